"""Issue 12: saves and loads running together. Every load returns a model whose weights match the
manifest it read (both models from one save), or raises BundleError; nothing else. A loader paused at
each point of its read while a whole save runs, and a save paused at each of its file-system steps
while a whole load runs, must both give a whole bundle, old or new."""

from __future__ import annotations

import builtins
import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import fallbackformer as ff
from fallbackformer.export.bundle import MANIFEST, BundleError, load, save

TIMEOUT = 60.0  # a barrier that waits this long means a deadlock: fail, never hang


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _label(loaded: ff.FallbackModel, refs: dict[str, dict[str, dict[str, torch.Tensor]]]) -> str:
    """Which saved model ``loaded`` is, checking that both its parts come from that one save."""
    for label, ref in refs.items():
        if all(
            loaded_part.keys() == ref[role].keys() and all(torch.equal(loaded_part[k], ref[role][k]) for k in loaded_part)
            for role, loaded_part in (("primary", loaded.primary.state_dict()), ("student", loaded.student.state_dict()))
        ):
            return label
    raise AssertionError("a load mixed the parts of two saves (or served weights nobody saved)")


@pytest.fixture
def refs(model_a, model_b):
    return {
        "a": {"primary": _weights(model_a.primary), "student": _weights(model_a.student)},
        "b": {"primary": _weights(model_b.primary), "student": _weights(model_b.student)},
    }


def _check(loaded: ff.FallbackModel, refs, hashes: dict[str, str]) -> str:
    label = _label(loaded, refs)
    assert loaded.model_hashes["primary"] == hashes[label], "the weights served are not the ones the manifest hashes"
    return label


@pytest.fixture
def hashes(model_a, model_b, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    return {label: load(save(m, root / label)).model_hashes["primary"] for label, m in (("a", model_a), ("b", model_b))}


class _Pause:
    """Pause ``thread`` at its ``k``-th hooked call until the other side has run a whole operation."""

    def __init__(self, k: int) -> None:
        self.k, self.calls, self.thread = k, 0, None
        self.reached = threading.Barrier(2, timeout=TIMEOUT)
        self.resume = threading.Barrier(2, timeout=TIMEOUT)
        self.hit = False

    def __call__(self) -> None:
        if threading.current_thread() is not self.thread:
            return
        self.calls += 1
        if self.calls == self.k:
            self.hit = True
            self.reached.wait()
            self.resume.wait()


def _hook(monkeypatch, module, name: str, pause: _Pause) -> None:
    real = getattr(module, name)

    def hooked(*args, **kwargs):
        pause()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, hooked)


def _run_paused(pause: _Pause, paused_fn, other_fn):
    """Run ``paused_fn`` in a thread; at the pause point run ``other_fn`` here; return both results."""
    out: dict[str, object] = {}

    def target():
        try:
            out["paused"] = paused_fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out["paused_error"] = exc
        finally:
            if not pause.hit:  # never reached the point: release the main thread
                pause.reached.abort()

    t = threading.Thread(target=target)
    pause.thread = t
    t.start()
    try:
        pause.reached.wait()
    except threading.BrokenBarrierError:
        t.join(TIMEOUT)
        return out, None
    try:
        other = other_fn()
    finally:
        pause.resume.wait()
        t.join(TIMEOUT)
    return out, other


LOADER_POINTS = range(1, 7)  # each file the loader opens (manifest, weights) and the steps around them


@pytest.mark.parametrize("k", LOADER_POINTS)
def test_a_save_between_any_two_reads_of_a_load(model_a, model_b, refs, hashes, tmp_path, monkeypatch, k):
    path = tmp_path / "b"
    save(model_a, path)
    pause = _Pause(k)
    for module, name in ((os, "open"), (builtins, "open"), (io, "open"), (os, "stat"), (os, "lstat")):
        _hook(monkeypatch, module, name, pause)
    out, _ = _run_paused(pause, lambda: load(path), lambda: save(model_b, path))
    if not pause.hit:
        pytest.skip(f"the loader makes fewer than {k} hooked calls")
    error = out.get("paused_error")
    assert error is None, f"the load failed while a save replaced the bundle: {error!r}"
    assert _check(out["paused"], refs, hashes) in ("a", "b")
    assert _check(load(path), refs, hashes) == "b"


SAVER_STEPS = [("os", "replace"), ("os", "rename"), ("shutil", "rmtree"), ("os", "symlink")]


@pytest.mark.parametrize("module_name, name", SAVER_STEPS)
def test_a_load_between_any_two_steps_of_a_save(model_a, model_b, refs, hashes, tmp_path, monkeypatch, module_name, name):
    path = tmp_path / "b"
    save(model_a, path)
    pause = _Pause(1)
    _hook(monkeypatch, {"os": os, "shutil": shutil}[module_name], name, pause)
    out, loaded = _run_paused(pause, lambda: save(model_b, path), lambda: load(path))
    if not pause.hit:
        pytest.skip(f"the save does not call {module_name}.{name}")
    assert out.get("paused_error") is None, out.get("paused_error")
    assert _check(loaded, refs, hashes) in ("a", "b")
    assert _check(load(path), refs, hashes) == "b"


@pytest.mark.realtime
def test_saves_and_loads_running_together_for_ten_seconds(model_a, model_b, refs, hashes, tmp_path):
    path = tmp_path / "b"
    save(model_a, path)
    stop = threading.Event()
    errors: list[BaseException] = []
    seen = {"a": 0, "b": 0, "refused": 0}

    def saver():
        i = 0
        while not stop.is_set():
            try:
                save((model_a, model_b)[i % 2], path)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return
            i += 1

    def loader():
        while not stop.is_set():
            try:
                seen[_check(load(path), refs, hashes)] += 1
            except BundleError:
                seen["refused"] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=saver), threading.Thread(target=loader), threading.Thread(target=loader)]
    for t in threads:
        t.start()
    time.sleep(10.0)
    stop.set()
    for t in threads:
        t.join(60.0)
    assert not errors, errors[:3]
    assert seen["a"] + seen["b"] > 0
    leftovers = [p.name for p in Path(tmp_path).iterdir() if p.name not in ("b", ".b.lock") and not p.name.startswith("b.v-")]
    assert leftovers == []
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("b.v-")]) == 1
    assert (path / MANIFEST).is_file()
