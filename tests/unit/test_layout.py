"""The house rules hold: import contracts, lint, one namespace, one source per table.

The import contracts live in ``.importlinter`` (the picture of docs/architecture.md); ruff's
rules in pyproject.toml; the package list (what a wheel installs) in ``[tool.setuptools]``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_import_contracts_hold() -> None:
    proc = _run([str(BIN / "lint-imports"), "--no-cache"])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def test_ruff_is_clean() -> None:
    proc = _run([str(BIN / "ruff"), "check", "--no-cache", "."])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _package_folders() -> dict[str, Path]:
    """Every package on disk, by the name it installs under."""
    out: dict[str, Path] = {}
    for init in sorted((ROOT / "fedpeft").rglob("__init__.py")):
        out[".".join(init.parent.relative_to(ROOT).parts)] = init.parent
    for name, folder in SETUPTOOLS["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            out[".".join((name, *rel))] = init.parent
    return out


def test_one_distribution_namespace() -> None:
    packages = SETUPTOOLS["packages"]
    assert all(p.startswith("fedpeft.") for p in packages), packages
    assert all(k.startswith("fedpeft.") for k in SETUPTOOLS["package-dir"])
    # every package on disk is installed (a new subpackage cannot silently miss the wheel)
    assert sorted(packages) == sorted(_package_folders())
    # fedpeft/ is a namespace: the mapped folders join it, nothing shadows them
    assert not (ROOT / "fedpeft" / "__init__.py").exists()
    for name in SETUPTOOLS["package-dir"]:
        assert not (ROOT / "fedpeft" / name.split(".", 1)[1]).exists(), name
    # the required top-level folders stay on disk
    for folder in ("coordinator", "client", "peft_methods", "privacy", "simulations", "tests"):
        assert (ROOT / folder).is_dir(), folder


def test_wheel_installs_nothing_but_fedpeft(tmp_path: Path) -> None:
    had_build = (ROOT / "build").exists()
    try:
        proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                     "--quiet", "--wheel-dir", str(tmp_path), str(ROOT)])
    finally:
        if not had_build:  # setuptools builds in the tree; leave it as it was
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedpeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"fedpeft", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}, tops
    for mod in ("fedpeft/client/runtime.py", "fedpeft/secagg/client.py",
                "fedpeft/privacy/accounting/ledger.py", "fedpeft/core/errors.py"):
        assert mod in names, mod


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_hazmat_only_in_secagg_and_certs() -> None:
    """cryptography's hazmat layer (raw primitives) only in fedpeft.secagg; TLS issuance
    (fedpeft/deploy/certs.py) needs its key types for X.509 and is the one exception."""
    allowed = {ROOT / "fedpeft" / "deploy" / "certs.py"}
    users = set()
    for folder in _package_folders().values():
        for py in folder.glob("*.py"):
            if any(m.startswith("cryptography.hazmat") for m in _imports(py)):
                users.add(py)
    secagg = ROOT / "secagg"
    assert users, "no module imports cryptography.hazmat: is the scan broken?"
    assert {u for u in users if secagg not in u.parents} <= allowed, users


def test_one_table_of_optimizer_names() -> None:
    from fedpeft.training import trainer
    from fedpeft.training.config import OPTIMIZERS

    assert tuple(trainer._OPTIMIZER_BUILDERS) == OPTIMIZERS


def test_flower_components_are_in_the_namespace() -> None:
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedpeft.coordinator.app:app",
                          "clientapp": "fedpeft.client.app:app"}
