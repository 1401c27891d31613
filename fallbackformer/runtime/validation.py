"""Input validation: bad input gets a clear error that names the value and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


class InvalidInputError(ValueError):
    """The input does not match the model's input spec; the message says what and how to fix it."""


@dataclass(frozen=True)
class InputSpec:
    """The input as a user has it, before any model transform.

    Attributes:
        shape: per-sample shape (digits: ``(1, 8, 8)``).
        dtype: the expected floating dtype name.
        value_range: ``(low, high)`` of raw values (digits: ``(0, 16)``), or ``None``.
        description: a human-readable note (what the values mean).
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["value_range"] = list(self.value_range) if self.value_range is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        vr = data.get("value_range")
        return cls(
            shape=tuple(int(s) for s in data["shape"]),
            dtype=data.get("dtype", "float32"),
            value_range=(float(vr[0]), float(vr[1])) if vr is not None else None,
            description=data.get("description", ""),
        )


def check_batch(x: Any, spec: InputSpec | None) -> torch.Tensor:
    """Check the whole-batch properties (type, rank, shape, dtype); return the batch as float.

    Raises:
        InvalidInputError: naming the bad value and the fix.
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(
            f"input must be a torch.Tensor; got {type(x).__name__}. Wrap it: torch.as_tensor(x, dtype=torch.float32)"
        )
    if spec is None:
        if x.is_meta:
            raise InvalidInputError(
                f"input of shape {tuple(x.shape)} is on the meta device: it has a shape but no values; "
                "pass a tensor with data (e.g. torch.zeros(..., device='cpu'))"
            )
        if x.dim() < 1 or x.shape[0] == 0:
            raise InvalidInputError(f"input must be a non-empty batch [B, ...]; got shape {tuple(x.shape)}")
        return x
    shape, target = x.shape, _DTYPES.get(spec.dtype)
    if x.dtype == target and shape[1:] == spec.shape and len(shape) == len(spec.shape) + 1 and shape[0] > 0 and not x.is_meta:
        return x  # the common case, in as few steps as possible; anything else gets the checks below
    if x.is_meta:
        raise InvalidInputError(
            f"input of shape {tuple(x.shape)} is on the meta device: it has a shape but no values to "
            "answer. Pass a tensor with data (e.g. on 'cpu': x = torch.zeros(..., device='cpu')); a "
            "module built under torch.device('meta') needs to_empty(device='cpu') and its weights loaded"
        )
    expected = (len(spec.shape) + 1)
    if x.dim() == len(spec.shape) and tuple(x.shape) == spec.shape:
        raise InvalidInputError(
            f"input shape {tuple(x.shape)} has no batch dimension; expected [B, {', '.join(map(str, spec.shape))}]. "
            "Use x.unsqueeze(0) for a single sample"
        )
    if x.dim() != expected or tuple(x.shape[1:]) != spec.shape:
        raise InvalidInputError(
            f"input shape {tuple(x.shape)} does not match [B, {', '.join(map(str, spec.shape))}]"
            f" ({spec.description or 'the model input'}); reshape it to that"
        )
    if x.shape[0] == 0:
        raise InvalidInputError("input batch is empty (B=0); send at least one sample")
    if not torch.is_floating_point(x):
        if x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
            raise InvalidInputError(
                f"input dtype {x.dtype} is not floating; expected {spec.dtype}. Convert it: x.float()"
            )
        raise InvalidInputError(f"input dtype {x.dtype} is not supported; expected {spec.dtype}")
    target = _dtype(spec.dtype)
    if x.dtype == target:
        return x
    y = x.to(target)
    if torch.finfo(x.dtype).max > torch.finfo(target).max:  # a narrowing cast: remember overflows
        overflow = torch.isfinite(x) & ~torch.isfinite(y)
        if bool(overflow.any()):  # the message says so, rather than "NaN or inf"
            y._ff_cast_overflow = (x.dtype, x[overflow].abs().max().item())
    return y


def _overflow_of(x: torch.Tensor) -> tuple[torch.dtype, float] | None:
    """(source dtype, largest overflowing magnitude) when ``check_batch``'s cast made ``x`` overflow."""
    return getattr(x, "_ff_cast_overflow", None)


_DTYPES: dict[str, torch.dtype] = {}


def _dtype(name: str) -> torch.dtype:
    """``getattr(torch, name)``, memoised."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = _DTYPES[name] = getattr(torch, name)
    return dtype


def bad_samples(x: torch.Tensor, spec: InputSpec | None) -> torch.Tensor:
    """Per-sample problems: non-finite values, or values outside the spec's range. BoolTensor [B]."""
    flat = x.reshape(x.shape[0], -1)
    bad = ~torch.isfinite(flat).all(dim=1)
    if spec is not None and spec.value_range is not None:
        lo, hi = spec.value_range
        tol = 1e-3 * (hi - lo)
        bad |= (flat < lo - tol).any(dim=1) | (flat > hi + tol).any(dim=1)
    return bad


def describe_bad_samples(x: torch.Tensor, bad: torch.Tensor, spec: InputSpec | None) -> str:
    """A message naming the bad samples and the fix."""
    idx = torch.nonzero(bad).flatten().tolist()
    first = idx[0]
    vals = x[first].reshape(-1)
    finite = torch.isfinite(vals)
    overflow = _overflow_of(x)
    if not bool(finite.all()) and overflow is not None:
        src, biggest = overflow
        what = (
            f"values too large for {x.dtype} in sample {first} (the largest, {biggest:g}, is finite as "
            f"{src} but beyond {x.dtype}'s range of \u00b1{torch.finfo(x.dtype).max:.3g}: the cast overflows to inf)"
        )
        fix = "clip or rescale them before calling the model" + (
            f" (raw values in [{spec.value_range[0]:g}, {spec.value_range[1]:g}])" if spec and spec.value_range else ""
        )
    elif not bool(finite.all()):
        what = f"non-finite values (NaN or inf) in sample {first}"
        fix = "clean or drop those samples before calling the model"
    else:
        lo, hi = spec.value_range if spec and spec.value_range else (float("-inf"), float("inf"))
        what = f"values in [{vals.min().item():g}, {vals.max().item():g}] in sample {first}, outside the input range [{lo:g}, {hi:g}]"
        fix = f"send raw values in [{lo:g}, {hi:g}] ({spec.description if spec else ''}); do not pre-normalise"
    more = f" ({len(idx)} bad samples: {idx[:10]}{'...' if len(idx) > 10 else ''})"
    return f"invalid input: {what}{more}; {fix}"
