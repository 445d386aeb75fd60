"""Typed errors of the secure-aggregation core.

All derive from :class:`SecAggError` (itself a :class:`fedpeft.core.errors.FedPeftError`), so the
Flower integration can catch one type per round and record the reason.
"""

from __future__ import annotations

from fedpeft.core.errors import ConfigError, DataError, FedPeftError, PayloadError


class SecAggError(FedPeftError):
    """Base class of every error raised by ``fedpeft.secagg``."""


class SecAggConfigError(SecAggError, ConfigError):
    """A secure-aggregation parameter is invalid (names the parameter and its value)."""


class ModulusOverflowError(SecAggConfigError):
    """The planned modulus cannot hold the sum of ``n`` clipped, quantised updates."""


class InfeasiblePlanError(SecAggConfigError):
    """No (degree, threshold) meets the abort-probability target for this ``n`` and dropout."""


class UpdateError(SecAggError, DataError):
    """The update vector handed to a client is unusable (wrong shape, dtype or non-finite)."""


class MalformedMessageError(SecAggError, PayloadError):
    """A wire message is truncated, has trailing bytes, a bad header or out-of-range fields."""


class ProtocolError(SecAggError):
    """A well-formed message violates the protocol (sender, recipient set, sizes, content)."""


class StageError(ProtocolError):
    """A message or call arrived in a stage that does not accept it."""


class ShareDecryptionError(ProtocolError):
    """An encrypted Shamir share failed AEAD authentication or names the wrong parties."""


class RefusedError(ProtocolError):
    """A client refused a request that would reveal secrets (e.g. both share kinds of one peer)."""


class StateError(SecAggError, PayloadError):
    """An exported client state is truncated, garbled, of an unknown version or inconsistent."""


class AbortError(SecAggError):
    """The round cannot complete (too few survivors or shares); nothing more is revealed."""


class ShamirError(SecAggError):
    """Shamir secret sharing was called with invalid arguments."""


class InsufficientSharesError(ShamirError):
    """Fewer shares than the threshold were supplied for reconstruction."""


class AuthenticationError(ProtocolError):
    """A certificate or signature failed verification (authenticated SecAgg+)."""
