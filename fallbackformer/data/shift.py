"""The shift suite: MNIST-C-style corruptions of digits images at five severities.

Images are the raw digits input: float tensors ``[N, 1, 8, 8]`` with values in ``0..16`` (background 0).
Every corruption keeps shape and dtype, clamps to ``0..16`` and is deterministic for a seed: its
randomness comes from a private ``torch.Generator`` seeded from ``(seed, name, severity)``, never from
the global RNG. Severity runs from 1 (mild) to 5 (harsh); the mean distortion from the clean image
grows strictly with severity (checked by ``tests/unit/data/test_shift.py``).

Two groups:

* ``TUNING_CORRUPTIONS`` (15 types) may be used to choose anything (thresholds, policies, models).
* ``HELD_OUT`` (4 types) must never be used for tuning; they exist to measure how the system does on
  shift nobody looked at. ``configs/shift/default.yaml`` lists them under ``held_out``.

The corruptions themselves are in :mod:`fallbackformer.data.image_corruptions`; this module applies
them (:func:`corrupt`), names and caches the shift sets and holds the configured :class:`ShiftSuite`.

>>> import torch
>>> x = torch.rand(4, 1, 8, 8) * 16
>>> y = corrupt(x, "rotate", 3, seed=0)
>>> y.shape, y.dtype
(torch.Size([4, 1, 8, 8]), torch.float32)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fallbackformer.data.image_corruptions import (
    CORRUPTIONS,
    HELD_OUT,
    MAX_VALUE,
    SHIFT_VERSION,
    STOCHASTIC,
    TUNING_CORRUPTIONS,
)

__all__ = [
    "CORRUPTIONS",
    "HELD_OUT",
    "TUNING_CORRUPTIONS",
    "STOCHASTIC",
    "SEVERITIES",
    "MAX_VALUE",
    "SHIFT_VERSION",
    "ShiftSuite",
    "corrupt",
    "corruption_generator",
    "make_shift_sets",
    "set_key",
    "parse_set_key",
    "tuning_sets",
]

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)


# --------------------------------------------------------------------------------------------------
# public API


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise KeyError(
            f"unknown corruption {name!r}; valid names: {sorted(CORRUPTIONS)} "
            f"(held out, never for tuning: {sorted(HELD_OUT)})"
        )


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or int(severity) != severity or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def corruption_generator(seed: int, name: str, severity: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, name, severity)`` via SHA-256 (stable across runs)."""
    digest = hashlib.sha256(f"fallbackformer.shift/{int(seed)}/{name}/{int(severity)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply one corruption at one severity.

    Args:
        images: raw images ``[N, C, H, W]`` (digits: ``[N, 1, 8, 8]``), floating point, values 0..16.
        name: a key of :data:`CORRUPTIONS`.
        severity: 1 (mild) .. 5 (harsh).
        seed: the same seed, name, severity and input give the same output, bit for bit.

    Returns:
        The corrupted images: same shape, dtype and device, clamped to ``0..16``.

    Raises:
        KeyError: unknown ``name`` (the message lists the valid names).
        ValueError: bad severity, shape or dtype.
    """
    _check_name(name)
    _check_severity(severity)
    if not isinstance(images, Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a 4-D tensor [N, C, H, W], got {shape}; add a channel dim with x[:, None]")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}; convert with images.float()")
    if images.shape[0] == 0:
        return images.clone()
    gen = corruption_generator(seed, name, int(severity))
    with torch.no_grad():
        out = CORRUPTIONS[name](images, int(severity), gen)
        out = out.to(images.dtype).clamp_(0.0, MAX_VALUE)
    assert out.shape == images.shape, f"{name} changed the shape {tuple(images.shape)} -> {tuple(out.shape)}"
    return out.contiguous()


def set_key(name: str, severity: int) -> str:
    """The name of one shift set: ``"<corruption>/<severity>"``."""
    return f"{name}/{int(severity)}"


def parse_set_key(key: str) -> tuple[str, int] | None:
    """``"rotate/3"`` -> ``("rotate", 3)``; any other key (``"clean"``) -> ``None``."""
    name, sep, sev = key.rpartition("/")
    if not sep or name not in CORRUPTIONS or not sev.isdigit():
        return None
    return name, int(sev)


def _input_hash(images: Tensor, labels: Tensor) -> str:
    h = hashlib.sha256()
    for t in (images, labels):
        a = t.detach().to("cpu").contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.view(-1).view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()[:16]


def _cache_path(cache_dir: Path, name: str, severity: int, seed: int, digest: str) -> Path:
    return cache_dir / f"{name}_s{int(severity)}_seed{int(seed)}_v{SHIFT_VERSION}_{digest}.safetensors"


def _load_cached(path: Path, like: Tensor) -> Tensor | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))["images"]
    except Exception:  # a torn or foreign file: recompute and overwrite
        return None
    if t.shape != like.shape or t.dtype != like.dtype:
        return None
    return t.to(like.device)


def _save_atomic(path: Path, images: Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({"images": images.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def make_shift_sets(
    images: Tensor,
    labels: Tensor,
    names: Iterable[str] | None = None,
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """Build the shift sets ``"<name>/<severity>" -> (corrupted images, labels)``.

    Args:
        images: clean raw images ``[N, C, H, W]`` in 0..16 (the test split; never train/val/calibration).
        labels: ``[N]`` labels; returned unchanged with every set.
        names: corruptions to build; ``None`` builds all of :data:`CORRUPTIONS` (held-out ones included).
        severities: severities to build, each in 1..5.
        seed: the suite's seed.
        cache_dir: if given, each set is stored as a safetensors file keyed by name, severity, seed,
            :data:`SHIFT_VERSION` and a hash of the input, and read back on later calls.

    Returns:
        An insertion-ordered dict (names outer, severities inner).
    """
    names = list(CORRUPTIONS) if names is None else list(names)
    severities = [int(s) for s in severities]
    for name in names:
        _check_name(name)
    for s in severities:
        _check_severity(s)
    if labels.shape[:1] != images.shape[:1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}: one label per image")
    cache = Path(cache_dir) if cache_dir is not None else None
    digest = _input_hash(images, labels) if cache is not None else ""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name in names:
        for s in severities:
            x = None
            if cache is not None:
                path = _cache_path(cache, name, s, seed, digest)
                if path.exists():
                    x = _load_cached(path, images)
            if x is None:
                x = corrupt(images, name, s, seed)
                if cache is not None:
                    _save_atomic(path, x)
            out[set_key(name, s)] = (x, labels)
    return out


@dataclass
class ShiftSuite:
    """The digits shift suite as configured (``configs/shift/default.yaml`` and ``smoke.yaml``).

    A :class:`~fallbackformer.data.protocol.ShiftSuiteLike`: the pipeline, the router's mixture and
    AugMix reach the corruptions through :meth:`corrupt`.

    Attributes:
        names: corruptions that may be used for tuning and are evaluated.
        held_out: corruptions evaluated but never used for tuning; must be a subset of :data:`HELD_OUT`
            or at least disjoint from ``names``.
        severities: severities per corruption.
        seed: the suite's seed.
        cache_dir: where sets are cached (``None``: no cache).
    """

    names: Sequence[str] = field(default_factory=lambda: list(TUNING_CORRUPTIONS))
    held_out: Sequence[str] = field(default_factory=lambda: sorted(HELD_OUT))
    severities: Sequence[int] = field(default_factory=lambda: list(SEVERITIES))
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        self.names = list(self.names)
        self.held_out = list(self.held_out)
        self.severities = [int(s) for s in self.severities]
        for n in [*self.names, *self.held_out]:
            _check_name(n)
        for s in self.severities:
            _check_severity(s)
        both = set(self.names) & set(self.held_out)
        if both:
            raise ValueError(f"corruptions {sorted(both)} are both tunable and held out; list each in one place")

    @property
    def value_range(self) -> tuple[float, float]:
        """The raw pixel range every corruption keeps: ``(0, 16)``."""
        return (0.0, MAX_VALUE)

    @property
    def all_names(self) -> list[str]:
        """Tunable names then held-out names."""
        return [*self.names, *self.held_out]

    def is_held_out(self, key: str) -> bool:
        """Whether a set key (``"fog/3"``) or corruption name belongs to a held-out corruption."""
        parsed = parse_set_key(key)
        name = parsed[0] if parsed else key
        return name in self.held_out

    def corrupt(self, x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
        """One corruption of this suite (tunable or held out), see :func:`corrupt`."""
        if name not in self.all_names:
            raise KeyError(f"corruption {name!r} is not in this suite; its names are {self.all_names}")
        return corrupt(x, name, severity, seed)

    def build(
        self, images: Tensor, labels: Tensor, include_held_out: bool = True
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """All sets of the suite for the given clean split. Pass ``include_held_out=False`` when tuning."""
        names = self.all_names if include_held_out else list(self.names)
        return make_shift_sets(images, labels, names, self.severities, self.seed, self.cache_dir)

    def to_dict(self) -> dict[str, object]:
        """JSON-able description (for reports and manifests)."""
        return {
            "names": list(self.names),
            "held_out": list(self.held_out),
            "severities": list(self.severities),
            "seed": int(self.seed),
            "version": SHIFT_VERSION,
        }


def tuning_sets(sets: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Drop every held-out set from ``sets`` (use before anything that tunes)."""
    return {k: v for k, v in sets.items() if not ((p := parse_set_key(k)) and p[0] in HELD_OUT)}
