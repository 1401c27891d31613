"""Who can serve an answer, by name, and what counts as a fallback: built here and nowhere else.

The ``served_by`` vocabulary: ``exit_1`` .. ``exit_{E-1}`` (the primary's early exits, in order),
``primary`` (its final head), ``student``, ``cache`` (the response cache of the ladder) and
``default`` (the safe default). The primary's exits
and its final head are **the primary's own path**; an answer is a **fallback** when anything else
served it. Events, ``FallbackModel.stats()``, the metrics, the monitors and the report all count
fallbacks with :func:`is_fallback`.

>>> path_names(3)
['exit_1', 'exit_2', 'primary', 'student']
>>> [is_fallback(s) for s in ("exit_1", "primary", "student", "default")]
[False, False, True, True]
>>> exit_index("exit_2"), exit_index("primary")
(2, None)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CACHE",
    "DEFAULT",
    "EXIT_PREFIX",
    "PRIMARY",
    "STUDENT",
    "exit_index",
    "exit_name",
    "exit_names",
    "fallback_count",
    "is_fallback",
    "is_primary_path",
    "path_names",
    "served_by_codes",
]

EXIT_PREFIX = "exit_"
PRIMARY = "primary"
STUDENT = "student"
CACHE = "cache"
DEFAULT = "default"


def exit_name(i: int) -> str:
    """The name of early exit ``i`` (1-based): ``exit_name(1) == "exit_1"``."""
    if i < 1:
        raise ValueError(f"exits are numbered from 1; got {i!r}")
    return f"{EXIT_PREFIX}{i}"


def exit_names(num_heads: int) -> list[str]:
    """The names of a primary's heads: ``num_heads - 1`` early exits, then ``"primary"``."""
    if num_heads < 1:
        raise ValueError(f"a primary has at least one head (its final one); got num_heads={num_heads!r}")
    return [exit_name(i + 1) for i in range(num_heads - 1)] + [PRIMARY]


def path_names(num_heads: int) -> list[str]:
    """Every path that has a gate, in cascade order: the primary's heads, then ``"student"``."""
    return exit_names(num_heads) + [STUDENT]


def served_by_codes(paths: Iterable[str]) -> list[str]:
    """``served_by`` values in code order (ONNX, Triton, the manifest): the paths, then ``"default"``."""
    return list(paths) + [DEFAULT]


def exit_index(name: str) -> int | None:
    """``i`` for ``"exit_<i>"``; ``None`` for any other name."""
    if name.startswith(EXIT_PREFIX) and name[len(EXIT_PREFIX):].isdigit():
        return int(name[len(EXIT_PREFIX):])
    return None


def is_primary_path(served_by: str) -> bool:
    """Whether the primary's own path served: its final head or one of its early exits."""
    return served_by == PRIMARY or exit_index(served_by) is not None


def is_fallback(served_by: str) -> bool:
    """Whether an answer is a fallback: anything but the primary's own path served it."""
    return not is_primary_path(served_by)


def fallback_count(served_by: Iterable[str]) -> int:
    """How many of ``served_by`` are fallbacks."""
    return sum(1 for s in served_by if is_fallback(s))
