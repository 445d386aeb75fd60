"""Length-sorted micro-batches, per-group learning rates and the per-round lr schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedpeft.core.errors import ConfigError
from fedpeft.runconfig.config import parse_run_config
from fedpeft.training.config import OPTIMIZERS, TrainConfig
from fedpeft.training.trainer import (
    for_round,
    is_head_parameter,
    length_sorted_chunks,
    make_optimizer,
    round_lr_scale,
)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=80),
       size=st.one_of(st.none(), st.integers(1, 20)))
def test_chunks_partition_the_batch_shortest_first(lengths: list[int], size: int | None) -> None:
    idx = list(range(len(lengths)))
    chunks = length_sorted_chunks(idx, lengths, size)
    flat = [i for c in chunks for i in c]
    assert sorted(flat) == idx  # every row exactly once: sums over examples are unchanged
    assert [lengths[i] for i in flat] == sorted(lengths)
    if size is not None:
        assert all(1 <= len(c) <= size for c in chunks)
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1  # near-equal like Opacus


def test_empty_batch_is_one_empty_chunk() -> None:
    assert length_sorted_chunks([], [], 4) == [[]]


def test_head_parameters_are_recognised() -> None:
    assert is_head_parameter("peft_model.base_model.model.classifier.modules_to_save.default.weight")
    assert is_head_parameter("model.score.weight")
    assert not is_head_parameter("peft_model.base_model.model.encoder.layer.0.attention.self."
                                 "query.lora_A.default.weight")
    assert not is_head_parameter("prompt.weight")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_head_lr_is_its_own_group(optimizer: str) -> None:
    named = {"lora_A.weight": nn.Parameter(torch.zeros(2)),
             "classifier.weight": nn.Parameter(torch.zeros(2))}
    opt = make_optimizer(named, TrainConfig(lr=0.001, head_lr=0.05, optimizer=optimizer))
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(named["lora_A.weight"])] == 0.001
    assert lrs[id(named["classifier.weight"])] == 0.05
    same = make_optimizer(named, TrainConfig(lr=0.001, optimizer=optimizer))
    assert {g["lr"] for g in same.param_groups} == {0.001}  # head-lr 0 means lr


def test_head_lr_is_validated_and_parsed() -> None:
    with pytest.raises(ConfigError, match="head-lr=-1"):
        TrainConfig(head_lr=-1.0)
    assert parse_run_config({"head-lr": "0.02"}).train.head_lr == 0.02


def test_lr_schedule_known_values() -> None:
    # cosine from 1 to f over rounds 1..R: f + (1 - f) * (1 + cos(pi * (r - 1) / (R - 1))) / 2
    assert round_lr_scale(1, 10, 0.1) == 1.0
    assert round_lr_scale(10, 10, 0.1) == pytest.approx(0.1)
    assert round_lr_scale(3, 5, 0.1) == pytest.approx(0.55)  # the midpoint: (1 + f) / 2
    assert round_lr_scale(2, 3, 0.2) == pytest.approx(0.6)
    assert round_lr_scale(11, 10, 0.1) == pytest.approx(0.1)  # resumed past the plan: the floor
    assert round_lr_scale(1, 1, 0.1) == 1.0
    assert all(round_lr_scale(r, 7, 1.0) == 1.0 for r in range(1, 9))  # 1 = constant


@settings(max_examples=200, deadline=None)
@given(rounds=st.integers(1, 200), fraction=st.floats(1e-6, 1.0))
def test_lr_schedule_decays_monotonically_within_its_bounds(rounds: int, fraction: float) -> None:
    scales = [round_lr_scale(r, rounds, fraction) for r in range(1, rounds + 3)]
    assert scales[0] == 1.0
    assert all(fraction - 1e-12 <= s <= 1.0 for s in scales)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(scales))
    if rounds > 1:
        assert scales[rounds - 1] == pytest.approx(fraction)


@pytest.mark.parametrize(("r", "n", "f"), [(0, 10, 0.1), (1, 0, 0.1), (1, 10, 0.0),
                                           (1, 10, 1.5), (1, 10, math.nan)])
def test_lr_schedule_rejects_bad_input(r: int, n: int, f: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        round_lr_scale(r, n, f)


def test_for_round_scales_lr_and_head_lr() -> None:
    cfg = TrainConfig(lr=0.5, head_lr=5.0, lr_final_fraction=0.1)
    last = for_round(cfg, 10, 10)
    assert (last.lr, last.head_lr) == (pytest.approx(0.05), pytest.approx(0.5))
    assert for_round(cfg, 1, 10) is cfg
    same = for_round(TrainConfig(lr=0.5, lr_final_fraction=0.1), 10, 10)
    assert same.head_lr == 0.0  # head-lr 0 still means "same as lr", which is scaled
    assert make_optimizer({"w": nn.Parameter(torch.zeros(1))}, last).param_groups[0]["lr"] \
        == pytest.approx(0.05)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, math.nan])
def test_lr_final_fraction_is_validated_and_parsed(bad: float) -> None:
    with pytest.raises(ConfigError, match="lr-final-fraction="):
        TrainConfig(lr_final_fraction=bad)
    with pytest.raises(ConfigError, match="lr-final-fraction="):
        parse_run_config({"lr-final-fraction": bad})
    assert parse_run_config({"lr-final-fraction": "0.1"}).train.lr_final_fraction == 0.1


def test_client_runtime_trains_each_round_at_the_scheduled_lr() -> None:
    from fedpeft.client.runtime import ClientIdentity, ClientRuntime

    run = parse_run_config({"lr": 0.5, "head-lr": 5.0, "lr-final-fraction": 0.1,
                            "num-rounds": 5})
    rt = ClientRuntime(run, ClientIdentity("c0", 0, 2))
    assert [round(rt._train_config(r).lr, 6) for r in range(1, 6)] == \
        [round(0.5 * round_lr_scale(r, 5, 0.1), 6) for r in range(1, 6)]
    assert rt._train_config(5).head_lr == pytest.approx(0.5)
