"""Run mypy --strict over the fedpeft namespace, benchmarks/ and scripts/ (what CI runs).

mypy cannot follow setuptools' package-dir mapping (``fedpeft.client`` -> ``client/``), so this
lays the namespace out as symbolic links in a temporary folder -- ``fedpeft/core`` ->
``<repo>/fedpeft/core``, ``fedpeft/client`` -> ``<repo>/client``, ... -- exactly the tree an
installed wheel has, and checks that. Settings come from ``[tool.mypy]`` in pyproject.toml.

    .venv/bin/python scripts/typecheck.py            # exit status = mypy's
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """``fedpeft.<name>`` -> its folder: the package-dir mapping plus fedpeft/'s own packages."""
    doc = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = doc["tool"]["setuptools"]["package-dir"]
    out = {name.split(".", 1)[1]: root / folder for name, folder in mapping.items()}
    for sub in sorted((root / "fedpeft").iterdir()):
        if (sub / "__init__.py").is_file():
            out[sub.name] = sub
    return out


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="fedpeft-typecheck-") as tmp:
        ns = Path(tmp) / "fedpeft"
        ns.mkdir()
        for name, folder in package_dirs().items():
            (ns / name).symlink_to(folder, target_is_directory=True)
        cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
               "--cache-dir", os.environ.get("MYPY_CACHE_DIR", str(ROOT / ".mypy_cache")),
               str(ns), "benchmarks", "scripts", *extra]
        env = {**os.environ, "MYPYPATH": tmp}
        return subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
