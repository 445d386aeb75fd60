"""Errors of :mod:`fedpeft.data` (all derive from :class:`fedpeft.core.errors.DataError`)."""

from __future__ import annotations

from fedpeft.core.errors import DataError


class MissingDataError(DataError):
    """A data file is not where it was looked for. The message lists the places searched."""


__all__ = ["DataError", "MissingDataError"]
