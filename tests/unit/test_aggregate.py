from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.coordinator.aggregate import mean_from_sum, weighted_mean, weighted_sum
from fedpeft.coordinator.server_opt import ServerOptConfig, server_step
from fedpeft.core.errors import ConfigError
from fedpeft.runconfig.config import AGGREGATIONS, SERVER_KNOBS, unused_server_knobs


def test_weighted_mean_known_answer() -> None:
    u = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 6.0])}]
    assert torch.allclose(weighted_mean(u, [1, 3])["w"], torch.tensor([2.5, 5.0]))
    assert torch.allclose(weighted_mean(u, [1, 1])["w"], torch.tensor([2.0, 4.0]))


def test_mean_from_sum_matches_weighted_mean() -> None:
    u = [{"w": torch.randn(5)} for _ in range(4)]
    s = weighted_sum(u, [1, 1, 1, 1])
    assert torch.allclose(mean_from_sum(s, 4, u[0])["w"], weighted_mean(u, [1, 1, 1, 1])["w"])


@given(st.lists(st.tuples(st.floats(-1e3, 1e3), st.integers(1, 100)), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None)
def test_mean_lies_within_the_updates(pairs: list[tuple[float, int]]) -> None:
    u = [{"w": torch.tensor([v], dtype=torch.float32)} for v, _ in pairs]
    m = float(weighted_mean(u, [w for _, w in pairs])["w"][0])
    lo, hi = min(v for v, _ in pairs), max(v for v, _ in pairs)
    assert lo - 1e-3 * max(1, abs(lo)) <= m <= hi + 1e-3 * max(1, abs(hi))


def test_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(ConfigError, match="share one adapter spec"):
        weighted_mean([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ConfigError, match="non-negative"):
        weighted_mean([{"a": torch.zeros(1)}], [-1])
    with pytest.raises(ConfigError, match="sum to 0"):
        weighted_mean([{"a": torch.zeros(1)}], [0])


def test_server_optimisers_known_answers() -> None:
    x = {"w": torch.tensor([1.0])}
    d = {"w": torch.tensor([0.5])}
    p, s = server_step(x, d, {}, ServerOptConfig("fedavg", lr=1.0))
    assert float(p["w"]) == 1.5 and s == {}
    p, s = server_step(x, d, {}, ServerOptConfig("fedavgm", lr=1.0, momentum=0.9))
    p, s = server_step(p, d, s, ServerOptConfig("fedavgm", lr=1.0, momentum=0.9))
    assert math.isclose(float(p["w"]), 1.5 + 0.5 * 0.9 + 0.5, rel_tol=1e-6)
    cfg = ServerOptConfig("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    p, s = server_step(x, d, {}, cfg)
    m, v = 0.1 * 0.5, 0.01 * 0.25
    assert math.isclose(float(p["w"]), 1.0 + 0.1 * m / (math.sqrt(v) + 1e-3), rel_tol=1e-5)
    cfg = ServerOptConfig("fedyogi", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    p, s = server_step(x, d, {}, cfg)
    v = 0.0 - 0.01 * 0.25 * (-1.0)  # sign(v - d^2) = -1 at v = 0
    assert math.isclose(float(s["v/w"]), v, rel_tol=1e-5)
    with pytest.raises(ConfigError):
        ServerOptConfig("sgd")


#: run-config key -> ServerOptConfig field
_FIELD = {"server-momentum": "momentum", "beta1": "beta1", "beta2": "beta2", "tau": "tau"}


@pytest.mark.parametrize("kind", AGGREGATIONS)
def test_server_knob_table_matches_server_step(kind: str) -> None:
    """SERVER_KNOBS (which the utility sweep's cell keys rely on) says exactly which knobs
    each server optimiser reads: changing an unused one changes nothing, a used one does."""
    assert set(SERVER_KNOBS) == set(_FIELD)
    x = {"w": torch.tensor([1.0, -2.0])}
    d = {"w": torch.tensor([0.5, 0.25])}

    def two_steps(cfg: ServerOptConfig) -> torch.Tensor:
        p, s = server_step(x, d, {}, cfg)
        return server_step(p, d, s, cfg)[0]["w"]

    base = ServerOptConfig(kind, lr=0.1, momentum=0.9, beta1=0.9, beta2=0.99, tau=1e-3)
    ref = two_steps(base)
    for key, field in _FIELD.items():
        changed = two_steps(replace(base, **{field: getattr(base, field) / 2}))
        assert torch.equal(changed, ref) == (key in unused_server_knobs(kind)), key
