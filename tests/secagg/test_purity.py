"""``fedpeft.secagg`` is pure state machines on bytes (checked on the source, not by running it).

No I/O, no logging, no non-cryptographic randomness, imports limited to itself,
``fedpeft.core.errors``, numpy, ``cryptography`` and a few standard modules; and
``secagg/prg.py`` is the only module of ``fedpeft.secagg`` and ``fedpeft.privacy`` that builds
a raw ChaCha20 cipher.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import fedpeft.secagg

SECAGG = Path(fedpeft.secagg.__file__).parent
MODULES = sorted(SECAGG.glob("*.py"))
#: Standard-library modules secagg may use (``time`` only for the driver's timings).
STDLIB = {"__future__", "collections", "dataclasses", "enum", "hashlib", "math", "os", "secrets",
          "struct", "typing", "time", "datetime"}
FIRST_PARTY = ("fedpeft.secagg", "fedpeft.core.errors")
#: Calls that would do I/O or run code.
FORBIDDEN_CALLS = {"print", "open", "input", "breakpoint", "exec", "eval", "compile", "__import__"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module) -> list[str]:
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used in fedpeft"
            out.append(str(node.module))
    return out


def test_the_package_has_the_expected_modules() -> None:
    names = {p.stem for p in MODULES}
    assert {"client", "state", "server", "messages", "prg", "kdf", "shamir"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_are_limited(path: Path) -> None:
    for name in _imports(_tree(path)):
        top = name.split(".")[0]
        if top == "fedpeft":
            assert name.startswith(FIRST_PARTY), f"{path.name} imports {name} (upward or sideways)"
        else:
            assert top in STDLIB | {"numpy", "cryptography"}, f"{path.name} imports {name}"
        if top == "time":
            assert path.name == "driver.py", f"{path.name} reads the clock"
    for node in ast.walk(_tree(path)):  # datetime for types and arithmetic; the clock is passed in
        if isinstance(node, ast.Attribute) and node.attr in ("now", "utcnow", "today"):
            pytest.fail(f"{path.name} reads the clock ({node.attr}); take a clock argument")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_io_calls_and_only_urandom_from_os(path: Path) -> None:
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {node.func.id}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            assert node.attr == "urandom", f"{path.name}:{node.lineno} uses os.{node.attr}"
        if isinstance(node, ast.Attribute) and node.attr == "random" and isinstance(node.value, ast.Name):
            assert node.value.id not in ("np", "numpy"), f"{path.name}:{node.lineno} uses numpy.random"


def _builds_chacha20(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "ChaCha20":
            return True
        if isinstance(node, ast.Name) and node.id == "ChaCha20":
            return True
        if isinstance(node, ast.ImportFrom) and any(a.name == "ChaCha20" for a in node.names):
            return True
    return False


def test_only_prg_builds_a_chacha20_cipher() -> None:
    spec = importlib.util.find_spec("fedpeft.privacy")
    assert spec is not None and spec.submodule_search_locations
    privacy = [p for loc in spec.submodule_search_locations for p in sorted(Path(loc).rglob("*.py"))]
    builders = [p for p in [*MODULES, *privacy] if _builds_chacha20(_tree(p))]
    assert builders == [SECAGG / "prg.py"]
