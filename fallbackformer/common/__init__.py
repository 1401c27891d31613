"""fallbackformer.common: the vocabulary every package shares, below ``models/`` in the import order.

* :mod:`~fallbackformer.common.paths`: the ``served_by`` names (``exit_<i>``, ``primary``,
  ``student``, ``default``) and the one definition of a fallback.
* :mod:`~fallbackformer.common.jsonsafe`: the one JSON form of numbers (``NaN`` as ``null``,
  infinities as ``"inf"`` / ``"-inf"``) that every writer uses, and its reader.

Standard library and torch only; nothing here imports another fallbackformer package.
"""
