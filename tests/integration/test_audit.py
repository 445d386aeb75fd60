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
    assert json.loads((run_dir / "audit.json").read_text()) == doc
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
