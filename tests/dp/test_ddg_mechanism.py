"""The distributed discrete Gaussian encoding: rotation, conditional rounding, field, planner.

Statistical tests use fixed keys and state a false-alarm rate of 1e-6 each.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import hadamard as scipy_hadamard

from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.ddg_mechanism import (
    DDGMechanismError,
    DDGPlan,
    client_encode,
    clip_l2,
    conditional_round,
    hadamard,
    padded_dimension,
    plan_granularity,
    rotate,
    rotation_signs,
    server_decode,
    sum_bound,
    sum_norm_bound,
    unrotate,
)
from fedpeft.privacy.discrete_gaussian import ExactIntegers, discrete_gaussian_variance

Z = stats.norm.isf(1e-6 / 2)
ROT = b"\x07" * 32


def test_blockwise_rotation_pads_to_whole_blocks_and_stays_orthogonal() -> None:
    from fedpeft.privacy.ddg_mechanism import HADAMARD_BLOCK, block_size

    assert padded_dimension(300) == 512 and block_size(300) == 512  # one block
    assert padded_dimension(460_800) == 460_800  # 225 whole blocks: no padding at all
    assert padded_dimension(37_634) == 19 * HADAMARD_BLOCK  # not 65,536
    signs = rotation_signs(ROT, padded_dimension(5000))
    x = np.random.default_rng(3).standard_normal(5000)
    y = rotate(x, signs)
    assert y.shape == (3 * HADAMARD_BLOCK,)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    assert np.allclose(unrotate(y, signs, 5000), x)
    block = scipy_hadamard(HADAMARD_BLOCK) / math.sqrt(HADAMARD_BLOCK)
    padded = np.zeros(3 * HADAMARD_BLOCK)
    padded[:5000] = x * signs[:5000]
    assert np.allclose(y[HADAMARD_BLOCK:2 * HADAMARD_BLOCK],
                       block @ padded[HADAMARD_BLOCK:2 * HADAMARD_BLOCK])


def test_hadamard_is_orthonormal_and_matches_scipy() -> None:
    x = np.random.default_rng(0).normal(size=16)
    h = scipy_hadamard(16) / 4.0
    assert np.allclose(hadamard(x), h @ x)
    assert np.allclose(hadamard(hadamard(x)), x)
    assert np.linalg.norm(hadamard(x)) == pytest.approx(np.linalg.norm(x))
    with pytest.raises(DDGMechanismError, match="power of two"):
        hadamard(np.ones(6))


def test_rotation_is_invertible_linear_and_flattens() -> None:
    signs = rotation_signs(ROT, padded_dimension(300))
    assert set(np.unique(signs)) == {-1.0, 1.0} and signs.shape == (512,)
    assert np.array_equal(signs, rotation_signs(ROT, 512))  # the shared key: same signs
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=300), rng.normal(size=300)
    assert np.allclose(unrotate(rotate(a, signs), signs, 300), a)
    assert np.allclose(rotate(a, signs) + rotate(b, signs), rotate(a + b, signs))
    spike = np.zeros(300)
    spike[3] = 1.0  # a one-hot vector is spread evenly: every coordinate is +-1/sqrt(512)
    assert np.allclose(np.abs(rotate(spike, signs)), 1 / math.sqrt(512))


def test_clip_and_conditional_round() -> None:
    x = np.full(64, 3.0)
    assert np.linalg.norm(clip_l2(x, 2.0)) == pytest.approx(2.0)
    assert clip_l2(x, 100.0) is x
    uniforms = DPRandomness.from_seed(3).sampling.uniform
    y = np.random.default_rng(2).normal(size=64) * 5
    bound = float(np.dot(y, y)) + 64 / 4 + math.sqrt(2 * 0.5) * (np.linalg.norm(y) + 4)
    r = conditional_round(y, bound, uniforms)
    assert np.all((r == np.floor(y)) | (r == np.ceil(y)))
    assert float(np.dot(r, r)) <= bound
    with pytest.raises(DDGMechanismError, match="norm bound"):
        conditional_round(y, 0.0, uniforms, max_tries=3)
    with pytest.raises(DDGMechanismError, match="non-finite"):
        clip_l2(np.array([np.nan]), 1.0)


def _run(plan: DDGPlan, updates: list[np.ndarray], seed: int) -> np.ndarray:
    words = [client_encode(u, plan, ROT, rounding=DPRandomness.from_seed(seed + i).sampling.uniform,
                           noise=ExactIntegers(bytes([seed + i]) * 32))
             for i, u in enumerate(updates)]
    total = np.zeros(plan.padded, dtype=np.uint64)
    for w in words:  # what SecAgg releases: the modular sum
        total = (total + w.astype(np.uint64)) % (1 << plan.bits)
    return server_decode(total.astype(np.uint32), plan, ROT, survivors=len(updates))


def test_norm_check_rejects_a_substituted_vector_and_passes_honest_extremes() -> None:
    """Honest sums at the clip (all updates aligned) pass the norm check; a sum with one
    client's words replaced by uniform ones is refused (the uniform vector's norm is about
    2^(b-1) sqrt(d / 3), far beyond the bound the plan leaves room for)."""
    plan = plan_granularity(clip=1.0, noise_std=0.05, clients=8, dimension=500, bits=20)
    aligned = [np.full(500, 1.0 / np.sqrt(500))] * 8
    _run(plan, aligned, 40)  # passes
    rng = np.random.default_rng(5)
    words = [client_encode(u, plan, ROT, rounding=DPRandomness.from_seed(60 + i).sampling.uniform,
                           noise=ExactIntegers(bytes([60 + i]) * 32)) for i, u in enumerate(aligned)]
    words[3] = rng.integers(0, 1 << plan.bits, size=plan.padded, dtype=np.uint64).astype(np.uint32)
    total = sum(w.astype(np.uint64) for w in words) % (1 << plan.bits)
    with pytest.raises(DDGMechanismError, match="substituted or corrupted"):
        server_decode(total.astype(np.uint32), plan, ROT, survivors=8)
    assert sum_norm_bound(plan, 8) < sum_norm_bound(plan, 9)
    with pytest.raises(DDGMechanismError, match="survivors"):
        sum_norm_bound(plan, 0)


@pytest.mark.statistical
def test_end_to_end_sum_and_noise_variance() -> None:
    """n clients' encoded updates summed mod 2^bits decode to the sum of the clipped updates
    plus noise whose variance is n * gamma^2 * Var(N_Z) (+ rounding), within the false-alarm
    rate."""
    n, d = 8, 300
    plan = plan_granularity(clip=1.0, noise_std=0.05, clients=n, dimension=d, bits=20)
    assert plan.local_variance >= 1 and plan.padded == 512
    rng = np.random.default_rng(4)
    updates = [rng.normal(size=d) * 0.1 for _ in range(n)]
    truth = sum(clip_l2(u, plan.clip) for u in updates)
    err = _run(plan, updates, 10) - truth
    # rotation is orthonormal, so the error's d coordinates carry (noise + rounding) variance
    noise_var = n * plan.granularity ** 2 * discrete_gaussian_variance(plan.local_variance)
    rounding_var_max = n * plan.granularity ** 2 / 4
    var = float(np.mean(err ** 2))
    sd = math.sqrt(2 / d)  # relative sd of a sample variance of d Gaussian-like values
    assert noise_var * (1 - Z * sd) <= var <= (noise_var + rounding_var_max) * (1 + Z * sd)


def test_zero_noise_like_plan_recovers_the_sum_exactly_up_to_rounding() -> None:
    n, d = 4, 100
    plan = DDGPlan(clip=10.0, granularity=1e-4, local_variance=Fraction(1), bits=32,
                   dimension=d)
    updates = [np.linspace(-1, 1, d) * (i + 1) for i in range(n)]
    out = _run(plan, updates, 20)
    # noise std per client: 1 grid step; rounding: < 1 step; total << 0.01
    assert np.linalg.norm(updates[3]) > plan.clip  # the longest is clipped
    assert np.max(np.abs(out - sum(clip_l2(u, plan.clip) for u in updates))) < 0.01


def test_planner_wrap_bound_and_fail_closed() -> None:
    plan = plan_granularity(clip=1.0, noise_std=0.05, clients=100, dimension=10_000, bits=18)
    half = (1 << 17) - 1
    assert sum_bound(1.0, plan.granularity, 0.05, 100, plan.padded, 1e-9) <= plan.granularity * half
    assert float(plan.local_variance) >= (0.05 / plan.granularity) ** 2  # never less noise
    # more clients or fewer bits: a coarser grid
    assert plan_granularity(1.0, 0.05, 300, 10_000, 18).granularity > plan.granularity
    with pytest.raises(DDGMechanismError, match="raise bits"):
        plan_granularity(clip=1.0, noise_std=0.001, clients=1000, dimension=10_000, bits=12)
    with pytest.raises(DDGMechanismError, match="bits=40"):
        plan_granularity(1.0, 0.05, 10, 100, 40)
    with pytest.raises(DDGMechanismError, match="wrap_probability"):
        plan_granularity(1.0, 0.05, 10, 100, 20, wrap_probability=0.0)
    with pytest.raises(DDGMechanismError, match="noise_std"):
        plan_granularity(1.0, -1.0, 10, 100, 20)


def test_bad_plans_and_inputs_are_typed_errors() -> None:
    with pytest.raises(DDGMechanismError, match="local_variance"):
        DDGPlan(1.0, 0.01, Fraction(1, 2), 20, 10)
    with pytest.raises(DDGMechanismError, match="bits"):
        DDGPlan(1.0, 0.01, Fraction(4), 4, 10)
    with pytest.raises(DDGMechanismError, match="dimension"):
        DDGPlan(1.0, 0.01, Fraction(4), 20, 0)
    plan = DDGPlan(1.0, 0.01, Fraction(4), 20, 10)
    with pytest.raises(DDGMechanismError, match="coordinates"):
        client_encode(np.zeros(11), plan, ROT, rounding=DPRandomness.from_seed(0).sampling.uniform,
                      noise=ExactIntegers(bytes(32)))
    with pytest.raises(DDGMechanismError, match="rotation key"):
        rotation_signs(b"short", 8)
    with pytest.raises(DDGMechanismError, match="shape"):
        server_decode(np.zeros(8, dtype=np.uint32), plan, ROT)


def test_accounting_event_never_counts_more_noise_than_present() -> None:
    from fedpeft.privacy.accounting.ddg import epsilon

    plan = DDGPlan(1.0, 0.01, Fraction(10, 3), 20, 300)  # 10/3: not a float
    ev = plan.accounting_event(sample_rate=0.1, contributors=50, steps=3)
    assert Fraction(ev.local_variance) <= plan.local_variance
    assert ev.dimension == plan.padded == 512 and ev.granularity == plan.granularity
    assert ev.beta == plan.beta and ev.steps == 3
    fewer = plan.accounting_event(sample_rate=0.1, contributors=10, steps=3)
    assert epsilon([fewer], 1e-6).epsilon > epsilon([ev], 1e-6).epsilon


def test_provisioning_meets_the_target_tightly_and_counts_only_the_minimum() -> None:
    from fedpeft.privacy.ddg_mechanism import provision, release_epsilon

    common = {"delta": 1e-6, "rounds": 20, "sample_rate": 0.1, "clip": 1.0,
              "clients_per_round": 100, "dimension": 10_000, "bits": 18}
    got = provision(target_epsilon=8.0, min_contributors=80, **common)  # type: ignore[arg-type]
    assert 7.9 <= got.epsilon <= 8.0
    again = release_epsilon(got.plan, sample_rate=0.1, min_contributors=80, rounds=20,
                            delta=1e-6)
    assert again == pytest.approx(got.epsilon) and again <= 8.0
    # fewer shares the round can count on: each client must add more
    fewer = provision(target_epsilon=8.0, min_contributors=20, **common)  # type: ignore[arg-type]
    assert fewer.noise_std > got.noise_std
    # the same plan with fewer contributors present would spend more: the provisioning
    # must be for the smallest accepted set
    assert release_epsilon(got.plan, sample_rate=0.1, min_contributors=20, rounds=20,
                           delta=1e-6) > 8.0


def test_provisioning_fails_closed() -> None:
    from fedpeft.privacy.ddg_mechanism import provision

    with pytest.raises(DDGMechanismError, match="raise bits"):
        provision(target_epsilon=0.01, delta=1e-6, rounds=1000, sample_rate=1.0, clip=1.0,
                  min_contributors=2, clients_per_round=1000, dimension=100_000, bits=8)
    with pytest.raises(DDGMechanismError, match="exceeds clients_per_round"):
        provision(target_epsilon=8.0, delta=1e-6, rounds=1, sample_rate=0.1, clip=1.0,
                  min_contributors=50, clients_per_round=10, dimension=10, bits=20)
    with pytest.raises(DDGMechanismError, match="target_epsilon"):
        provision(target_epsilon=0.0, delta=1e-6, rounds=1, sample_rate=0.1, clip=1.0,
                  min_contributors=5, clients_per_round=10, dimension=10, bits=20)


def test_a_client_refuses_a_plan_with_too_little_noise() -> None:
    from fedpeft.privacy.ddg_mechanism import provision, verify_provisioning

    got = provision(target_epsilon=4.0, delta=1e-6, rounds=10, sample_rate=0.1, clip=1.0,
                    min_contributors=40, clients_per_round=50, dimension=1000, bits=20)
    kwargs = {"sample_rate": 0.1, "min_contributors": 40, "rounds": 10, "delta": 1e-6}
    assert verify_provisioning(got.plan, epsilon_max=4.0, **kwargs) <= 4.0  # type: ignore[arg-type]
    stingy = DDGPlan(got.plan.clip, got.plan.granularity, got.plan.local_variance / 4,
                     got.plan.bits, got.plan.dimension, got.plan.beta)
    with pytest.raises(DDGMechanismError, match="refused"):
        verify_provisioning(stingy, epsilon_max=4.0, **kwargs)  # type: ignore[arg-type]
