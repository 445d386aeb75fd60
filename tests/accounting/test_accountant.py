"""Accountant tests: unit, known-answer vectors and cross-checks against Google dp_accounting.

Reference implementation: ``dp_accounting`` 0.6.0 (independent of Opacus).
Tolerances:
* RDP: ours (Opacus RDP, same order grid as dp_accounting) within 1 % relative of
  dp_accounting's ``RdpAccountant``.
* PRV: dp_accounting's ``PLDAccountant`` (pessimistic, value_discretization_interval=1e-3)
  must lie inside our PRV error interval [eps_low, eps_upper] (Gopi et al. 2021 bounds with
  eps_error=0.01, delta_error=delta/1000), widened by PLD_SLACK=1e-3 for PLD's own
  pessimistic discretisation.
"""

from __future__ import annotations

import itertools
import math

import dp_accounting as dpa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.accounting.accountant import (
    compute_epsilon,
    epsilon,
    epsilon_side_by_side,
    group_events,
)
from fedpeft.privacy.accounting.errors import EventValidationError
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent as E

RDP_REL_TOL = 0.01
PLD_SLACK = 1e-3

CASES: dict[str, list[E]] = {
    "abadi-mnist": [E(0.01, 1.1, 10000)],
    "heterogeneous-rounds": [E(0.01, 1.1, 100), E(0.02, 0.9, 50), E(0.005, 1.5, 300),
                             E(0.01, 1.1, 100)],
    "high-q": [E(0.2, 2.0, 40), E(0.1, 1.5, 60)],
    "few-steps": [E(0.05, 0.8, 5)],
    "low-noise": [E(0.01, 0.6, 1000)],
}


def _reference(events: list[E], delta: float) -> tuple[float, float]:
    pld = dpa.pld.PLDAccountant(value_discretization_interval=1e-3)
    rdp = dpa.rdp.RdpAccountant()
    for e in events:
        event = dpa.PoissonSampledDpEvent(e.sample_rate, dpa.GaussianDpEvent(e.noise_multiplier))
        pld.compose(event, e.steps)
        rdp.compose(event, e.steps)
    return float(pld.get_epsilon(delta)), float(rdp.get_epsilon(delta))


@pytest.mark.parametrize("delta", [1e-5, 1e-7])
@pytest.mark.parametrize("case", sorted(CASES))
def test_cross_check_against_dp_accounting(case: str, delta: float) -> None:
    events = CASES[case]
    ours = epsilon_side_by_side(events, delta)
    pld_eps, rdp_eps = _reference(events, delta)
    assert ours["rdp"].epsilon == pytest.approx(rdp_eps, rel=RDP_REL_TOL)
    prv = ours["prv"]
    assert prv.eps_low is not None and prv.eps_upper is not None
    assert prv.eps_low - PLD_SLACK <= pld_eps <= prv.eps_upper + PLD_SLACK
    # PRV is the tighter accountant on these compositions.
    assert prv.epsilon < ours["rdp"].epsilon


def test_known_answer_abadi_mnist() -> None:
    """q=0.01, sigma=1.1, 10000 steps, delta=1e-5 (Abadi et al. 2016 MNIST setting).

    Reference values computed with dp_accounting 0.6.0: PLD (1e-3 grid) 5.1963,
    RDP 5.6320. Opacus' PRV upper bound is 5.2029.
    """
    events = [E(0.01, 1.1, 10000)]
    res = compute_epsilon(events, 1e-5, "prv")
    assert res.epsilon == res.eps_upper
    assert res.eps_low is not None and res.eps_estimate is not None
    assert res.eps_low <= res.eps_estimate <= res.epsilon
    assert res.epsilon == pytest.approx(5.2029, abs=0.005)
    assert res.eps_low <= 5.1963 <= res.epsilon
    assert epsilon(events, 1e-5, "rdp") == pytest.approx(5.6320, abs=0.005)


def test_zero_noise_is_infinite() -> None:
    for acc in ("prv", "rdp"):
        assert epsilon([E(0.1, 0.0, 1)], 1e-5, acc) == math.inf
        assert epsilon([E(0.1, 1.0, 10), E(0.1, 0.0, 1)], 1e-5, acc) == math.inf


def test_empty_composition_is_zero() -> None:
    assert epsilon([], 1e-5, "prv") == 0.0
    assert epsilon([], 1e-5, "rdp") == 0.0


def test_grouping_identical_mechanisms() -> None:
    split = [E(0.02, 1.0, 30), E(0.05, 2.0, 7), E(0.02, 1.0, 70)]
    merged = [E(0.05, 2.0, 7), E(0.02, 1.0, 100)]
    assert group_events(split) == ((0.02, 1.0, 100), (0.05, 2.0, 7))
    for acc in ("prv", "rdp"):
        assert epsilon(split, 1e-5, acc) == epsilon(merged, 1e-5, acc)


def test_more_steps_more_epsilon() -> None:
    for acc in ("prv", "rdp"):
        assert epsilon([E(0.02, 1.0, 100)], 1e-5, acc) < epsilon([E(0.02, 1.0, 200)], 1e-5, acc)
        assert epsilon([E(0.02, 2.0, 100)], 1e-5, acc) < epsilon([E(0.02, 1.0, 100)], 1e-5, acc)


def test_prv_failure_falls_back_to_rdp_bound() -> None:
    # Extremely low noise: the PRV computation overflows; the (valid) RDP bound is reported.
    res = compute_epsilon([E(0.5, 0.3, 500)], 1e-5, "prv")
    assert math.isfinite(res.epsilon)
    assert res.epsilon == epsilon([E(0.5, 0.3, 500)], 1e-5, "rdp")
    assert "RDP" in res.note


def test_validation() -> None:
    with pytest.raises(EventValidationError, match="accountant='gdp'"):
        epsilon([E(0.1, 1.0, 1)], 1e-5, "gdp")
    with pytest.raises(EventValidationError, match="delta=0"):
        epsilon([E(0.1, 1.0, 1)], 0.0)
    with pytest.raises(EventValidationError, match="event="):
        epsilon([(0.1, 1.0, 1)], 1e-5)  # type: ignore[list-item]


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.01, 0.05]), st.sampled_from([0.9, 1.5]),
                          st.integers(1, 100)), min_size=2, max_size=5))
def test_prv_epsilon_monotone_in_appended_events(spec: list[tuple[float, float, int]]) -> None:
    events = [E(q, s, n) for q, s, n in spec]
    values = [epsilon(events[:k], 1e-5, "prv") for k in range(1, len(events) + 1)]
    assert all(a <= b for a, b in itertools.pairwise(values))
