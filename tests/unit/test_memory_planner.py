"""The batched pass's memory planner (fedpeft.training.memory, issue 16 "Bad input")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedpeft.core.errors import ConfigError
from fedpeft.training.memory import (
    WORKSPACE_MARGIN,
    ModelShape,
    PassCost,
    activation_bytes_per_row,
    available_memory_bytes,
    pass_cost,
    plan_cohort,
)

MINILM = ModelShape(layers=6, hidden=384, heads=12, intermediate=1536)
SMOLLM = ModelShape(layers=30, hidden=576, heads=9, intermediate=1536, vocab=49152, gated=True)


def test_activation_estimate_known_answers() -> None:
    # attention 11*64*384 + 5*12*64^2, norms 4*64*384, MLP 3*64*384 + 4*64*1536; x6 layers x2
    assert activation_bytes_per_row(MINILM, 64) == 6 * 2 * (516096 + 98304 + 466944)
    per_layer = 11 * 64 * 576 + 5 * 9 * 64 * 64 + 4 * 64 * 576 + 3 * 64 * 576 + 8 * 64 * 1536
    assert activation_bytes_per_row(SMOLLM, 64) == 30 * 2 * per_layer + 3 * 64 * 49152 * 4


def test_pass_cost_counts_per_example_gradients_and_optimiser_states() -> None:
    sgd = pass_cost(MINILM, 64, 1000, optimizer_states=0)
    adam = pass_cost(MINILM, 64, 1000, optimizer_states=2)
    assert sgd.per_row == math.ceil(activation_bytes_per_row(MINILM, 64) * WORKSPACE_MARGIN) + 2 * 1000 * 4
    assert adam.per_client - sgd.per_client == 2 * 1000 * 4
    assert sgd.bytes(3, 2) == 3 * sgd.per_row + 2 * sgd.per_client


def test_a_batch_that_fits_is_kept() -> None:
    cost = PassCost(per_row=10, per_client=1)
    plan = plan_cohort(cost, clients=8, rows=64, rows_per_client=2, budget_bytes=10**6)
    assert (plan.clients, plan.rows, plan.reason) == (8, 16, "")
    assert plan.estimate_bytes == 16 * 10 + 8


def test_a_batch_that_does_not_fit_is_cut_and_says_so() -> None:
    cost = PassCost(per_row=100, per_client=10)
    # 4 clients x 2 rows: 800 + 40 = 840 > 500; 2 clients: 400 + 20 = 420 <= 500; 3: 630
    plan = plan_cohort(cost, clients=4, rows=64, rows_per_client=2, budget_bytes=500)
    assert plan.clients == 2 and plan.rows == 4 and plan.estimate_bytes == 420
    assert "batch-clients=4" in plan.reason and "2 clients at a time" in plan.reason
    assert "same results" in plan.reason


def test_nothing_fits_means_one_by_one() -> None:
    plan = plan_cohort(PassCost(10**9, 10**9), clients=16, rows=64, rows_per_client=8,
                       budget_bytes=10)
    assert plan.clients == 1 and "one by one" in plan.reason


@given(per_row=st.integers(1, 10**6), per_client=st.integers(0, 10**6),
       clients=st.integers(1, 300), rows=st.integers(1, 512), rpc=st.integers(1, 32),
       budget=st.integers(1, 10**9))
def test_the_plan_is_the_largest_batch_that_fits(per_row: int, per_client: int, clients: int,
                                                 rows: int, rpc: int, budget: int) -> None:
    cost = PassCost(per_row, per_client)
    plan = plan_cohort(cost, clients=clients, rows=rows, rows_per_client=rpc,
                       budget_bytes=budget)

    def est(k: int) -> int:
        return cost.bytes(min(rows, k * rpc), k)

    assert 1 <= plan.clients <= clients
    assert plan.estimate_bytes == est(plan.clients)
    assert plan.clients == 1 or est(plan.clients) <= budget
    assert plan.clients == clients or est(plan.clients + 1) > budget
    assert bool(plan.reason) == (plan.clients < clients)


def test_bad_inputs_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="clients=0"):
        plan_cohort(PassCost(1, 1), clients=0, rows=1, rows_per_client=1, budget_bytes=1)
    with pytest.raises(ConfigError, match="seq_len=0"):
        pass_cost(MINILM, 0, 10, optimizer_states=0)
    with pytest.raises(ConfigError, match="ModelShape.layers=0"):
        ModelShape(layers=0, hidden=1, heads=1, intermediate=1)


def test_available_memory_reads_meminfo_and_falls_back(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemAvailable:   12345678 kB\n")
    assert available_memory_bytes(info) == 12345678 * 1024
    assert available_memory_bytes(tmp_path / "absent") > 0
