"""Shared fixtures: tiny (2-layer) cuts of the embedded models, loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_flat(**overrides: object) -> dict[str, object]:
    """Run config for a fast federation on the real SmolLM2 cut to 2 layers."""
    flat: dict[str, object] = {
        "num-hidden-layers": 2, "num-rounds": 2, "local-steps": 3, "batch-size": 4,
        "max-examples-per-client": 12, "eval-examples": 12, "lr": 0.01, "progress": False,
        "max-length": 32, "dp": False, "secagg": False, "weighting": "examples",
    }
    flat.update(overrides)
    return flat


@pytest.fixture
def tiny() -> object:
    return tiny_flat
