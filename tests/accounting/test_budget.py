"""Budget decision tests."""

from __future__ import annotations

import pytest

from fedpeft.privacy.accounting.accountant import epsilon
from fedpeft.privacy.accounting.budget import (
    BUDGET_EXHAUSTED_STATUS,
    Budget,
    check_round,
    require_round,
)
from fedpeft.privacy.accounting.errors import BudgetExhaustedError, EventValidationError
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent as E

ROUND = E(0.02, 1.0, 50)


@pytest.mark.parametrize("acc", ["prv", "rdp"])
def test_rounds_until_exhausted(acc: str) -> None:
    budget = Budget(3.0, 1e-5)
    spent: list[E] = []
    decisions = []
    for _ in range(200):
        d = check_round(spent, ROUND, budget, acc)
        decisions.append(d)
        if not d.allowed:
            break
        spent.append(ROUND)
    last = decisions[-1]
    assert not last.allowed and last.status == BUDGET_EXHAUSTED_STATUS
    assert len(spent) >= 2
    assert epsilon(spent, 1e-5, acc) <= 3.0 < epsilon(spent + [ROUND], 1e-5, acc)
    assert last.epsilon_before == pytest.approx(epsilon(spent, 1e-5, acc))
    assert last.remaining == pytest.approx(3.0 - last.epsilon_before)
    ok = decisions[-2]
    assert ok.allowed and ok.status == "ok"
    assert ok.remaining == pytest.approx(3.0 - ok.epsilon_after)
    with pytest.raises(BudgetExhaustedError, match="privacy_budget_exhausted") as info:
        require_round(spent, ROUND, budget, acc)
    assert info.value.epsilon_after > 3.0


def test_zero_noise_round_is_refused() -> None:
    d = check_round([], E(0.02, 0.0, 1), Budget(100.0, 1e-5))
    assert not d.allowed and d.remaining == 100.0


def test_budget_validation() -> None:
    with pytest.raises(EventValidationError, match="epsilon_max="):
        Budget(0.0, 1e-5)
    with pytest.raises(EventValidationError, match="delta="):
        Budget(1.0, 1.0)
