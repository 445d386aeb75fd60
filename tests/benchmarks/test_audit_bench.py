"""The preset audit benchmark (benchmarks/audit_bench.py): arms and the overhead line."""

from __future__ import annotations

import pytest

from benchmarks.audit_bench import arm_overrides, markdown
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.runconfig.presets import get_preset


@pytest.mark.parametrize("preset", ["sst2-lora", "chat-lora"])
def test_arms_are_valid_and_only_the_plain_one_lacks_canaries(preset: str) -> None:
    for arm in ("eps8-plain", "eps8", "eps1", "no-dp"):
        o = arm_overrides(arm, 50, 100)
        run = parse_run_config({**DEFAULTS, **get_preset(preset).config, **o})
        assert run.data.canaries == (0 if arm == "eps8-plain" else 50)
        assert run.dp.gradient_canaries == (100 if arm in ("eps8", "eps1") else 0)
        assert run.dp.enabled == (arm != "no-dp")
    with pytest.raises(ValueError, match="unknown arm"):
        arm_overrides("eps3", 1, 1)


def test_the_overhead_is_the_audited_run_over_the_plain_one() -> None:
    audit = {"access": "black box", "claimed_epsilon": 8.0, "epsilon_lower_bound": 0.1,
             "canaries": 10, "ceiling": 1.0, "tpr_at_fpr": {"0.01": 0.0},
             "mean_score_included": 0.1, "mean_score_excluded": 0.0}
    doc = {"arms": [
        {"preset": "p", "arm": "eps8-plain", "seconds": 100.0, "train_seconds": 100.0},
        {"preset": "p", "arm": "eps8", "seconds": 120.0, "train_seconds": 110.0,
         "audit_seconds": 10.0, "audits": [audit]}]}
    text = markdown(doc)
    assert "**1.20x**" in text and "| p | eps8 | 8.00 | black box | 0.10 |" in text
