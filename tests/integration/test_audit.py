"""`fedpeft audit` end to end on tiny federations: canaries planted, scored by the likelihood
ratio of the final to the initial adapter, the one-run bound written and shown beside the
claimed epsilon in every report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.cli.main import main, print_privacy_report
from fedpeft.coordinator.server import Coordinator
from fedpeft.core.errors import ConfigError
from fedpeft.report.audit import audit_run
from fedpeft.report.run_report import write_report
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration


def _run(tmp: Path, **kw: object) -> Path:
    run = parse_run_config(tiny_flat(**{"run-dir": str(tmp), "audit-canaries": 40,
                                        "num-rounds": 1, "local-steps": 4, **kw}))
    summary = Coordinator(run, InMemoryTransport(run, 4), tmp).run_federation()
    assert not summary.stopped_reason
    return tmp


def test_non_private_run_is_audited_and_reported(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = _run(tmp_path)
    doc = audit_run(run_dir)
    assert doc["level"] == "record" and doc["canaries"] == 40 and doc["dp"] is False
    assert doc["claimed_epsilon"] is None and 0 <= doc["epsilon_lower_bound"] <= doc["ceiling"]
    assert doc["included"] + (40 - doc["included"]) == 40 and 0 < doc["included"] < 40
    # the canaries a client trained on became more likely under the final adapter than the
    # ones it never saw (non-private training memorises: the attack has signal)
    assert doc["mean_score_included"] > doc["mean_score_excluded"]
    assert json.loads((run_dir / "audit.json").read_text()) == {"audits": [doc]}
    print_privacy_report(run_dir)
    assert "audit, record level" in capsys.readouterr().out
    assert "## Privacy audit" in write_report(run_dir).read_text()
    assert main(["audit", "--existing", str(run_dir)]) == 0
    assert "epsilon >= " in capsys.readouterr().out


def test_dp_run_audit_stays_below_its_claim(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, dp=True, **{"dp-target-epsilon": 8.0, "local-steps": 2})
    doc = audit_run(run_dir)
    assert doc["dp"] is True and doc["claimed_adjacency"] == "replace-one"
    assert isinstance(doc["claimed_epsilon"], float)
    assert doc["epsilon_lower_bound"] <= doc["claimed_epsilon"]
    assert doc["delta"] == pytest.approx(1e-5)


def test_a_run_without_canaries_cannot_be_audited(tmp_path: Path) -> None:
    (tmp_path / "run_config.json").write_text(json.dumps({"run_config": tiny_flat()}))
    with pytest.raises(ConfigError, match="no canaries"):
        audit_run(tmp_path)
    with pytest.raises(ConfigError, match="unreadable"):
        audit_run(tmp_path / "nowhere")


def test_white_box_gradient_canaries_through_the_federation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Gradient canaries in every client's DP-SGD: scored on the devices, kept there (never in
    a reply), audited beside the black-box canaries; the correct mechanism stays below its
    claim."""
    run_dir = _run(tmp_path, dp=True, **{"dp-target-epsilon": 2.0, "local-steps": 2,
                                         "audit-gradient-canaries": 200})
    rows = sorted(tmp_path.glob("client-state/*/gradient-canary-scores.jsonl"))
    assert len(rows) == 4  # every client trained and kept its scores
    audits = json.loads((run_dir / "audit.json").read_text())["audits"] if (
        run_dir / "audit.json").exists() else None
    assert audits is None  # nothing audits until asked
    assert main(["audit", "--existing", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "black box" in out and "white box" in out
    audits = json.loads((run_dir / "audit.json").read_text())["audits"]
    white = next(a for a in audits if a["access"] == "white box")
    assert white["canaries"] == 200 and white["client_rounds_scored"] == 4
    assert white["tests"] >= 2 and "all" in white["bounds"]
    assert white["epsilon_lower_bound"] <= white["claimed_epsilon"]
    metrics = (run_dir / "metrics.jsonl").read_text()
    assert "canary" not in metrics  # the scores never left the devices


@pytest.mark.parametrize("flat, match", [
    ({"dp": False}, "audits record-level DP-SGD"),
    ({"dp": True, "batch-clients": 4}, "batch-clients = 1"),
])
def test_gradient_canaries_refuse_runs_they_cannot_audit(flat: dict[str, object],
                                                         match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_run_config(tiny_flat(**{"audit-gradient-canaries": 10, **flat}))


def _user_canary_run(tmp: Path) -> Path:
    """6 clients with data and 60 canary clients, every client in the one round, a 4-token
    soft prompt (2,304 coordinates), user-level epsilon 1."""
    run = parse_run_config(tiny_flat(**{
        "run-dir": str(tmp), "num-rounds": 1, "dp": True, "dp-level": "user", "secagg": True,
        "method": "prompt", "prompt-tokens": 4, "weighting": "uniform",
        "dp-user-epsilon": 1.0, "dp-user-clip": 0.5, "secagg-dropout": 0.05,
        "secagg-max-abort": 0.5, "local-steps": 2, "audit-user-canaries": 60}))
    transport = InMemoryTransport(run, 6 + 60)
    assert transport.runtimes[5].user_canary is None and transport.runtimes[6].user_canary == 0
    summary = Coordinator(run, transport, tmp).run_federation()
    assert not summary.stopped_reason and summary.rounds_completed == 1
    return tmp


def test_user_level_canary_clients_audit_below_the_claim(tmp_path: Path) -> None:
    doc = audit_run(_user_canary_run(tmp_path))
    assert doc["level"] == "user" and doc["canaries"] == 60
    assert doc["included_canaries_that_joined"] == doc["included"]  # everyone joined
    assert isinstance(doc["claimed_epsilon"], float) and doc["claimed_epsilon"] <= 1.0
    assert doc["epsilon_lower_bound"] <= doc["claimed_epsilon"]


def test_user_level_noise_reported_but_not_added_is_caught(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    def no_noise(n: int, variance: float, source: object) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)  # the ledger still records the planned noise

    monkeypatch.setattr("fedpeft.privacy.ddg_mechanism.discrete_gaussian_batch", no_noise)
    doc = audit_run(_user_canary_run(tmp_path))
    assert doc["epsilon_lower_bound"] > doc["claimed_epsilon"]
    assert doc["gaussian_epsilon_estimate"] > 10 * doc["claimed_epsilon"]
