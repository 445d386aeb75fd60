"""The real Flower simulation engine (SuperLink + Ray), offline, through `fedpeft simulate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.simulations.launcher import simulate
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


@pytest.mark.slow  # the fast tier runs the same path at dp-level = both (below)
def test_flower_simulation_with_dp_and_secagg_completes(tmp_path: Path) -> None:
    """3 virtual clients, DP-SGD + SecAgg+ through Flower's Message API and Ray."""
    flat = tiny_flat(**{"num-rounds": 1, "dp": True, "secagg": True, "weighting": "uniform",
                        "secagg-dropout": 0.02, "batch-size": 4, "local-steps": 2,
                        "max-examples-per-client": 16})
    run = tmp_path / "run"
    result = simulate(flat, 3, run, stream=False)  # type: ignore[arg-type]
    assert result.status == "finished:completed", (run / "flwr-run.log").read_text()[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["round"] == 1 and last["ok"] == 3, last
    assert last["secagg"]["survivors"] == 3 and not last["secagg"]["aborted"]
    assert all("update-bytes" not in c for c in last["clients"])  # nothing sent in the clear
    assert 0 < last["dp_epsilon"]["max"] <= 8.0
    assert len(list((run / "ledgers").glob("*.ledger.jsonl"))) == 3
    assert (run / ".flwr" / "config.toml").is_file()  # FLWR_HOME stays run-local


@pytest.mark.slow
def test_failed_run_is_detected(tmp_path: Path) -> None:
    flat = tiny_flat(**{"dataset": "file", "data-path": str(tmp_path / "missing.tsv")})
    result = simulate(flat, 2, tmp_path / "run", stream=False)  # type: ignore[arg-type]
    assert result.status == "finished:failed" and result.returncode == 1


def test_flower_simulation_at_both_levels_completes(tmp_path: Path) -> None:
    """dp-level both through Flower and Ray: DP-SGD on each device plus distributed discrete
    Gaussian noise inside SecAgg+; the coordinator's user-level ledger holds the release."""
    from fedpeft.privacy.accounting.ledger import read_ledger

    flat = tiny_flat(**{"num-rounds": 1, "dp": True, "dp-level": "both", "secagg": True,
                        "weighting": "uniform", "secagg-dropout": 0.02, "secagg-bits": 16,
                        "batch-size": 4, "local-steps": 2, "max-examples-per-client": 16,
                        "dp-user-clip": 0.5})
    run = tmp_path / "run"
    result = simulate(flat, 3, run, stream=False)  # type: ignore[arg-type]
    assert result.status == "finished:completed", (run / "flwr-run.log").read_text()[-3000:]
    last = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["ok"] == 3 and not last["secagg"]["aborted"], last
    # at user level nothing derived from a device's dataset size leaves it
    assert all("num-examples" not in c and "dp-q" not in c for c in last["clients"])
    assert "dp_epsilon" not in last
    (release,) = read_ledger(run / "user-ledger" / "coordinator.ledger.jsonl").releases
    assert release.status == "committed" and len(release.metadata.users) == 3
    report = json.loads((run / "privacy_report.json").read_text())
    assert report["levels"] == "both" and set(report) >= {"record", "user"}
    assert 0 < report["user"]["summary"]["epsilon_max"] <= 8.0
    ledgers = run / "ledgers"
    assert len(list(ledgers.glob("*.user.ledger.jsonl"))) == 3  # each device's own, and
    record = [p for p in ledgers.glob("*.ledger.jsonl") if ".user." not in p.name]
    assert len(record) == 3  # its record-level DP-SGD ledger
    from fedpeft.privacy.accounting.report import reports_from_path

    assert all(0 < r.epsilon_prv <= 8.0 for r in reports_from_path(ledgers))
