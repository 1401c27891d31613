"""BENCHMARKS.md from its template, every figure read from the run's JSON.

The template (``BENCHMARKS.md.tmpl`` beside this module) holds all the prose; Python only formats
values. Placeholders are ``${dotted.path}`` or ``${dotted.path|format}`` into the results, with the
formats of :data:`FORMATS`. A line that starts with ``?? `` is optional: it is dropped when one of its
placeholders is missing (a variant the config left out); any other missing placeholder is an error. A
figure stored as ``null`` (undefined on this run: NaN) reads ``n/a``; ``"inf"`` reads ``inf``.
Each section's text lies between ``<!-- section: NAME -->`` and ``<!-- end: NAME -->`` and is rendered
only when the run has that section; a section that reports a ``status`` (not available, failed) is
rendered as its heading and that status; a section the template does not know is rendered as a
key/value table under its name.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fallbackformer.common.jsonsafe import parse_json_float

__all__ = ["FORMATS", "TEMPLATE", "placeholders", "render_markdown", "write_markdown"]

TEMPLATE = Path(__file__).with_name("BENCHMARKS.md.tmpl")

_SECTION = re.compile(r"<!-- section: (?P<name>\w+) -->\n(?P<body>.*?)<!-- end: (?P=name) -->\n?", re.S)
_OPTIONAL = "?? "


class _Template(string.Template):
    idpattern = r"(?!)"  # only the braced form ${...}; a bare $name is an error
    braceidpattern = r"[A-Za-z_][A-Za-z0-9_.]*(?:\|[a-z0-9_]+)?"


def fmt(v: Any) -> str:
    """A value as the page shows it: 4 significant digits, yes/no, ``k: v`` lists."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def _table(rows: list[list[Any]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _as_table(v: Any) -> str:
    """A list of dicts (one row each) or a dict of dicts (one row per key) as a Markdown table."""
    if isinstance(v, Mapping):
        rows = [{"name": k, **(x if isinstance(x, Mapping) else {"value": x})} for k, x in v.items()]
    else:
        rows = list(v)
    if not rows:
        return "(none)"
    header: list[str] = []
    for r in rows:
        header += [k for k in r if k not in header]
    return _table([[r.get(k, "") for k in header] for r in rows], header)


def _num(v: Any) -> float:
    """A number as ``benchmark.json`` stores it (``"inf"``, ``"-inf"``, ``null`` for NaN) back as a float."""
    return parse_json_float(v) if v is None or isinstance(v, str) else v


def _kv(v: Mapping[str, Any]) -> str:
    return _table([[k, x] for k, x in v.items()], ["figure", "value"])


#: ``${path|name}``: how a value is written
FORMATS: dict[str, Callable[[Any], str]] = {
    "f1": lambda v: f"{_num(v):.1f}",
    "f2": lambda v: f"{_num(v):.2f}",
    "f3": lambda v: f"{_num(v):.3f}",
    "f4": lambda v: f"{_num(v):.4f}",
    "pct": lambda v: f"{100 * _num(v):.1f}%",
    "range": lambda v: f"{_num(v[0]):.3f}-{_num(v[1]):.3f}",
    "g": lambda v: f"{_num(v):g}",
    "table": _as_table,
    "kv": _kv,
}


class _Fields(Mapping[str, str]):
    """The results seen as placeholders: ``fields["a.b|f3"]`` is ``results["a"]["b"]`` formatted."""

    def __init__(self, results: Mapping[str, Any]) -> None:
        self.results = results

    def __getitem__(self, key: str) -> str:
        path, _, form = key.partition("|")
        value: Any = self.results
        for part in path.split("."):
            if not isinstance(value, Mapping) or part not in value:
                raise KeyError(key)
            value = value[part]
        if value is None:  # a figure that is undefined on this run (NaN, stored as null)
            return "n/a"
        return FORMATS[form](value) if form else fmt(value)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def placeholders(text: str) -> list[str]:
    """Every ``${...}`` placeholder of ``text``, in order."""
    return [m.group("braced") for m in _Template.pattern.finditer(text) if m.group("braced")]


def _render_block(body: str, fields: _Fields) -> str:
    out = []
    for line in body.split("\n"):
        if line.startswith(_OPTIONAL):
            try:
                out.append(_Template(line[len(_OPTIONAL):]).substitute(fields))
            except KeyError:
                continue
        else:
            out.append(_Template(line).substitute(fields))
    return "\n".join(out)


def render_markdown(results: Mapping[str, Any], template: str | None = None) -> str:
    """The page for ``results`` (the JSON of one run).

    Raises:
        KeyError: a required placeholder has no value in ``results``.
    """
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    fields = _Fields(results)
    parts: list[str] = []
    known: set[str] = set()
    pos = 0
    for m in _SECTION.finditer(text):
        parts.append(_render_block(text[pos : m.start()], fields))
        pos = m.end()
        name, body = m.group("name"), m.group("body")
        known.add(name)
        value = results.get(name)
        if value is None:
            continue
        if isinstance(value, Mapping) and "status" in value:
            heading = body.split("\n", 1)[0]
            parts.append(f"{heading}\n\n{value['status']}\n\n")
        else:
            parts.append(_render_block(body, fields))
    parts.append(_render_block(text[pos:], fields))
    for name, value in results.items():
        if name in known or name in ("machine", "config"):
            continue
        parts.append(f"## {name}\n\n" + (_kv(value) if isinstance(value, Mapping) else fmt(value)) + "\n\n")
    return "".join(parts)


def write_markdown(results: Mapping[str, Any], path: Path, template: str | None = None) -> None:
    """Render :func:`render_markdown` into ``path``."""
    path.write_text(render_markdown(results, template), encoding="utf-8")
