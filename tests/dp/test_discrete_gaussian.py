"""Exact discrete Gaussian sampling (CKS 2020) from a ChaCha20 stream.

Statistical tests use fixed keys (deterministic) and state their false-alarm rate: the
threshold each would exceed with that probability for a correct sampler on a fresh key.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from fedpeft.privacy.discrete_gaussian import (
    DiscreteGaussianError,
    ExactIntegers,
    as_variance,
    bernoulli_exp_neg,
    discrete_gaussian,
    discrete_gaussian_pmf,
    discrete_gaussian_variance,
    discrete_gaussian_vector,
    discrete_laplace,
)

FALSE_ALARM = 1e-6  # per statistical test
Z = stats.norm.isf(FALSE_ALARM / 2)  # two-sided z threshold (~4.9)


def _rng(tag: int) -> ExactIntegers:
    return ExactIntegers(bytes([tag]) * 32)


def _chi2_ok(samples: np.ndarray, pmf: dict[int, float]) -> tuple[float, float]:
    """Chi-square of ``samples`` against ``pmf`` (support outside the keys pooled in a tail
    bin); returns (statistic, threshold at FALSE_ALARM)."""
    n = len(samples)
    keys = sorted(pmf)
    observed = [int(np.sum(samples == k)) for k in keys]
    expected = [n * pmf[k] for k in keys]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return stat, float(stats.chi2.isf(FALSE_ALARM, len(keys)))


def test_known_answer_vector() -> None:
    """Regression vector: key 0^32, sigma^2 = 25 (changes if the stream or algorithm does)."""
    draws = discrete_gaussian_vector(10, 25, ExactIntegers(bytes(32)))
    assert draws.tolist() == [1, 12, -4, -3, 2, 4, 5, 1, 2, 4]


@pytest.mark.statistical
@pytest.mark.parametrize("sigma2", [Fraction(1, 4), 1, 4, Fraction(49, 2)])
def test_matches_the_exact_pmf(sigma2: Fraction | int) -> None:
    samples = discrete_gaussian_vector(20_000, sigma2, _rng(1))
    span = math.ceil(4 * math.sqrt(float(sigma2))) + 1
    pmf = {k: discrete_gaussian_pmf(k, sigma2) for k in range(-span, span + 1)}
    stat, threshold = _chi2_ok(samples, pmf)
    assert stat < threshold, (sigma2, stat, threshold)


@pytest.mark.statistical
def test_variance_and_symmetry() -> None:
    n, s2 = 20_000, 100
    x = discrete_gaussian_vector(n, s2, _rng(2)).astype(np.float64)
    var = discrete_gaussian_variance(s2)
    assert var < s2 and var == pytest.approx(s2, rel=1e-9)  # CKS Prop. 19: Var < sigma^2
    # sample variance: sd ~ sigma^2 sqrt(2/n); sample mean: sd ~ sigma / sqrt(n)
    assert abs(x.var() - var) < Z * var * math.sqrt(2 / n)
    assert abs(x.mean()) < Z * math.sqrt(var / n)
    # a tiny variance is far below sigma^2: the law is not a rounded Gaussian
    assert discrete_gaussian_variance(Fraction(1, 4)) < 0.25


@pytest.mark.statistical
@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(1, 3), Fraction(1), Fraction(5, 2)])
def test_bernoulli_exp_neg_frequency(gamma: Fraction) -> None:
    n, p = 20_000, math.exp(-float(gamma))
    rng = _rng(3)
    hits = sum(bernoulli_exp_neg(gamma, rng) for _ in range(n))
    assert abs(hits - n * p) <= Z * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.statistical
def test_discrete_laplace_pmf() -> None:
    t, rng = 3, _rng(4)
    samples = np.array([discrete_laplace(t, rng) for _ in range(20_000)])
    norm = (1 - math.exp(-1 / t)) / (1 + math.exp(-1 / t))
    pmf = {k: norm * math.exp(-abs(k) / t) for k in range(-15, 16)}
    stat, threshold = _chi2_ok(samples, pmf)
    assert stat < threshold


@pytest.mark.statistical
def test_exact_integers_are_uniform_and_in_range() -> None:
    rng = _rng(5)
    counts = np.bincount([rng.randbelow(7) for _ in range(14_000)], minlength=7)
    stat = float(np.sum((counts - 2000.0) ** 2 / 2000.0))
    assert stat < stats.chi2.isf(FALSE_ALARM, 6)
    big = (1 << 70) + 3
    assert all(0 <= rng.randbelow(big) < big for _ in range(200))
    assert rng.randbelow(1) == 0


def test_different_keys_give_different_streams_and_repr_hides_the_key() -> None:
    a = discrete_gaussian_vector(50, 9, _rng(6))
    b = discrete_gaussian_vector(50, 9, _rng(7))
    assert not np.array_equal(a, b)
    rng = ExactIntegers(b"\x42" * 32)
    assert "42" not in repr(rng) and "position=0" in repr(rng)
    assert isinstance(ExactIntegers.from_os().randbelow(10), int)


def test_variance_is_exact() -> None:
    assert as_variance(0.1) == Fraction(0.1)  # the float's exact dyadic value
    assert as_variance(Fraction(7, 3)) == Fraction(7, 3)
    # a large variance (sigma = 10^6) samples at its scale: |x| beyond 7 sigma has p < 1e-11
    draws = discrete_gaussian_vector(20, Fraction(10**12), _rng(8))
    assert np.all(np.abs(draws) < 7 * 10**6) and np.any(np.abs(draws) > 10**4)


@pytest.mark.parametrize("bad", [0, -1, Fraction(-1, 2), float("nan"), float("inf"), True, "4",
                                 Fraction(10) ** 19])
def test_bad_variance_is_a_typed_error(bad: object) -> None:
    with pytest.raises(DiscreteGaussianError, match="sigma2"):
        discrete_gaussian(bad, _rng(9))  # type: ignore[arg-type]


def test_other_bad_input_is_a_typed_error() -> None:
    with pytest.raises(DiscreteGaussianError, match="32 bytes"):
        ExactIntegers(b"short")
    with pytest.raises(DiscreteGaussianError, match="n=-1"):
        discrete_gaussian_vector(-1, 4, _rng(10))
    with pytest.raises(DiscreteGaussianError, match="bound n=0"):
        _rng(10).randbelow(0)
    with pytest.raises(DiscreteGaussianError, match="scale t=0"):
        discrete_laplace(0, _rng(10))
    with pytest.raises(DiscreteGaussianError, match="gamma=-1"):
        bernoulli_exp_neg(Fraction(-1), _rng(10))


def test_pmf_is_normalised() -> None:
    for s2 in (Fraction(1, 9), 1, 30):
        total = math.fsum(discrete_gaussian_pmf(k, s2) for k in range(-400, 401))
        assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.statistical
@pytest.mark.parametrize("sigma2", [Fraction(1, 4), 1, Fraction(49, 2), 10**4])
def test_batch_sampler_matches_the_exact_pmf(sigma2: Fraction | int) -> None:
    from fedpeft.privacy.discrete_gaussian import discrete_gaussian_batch

    samples = discrete_gaussian_batch(50_000, sigma2, _rng(11))
    span = math.ceil(4 * math.sqrt(float(sigma2))) + 1
    step = max(1, span // 40)  # pool wide supports into bins of `step` integers
    pmf: dict[int, float] = {}
    binned = samples // step
    for k in range(-span, span + 1):
        pmf[k // step] = pmf.get(k // step, 0.0) + discrete_gaussian_pmf(k, sigma2)
    stat, threshold = _chi2_ok(binned, pmf)
    assert stat < threshold, (sigma2, stat, threshold)
    var = discrete_gaussian_variance(sigma2)
    assert abs(samples.astype(np.float64).var() - var) < Z * var * math.sqrt(2.5 / 50_000)


@pytest.mark.statistical
def test_batch_sampler_fallbacks_keep_the_law(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paths for numbers past int64 (Python integers) draw from the same law: force them
    with a tiny safe bound."""
    from fedpeft.privacy import discrete_gaussian as dg

    ints = dg._BatchIntegers(_rng(12))
    ones = np.ones(40_000, dtype=np.int64)
    monkeypatch.setattr(dg, "_INT64_SAFE", 3)  # every k > 3 continues in Python
    hits = dg._bernoulli_exp_neg_fraction(ones, ones, ints)
    p = math.exp(-1)
    assert abs(hits.sum() - 40_000 * p) <= Z * math.sqrt(40_000 * p * (1 - p))
    # the tail |y| > 7 (about 2% at sigma 3) and k > 6 continue in Python integers
    monkeypatch.setattr(dg, "_INT64_SAFE", 2000)
    samples = dg.discrete_gaussian_batch(20_000, 9, _rng(16))
    assert np.any(np.abs(samples) > 7)
    stat, threshold = _chi2_ok(samples, {k: discrete_gaussian_pmf(k, 9) for k in range(-12, 13)})
    assert stat < threshold
    # den beyond the safe bound: the whole batch takes the scalar path (same stream type)
    monkeypatch.setattr(dg, "_INT64_SAFE", 16)
    samples = dg.discrete_gaussian_batch(3_000, 9, _rng(13))
    stat, threshold = _chi2_ok(samples, {k: discrete_gaussian_pmf(k, 9) for k in range(-12, 13)})
    assert stat < threshold


def test_batch_sampler_bad_input_and_edges() -> None:
    from fedpeft.privacy.discrete_gaussian import discrete_gaussian_batch

    assert discrete_gaussian_batch(0, 4, _rng(14)).shape == (0,)
    with pytest.raises(DiscreteGaussianError, match="n=-2"):
        discrete_gaussian_batch(-2, 4, _rng(14))
    with pytest.raises(DiscreteGaussianError, match="sigma2"):
        discrete_gaussian_batch(3, 0, _rng(14))
    big = discrete_gaussian_batch(50, Fraction(10**12), _rng(15))  # scalar path: huge sigma
    assert np.all(np.abs(big) < 7 * 10**6)
