"""Smoke run of the batched-training benchmark's measurement (benchmarks/batched_bench.py)."""

from __future__ import annotations

import pytest

from benchmarks.batched_bench import ROWS, _runtimes, _workload, measure


@pytest.mark.slow  # ~100 s; batched training itself is checked in tests/dp/test_batched.py
@pytest.mark.integration
def test_measure_trains_both_ways_and_reports_consistent_rates() -> None:
    flat, _, mechanism = _workload("chat-smollm-user", quick=True)
    row = measure(_runtimes({**flat, "local-steps": 1, "max-examples-per-client": 8}, 2),
                  mechanism, ROWS["chat-smollm-user"])
    assert row["clients"] == 2 and all(0 < n <= 8 for n in row["examples"])
    assert row["alone_s"] > 0 and row["batched_s"] > 0
    assert row["speedup"] == pytest.approx(row["alone_s"] / row["batched_s"])
    assert row["batched_updates_per_s"] == pytest.approx(2 / row["batched_s"])


def test_unknown_arm_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown arm"):
        _workload("nope", quick=True)
