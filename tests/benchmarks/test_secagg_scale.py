"""Smoke run of the population-scale SecAgg+ benchmark (benchmarks/secagg_scale_bench.py --quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_writes_a_verified_result(tmp_path: Path) -> None:
    out = tmp_path / "secagg_scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "secagg_scale_bench.py"), "--quick",
                           "--unmask-repeats", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["quick"] is True
    assert {"cpus", "python", "numpy", "cryptography"} <= set(doc["meta"]["machine"])
    assert [r["n"] for r in doc["rows"]] == [20, 50]
    for r in doc["rows"]:
        assert r["exact_sum_verified"] is True
        assert r["dropped"] == round(0.2 * r["n"]) and r["survivors"] == r["n"] - r["dropped"]
        assert r["pairwise_masks_removed"] > 0  # dropped clients' masks really were removed
        assert len(r["server_unmask_seconds_runs"]) == 2
        assert {"on_advertise", "on_shares", "on_masked", "on_unmask"} <= set(r["server_seconds_by_stage"])
        assert r["upload_bytes_per_client_max"] > 4 * r["vector_length"]
    assert "| n | dropped |" in proc.stdout
