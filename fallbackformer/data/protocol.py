"""What the pipeline needs from a dataset and from its shift suite, whatever the modality.

The pipeline, the evaluation and the router step talk to data only through these two protocols, so
a new dataset is a datamodule and a shift suite that satisfy them (``configs/data/<name>.yaml`` and
``configs/shift/<name>.yaml``); nothing outside the dataset's own files knows its shape or its
corruptions.

>>> from fallbackformer.data.datamodule import DigitsDataModule
>>> isinstance(DigitsDataModule(), DataSource)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from fallbackformer.runtime.validation import InputSpec

__all__ = ["DataSource", "ShiftSuiteLike", "check_data_source", "check_shift_suite", "parse_set_key", "set_key"]

Splits = dict[str, tuple[Tensor, Tensor]]


@runtime_checkable
class DataSource(Protocol):
    """A datamodule as the pipeline sees it.

    Attributes:
        input_spec: the raw input a user sends (shape per sample, dtype, value range); it goes into
            the :class:`~fallbackformer.FallbackModel` and the bundle's manifest.
        class_names: one name per class, by index.
        num_classes: ``len(class_names)``.
        splits: ``{"train", "val", "calibration", "test"} -> (inputs [N, ...], labels int64 [N])``,
            available after ``setup()``.
    """

    @property
    def input_spec(self) -> InputSpec: ...

    @property
    def class_names(self) -> list[str]: ...

    @property
    def num_classes(self) -> int: ...

    splits: Splits

    def setup(self, stage: str | None = None) -> None: ...


@runtime_checkable
class ShiftSuiteLike(Protocol):
    """A shift suite: named shifts at several severities of a dataset's test split.

    Attributes:
        names: shifts that may be used for tuning (the router's mixture, AugMix) and are evaluated.
        held_out: shifts that are evaluated but never used to fit or choose anything.
        severities: the severities built per shift (1 mild .. 5 harsh).
    """

    names: Sequence[str]
    held_out: Sequence[str]
    severities: Sequence[int]

    @property
    def all_names(self) -> list[str]: ...

    def build(self, images: Tensor, labels: Tensor, include_held_out: bool = True) -> Splits:
        """``{"<name>/<severity>": (inputs, labels)}`` made from a clean split."""
        ...

    def corrupt(self, x: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
        """One shift applied to inputs ``x`` (same shape and dtype), deterministic for ``seed``."""
        ...

    def is_held_out(self, key: str) -> bool: ...

    def to_dict(self) -> dict[str, Any]: ...


def check_data_source(obj: Any) -> DataSource:
    """``obj`` if it satisfies :class:`DataSource`; otherwise a TypeError naming what is missing."""
    missing = [a for a in ("input_spec", "class_names", "num_classes", "splits", "setup") if not hasattr(obj, a)]
    if missing:
        raise TypeError(
            f"datamodule {type(obj).__name__} lacks {missing}; give it the properties input_spec, "
            "class_names, num_classes and splits (see fallbackformer.data.protocol.DataSource)"
        )
    return obj


def check_shift_suite(obj: Any) -> ShiftSuiteLike:
    """``obj`` if it satisfies :class:`ShiftSuiteLike`; otherwise a TypeError naming what is missing."""
    needed = ("names", "held_out", "severities", "all_names", "build", "corrupt", "is_held_out", "to_dict")
    missing = [a for a in needed if not hasattr(obj, a)]
    if missing:
        raise TypeError(
            f"shift suite {type(obj).__name__} lacks {missing}; see fallbackformer.data.protocol.ShiftSuiteLike "
            "(configs/shift/<name>.yaml must build one)"
        )
    return obj


def set_key(name: str, severity: int) -> str:
    """The name of one shift set: ``"<shift>/<severity>"``."""
    return f"{name}/{int(severity)}"


def parse_set_key(key: str) -> tuple[str, int] | None:
    """``"rotate/3"`` -> ``("rotate", 3)``; a key without a ``/<severity>`` suffix (``"clean"``) -> ``None``.

    Unlike :func:`fallbackformer.data.shift.parse_set_key` it accepts any suite's shift names.
    """
    name, sep, sev = key.rpartition("/")
    if not sep or not name or not sev.isdigit():
        return None
    return name, int(sev)
