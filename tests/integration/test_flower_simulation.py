"""The real Flower simulation engine (SuperLink + Ray), offline, through `fedpeft simulate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.launcher import simulate
from tests.conftest import tiny_flat

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flower_simulation_completes(tmp_path: Path) -> None:
    flat = tiny_flat(**{"num-rounds": 1})
    result = simulate(flat, 2, tmp_path / "run", stream=False)  # type: ignore[arg-type]
    assert result.status == "finished:completed", (tmp_path / "run" / "flwr-run.log").read_text()[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 1 and rows[-1]["ok"] == 2
    assert (tmp_path / "run" / ".flwr" / "config.toml").is_file()  # FLWR_HOME stays run-local


def test_failed_run_is_detected(tmp_path: Path) -> None:
    flat = tiny_flat(**{"dataset": "file", "data-path": str(tmp_path / "missing.tsv")})
    result = simulate(flat, 2, tmp_path / "run", stream=False)  # type: ignore[arg-type]
    assert result.status == "finished:failed" and result.returncode == 1
