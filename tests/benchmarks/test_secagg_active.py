"""Smoke run of the SecAgg+ hardening cost benchmark (benchmarks/secagg_active_bench.py --quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_compares_the_three_variants_on_exact_sums(tmp_path: Path) -> None:
    out = tmp_path / "secagg_active.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "secagg_active_bench.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["variant"]) for r in rows] == [
        (n, v) for n in (10, 20) for v in ("before", "planner", "active")]
    assert all(r["exact_sum_verified"] for r in rows)
    by = {(r["n"], r["variant"]): r for r in rows}
    # the planner at gamma = 0.05 tolerates one colluder at n = 20: never a lower threshold
    assert by[(20, "planner")]["threshold"] >= by[(20, "before")]["threshold"]
    # signed advertisements cost bytes: the certificates travel with the keys
    assert by[(20, "active")]["download_bytes_per_client"] > by[(20, "planner")]["download_bytes_per_client"]
    assert "| n | variant |" in out.with_suffix(".md").read_text()
