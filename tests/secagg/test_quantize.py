"""Clipping, stochastic rounding, modulus planning (pure functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.secagg.errors import ModulusOverflowError, SecAggConfigError, UpdateError
from fedpeft.secagg.quantize import (
    QuantizationPlan,
    decode_signed,
    dequantize,
    encode_signed,
    plan_quantization,
    quantize,
    stochastic_round,
)

SEED = bytes(range(32))


def test_plan_uses_all_levels_and_cannot_wrap() -> None:
    plan = plan_quantization(clip=0.01, n_clients=100, bits=32)
    assert plan.max_level == (2**31 - 1) // 200  # one bit of headroom (HEADROOM_BITS)
    assert plan.n_clients * plan.max_level <= 2**31 - 1
    assert 2 * plan.n_clients * (plan.max_level + 1) > 2**31 - 1  # as many levels as allowed
    assert math.isclose(plan.step, 0.01 / plan.max_level)


def test_plan_fails_closed_when_sum_could_wrap() -> None:
    with pytest.raises(ModulusOverflowError, match="wrap"):
        plan_quantization(clip=1.0, n_clients=100, bits=32, max_level=2**31 // 50)
    with pytest.raises(ModulusOverflowError):
        plan_quantization(clip=1.0, n_clients=300, bits=8)  # no level left
    with pytest.raises(SecAggConfigError, match="bits"):
        plan_quantization(clip=1.0, n_clients=3, bits=40)
    with pytest.raises(SecAggConfigError, match="clip"):
        QuantizationPlan(bits=32, clip=-1.0, n_clients=3, max_level=10)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), bits=st.sampled_from([16, 24, 32]), data=st.data())
def test_worst_case_sum_never_wraps(n: int, bits: int, data: st.DataObject) -> None:
    """n clients at +clip (or -clip) decode exactly, for every planned (n, bits)."""
    if ((1 << (bits - 1)) - 1) // n < 1:
        return
    plan = plan_quantization(0.5, n, bits)
    sign = data.draw(st.sampled_from([1.0, -1.0]))
    x = np.full(4, sign * 0.5, dtype=np.float32)
    q = quantize(x, plan, SEED)
    total = np.zeros(4, dtype=np.uint32)
    for _ in range(n):
        total += q
    total &= np.uint32(plan.modulus - 1)
    assert decode_signed(total, bits).tolist() == [int(sign) * n * plan.max_level] * 4


def test_encode_decode_roundtrip_signed() -> None:
    v = np.array([-(2**31), -5, -1, 0, 1, 7, 2**31 - 1], dtype=np.int64)
    assert decode_signed(encode_signed(v, 32), 32).tolist() == v.tolist()
    v16 = np.array([-(2**15), -1, 0, 2**15 - 1], dtype=np.int64)
    assert decode_signed(encode_signed(v16, 16), 16).tolist() == v16.tolist()


def test_quantize_error_within_one_step_and_clips() -> None:
    plan = plan_quantization(clip=1e-2, n_clients=10)
    x = np.linspace(-2e-2, 2e-2, 1001).astype(np.float32)
    back = dequantize(decode_signed(quantize(x, plan, SEED), 32), plan)
    clipped = np.clip(x.astype(np.float64), -1e-2, 1e-2)
    assert np.max(np.abs(back - clipped)) <= plan.step * (1 + 1e-9)
    assert np.max(np.abs(back)) <= 1e-2 + 1e-15


def test_stochastic_rounding_depends_only_on_seed() -> None:
    v = np.full(1000, 0.5)
    a, b = stochastic_round(v, SEED), stochastic_round(v, SEED)
    c = stochastic_round(v, bytes(32))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(a.tolist()) == {0, 1}


@pytest.mark.statistical
def test_stochastic_rounding_is_unbiased() -> None:
    """Mean of rounded 0.3 over 2e5 draws: |mean - 0.3| < 5 sigma (false alarm ~ 6e-7)."""
    n = 200_000
    r = stochastic_round(np.full(n, 0.3), bytes([7]) * 32)
    sigma = math.sqrt(0.3 * 0.7 / n)
    assert abs(r.mean() - 0.3) < 5 * sigma


def test_quantize_rejects_non_finite_and_bad_shape() -> None:
    plan = plan_quantization(1.0, 3)
    with pytest.raises(UpdateError, match="NaN"):
        quantize(np.array([0.0, np.nan], dtype=np.float32), plan, SEED)
    with pytest.raises(UpdateError, match="shape"):
        quantize(np.zeros((2, 2), dtype=np.float32), plan, SEED)
    with pytest.raises(UpdateError, match="dtype"):
        quantize(np.zeros(3, dtype=np.int32), plan, SEED)  # type: ignore[arg-type]
