"""Measure the house: lines of code per package of the fedpeft namespace and the largest share.

    .venv/bin/python scripts/house_stats.py           # a Markdown table (docs/architecture.md)

Counts non-blank, non-comment source lines of every ``.py`` file of each top-level package
(``fedpeft.core``, ``fedpeft.client``, ...; the folders come from scripts/typecheck.py's
mapping). Import contracts are counted by ``lint-imports`` (tests/unit/test_layout.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.typecheck import package_dirs  # noqa: E402  (a sibling script)


def code_lines(path: Path) -> int:
    """Source lines of one file: not blank, not only a comment."""
    return sum(1 for line in path.read_text().splitlines()
               if line.strip() and not line.strip().startswith("#"))


def package_lines() -> dict[str, int]:
    """``fedpeft.<package>`` -> its code lines (sub-packages included)."""
    return {f"fedpeft.{name}": sum(code_lines(p) for p in folder.rglob("*.py"))
            for name, folder in sorted(package_dirs().items())}


def main() -> None:
    lines = package_lines()
    total = sum(lines.values())
    print("| package | lines | share |\n|---|---:|---:|")
    for name, n in sorted(lines.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {n} | {100 * n / total:.1f}% |")
    print(f"| total | {total} | |")


if __name__ == "__main__":
    main()
