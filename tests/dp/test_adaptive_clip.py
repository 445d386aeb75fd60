"""Adaptive clipping of user-level updates (Andrew et al. 2021) inside the distributed discrete
Gaussian: known answers, properties, the plan's accounting, and the count's noise statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.client.secagg_session import round_clip
from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import ROUND_CLIP_KEY
from fedpeft.privacy.adaptive_clip import (
    AdaptiveClipError,
    append_count,
    check_round_clip,
    clip_range,
    count_coordinate_weight,
    mechanism_clip,
    next_clip,
    split_count,
)
from fedpeft.privacy.ddg_mechanism import release_epsilon
from fedpeft.privacy.user_level import (
    COORDINATOR_SAMPLE_RATE,
    UserDPConfig,
    UserDPError,
    decode_release,
    decode_sum,
    encode_update,
    round_plan,
)
from fedpeft.secagg.quantize import decode_signed, encode_signed

ADAPTIVE = UserDPConfig(enabled=True, target_epsilon=8.0, delta=1e-5, clip=1.0,
                        participations=1, clip_quantile=0.5, clip_lr=0.2)


def test_geometric_update_known_answers() -> None:
    # Andrew et al. Alg. 1: C <- C exp(-lr (b - gamma))
    assert next_clip(1.0, 1.0, target_quantile=0.5, lr=0.2) == pytest.approx(math.exp(-0.1))
    assert next_clip(2.0, 0.0, target_quantile=0.5, lr=0.2) == pytest.approx(2 * math.exp(0.1))
    assert next_clip(3.0, 0.5, target_quantile=0.5, lr=0.2) == pytest.approx(3.0)
    # the noisy fraction is clamped to [0, 1]: one round moves log C by at most lr
    assert next_clip(1.0, 7.0, target_quantile=0.9, lr=0.2) == pytest.approx(math.exp(-0.02))
    assert next_clip(1.0, -3.0, target_quantile=0.9, lr=0.2) == pytest.approx(math.exp(0.18))
    with pytest.raises(AdaptiveClipError, match="not finite"):
        next_clip(1.0, float("nan"), target_quantile=0.5, lr=0.2)


def test_appended_vector_known_answers() -> None:
    short = np.array([0.3, 0.4])  # norm 0.5 <= round clip 2: scaled by C0 / C_t = 0.5
    np.testing.assert_allclose(append_count(short, round_clip=2.0, base_clip=1.0, weight=0.1),
                               [0.15, 0.2, 0.1])
    long = np.array([3.0, 4.0])  # norm 5 > 2: clipped, then scaled: norm C0 = 1
    np.testing.assert_allclose(append_count(long, round_clip=2.0, base_clip=1.0, weight=0.1),
                               [0.6, 0.8, -0.1])
    assert mechanism_clip(2.0, 0.75) == pytest.approx(2.0 * 1.25)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=20),
       st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.floats(1e-3, 10.0))
def test_appended_vector_is_within_the_plans_clip_whatever_the_round_clip(
        xs: list[float], c_t: float, c_0: float, w: float) -> None:
    """The sensitivity does not depend on C_t: every appended vector is within the plan's
    clip C0 sqrt(1 + w^2), so a coordinator's choice of C_t cannot void the guarantee."""
    v = append_count(np.array(xs), round_clip=c_t, base_clip=c_0, weight=w)
    assert float(np.linalg.norm(v)) <= mechanism_clip(c_0, w) * (1 + 1e-12)
    assert abs(v[-1]) == pytest.approx(w * c_0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(-5, 5), min_size=4, max_size=4), min_size=1, max_size=12),
       st.floats(0.05, 10.0))
def test_split_inverts_the_sum_of_appended_vectors(rows: list[list[float]], c_t: float) -> None:
    updates = np.array(rows)
    total = sum(append_count(u, round_clip=c_t, base_clip=1.0, weight=0.3) for u in updates)
    got, fraction = split_count(np.asarray(total), round_clip=c_t, base_clip=1.0, weight=0.3,
                                survivors=len(rows))
    norms = np.linalg.norm(updates, axis=1)
    clipped = updates * np.minimum(1.0, c_t / np.maximum(norms, 1e-300))[:, None]
    np.testing.assert_allclose(got, clipped.sum(axis=0), atol=1e-9)
    assert fraction == pytest.approx(float(np.mean(norms <= c_t)), abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1.0, 2.0, allow_nan=False), min_size=1, max_size=30),
       st.floats(0.01, 0.99), st.floats(0.01, 2.0))
def test_every_clip_the_rule_reaches_passes_the_clients_check(
        fractions: list[float], gamma: float, lr: float) -> None:
    clip = 1.5
    for rnd, b in enumerate(fractions, start=2):
        clip = next_clip(clip, b, target_quantile=gamma, lr=lr)
        assert check_round_clip(clip, base_clip=1.5, lr=lr, target_quantile=gamma,
                                server_round=rnd) == clip


def test_client_refuses_clips_the_rule_cannot_reach() -> None:
    kw = {"base_clip": 1.0, "lr": 0.2, "target_quantile": 0.5}
    assert check_round_clip(1.0, server_round=1, **kw) == 1.0
    lo, hi = clip_range(1.0, lr=0.2, target_quantile=0.5, updates=3)
    assert (lo, hi) == pytest.approx((math.exp(-0.3), math.exp(0.3)))
    with pytest.raises(AdaptiveClipError, match="round 1 is outside"):
        check_round_clip(1.01, server_round=1, **kw)
    with pytest.raises(AdaptiveClipError, match="outside"):
        check_round_clip(hi * 1.001, server_round=4, **kw)
    for bad in (float("nan"), float("inf"), -1.0, 0.0, True, "1.0"):
        with pytest.raises(AdaptiveClipError, match="finite number"):
            check_round_clip(bad, server_round=2, **kw)


def test_round_clip_from_the_message_refuses_mismatched_configs() -> None:
    fixed = UserDPConfig(enabled=True)
    assert round_clip({}, fixed, 3) == fixed.clip
    with pytest.raises(ConfigError, match="dp-user-clip-quantile=0"):
        round_clip({ROUND_CLIP_KEY: 1.0}, fixed, 3)
    with pytest.raises(ConfigError, match="sent no"):
        round_clip({}, ADAPTIVE, 3)
    assert round_clip({ROUND_CLIP_KEY: math.exp(0.1)}, ADAPTIVE, 2) == pytest.approx(
        math.exp(0.1))


@pytest.mark.parametrize(("kw", "match"), [
    ({"clip_quantile": 1.0}, "dp-user-clip-quantile"),
    ({"clip_quantile": -0.1}, "dp-user-clip-quantile"),
    ({"clip_lr": 0.0}, "dp-user-clip-lr"), ({"clip_lr": float("inf")}, "dp-user-clip-lr"),
    ({"clip_count_std": -1.0}, "dp-user-clip-count-std"),
])
def test_bad_knobs_are_typed_errors_naming_the_knob(kw: dict[str, float], match: str) -> None:
    with pytest.raises(UserDPError, match=match):
        UserDPConfig(enabled=True, **kw)  # type: ignore[arg-type]


def test_the_adaptive_plan_accounts_the_count_and_meets_the_target() -> None:
    fixed = round_plan(UserDPConfig(enabled=True, participations=1), planned_clients=100,
                       threshold=82, dimension=5000, bits=32)
    plan = round_plan(ADAPTIVE, planned_clients=100, threshold=82, dimension=5000, bits=32)
    assert plan.ddg.dimension == 5001 and plan.update_dimension == 5000
    w = count_coordinate_weight(planned_clients=100, noise_std=fixed.provisioned.noise_std,
                                base_clip=1.0, count_std=100 / 20)
    assert plan.count_weight == pytest.approx(w)
    # the mechanism's clip covers update and count: accounted with it, epsilon within target
    assert plan.ddg.clip == pytest.approx(math.sqrt(1 + w * w))
    eps = release_epsilon(plan.ddg, sample_rate=COORDINATOR_SAMPLE_RATE,
                          min_contributors=plan.min_contributors, rounds=1, delta=1e-5)
    assert eps <= 8.0
    # the count costs a little more noise (sensitivity x sqrt(1 + w^2), about 1% here), and
    # its own noise is at least what was asked (Andrew et al.: clients / 20), within 2%
    ratio = plan.provisioned.noise_std / fixed.provisioned.noise_std
    assert 1.0 < ratio <= math.sqrt(1 + w * w) * 1.01
    assert 5.0 <= plan.count_std(100) <= 5.0 * 1.02
    with pytest.raises(UserDPError, match="decode_release"):
        decode_sum(np.zeros(plan.ddg.padded, dtype=np.uint32), plan, b"s" * 24)


def _sum_words(words: list[np.ndarray], bits: int) -> np.ndarray:
    total = sum(decode_signed(w, bits).astype(np.int64) for w in words)
    return encode_signed(np.asarray(total), bits)


@pytest.mark.statistical
def test_released_count_is_unbiased_with_the_planned_noise() -> None:
    """Through the real encoding (rotation, rounding, exact N_Z noise): 10 clients, 6 of them
    unclipped; over 60 releases the noisy fraction has mean 0.6 and std count_std / 10.
    False alarm: mean off by > 5 standard errors (6e-7), std ratio outside 1 +- 5 x
    sqrt(1 / (2 x 60)) (about 1e-6, normal approximation)."""
    cfg = UserDPConfig(enabled=True, target_epsilon=4.0, delta=1e-5, clip=1.0,
                       participations=1, clip_quantile=0.5, clip_count_std=1.0)
    plan = round_plan(cfg, planned_clients=10, threshold=8, dimension=63, bits=24)
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(10, 63))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    norms = np.where(np.arange(10) < 6, 0.5, 3.0)  # round clip 1.0: 6 unclipped
    updates = directions * norms[:, None]
    fractions = []
    for t in range(60):
        session = t.to_bytes(24, "big")
        words = [encode_update(u, plan, session, round_clip=1.0) for u in updates]
        release = decode_release(_sum_words(words, plan.ddg.bits), plan, session,
                                 survivors=10, round_clip=1.0)
        assert release.unclipped_fraction is not None
        fractions.append(release.unclipped_fraction)
    expected_std = plan.count_std(10) / 10
    got = np.array(fractions)
    assert abs(got.mean() - 0.6) < 5 * expected_std / math.sqrt(60)
    assert abs(got.std(ddof=1) / expected_std - 1) < 5 * math.sqrt(1 / 120)


def test_the_clip_tracks_the_median_norm_through_the_real_encoding() -> None:
    """40 rounds of 20 clients whose update norms are log-normal with median 0.25: starting
    at 1.0 with lr 0.3, the clip ends within a factor 1.6 of the median (the noisy count
    moves it by about lr x count_std / n = 0.015 a round)."""
    cfg = UserDPConfig(enabled=True, target_epsilon=4.0, delta=1e-5, clip=1.0,
                       participations=1, clip_quantile=0.5, clip_lr=0.3)
    plan = round_plan(cfg, planned_clients=20, threshold=15, dimension=31, bits=24)
    rng = np.random.default_rng(1)
    clip = 1.0
    for t in range(40):
        norms = 0.25 * np.exp(rng.normal(0.0, 0.5, size=20))
        d = rng.normal(size=(20, 31))
        updates = d / np.linalg.norm(d, axis=1, keepdims=True) * norms[:, None]
        session = (1000 + t).to_bytes(24, "big")
        words = [encode_update(u, plan, session, round_clip=clip) for u in updates]
        release = decode_release(_sum_words(words, plan.ddg.bits), plan, session,
                                 survivors=20, round_clip=clip)
        assert release.unclipped_fraction is not None
        clip = next_clip(clip, release.unclipped_fraction, target_quantile=0.5, lr=0.3)
    assert 0.25 / 1.6 < clip < 0.25 * 1.6
