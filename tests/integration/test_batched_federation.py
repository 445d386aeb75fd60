"""Whole federations with the round's clients trained in batches (``batch-clients``).

The in-process transport hands a round's train messages to :func:`fedpeft.client.cohort.
train_cohort`; each client's pipeline (checks, ledgers, masking, reply) is its own. Plain
training is compared with the one-by-one federation (SmolLM2's cut has no dropout); DP runs
draw fresh OS keys, so they are compared by what their ledgers and reports account.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.coordinator.server import Coordinator
from fedpeft.core.errors import ConfigError, DataError
from fedpeft.peft_methods import get_adapted
from fedpeft.privacy.accounting.ledger import read_ledger
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _federate(tmp: Path, clients: int = 4, **kw: object) -> tuple[dict[str, torch.Tensor],
                                                                 InMemoryTransport]:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp), **kw}))
    transport = InMemoryTransport(run, clients)
    summary = Coordinator(run, transport, tmp).run_federation()
    assert summary.rounds_completed == run.federation.num_rounds and not summary.stopped_reason
    return get_adapted(run.model, run.adapter, run.seed).adapter_state(), transport


# LoRA in the slow tier: the fast tier has it in tests/dp/test_batched.py, one pass at a time
@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "prompt"])
def test_batched_federation_equals_the_one_by_one_federation(method: str, tmp_path: Path) -> None:
    kw = {"method": method, "optimizer": "sgd", "momentum": 0.9, "lr": 0.05}
    alone, _ = _federate(tmp_path / "alone", **kw)
    batched, _ = _federate(tmp_path / "batched", **kw, **{"batch-clients": 3, "batch-rows": 5})
    for name in alone:
        assert torch.allclose(alone[name], batched[name], atol=1e-5), name
    a, b = _rows(tmp_path / "alone"), _rows(tmp_path / "batched")
    for ra, rb in zip(a[1:], b[1:], strict=True):
        losses_a = {c["client-id"]: c["train-loss"] for c in ra["clients"]}  # type: ignore[union-attr,index]
        losses_b = {c["client-id"]: c["train-loss"] for c in rb["clients"]}  # type: ignore[union-attr,index]
        assert losses_a.keys() == losses_b.keys()
        for cid, loss in losses_a.items():
            assert loss == pytest.approx(losses_b[cid], rel=1e-5, abs=1e-5)  # float32 sums of ~30


def test_batched_dp_federation_accounts_each_client_as_alone(tmp_path: Path) -> None:
    kw = {"dp": True, "secagg": True, "weighting": "uniform", "dp-noise-multiplier": 1.0,
          "dp-clip": 1.0, "min-clients": 3, "secagg-dropout": 0.2, "secagg-max-abort": 0.5}
    _federate(tmp_path / "alone", **kw)
    _, transport = _federate(tmp_path / "batched", **kw, **{"batch-clients": 4})
    for rt in transport.runtimes.values():
        batched = read_ledger(rt.ledger_path())
        alone = read_ledger(tmp_path / "alone" / rt.ledger_path().relative_to(tmp_path / "batched"))
        assert [e.event for e in batched.entries] == [e.event for e in alone.entries]
        assert len(batched.spent_events()) == 2
        assert all(e.status == "committed" for e in batched.entries)
    report_a = json.loads((tmp_path / "alone" / "privacy_report.json").read_text())
    report_b = json.loads((tmp_path / "batched" / "privacy_report.json").read_text())
    eps = [sorted(c["dp-epsilon"] for c in r["record"]["clients"].values())
           for r in (report_a, report_b)]
    assert eps[0] == pytest.approx(eps[1])


def test_batched_user_and_record_level_federation(tmp_path: Path) -> None:
    kw = {"dp": True, "dp-level": "both", "secagg": True, "weighting": "uniform",
          "dp-noise-multiplier": 1.0, "dp-user-clip": 0.5, "secagg-dropout": 0.2,
          "secagg-max-abort": 0.5, "min-clients": 3, "batch-clients": 6}
    _, transport = _federate(tmp_path, clients=6, **kw)
    for rt in transport.runtimes.values():
        assert len(read_ledger(rt.user_ledger_path()).releases) == 2
        assert len(read_ledger(rt.ledger_path()).spent_events()) == 2
    user = json.loads((tmp_path / "privacy_report.json").read_text())["user"]
    assert len(user["users"]) == 6 and max(user["users"].values()) <= 8.0 + 1e-9


def test_a_client_that_fails_before_training_is_dropped_not_the_batch(tmp_path: Path) -> None:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path), "num-rounds": 1,
                                        "batch-clients": 4}))
    transport = InMemoryTransport(run, 4)

    def no_data() -> None:
        raise DataError("the device's data file is unreadable")

    transport.runtimes[2].data = no_data  # type: ignore[method-assign,assignment]
    summary = Coordinator(run, transport, tmp_path).run_federation()
    assert summary.rounds_completed == 1
    row = _rows(tmp_path)[1]
    assert row["ok"] == 3
    assert any("unreadable" in str(f) for f in row["faults"])  # type: ignore[union-attr]


def test_bad_batching_knobs_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="batch-clients=0"):
        parse_run_config(tiny_flat(**{"batch-clients": 0}))
    with pytest.raises(ConfigError, match="batch-rows=0"):
        parse_run_config(tiny_flat(**{"batch-rows": 0}))


def test_the_flower_simulation_refuses_batch_clients_before_starting_anything(tmp_path: Path) -> None:
    from fedpeft.simulations.launcher import simulate

    with pytest.raises(ConfigError, match="in-process only"):
        simulate(tiny_flat(**{"batch-clients": 4}), 4, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_memory_planner_batches_fewer_clients_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fedpeft.client.cohort as cohort_module
    from fedpeft.training.batched import cohort_plan

    kw = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.05}
    alone, _ = _federate(tmp_path / "alone", **kw)
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp_path / "probe"), **kw}))
    probe = InMemoryTransport(run, 4)
    model = probe.runtimes[0].model
    datas = [rt.data() for rt in probe.runtimes.values()]

    def estimate(k: int) -> int:
        return cohort_plan(model, datas, run.train, clients=k, rows=5,
                           budget_bytes=2**62).estimate_bytes

    budget = (estimate(2) + estimate(3)) // 2  # room for 2 clients' pass, not 3
    monkeypatch.setattr(cohort_module, "available_memory_bytes", lambda: 2 * budget)
    capsys.readouterr()
    batched, _ = _federate(tmp_path / "batched", **kw, **{"batch-clients": 4, "batch-rows": 5})
    err = capsys.readouterr().err
    assert "batch-clients=4" in err and "training 2 clients at a time" in err
    for name in alone:
        assert torch.allclose(alone[name], batched[name], atol=1e-5), name
