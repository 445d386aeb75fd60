"""Config validation and the (degree, threshold) planner with its abort-probability bound."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedpeft.secagg.config import (
    SecAggConfig,
    abort_probability,
    binom_cdf,
    min_safe_threshold,
    plan_graph,
)
from fedpeft.secagg.errors import InfeasiblePlanError, ModulusOverflowError, SecAggConfigError
from fedpeft.secagg.graph import neighbour_graph


@pytest.mark.parametrize("gamma", [0.0, 0.05])
@pytest.mark.parametrize("n", [20, 50, 100, 200, 1000])
def test_planner_meets_one_percent_at_20pct_dropout(n: int, gamma: float) -> None:
    gp = plan_graph(n, expected_dropout=0.2, max_abort_prob=0.01, corrupt_fraction=gamma)
    assert gp.abort_probability < 0.01
    assert gp.colluders == int(gamma * n)
    # security floor: the server with its colluders cannot gather both share kinds
    assert 2 * gp.threshold > gp.degree + 1 + gp.colluders
    assert gp.degree >= min(n - 1, 2 * int(np.ceil(np.log2(n))))
    if n >= 100 and gamma == 0.0:
        assert gp.degree < n / 2  # sparse (O(log n)) graph
    # largest threshold: one more would break the target
    if gp.threshold < gp.degree:
        assert abort_probability(n, gp.degree, gp.threshold + 1, 0.2) > 0.01
    # smallest degree: the next smaller even one cannot meet the floor and the target
    k = gp.degree - 2 if gp.degree < n - 1 else max(d for d in range(0, n - 1, 2))
    t = min_safe_threshold(k, gp.colluders)
    if k >= min(n - 1, 2 * int(np.ceil(np.log2(n)))) and k < gp.degree:
        assert t > k or abort_probability(n, k, t, 0.2) > 0.01


def test_floor_counts_colluders_as_the_review_found() -> None:
    """The review's collusion attack needs ``2t - (k + 1)`` colluders: the floor tolerates
    ``floor(gamma n)`` of them (5 at n = 100), where the gamma-free plan tolerated none."""
    old = plan_graph(100, corrupt_fraction=0.0)
    assert 2 * old.threshold - (old.degree + 1) <= 1  # the review: 1 colluder sufficed
    gp = plan_graph(100)
    assert gp.colluders == 5 and 2 * gp.threshold - (gp.degree + 1) > 5
    assert min_safe_threshold(10, 3) == 8 and min_safe_threshold(10, 0) == 6
    assert min_safe_threshold(4, 99) == 5  # colluders beyond the degree: every holder


def test_planner_infeasible_for_tiny_n_says_what_to_do() -> None:
    with pytest.raises(InfeasiblePlanError, match="raise max_abort_prob"):
        plan_graph(10, 0.2, 0.01)
    assert plan_graph(10, 0.2, 0.05).degree == 9
    with pytest.raises(SecAggConfigError, match="n=2"):
        plan_graph(2)


def test_complete_graph_formula_matches_enumeration() -> None:
    """Exact abort probability by enumerating every survivor set (n=8) vs the closed form."""
    n, t, delta = 8, 5, 0.3
    total = 0.0
    for alive in itertools.product([0, 1], repeat=n):
        s = sum(alive)
        p = (1 - delta) ** s * delta ** (n - s)
        # survivor: own share + surviving neighbours; dropped: surviving neighbours only
        holders = [sum(alive[j] for j in range(n) if j != i) + alive[i] for i in range(n)]
        ok = all(h >= t for h in holders)
        total += 0.0 if ok else p
    assert abs(total - abort_probability(n, n - 1, t, delta)) < 1e-12


@pytest.mark.statistical
def test_union_bound_dominates_simulated_abort_rate() -> None:
    """Simulate dropouts on the real Harary graph; the abort rate stays below the bound.

    n=100 with a deliberately weak threshold so aborts are frequent enough to measure.
    The bound exceeds the rate by more than 5 binomial sigmas in expectation (seeded).
    """
    n, degree, t, delta, trials = 100, 24, 14, 0.2, 4000
    graph = neighbour_graph(list(range(n)), degree, bytes(32))
    adj = np.zeros((n, n), dtype=bool)
    for a, nb in graph.items():
        adj[a, list(nb)] = True
    rng = np.random.default_rng(1234)
    alive = rng.random((trials, n)) > delta
    holders = alive.astype(np.int32) @ adj.astype(np.int32)  # surviving neighbours per client
    holders = holders + alive  # a survivor also holds a share of its own self-mask seed
    aborts = np.mean(np.any(holders < t, axis=1))
    bound = abort_probability(n, degree, t, delta)
    assert bound < 1.0 and aborts <= bound  # bound 0.38, measured ~0.06
    assert aborts > 0.02  # the check is not vacuous


def test_config_validation_names_parameter() -> None:
    with pytest.raises(SecAggConfigError, match="clip"):
        SecAggConfig(clip=0.0)
    with pytest.raises(SecAggConfigError, match="bits"):
        SecAggConfig(clip=1.0, bits=33)
    with pytest.raises(SecAggConfigError, match="expected_dropout"):
        SecAggConfig(clip=1.0, expected_dropout=1.0)
    with pytest.raises(SecAggConfigError, match="2\\*threshold > degree"):
        SecAggConfig(clip=1.0, threshold=3, degree=6)
    with pytest.raises(SecAggConfigError, match="both or neither"):
        SecAggConfig(clip=1.0, threshold=3)
    with pytest.raises(InfeasiblePlanError, match="abort probability"):
        SecAggConfig(clip=1.0, threshold=10, degree=12, corrupt_fraction=0.0).resolve(50)
    with pytest.raises(SecAggConfigError, match="degree >= 12, threshold >= 8 \\(2 colluders"):
        SecAggConfig(clip=1.0, threshold=7, degree=12).resolve(50)  # 2 * 7 <= 12 + 1 + 2
    with pytest.raises(SecAggConfigError, match="degree >= 12"):
        SecAggConfig(clip=1.0, threshold=5, degree=6, corrupt_fraction=0.0).resolve(50)
    with pytest.raises(SecAggConfigError, match="corrupt_fraction"):
        SecAggConfig(clip=1.0, corrupt_fraction=1.0)
    with pytest.raises(ModulusOverflowError):
        SecAggConfig(clip=1.0, bits=8, max_abort_prob=1.0).resolve(500)
    r = SecAggConfig(clip=1.0).resolve(100)
    assert r.degree is not None and r.threshold is not None and r.abort_probability(100) < 0.01


def test_binom_cdf_edges() -> None:
    assert binom_cdf(-1, 5, 0.5) == 0.0 and binom_cdf(5, 5, 0.5) == 1.0
    assert abs(binom_cdf(2, 4, 0.5) - 11 / 16) < 1e-15


def test_complete_graph_plan_has_the_largest_threshold() -> None:
    from fedpeft.secagg.config import SecAggConfig, abort_probability, plan_graph

    sparse, full = plan_graph(100, 0.1, 0.01), plan_graph(100, 0.1, 0.01, complete=True)
    assert sparse.degree < 99 and full.degree == 99 and full.exact
    assert full.threshold == 82 > sparse.threshold
    assert full.abort_probability <= 0.01 < abort_probability(100, 99, 83, 0.1)
    cfg = SecAggConfig(clip=1.0, expected_dropout=0.1)
    assert cfg.resolve_complete(100).degree == 99 and cfg.resolve_complete(100).threshold == 82
    pinned = SecAggConfig(clip=1.0, threshold=9, degree=16, corrupt_fraction=0.0)  # kept
    assert (pinned.resolve_complete(100).degree, pinned.resolve_complete(100).threshold) == (16, 9)
