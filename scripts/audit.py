"""Audit-log tools (a plain command line: it takes a file).

    python scripts/audit.py verify runs/.../fallbacks.jsonl

``verify`` checks the hash chain of the log and its rotated siblings (``LOG.N`` ... ``LOG.1``,
``LOG``); it exits 0 when intact and 1 naming the first record (counted from 1) that was changed,
removed or moved.
"""

from __future__ import annotations

import argparse
import sys

from fallbackformer.common.jsonsafe import dumps
from fallbackformer.governance.audit import verify_log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audit.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check the hash chain of an audit log")
    v.add_argument("log", help="the log file a JsonlFileSink writes (rotated LOG.1, LOG.2 ... are found)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = verify_log(args.log)
    except FileNotFoundError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(dumps(report.__dict__, indent=2, where="audit report"))
    else:
        print(f"{'OK' if report.ok else 'FAILED'}: {args.log}: {report.message}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
