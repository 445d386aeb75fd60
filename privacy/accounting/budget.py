"""Privacy budgets: refuse a round *before* training if it would exceed the budget.

Pure: the decision is computed from the events already spent (pending reservations count as
spent) plus the proposed event, with the chosen accountant and neighbouring relation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedpeft.core.protocol import STATUS_BUDGET_EXHAUSTED, STATUS_OK
from fedpeft.privacy.accounting.accountant import (
    DEFAULT_ACCOUNTANT,
    DEFAULT_ADJACENCY,
    AccountantName,
    Adjacency,
    compute_epsilon,
    validate_accountant,
    validate_adjacency,
)
from fedpeft.privacy.accounting.errors import BudgetExhaustedError
from fedpeft.privacy.accounting.events import (
    PoissonSampledGaussianEvent,
    validate_delta,
    validate_epsilon,
)

#: Status string a client replies with when it refuses a round for lack of budget (the
#: protocol's :data:`fedpeft.core.protocol.STATUS_BUDGET_EXHAUSTED`).
BUDGET_EXHAUSTED_STATUS = STATUS_BUDGET_EXHAUSTED
#: Status of an allowed round (the protocol's :data:`fedpeft.core.protocol.STATUS_OK`).
BUDGET_OK_STATUS = STATUS_OK


@dataclass(frozen=True)
class Budget:
    """A client's total (epsilon_max, delta) budget over all rounds it joins."""

    epsilon_max: float
    delta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon_max",
                           validate_epsilon(self.epsilon_max, name="epsilon_max"))
        object.__setattr__(self, "delta", validate_delta(self.delta))


@dataclass(frozen=True)
class BudgetDecision:
    """Outcome of :func:`check_round`.

    ``remaining`` is the budget left after the round if it is allowed, otherwise the budget
    left now (never negative). ``status`` is ``"ok"`` or :data:`BUDGET_EXHAUSTED_STATUS`.
    ``adjacency`` is the neighbouring relation the epsilons are stated for.
    """

    allowed: bool
    epsilon_before: float
    epsilon_after: float
    remaining: float
    epsilon_max: float
    delta: float
    accountant: AccountantName
    adjacency: Adjacency = DEFAULT_ADJACENCY

    @property
    def status(self) -> str:
        """Status value a client can reply with."""
        return BUDGET_OK_STATUS if self.allowed else BUDGET_EXHAUSTED_STATUS

    def message(self) -> str:
        """Human-readable explanation of the decision."""
        verdict = "allowed" if self.allowed else "refused: it would exceed the privacy budget"
        return (
            f"round {verdict} (epsilon {self.epsilon_before:.4g} -> {self.epsilon_after:.4g} "
            f"of epsilon_max={self.epsilon_max:.4g} at delta={self.delta:.3g}, "
            f"accountant={self.accountant}, adjacency={self.adjacency}; remaining "
            f"{self.remaining:.4g})"
        )


def check_round(ledger_events: Sequence[PoissonSampledGaussianEvent],
                proposed_event: PoissonSampledGaussianEvent, budget: Budget,
                accountant: str = DEFAULT_ACCOUNTANT, *,
                adjacency: str = DEFAULT_ADJACENCY) -> BudgetDecision:
    """Would ``proposed_event`` on top of ``ledger_events`` stay within ``budget``
    (the whole composition accounted under ``adjacency``)?"""
    name = validate_accountant(accountant)
    adj = validate_adjacency(adjacency)
    before = compute_epsilon(tuple(ledger_events), budget.delta, name, adj).epsilon
    after = compute_epsilon(tuple(ledger_events) + (proposed_event,), budget.delta,
                            name, adj).epsilon
    allowed = math.isfinite(after) and after <= budget.epsilon_max
    left_from = after if allowed else before
    remaining = max(0.0, budget.epsilon_max - left_from) if math.isfinite(left_from) else 0.0
    return BudgetDecision(allowed, before, after, remaining, budget.epsilon_max,
                          budget.delta, name, adj)


def require_round(ledger_events: Sequence[PoissonSampledGaussianEvent],
                  proposed_event: PoissonSampledGaussianEvent, budget: Budget,
                  accountant: str = DEFAULT_ACCOUNTANT, *,
                  adjacency: str = DEFAULT_ADJACENCY) -> BudgetDecision:
    """Like :func:`check_round` but raise :class:`BudgetExhaustedError` when refused."""
    decision = check_round(ledger_events, proposed_event, budget, accountant,
                           adjacency=adjacency)
    if not decision.allowed:
        raise BudgetExhaustedError(
            f"proposed_event={proposed_event!r} {decision.message()}. The client must skip "
            f"this round and reply with status {BUDGET_EXHAUSTED_STATUS!r}; raise the budget "
            "only with the data owner's consent.",
            epsilon_before=decision.epsilon_before,
            epsilon_after=decision.epsilon_after,
            epsilon_max=decision.epsilon_max,
        )
    return decision
