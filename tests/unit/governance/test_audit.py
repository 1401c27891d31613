"""scripts/audit.py verify: an intact log passes; an edit, a removal and a swap are named by record."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fallbackformer.governance.audit import verify_log
from fallbackformer.monitoring.audit_chain import ChainedLogFile, chain_files

ROOT = Path(__file__).resolve().parents[3]


def _cli():
    spec = importlib.util.spec_from_file_location("audit_cli", ROOT / "scripts" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.main


def _write(log: Path, n: int = 6, **kw) -> None:
    f = ChainedLogFile(log, policy_digest="p" * 64, **kw)
    for i in range(n):
        f.write_record({"request_id": f"r{i}", "reason": "low_confidence", "served_by": "student", "pad": "x" * 60})
    f.close()


def _lines(files: list[Path]) -> list[str]:
    return [ln for p in files for ln in p.read_text().splitlines()]


def _rewrite(files: list[Path], lines: list[str], per_file: list[int]) -> None:
    k = 0
    for p, n in zip(files, per_file):
        p.write_text("".join(ln + "\n" for ln in lines[k : k + n]))
        k += n


@pytest.fixture(params=[None, 200], ids=["one_file", "rotated"])
def log(request, tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write(path, max_bytes=request.param)
    return path


def _tamper(log: Path, how: str) -> None:
    files = chain_files(log)
    per_file = [len(p.read_text().splitlines()) for p in files]
    lines = _lines(files)
    if how == "edit":
        rec = json.loads(lines[2])
        rec["reason"] = "deadline_exceeded"
        lines[2] = json.dumps(rec, sort_keys=True)
    elif how == "remove":
        del lines[2]
        per_file[-1] -= 1  # (the last file gets one line fewer; lines shift across files)
    elif how == "swap":
        lines[2], lines[3] = lines[3], lines[2]
    _rewrite(files, lines, per_file)


def test_untouched_log_passes(log: Path, capsys) -> None:
    assert verify_log(log).ok
    assert _cli()(["verify", str(log)]) == 0
    assert "OK" in capsys.readouterr().out


@pytest.mark.parametrize("how,problem", [("edit", "changed"), ("remove", "removed"), ("swap", "moved")])
def test_tampering_names_record_3(log: Path, how: str, problem: str, capsys) -> None:
    _tamper(log, how)
    report = verify_log(log)
    assert not report.ok and report.bad_record == 3 and report.problem == problem
    assert _cli()(["verify", str(log)]) == 1
    assert f"record 3" in capsys.readouterr().out


def test_rotation_is_found_in_order(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, max_bytes=200)
    assert len(chain_files(log)) >= 3
    report = verify_log(log)
    assert report.ok and report.records == 6 and report.start_seq == 1


def test_retention_verifies_from_the_oldest_kept_record(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    _write(log, n=6, max_bytes=200, max_files=2)
    report = verify_log(log)
    assert report.ok and report.records == 2 and report.start_seq == 5 and "pruned" in report.message


def test_rehashed_edit_is_caught_by_the_next_record(tmp_path: Path) -> None:
    from fallbackformer.monitoring.audit_chain import record_hash

    log = tmp_path / "audit.jsonl"
    _write(log)
    lines = log.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["reason"] = "primary_error"
    rec["hash"] = record_hash(rec)
    lines[1] = json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")
    report = verify_log(log)
    assert (report.ok, report.bad_record, report.problem) == (False, 2, "changed")


def test_missing_log_exits_2(tmp_path: Path, capsys) -> None:
    assert _cli()(["verify", str(tmp_path / "nope.jsonl")]) == 2
    assert "no audit log" in capsys.readouterr().err
