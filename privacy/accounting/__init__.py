"""Framework-free differential privacy accounting for fedpeft clients.

Events (:mod:`.events`), accountants (:mod:`.accountant`, PRV default and RDP), noise
calibration (:mod:`.calibrate`), the crash-safe hash-chained ledger (:mod:`.ledger`: clients'
record-level ledgers and the coordinator's user-level release ledger), budgets
(:mod:`.budget`) and reports (:mod:`.report`); replace-one (substitution) maths in
:mod:`.replace_one`. Importing this package does not import torch or
Opacus; accountants import Opacus lazily. See docs/privacy.md.
"""

from __future__ import annotations

from fedpeft.privacy.accounting.accountant import (
    ACCOUNTANTS,
    ADJACENCIES,
    DEFAULT_ACCOUNTANT,
    DEFAULT_ADJACENCY,
    Adjacency,
    EpsilonResult,
    compute_epsilon,
    epsilon,
    epsilon_side_by_side,
    group_events,
    validate_adjacency,
)
from fedpeft.privacy.accounting.budget import (
    BUDGET_EXHAUSTED_STATUS,
    Budget,
    BudgetDecision,
    check_round,
    require_round,
)
from fedpeft.privacy.accounting.calibrate import PrivacyPlan, calibrate_noise_multiplier, plan
from fedpeft.privacy.accounting.errors import (
    AccountingError,
    BudgetExhaustedError,
    CalibrationError,
    EventValidationError,
    LedgerCorruptedError,
    LedgerError,
    LedgerLockedError,
    LedgerReceiptError,
    LedgerRollbackError,
)
from fedpeft.privacy.accounting.events import (
    EventMetadata,
    PoissonSampledGaussianEvent,
    new_event_id,
    sample_rate_from,
)
from fedpeft.privacy.accounting.ledger import (
    AbortRecord,
    Ledger,
    LedgerEntry,
    LedgerHead,
    LedgerLevel,
    LedgerSnapshot,
    ReleaseEntry,
    ReleaseMetadata,
    UserBudgetExhaustedError,
    read_ledger,
    user_epsilons,
    user_events,
)

__all__ = [
    "ACCOUNTANTS", "ADJACENCIES", "BUDGET_EXHAUSTED_STATUS", "DEFAULT_ACCOUNTANT",
    "DEFAULT_ADJACENCY", "AbortRecord", "Adjacency", "AccountingError",
    "Budget", "BudgetDecision", "BudgetExhaustedError", "CalibrationError", "EpsilonResult",
    "EventMetadata", "EventValidationError", "Ledger", "LedgerCorruptedError", "LedgerEntry",
    "LedgerError", "LedgerHead", "LedgerLevel", "LedgerLockedError", "LedgerReceiptError",
    "LedgerRollbackError", "LedgerSnapshot", "PoissonSampledGaussianEvent",
    "PrivacyPlan", "ReleaseEntry", "ReleaseMetadata", "UserBudgetExhaustedError",
    "calibrate_noise_multiplier", "check_round", "compute_epsilon", "epsilon",
    "epsilon_side_by_side", "group_events", "new_event_id", "plan", "read_ledger",
    "require_round", "sample_rate_from", "user_epsilons", "user_events", "validate_adjacency",
]
