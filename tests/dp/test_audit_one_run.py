"""The one-run audit bound (Steinke, Nasr, Jagielski 2023): a naive reference, jax_privacy's
test values, soundness against a simulated DP mechanism, power without DP, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedpeft.privacy.auditing.one_run import (
    AuditError,
    audit_scores,
    auditable_ceiling,
    epsilon_lower_bound,
    hull_thresholds,
    p_value,
    randomized_response_correct,
    tpr_at_fpr,
)


def _naive_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's listing, term by term (a reference implementation)."""
    q = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


def _deterministic_normal(mu: float, n: int) -> np.ndarray:
    return stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1000), st.integers(0, 200), st.integers(0, 200),
       st.sampled_from([0.0, 0.5, 1.0, 3.0]), st.sampled_from([0.0, 1e-6, 1e-3, 0.1, 1.0]))
def test_p_value_matches_the_papers_listing(m: int, r: int, wrong: int, eps: float,
                                            delta: float) -> None:
    if not wrong <= r <= m:
        return
    v = r - wrong
    if v == 0:
        assert p_value(m, r, v, eps, delta) == 1.0
        return
    assert p_value(m, r, v, eps, delta) == pytest.approx(_naive_p_value(m, r, v, eps, delta),
                                                         abs=1e-9)


@pytest.mark.parametrize(("shift", "expected"), [(0, 0.0), (1, 1.13346), (2, 2.311945),
                                                 (4, 4.395568)])
def test_bound_from_scores_matches_jax_privacy(shift: float, expected: float) -> None:
    """jax_privacy's auditing_test.py (epsilon_one_run, Bonferroni over thresholds): 10,000
    included and 10,000 excluded canaries with normal scores shifted by ``shift``, 95 %,
    delta 1e-6."""
    audit = audit_scores(_deterministic_normal(shift, 10_000), _deterministic_normal(0, 10_000),
                         delta=1e-6, confidence=0.95)
    assert audit.epsilon_lower_bound == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert audit.canaries == 20_000 and audit.included == 10_000
    assert audit.epsilon_lower_bound <= audit.ceiling


def test_bound_is_the_largest_rejected_epsilon() -> None:
    eps = epsilon_lower_bound(1000, 100, 90, delta=1e-5, confidence=0.95)
    assert p_value(1000, 100, 90, eps, 1e-5) == pytest.approx(0.05, abs=1e-6)
    assert p_value(1000, 100, 90, eps * 0.99, 1e-5) < 0.05 < p_value(1000, 100, 90, eps * 1.01,
                                                                      1e-5)
    # more correct guesses, more canaries, less confidence: a larger bound
    assert epsilon_lower_bound(1000, 100, 95, delta=1e-5) > eps
    assert epsilon_lower_bound(1000, 100, 90, delta=1e-5, confidence=0.9) > eps
    assert epsilon_lower_bound(1000, 100, 50, delta=1e-5) == 0.0  # chance: nothing shown


def test_ceiling_known_shape() -> None:
    """With delta = 0 and all r guesses right the bound solves q^r = 1 - confidence:
    eps = logit(0.05^(1/r)), largest at the most guesses (m / 2 by default)."""
    for m in (10, 100, 1000):
        q = 0.05 ** (1 / (m // 2))
        assert auditable_ceiling(m, delta=0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert auditable_ceiling(1000, delta=1e-5) < auditable_ceiling(1000, delta=0.0)
    assert auditable_ceiling(100, delta=1e-5) < auditable_ceiling(1000, delta=1e-5)


def test_hull_drops_dominated_thresholds() -> None:
    # jax_privacy's _get_tn_fn_counts known answers, as (threshold, tp, fp)
    t, tp, fp = hull_thresholds(np.array([1.5, 2.5, 0.5, 3.5]), np.array([0.0, 3, 2, 1]))
    np.testing.assert_equal(t, [0, 0.5, 3.5, np.inf])
    np.testing.assert_equal(tp, [4, 4, 1, 0])
    np.testing.assert_equal(fp, [4, 3, 0, 0])
    t, _, _ = hull_thresholds(np.array([0.0, 0, 1, 2]), np.array([0.0, 1, 1, 1]))
    np.testing.assert_equal(t, [0, 2, np.inf])


def test_tpr_at_fpr_known_answers() -> None:
    ins, outs = np.full(30, 0.0), np.full(30, 1.0)  # the worst attack: TPR = FPR
    for f in (0.0, 0.3, 1.0):
        assert tpr_at_fpr(ins, outs, f) == pytest.approx(f)
    assert tpr_at_fpr(np.arange(10) + 100.0, np.arange(10), 0.01) == pytest.approx(1.0)


def _rr_audit(eps: float, m: int, rng: np.random.Generator) -> float:
    """A mechanism that is exactly eps-DP per canary: randomised response on its bit."""
    included = rng.random(m) < 0.5
    keep = rng.random(m) < randomized_response_correct(eps)
    score = np.where(keep, included, ~included).astype(float) + rng.random(m) * 1e-3
    return audit_scores(score[included], score[~included], delta=0.0).epsilon_lower_bound


@pytest.mark.statistical
def test_a_dp_mechanism_never_audits_above_its_claim() -> None:
    """Soundness: 40 audits of an exactly 1-DP mechanism (m = 1,000): a bound above 1 happens
    with probability at most 5 % each; more than 8 of 40 would happen with probability
    P[Binomial(40, 0.05) > 8] = 2e-4 (the false-alarm rate). Its bounds are also not trivial."""
    rng = np.random.default_rng(7)
    bounds = [_rr_audit(1.0, 1000, rng) for _ in range(40)]
    assert sum(b > 1.0 for b in bounds) <= 8
    assert np.median(bounds) > 0.5  # the audit has power close to the claim


def test_a_non_private_mechanism_audits_far_above_one() -> None:
    """Power: included canaries always score higher (no DP): with m = 1,000 the bound is the
    ceiling of 500 guesses (4.75 at 95 %, delta 1e-5, 3 thresholds on the hull)."""
    rng = np.random.default_rng(0)
    audit = audit_scores(rng.random(500) + 10, rng.random(500), delta=1e-5)
    assert audit.epsilon_lower_bound > 4.5 and audit.guesses == audit.correct == 500
    assert audit.epsilon_lower_bound == pytest.approx(audit.ceiling, rel=1e-6)
    assert audit.tpr_at_fpr[0.01] == pytest.approx(1.0)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: p_value(10, 5, 6, 1.0, 0.0), "correct"),
    (lambda: p_value(0, 0, 0, 1.0, 0.0), "canaries"),
    (lambda: p_value(10, 5, 3, -1.0, 0.0), "epsilon"),
    (lambda: p_value(10, 5, 3, 1.0, 1.5), "delta"),
    (lambda: epsilon_lower_bound(10, 5, 3, delta=0.0, confidence=1.0), "confidence"),
    (lambda: audit_scores([], [1.0], delta=0.0), "in_scores is empty"),
    (lambda: audit_scores([float("nan")], [1.0], delta=0.0), "non-finite"),
    (lambda: tpr_at_fpr([1.0], [0.0], 2.0), "fpr"),
])
def test_bad_input_is_a_typed_error(call: object, match: str) -> None:
    with pytest.raises(AuditError, match=match):
        call()  # type: ignore[operator]
