"""The one JSON form of the project's values: every file fallbackformer writes goes through here.

JSON has no NaN and no infinity, so :func:`json_safe` writes

* ``NaN`` as ``null`` (in the project a NaN metric means "undefined", as ``None`` does),
* ``+inf`` / ``-inf`` as the strings ``"inf"`` / ``"-inf"`` (a threshold of ``inf`` accepts nothing:
  a real value, kept),
* tensors and numpy arrays as (nested) lists, numpy and 0-d tensor scalars as Python numbers,
  tuples as lists, dataclasses as their fields, paths as strings,

and refuses anything else with a ``TypeError`` that names where the value sits. Mapping keys stay
as they are when JSON can hold them (``str``, ``int``, ``float``, ``bool``, ``None``), else
``str(key)``. :func:`parse_json_float` reads a number back, accepting the older ``"nan"`` string too
(bundle manifests of format 1 and 2 wrote it).

>>> json_safe({"a": float("nan"), "b": (1.0, float("-inf")), 3: torch.tensor([0.5])})
{'a': None, 'b': [1.0, '-inf'], 3: [0.5]}
>>> dumps({"threshold": float("inf")})
'{"threshold": "inf"}'
>>> parse_json_float("inf"), parse_json_float(None)
(inf, nan)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import torch

__all__ = ["dumps", "json_float", "json_safe", "parse_json_float"]

_KEY_TYPES = (str, int, float, bool, type(None))
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def json_float(x: float | None) -> float | str | None:
    """One number in its JSON form: ``None`` and NaN as ``None``, infinities as ``"inf"`` / ``"-inf"``.

    >>> [json_float(v) for v in (1.5, float("nan"), float("inf"), float("-inf"), None)]
    [1.5, None, 'inf', '-inf', None]
    """
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def parse_json_float(x: Any, missing: float = math.nan) -> float:
    """A number written by :func:`json_float` (or a bare number) back as a float.

    Args:
        x: a number, ``"inf"``, ``"-inf"``, ``"nan"`` or ``None``.
        missing: the value of ``None`` (NaN by default; a threshold reads it as ``inf``, say).

    Raises:
        ValueError: for any other string, or a bool.
    """
    if x is None:
        return missing
    if isinstance(x, bool):
        raise ValueError(f"expected a number, 'inf', '-inf', 'nan' or null; got the bool {x!r}")
    if isinstance(x, str):
        if x not in _NONFINITE:
            raise ValueError(f"expected a number, 'inf', '-inf', 'nan' or null; got the string {x!r:.80}")
        return _NONFINITE[x]
    return float(x)


def json_safe(obj: Any, where: str = "value") -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts (see the module doc).

    Args:
        obj: numbers, strings, bools, ``None``, mappings, lists, tuples, tensors, numpy values,
            dataclass instances and paths, nested in any way.
        where: a name for ``obj`` in the error message (``"policy"``, ``"gate exit_1"``).

    Raises:
        TypeError: for a value of another type, naming where it sits (``where.key[2]``).
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return json_float(obj)
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, _KEY_TYPES) else str(k)): json_safe(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.detach().cpu().tolist(), where)
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):  # numpy scalars and arrays (no numpy import)
        return json_safe(obj.tolist(), where)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(dataclasses.asdict(obj), where)
    if isinstance(obj, PurePath):
        return str(obj)
    raise TypeError(
        f"{where} holds a {type(obj).__name__} ({obj!r:.80}), which JSON cannot store; "
        "pass numbers, strings, lists, dicts, tensors or dataclasses"
    )


def dumps(obj: Any, *, indent: int | None = None, sort_keys: bool = False, where: str = "value") -> str:
    """``json.dumps`` of :func:`json_safe` (``obj``), strict (``allow_nan=False``)."""
    return json.dumps(json_safe(obj, where), indent=indent, sort_keys=sort_keys, allow_nan=False)
