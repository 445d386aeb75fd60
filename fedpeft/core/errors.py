"""Typed errors for fedpeft.

Every error says what was wrong and what to do about it. Packages define their own subclasses
(for example ``fedpeft.privacy.accounting.errors``) but all derive from :class:`FedPeftError`, so a
caller can catch one type at the edge (the CLI prints the message and exits non-zero).
"""

from __future__ import annotations


class FedPeftError(Exception):
    """Base class of every error fedpeft raises on purpose."""


class ConfigError(FedPeftError, ValueError):
    """A configuration value is invalid. The message names the parameter and its value."""


class UnknownNameError(ConfigError, KeyError):
    """A name (preset, method, model, partitioner, ...) is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DataError(FedPeftError):
    """Input data is missing, empty or malformed."""


class ModelError(FedPeftError):
    """A model cannot be loaded or does not fit the requested adapter."""


class PayloadError(FedPeftError, ValueError):
    """A tensor payload received from a peer does not match what was expected."""


class ClientFault(FedPeftError):
    """A client failed a round; the coordinator removes it from that round and records why."""


def require(condition: bool, error: type[FedPeftError], message: str) -> None:
    """Raise ``error(message)`` unless ``condition`` holds (an ``assert`` that survives ``-O``)."""
    if not condition:
        raise error(message)
