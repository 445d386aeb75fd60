"""The whole tree type-checks under mypy --strict: the fedpeft namespace, benchmarks/ and
scripts/ (settings in pyproject.toml; scripts/typecheck.py lays the namespace out for mypy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_mypy_strict_is_clean() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "typecheck.py")], cwd=root,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
