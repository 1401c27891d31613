"""The manifest's optional ``label_free`` section: the fitted label-free accuracy estimator.

Registered when :mod:`fallbackformer.export` is imported (so before any ``ff.save`` or ``ff.load``).
At save it stores :meth:`~fallbackformer.runtime.label_free.LabelFreeEstimator.to_config` of the
model's estimator (``model.label_free``, or the one its bundle was loaded with) when it has one; at
load the content is validated and lands in ``model.bundle_sections["label_free"]``, where
:func:`~fallbackformer.runtime.label_free.label_free_estimator` and the online controller find it. A
bundle without the section loads as before (its controller estimates with the mean confidence); the
format version is unchanged (an optional section, see :mod:`fallbackformer.export.manifest`).
"""

from __future__ import annotations

from typing import Any

from fallbackformer.export.manifest import ManifestSection, register_section
from fallbackformer.runtime.label_free import LabelFreeEstimator, label_free_estimator

__all__ = ["LABEL_FREE_SECTION"]


def _to_config(model: Any) -> dict[str, Any] | None:
    est = label_free_estimator(model)
    return None if est is None else est.to_config()


LABEL_FREE_SECTION = register_section(ManifestSection("label_free", LabelFreeEstimator.from_config, _to_config))
