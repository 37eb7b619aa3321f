"""Validation shared by the config dataclasses (called from their ``__post_init__``)."""

from __future__ import annotations

from typing import Any


def require_ints(cfg: Any, names: tuple[str, ...], minimum: int = 1) -> None:
    """Raise ``ValueError`` naming the class, field and value unless each field is an int >= minimum."""
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ValueError(f"{type(cfg).__name__}.{name}={value!r}: expected {expected}.")
