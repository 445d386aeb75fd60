"""Smoke run of the user-level wire benchmark (benchmarks/user_wire_bench.py --quick)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_measures_packed_bytes_and_the_noise_only_error(tmp_path: Path) -> None:
    out = tmp_path / "user_wire.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "user_wire_bench.py"),
                           "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["bits"] for r in rows] == [16, 20]
    for r in rows:
        # packed: bits per coordinate of the padded vector, plus a small header
        assert r["masked_bytes"] - r["padded"] * r["bits"] // 8 < 128
        assert r["wrapped_coordinates"] == 0 and r["epsilon"] <= 8.0
        # the decoded sum's error is the privacy noise (4096 coordinates: sd 0.022 of it)
        assert abs(r["mse_over_noise_variance"] - 1.0) < 0.15
