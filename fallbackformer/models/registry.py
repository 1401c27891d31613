"""A registry of model builders: ``create_model(name, **kwargs)`` in the style of timm.

Builders hold sizes; modules hold logic. A model built through the registry remembers how it was
built (``registry_name`` and ``registry_kwargs``) so that a bundle can rebuild it without pickling.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str) -> Callable[[F], F]:
    """Register a builder under ``name``.

    Args:
        name: the registry name, unique.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    >>> @register_model("my_student")
    ... def my_student(num_classes: int = 10) -> nn.Module: ...
    """

    def decorator(builder: F) -> F:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(
                f"model name {name!r} is already registered by {_BUILDERS[name].__module__}; "
                "choose another name"
            )
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    _import_builtin_models()
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (see :func:`list_models`).
        **kwargs: construction arguments passed to the builder; they are recorded on the model as
            ``registry_kwargs`` so a bundle can rebuild it.

    Returns:
        The model, with ``registry_name`` and ``registry_kwargs`` attributes.

    Raises:
        KeyError: for an unknown name; the message lists the known names.
    """
    _import_builtin_models()
    if name not in _BUILDERS:
        raise KeyError(
            f"unknown model {name!r}; registered models are {sorted(_BUILDERS)}. "
            "Register your own builder with fallbackformer.register_model(name)."
        )
    model = _BUILDERS[name](**kwargs)
    model.registry_name = name
    model.registry_kwargs = dict(kwargs)
    return model


def _import_builtin_models() -> None:
    # The reference models register themselves on import.
    from fallbackformer.models import classical, digits, tabular  # noqa: F401
