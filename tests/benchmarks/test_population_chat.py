"""The chitchat population benchmark (benchmarks/population_chat_bench.py): arms, labels and
the table; a quick smoke run of every kind of arm in the slow tier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.population_chat_bench import FULL, QUICK, arm_config, markdown, resolved
from fedpeft.runconfig.config import parse_run_config

ROOT = Path(__file__).resolve().parents[2]


def test_every_arm_is_a_valid_run_config() -> None:
    for method in ("prompt", "lora"):
        for privacy in ("non-private", "user-eps8", "record-eps8"):
            cfg = arm_config(f"{method}-{privacy}", FULL, 0, 1.5)
            run = parse_run_config(resolved(method, cfg))
            assert run.data.dataset == "chitchat" and run.data.partitioner == "natural"
            assert run.adapter.method == method
            assert run.dp_level == {"non-private": "off", "user-eps8": "user",
                                    "record-eps8": "record"}[privacy]
            if privacy == "user-eps8":
                assert run.user_dp.clip == 1.5 and run.user_dp.participations == 1
    with pytest.raises(ValueError, match="unknown arm"):
        arm_config("prompt-eps3", FULL, 0, 1.0)


def test_kept_share_of_the_gain_is_against_the_same_method() -> None:
    def row(arm: str, initial: float, final: float) -> dict[str, object]:
        return {"arm": arm, "label": arm, "initial": initial, "final": final, "best": final,
                "epsilon": None, "upload_bytes_per_client_round": 1000.0,
                "seconds_per_round_each": [1.0]}
    doc = {"meta": {"scale": {"layers": 0, "clients": 10, "examples_per_client": 4,
                              "clients_per_round": 5, "rounds": 2, "local_steps": 1,
                              "batch": 2}},
           "arms": [row("prompt-non-private", 100.0, 40.0), row("prompt-user-eps8", 100.0, 70.0),
                    row("lora-non-private", 200.0, 100.0), row("lora-user-eps8", 200.0, 190.0)]}
    table = markdown(doc)
    assert "| prompt-user-eps8 | 100.0 | 70.0 | 70.0 | 50 % |" in table
    assert "| lora-user-eps8 | 200.0 | 190.0 | 190.0 | 10 % |" in table


@pytest.mark.slow
def test_quick_run_writes_every_kind_of_arm(tmp_path: Path) -> None:
    out = tmp_path / "chat.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.population_chat_bench", "--quick",
                           "--arms", "prompt-non-private,prompt-user-eps8,lora-record-eps8",
                           "--out", str(out), "--work-dir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    arms = {a["arm"]: a for a in doc["arms"]}
    assert set(arms) == {"prompt-non-private", "prompt-user-eps8", "lora-record-eps8"}
    for a in arms.values():
        assert a["metric"] == "perplexity" and a["rounds"] == QUICK.rounds
        assert a["best"] == min(a["curve"])
    assert 0 < arms["prompt-user-eps8"]["epsilon"] <= 8.0 + 1e-9
    assert arms["prompt-user-eps8"]["user"]["releases"] == QUICK.rounds
    assert 0 < arms["lora-record-eps8"]["epsilon"] <= 8.0 + 1e-9
    assert "prompt" in doc["meta"]["probes"]
