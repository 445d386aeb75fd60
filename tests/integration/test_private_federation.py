"""Record-level DP across rounds: 3 clients x 3 rounds on the real SmolLM2 cut to 2 layers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedpeft.client.runtime import ClientRuntime
from fedpeft.coordinator.server import Coordinator
from fedpeft.privacy.accounting import compute_epsilon, read_ledger
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


def _flat(tmp: Path, **kw: object) -> dict[str, object]:
    return tiny_flat(**{"run-dir": str(tmp), "num-rounds": 3, "dp": True,
                        "dp-target-epsilon": 8.0, "batch-size": 4, "local-steps": 2,
                        "max-examples-per-client": 32, **kw})


def _rows(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epsilon_grows_matches_ledger_and_survives_restart(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path))
    transport = InMemoryTransport(run, 3)
    original = transport.exchange
    seen_rounds: list[int] = []

    def restart_client_0_after_round_1(kind, messages, timeout):  # type: ignore[no-untyped-def]
        rnd = int(next(iter(messages.values())).get("round", 0))
        if rnd == 2 and 2 not in seen_rounds:  # the device reboots: a fresh runtime, same disk
            transport.runtimes[0] = ClientRuntime(run, transport.runtimes[0].identity)
        seen_rounds.append(rnd)
        return original(kind, messages, timeout)

    transport.exchange = restart_client_0_after_round_1  # type: ignore[method-assign]
    summary = Coordinator(run, transport, tmp_path).run_federation()
    assert summary.rounds_completed == 3
    rows = _rows(tmp_path)[1:]
    for client in ("client-0", "client-1", "client-2"):
        eps = [next(c["dp-epsilon"] for c in r["clients"] if c["client-id"] == client)  # type: ignore[union-attr]
               for r in rows]
        assert eps[0] < eps[1] < eps[2] <= 8.0, eps  # grows each round, never above the target
        snap = read_ledger(tmp_path / "ledgers" / f"{client}.ledger.jsonl")
        assert len(snap.spent_events()) == 3
        from_file = compute_epsilon(snap.spent_events(), 1e-5, "prv",
                                    adjacency="replace_one").epsilon
        assert snap.adjacency == "replace_one" and snap.private_against_coordinator
        assert from_file == pytest.approx(eps[2], rel=1e-9)
    # under DP, raw training losses stay on the device
    assert all("train-loss" not in c for r in rows for c in r["clients"])  # type: ignore[union-attr]
    assert all(r["dp_epsilon"]["max"] <= 8.0 for r in rows)  # type: ignore[index]
    report = json.loads((tmp_path / "privacy_report.json").read_text())
    assert report["levels"] == "record" and report["record"]["level"] == "record"
    assert report["record"]["summary"]["clients"] == 3
    assert report["record"]["summary"]["exhausted"] == 0


def test_client_over_budget_sits_out_and_run_stops_cleanly(tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, **{"dp-planned-rounds": 2, "min-clients": 2}))
    transport = InMemoryTransport(run, 3)
    # client-2's device has a smaller budget: between its epsilon after round 1 and round 2
    from fedpeft.privacy.accounting import plan

    p = plan(8.0, 1e-5, rounds=2, sample_rate=4 / 32, local_steps=2, adjacency="replace_one")
    budget = (p.epsilon_per_round[0] + p.epsilon_per_round[1]) / 2
    ident = dataclasses.replace(transport.runtimes[2].identity, epsilon_budget=budget)
    transport.runtimes[2] = ClientRuntime(run, ident)
    summary = Coordinator(run, transport, tmp_path).run_federation()
    rows = _rows(tmp_path)
    r2 = rows[2]
    assert r2["ok"] == 2 and r2["dp_exhausted"] == 1
    assert r2["faults"][0]["status"] == "privacy_budget_exhausted"  # type: ignore[index]
    snap = read_ledger(tmp_path / "ledgers" / "client-2.ledger.jsonl")
    assert len(snap.spent_events()) == 1  # it trained nothing when refused
    # round 3 would push the others past the planned 2 rounds -> everyone exhausted -> stop
    assert "exhausted their privacy budget" in summary.stopped_reason
    assert "skipped" in rows[3] and rows[3]["dp_exhausted"] == 3


def test_crash_after_reserve_counts_the_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = parse_run_config(_flat(tmp_path, **{"num-rounds": 2}))
    transport = InMemoryTransport(run, 3)
    import fedpeft.client.runtime as rt

    real = rt.dp_local_train
    calls = {"n": 0}

    def flaky(model, data, *a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:  # client-0 in round 2 dies mid-training (after its reservation)
            model.eval()
            from fedpeft.core.errors import ClientFault

            raise ClientFault("process killed")
        return real(model, data, *a, **kw)

    monkeypatch.setattr(rt, "dp_local_train", flaky)
    Coordinator(run, transport, tmp_path).run_federation()
    snap = read_ledger(tmp_path / "ledgers" / "client-0.ledger.jsonl")
    assert len(snap.spent_events()) == 2  # the pending reservation is counted as spent
    assert any(e.status != "committed" for e in snap.entries)
