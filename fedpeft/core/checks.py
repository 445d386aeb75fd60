"""Small value checks shared by the validated configs (no dependencies)."""

from __future__ import annotations


def is_real(value: object) -> bool:
    """A Python ``int`` or ``float`` that is not a ``bool`` (``True`` is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

