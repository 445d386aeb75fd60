"""Smoke run of the population-scale record- vs user-level DP benchmark
(benchmarks/population_bench.py --quick): every arm trains, the privacy numbers are read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.population_bench import (
    FULL,
    arm_config,
    arm_label,
    record_planned_rounds,
    resolved,
    user_participations,
)
from fedpeft.data.paths import data_available

ROOT = Path(__file__).resolve().parents[2]

needs_sst2 = pytest.mark.skipif(
    not (data_available("sst2_train.tsv") and data_available("sst2_dev.tsv")),
    reason="needs sst2_train.tsv and sst2_dev.tsv in ../shared/data (or FEDPEFT_DATA_DIR)")


def test_participation_choices_fit_the_rounds() -> None:
    # 10 rounds x 100 of 1,000 clients: every user can join once, and a record-level client
    # is selected more than 3 times with probability about 1.3 %
    assert user_participations(FULL) == 1
    assert record_planned_rounds(FULL) == 3
    # user level pins its SecAgg+ graph: the complete one by default, the sparse one apart
    complete = arm_config("user-eps8", FULL, 0, 1.0)
    sparse = arm_config("user-eps8-sparse", FULL, 0, 1.0)
    assert complete["secagg-degree"] == FULL.clients_per_round - 1
    assert sparse["secagg-threshold"] < complete["secagg-threshold"]
    # the adaptive arm: the complete graph, the default clip as a start, the median target
    adaptive = arm_config("user-eps8-adaptive", FULL, 0, 2.22)
    assert adaptive["secagg-degree"] == complete["secagg-degree"]
    assert (adaptive["dp-user-clip"], adaptive["dp-user-clip-quantile"]) == (1.0, 0.5)
    assert "adaptive clip from 1" in arm_label("user-eps8-adaptive", resolved(adaptive))
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config("user-eps8-bogus", FULL, 0, 1.0)


@pytest.mark.integration
@needs_sst2
def test_quick_run_writes_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "population.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.population_bench", "--quick",
                           "--out", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    meta = doc["meta"]
    assert meta["quick"] is True and {"cpus", "python", "torch"} <= set(meta["machine"])
    assert meta["choices"]["user_clip"] == pytest.approx(meta["probe"]["median"], abs=1e-4)
    arms = {a["arm"]: a for a in doc["arms"]}
    assert list(arms) == ["non-private", "user-eps8", "record-eps8"]
    rounds = meta["scale"]["rounds"]
    for a in arms.values():
        assert a["rounds"] == rounds and a["skipped"] == 0 and not a["stopped"]
        assert len(a["curve"]) == rounds + 1 and 0.0 <= a["final"] <= 1.0
        assert a["upload_bytes_per_client_round"] > 0 and a["seconds_per_round"] > 0
    assert arms["non-private"]["epsilon"] is None
    user = arms["user-eps8"]
    assert 0 < user["epsilon"] <= 8.0 + 1e-9
    assert user["user"]["per_client_noise_std"] > 0 and user["user"]["min_contributors"] >= 1
    assert user["user"]["releases"] == rounds
    assert user["user_update_norms_last_round_joined"]["users"] > 0
    record = arms["record-eps8"]
    assert 0 < record["epsilon"] <= 8.0 + 1e-9 and record["record"]["sigma"]
    assert "| arm |" in out.with_suffix(".md").read_text()
