"""Foundation benchmarks (issue: federated PEFT on one machine).

1. Bytes uploaded per client per round: adapter payload vs full fine-tuning of the same model.
2. Wall time of one round with 10 clients for each preset (in-process transport: the same
   client and coordinator code as the Flower simulation, without Ray's scheduling).
3. Peak RSS of one process simulating 1, 10 and 100 virtual clients (one subprocess each).

Results: ``benchmarks/results/foundation.json``; summary in ``docs/benchmarks.md``.
Usage: ``.venv/bin/python benchmarks/foundation_bench.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "foundation.json"


def bytes_table() -> list[dict[str, object]]:
    from fedpeft.models import ModelConfig
    from fedpeft.wire import encode
    from peft_methods import AdapterConfig, LoraSettings, PromptSettings, build

    rows = []
    for model in (ModelConfig("smollm2-135m", task="causal_lm"),
                  ModelConfig("minilm-l6", task="classification")):
        for adapter in (AdapterConfig("lora", LoraSettings(r=8)),
                        AdapterConfig("prompt", PromptSettings(num_virtual_tokens=16))):
            m = build(model, adapter)
            payload = len(encode(m.adapter_state()))
            # full fine-tuning would upload every parameter as float32 (tied weights once)
            seen: set[int] = set()
            full = 0
            for p in m.frozen_module().parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    full += p.numel() * 4
            rows.append({"model": model.name, "method": adapter.method,
                         "trainable": m.num_trainable(), "upload_bytes": payload,
                         "full_ft_bytes": full, "ratio": full / payload})
            del m
    return rows


def round_time(preset: str, clients: int, flat_extra: dict[str, object]) -> dict[str, object]:
    from coordinator.server import Coordinator
    from fedpeft.config import DEFAULTS, parse_run_config
    from simulations.inmemory import InMemoryTransport
    from simulations.presets import get_preset

    p = get_preset(preset)
    with tempfile.TemporaryDirectory() as d:
        flat = {**DEFAULTS, **p.config, "num-rounds": 1, "progress": False, "run-dir": d,
                **flat_extra}
        run = parse_run_config(flat)
        transport = InMemoryTransport(run, clients)
        coord = Coordinator(run, transport, Path(d))
        coord.model  # load once, outside the timed round
        coord.eval_data(clients)
        t = time.perf_counter()
        coord.run_federation()
        total = time.perf_counter() - t
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    r1 = rows[-1]
    train = sum(c["train-seconds"] for c in r1["clients"])
    return {"preset": preset, "clients": clients, "round_seconds": r1["seconds"],
            "client_train_seconds_total": train, "with_initial_eval_seconds": total,
            "local_steps": run.train.local_steps, "batch_size": run.train.batch_size,
            "max_length": run.model.max_length, "layers": run.model.num_hidden_layers or "all"}


RSS_CHILD = r"""
import json, resource, sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from coordinator.server import Coordinator
from fedpeft.config import DEFAULTS, parse_run_config
from simulations.inmemory import InMemoryTransport
n = int(sys.argv[1])
d = tempfile.mkdtemp()
run = parse_run_config({**DEFAULTS, "num-hidden-layers": 2, "num-rounds": 1, "local-steps": 1,
    "batch-size": 4, "max-length": 32, "max-examples-per-client": 8, "eval-examples": 8,
    "progress": False, "run-dir": d, "min-clients": 1})
coord = Coordinator(run, InMemoryTransport(run, n), Path(d))
coord.model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
coord.run_federation()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"clients": n, "rss_after_model_mb": base / 1024, "peak_rss_mb": peak / 1024}))
"""


def rss_scaling(counts: list[int]) -> list[dict[str, object]]:
    out = []
    for n in counts:
        proc = subprocess.run([sys.executable, "-c", RSS_CHILD, str(n), str(ROOT)],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2-layer models, fewer clients")
    args = parser.parse_args()
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                  "quick": args.quick}
    results["bytes"] = bytes_table()
    extra: dict[str, object] = {"num-hidden-layers": 2} if args.quick else {}
    results["round_time"] = [round_time(p, 10, extra) for p in ("chat-lora", "chat-prompt", "sst2-lora")
                             if p != "sst2-lora" or _has_sst2()]
    results["rss"] = rss_scaling([1, 10] if args.quick else [1, 10, 100])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _has_sst2() -> bool:
    from fedpeft.data.paths import data_available

    return data_available("sst2_train.tsv") and data_available("sst2_dev.tsv")


if __name__ == "__main__":
    main()
