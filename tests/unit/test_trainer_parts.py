"""Length-sorted micro-batches and per-group learning rates of the local optimiser."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from client.trainer import is_head_parameter, length_sorted_chunks, make_optimizer
from fedpeft.config import TrainConfig, parse_run_config
from fedpeft.errors import ConfigError


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


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
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
