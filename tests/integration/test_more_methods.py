"""(IA)3, BitFit, bottleneck adapters and prefix tuning (issue 18) through whole federations: record-level
DP-SGD and user-level DP, both inside SecAgg+, on the real models cut to 2 layers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from fedpeft.coordinator.server import Coordinator
from fedpeft.peft_methods import get_adapted
from fedpeft.peft_methods.registry import initial_adapter_state
from fedpeft.runconfig.config import parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport
from tests.conftest import tiny_flat

pytestmark = pytest.mark.integration

GOOD = ["a wonderful film", "truly great acting", "i loved every minute", "a delight",
        "moving and funny", "brilliant and warm"]
BAD = ["a dull mess", "terrible pacing", "i hated it", "boring and long", "awful script",
       "a waste of time"]


def _sentiment_file(path: Path, n: int = 240, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choice(GOOD if label else BAD).split()
        rng.shuffle(words)
        lines.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _flat(tmp: Path, model: str, method: str, level: str) -> dict[str, object]:
    placement = {"bottleneck-placement": "parallel"} if method == "bottleneck-parallel" else {}
    method = method.removesuffix("-parallel")
    flat = tiny_flat(**{"run-dir": str(tmp / "run"), "method": method, "secagg": True, **placement,
                        "weighting": "uniform", "dp": True, "dp-level": level,
                        "num-rounds": 2, "local-steps": 2, "batch-size": 4, "min-clients": 3,
                        "secagg-dropout": 0.2, "secagg-max-abort": 0.5})
    if model == "minilm":
        flat.update({"model": "minilm-l6", "task": "classification", "dataset": "file",
                     "data-path": str(_sentiment_file(tmp / "sentiment.tsv")),
                     "partitioner": "iid", "max-examples-per-client": 24,
                     "eval-examples": 24, "lr": 0.05})
    if level == "record":
        flat.update({"dp-target-epsilon": 8.0, "max-examples-per-client": 24})
    else:
        flat.update({"dp-user-epsilon": 8.0, "dp-user-clip": 0.5})
    return flat


@pytest.mark.parametrize(("model", "method", "level"), [
    ("smollm", "ia3", "record"),
    ("minilm", "bitfit", "record"),
    ("minilm", "ia3", "user"),
    ("minilm", "bitfit", "user"),
    ("smollm", "bottleneck", "record"),
    ("minilm", "bottleneck-parallel", "user"),
    ("smollm", "prefix", "user"),
])
def test_method_trains_privately_inside_secagg(model: str, method: str, level: str,
                                               tmp_path: Path) -> None:
    run = parse_run_config(_flat(tmp_path, model, method, level))
    adapted = get_adapted(run.model, run.adapter, run.seed)
    trainable = set(adapted.adapter_parameters())
    frozen_before = {k: v.clone() for k, v in adapted.named_parameters() if k not in trainable}
    initial = initial_adapter_state(run.model, run.adapter, run.seed)
    summary = Coordinator(run, InMemoryTransport(run, 6 if level == "user" else 3),
                          tmp_path / "run").run_federation()
    assert summary.rounds_completed == 2 and not summary.stopped_reason
    final = adapted.adapter_state()
    assert any(not torch.equal(initial[k], final[k]) for k in initial), "adapter did not change"
    for k, p in adapted.named_parameters():
        if k not in trainable:
            assert torch.equal(frozen_before[k], p), f"frozen weight {k} changed"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("skipped" not in r for r in rows[1:]), rows
    report = json.loads((tmp_path / "run" / "privacy_report.json").read_text())
    assert report["levels"] == level
    # the round's checkpoint is the method's own export
    adapter_dir = tmp_path / "run" / "checkpoints" / "round-0002" / "adapter"
    own = method == "bitfit" or method.startswith("bottleneck")
    expected = "fedpeft_adapter.json" if own else "adapter_config.json"
    assert (adapter_dir / expected).is_file()
