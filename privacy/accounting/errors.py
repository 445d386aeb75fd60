"""Typed errors of the privacy accounting layer.

All derive from :class:`fedpeft.core.errors.FedPeftError`; every message names the parameter or
file involved, its value, and what to do.
"""

from __future__ import annotations

from fedpeft.core.errors import ConfigError, FedPeftError


class AccountingError(FedPeftError):
    """Base class of errors raised by ``fedpeft.privacy.accounting``."""


class EventValidationError(AccountingError, ConfigError):
    """A mechanism event or accounting parameter (q, sigma, steps, delta, epsilon) is invalid."""


class CalibrationError(AccountingError):
    """No noise multiplier within the allowed range reaches the target (epsilon, delta)."""


class LedgerError(AccountingError):
    """The privacy ledger cannot be used as asked (unknown event id, duplicate reserve, ...)."""


class LedgerCorruptedError(LedgerError):
    """The ledger file fails its integrity checks; training must be refused (fail closed)."""


class LedgerLockedError(LedgerError):
    """Another process holds the ledger's writer lock."""


class LedgerRollbackError(LedgerError):
    """The ledger is older than, or not a continuation of, what was recorded outside it.

    Raised when the ledger's anchor (kept in a separate directory) or a coordinator receipt
    names a record the ledger does not contain: the ledger was deleted and restarted, or
    restored from an older copy. Training must be refused (fail closed); restore the newest
    ledger, never reset it.
    """


class LedgerReceiptError(LedgerError):
    """A ledger receipt (``"<count>:<hash>"`` head string) is malformed."""


class BudgetExhaustedError(AccountingError):
    """The proposed round would exceed the client's privacy budget."""

    def __init__(self, message: str, *, epsilon_before: float, epsilon_after: float,
                 epsilon_max: float) -> None:
        super().__init__(message)
        self.epsilon_before = epsilon_before
        self.epsilon_after = epsilon_after
        self.epsilon_max = epsilon_max
