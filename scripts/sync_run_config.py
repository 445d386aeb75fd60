"""Rewrite [tool.flwr.app.config] in pyproject.toml from fedpeft.runconfig.config.DEFAULTS
(its last table)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fedpeft.runconfig.config import DEFAULTS  # noqa: E402

HEADER = "[tool.flwr.app.config]"


def render() -> str:
    lines = [HEADER, "# Run knobs (parsed once by fedpeft.runconfig.config.parse_run_config). "
             "Defaults = the chat-lora preset."]
    for k, v in DEFAULTS.items():
        s = ("true" if v else "false") if isinstance(v, bool) else (
            json.dumps(v) if isinstance(v, str) else repr(v))
        lines.append(f"{k} = {s}")
    return "\n".join(lines) + "\n"


def main() -> None:
    path = ROOT / "pyproject.toml"
    text = path.read_text()
    head = text[: text.index(HEADER)] if HEADER in text else text + "\n"
    path.write_text(head + render())


if __name__ == "__main__":
    main()
