"""White-box gradient canaries (issue 17): the plan, the hook's arithmetic, and the audit of
real DP-SGD runs on MiniLM cut to 2 layers (LoRA + a classification head).

Soundness: against the correct mechanism the one-run bound stays below the claimed epsilon;
at 95% confidence each seeded run has at most a 5% chance to exceed it (false alarm), and the
three seeds here are fixed (``DPRandomness.from_seed``), so the test is deterministic.
Power: two deliberately broken mechanisms are caught (the bound goes past the claim):
noise reported in the ledger's event but not added, and the head's noise skipped. A head
left out of DP-SGD altogether is refused by the hook itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.core.errors import ConfigError
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.privacy.accounting.accountant import epsilon
from fedpeft.privacy.auditing.gradient_canaries import (
    CanaryHook,
    audit_gradient_canaries,
    plan_gradient_canaries,
    spread,
    tensor_group,
    tensor_sizes,
)
from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.dp_config import DPConfig
from fedpeft.privacy.dp_sgd import dp_local_train
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import is_head_parameter
from tests.dp.conftest import get_model, make_data, seeded

N, BATCH, STEPS, CLAIM, DELTA, M = 16, 8, 10, 1.0, 1e-5, 1000


# -- the plan -----------------------------------------------------------------------------------


def test_tensor_kinds_ignore_layer_indices() -> None:
    assert tensor_group("m.layer.3.attention.query.lora_A.default.weight") == \
        "m.layer.N.attention.query.lora_A.default.weight"
    assert tensor_group("m.classifier.modules_to_save.default.weight") == \
        "m.classifier.modules_to_save.default.weight"


def test_layers_share_their_kind_s_canaries() -> None:
    sizes = tuple((f"m.layer.{i}.lora_A.weight", 100) for i in range(6)) + (("m.head.w", 50),)
    plan = plan_gradient_canaries(60, sizes, num_partitions=1, seed=0)
    head = plan.names.index("m.head.w")
    assert plan.tensor.count(head) == 30  # half: the head is one kind, the six layers another


def test_spread_fills_small_tensors_and_balances_the_rest() -> None:
    assert spread(500, [768, 2, 1536, 1536, 1536]) == [125, 2, 125, 124, 124]
    assert spread(7, [1, 100]) == [1, 6]
    assert sum(spread(37, [5, 9, 30])) == 37


def test_plan_is_reproducible_distinct_and_spread() -> None:
    sizes = (("b.weight", 30), ("a.weight", 50), ("head.bias", 2))
    plan = plan_gradient_canaries(40, sizes, num_partitions=3, seed=5)
    assert plan == plan_gradient_canaries(40, tuple(reversed(sizes)), num_partitions=3, seed=5)
    assert plan.names == ("a.weight", "b.weight", "head.bias")
    pairs = list(zip(plan.tensor, plan.coord, strict=True))
    assert len(set(pairs)) == 40  # no two canaries share a coordinate
    # three kinds of tensor (no layer index to share): 14, 13 and the bias's 2, then the
    # 11 left over the two that have room (6, 5)
    assert [plan.tensor.count(t) for t in range(3)] == [20, 18, 2]
    assert all(0 <= c < dict(sizes)[plan.names[t]] for t, c in pairs)
    assert set(plan.owners) <= {0, 1, 2} and 5 < sum(plan.included) < 35
    assert sorted(i for p in range(3) for i in plan.owned_by(p)) == list(range(40))
    assert plan != plan_gradient_canaries(40, sizes, num_partitions=3, seed=6)


@pytest.mark.parametrize("m", [0, -1, True, 83])
def test_plan_rejects_bad_counts(m: Any) -> None:
    with pytest.raises(ConfigError, match="audit-gradient-canaries"):
        plan_gradient_canaries(m, (("w", 80), ("b", 2)), num_partitions=1, seed=0)


def test_hook_adds_the_clip_only_for_included_canaries_that_join() -> None:
    w, b = torch.zeros(3, 4), torch.zeros(2)
    plan = plan_gradient_canaries(8, tensor_sizes({"w": w, "b": b}), num_partitions=1, seed=1)
    hook = CanaryHook(plan, plan.owned_by(0), {"w": w, "b": b}, 1.0, np.random.default_rng(0))
    summed = [torch.zeros_like(w), torch.zeros_like(b)]
    hook.inject([w, b], summed, 0.5)
    want = {"b": torch.zeros(2), "w": torch.zeros(12)}
    for i in range(8):
        if plan.included[i]:
            want[plan.names[plan.tensor[i]]][plan.coord[i]] += 0.5
    assert torch.equal(summed[0].view(-1), want["w"]) and torch.equal(summed[1], want["b"])
    noisy = [s + 1.0 for s in summed]
    hook.observe([w, b], noisy)
    assert hook.steps == 1
    for i, score in hook.scores.items():
        assert score == (1.5 if plan.included[i] else 1.0)


def test_hook_refuses_a_tensor_outside_the_noise_step() -> None:
    w, b = torch.zeros(3, 4), torch.zeros(2)
    plan = plan_gradient_canaries(8, tensor_sizes({"w": w, "b": b}), num_partitions=1, seed=1)
    hook = CanaryHook(plan, plan.owned_by(0), {"w": w, "b": b}, 1.0, np.random.default_rng(0))
    hook.inject([w], [torch.zeros_like(w)], 1.0)
    with pytest.raises(ConfigError, match="trained outside DP"):
        hook.observe([w], [torch.zeros_like(w)])
    with pytest.raises(ConfigError, match="does not train"):
        CanaryHook(plan, (), {"w": w}, 1.0, np.random.default_rng(0))


# -- audits of real DP-SGD ----------------------------------------------------------------------


def _sigma() -> float:
    cfg = DPConfig(enabled=True, target_epsilon=CLAIM, delta=DELTA, expected_batch_size=BATCH)
    return cfg.resolve_noise_multiplier(N, STEPS)


class _ZeroNoise:
    """A broken noise source: the event says sigma, the gradients get nothing."""

    def __init__(self, real: Any, skip: Sequence[tuple[int, ...]] | None = None) -> None:
        self.real, self.skip = real, skip

    def gaussian(self, shape: Sequence[int], std: float, dtype: torch.dtype = torch.float64,
                 *, device: Any = None, secure: bool = True) -> torch.Tensor:
        if self.skip is None or tuple(shape) in self.skip:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        return self.real.gaussian(shape, std, dtype, device=device, secure=secure)


def _audit(seed: int, *, broken: str = "") -> tuple[float, float]:
    model: AdaptedModel = get_model("minilm", "lora")
    named = model.adapter_parameters()
    plan = plan_gradient_canaries(M, tensor_sizes(named), num_partitions=1, seed=seed)
    sigma = _sigma()
    dp = DPConfig(enabled=True, noise_multiplier=sigma, delta=DELTA, expected_batch_size=BATCH)
    hook = CanaryHook(plan, plan.owned_by(0), named, dp.sample_rate(N),
                      np.random.default_rng(seed))
    randomness = seeded(seed)
    if broken:
        heads = [tuple(p.shape) for n, p in named.items() if is_head_parameter(n)]
        assert heads, "the MiniLM classifier has a head"
        randomness = DPRandomness(randomness.sampling, _ZeroNoise(
            randomness.noise, heads if broken == "head" else None), randomness.kind)
    result = dp_local_train(model, make_data("minilm", N, seed),
                            TrainConfig(local_steps=STEPS, lr=0.01), dp,
                            noise_multiplier=sigma, randomness=randomness, canaries=hook)
    claimed = epsilon([result.event], DELTA, adjacency="replace_one")  # as calibrated
    doc = audit_gradient_canaries(plan, [hook.scores[i] for i in range(M)], delta=DELTA)
    return float(doc["epsilon_lower_bound"]), claimed


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_correct_dp_sgd_audits_below_its_claim(seed: int) -> None:
    bound, claimed = _audit(seed)
    assert claimed == pytest.approx(CLAIM, rel=0.02)
    assert bound <= claimed


def test_noise_reported_but_not_added_is_caught() -> None:
    bound, claimed = _audit(0, broken="all")
    assert bound > 2 * claimed


def test_head_noise_skipped_is_caught() -> None:
    bound, claimed = _audit(0, broken="head")
    assert bound > claimed
