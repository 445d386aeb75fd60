"""Foundation benchmarks (issue: federated PEFT on one machine).

1. Bytes uploaded per client per round: adapter payload vs full fine-tuning of the same model.
2. Wall time of one round with 10 clients for each preset (in-process transport: the same
   client and coordinator code as the Flower simulation, without Ray's scheduling).
3. Resident memory of one process simulating 1, 10 and 100 virtual clients (one subprocess
   each; RSS sampled every 20 ms during the round, after the model and data are loaded).

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
    from fedpeft.core.models import ModelConfig
    from fedpeft.core.wire import encode
    from fedpeft.peft_methods import AdapterConfig, LoraSettings, PromptSettings, build

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


def round_time(preset: str, clients: int, flat_extra: dict[str, object],
               label: str = "") -> dict[str, object]:
    from fedpeft.coordinator.server import Coordinator
    from fedpeft.runconfig.config import DEFAULTS, parse_run_config
    from fedpeft.runconfig.presets import get_preset
    from fedpeft.simulations.inmemory import InMemoryTransport

    p = get_preset(preset)
    with tempfile.TemporaryDirectory() as d:
        flat = {**DEFAULTS, **p.config, "num-rounds": 1, "progress": False, "run-dir": d,
                **flat_extra}
        run = parse_run_config(flat)
        transport = InMemoryTransport(run, clients)
        coord = Coordinator(run, transport, Path(d))
        _ = coord.model  # load once, outside the timed round
        coord.eval_data(clients)
        t = time.perf_counter()
        coord.run_federation()
        total = time.perf_counter() - t
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    r1 = rows[-1]
    # under DP the clients keep their timings on the device (ClientRuntime.last_local)
    train = 0.0
    for rt in transport.runtimes.values():
        seconds = rt.last_local.get("train-seconds", 0.0)
        train += float(seconds) if isinstance(seconds, (int, float)) else 0.0
    return {"preset": label or preset, "clients": clients, "round_seconds": r1["seconds"],
            "dp": run.dp.enabled, "secagg": run.secagg is not None,
            "client_train_seconds_total": train, "with_initial_eval_seconds": total,
            "local_steps": run.train.local_steps, "batch_size": run.train.batch_size,
            "max_length": run.model.max_length, "layers": run.model.num_hidden_layers or "all"}


def round_times(quick: bool) -> list[dict[str, object]]:
    """Each preset with privacy on (its default) and off, side by side in one run."""
    extra: dict[str, object] = {"num-hidden-layers": 2} if quick else {}
    plain = {"dp": False, "secagg": False}
    runs = [("chat-lora", {}, ""), ("chat-lora", plain, "chat-lora (no DP, no SecAgg)"),
            ("chat-prompt", {}, ""), ("chat-prompt", plain, "chat-prompt (no DP, no SecAgg)")]
    if _has_sst2():
        runs += [("sst2-lora", {}, ""), ("sst2-lora", plain, "sst2-lora (no DP, no SecAgg)")]
    return [round_time(p, 10, {**extra, **kw}, label) for p, kw, label in runs]


RSS_CHILD = r"""
import json, sys, tempfile, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from fedpeft.coordinator.server import Coordinator
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.simulations.inmemory import InMemoryTransport

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

n = int(sys.argv[1])
d = tempfile.mkdtemp()
run = parse_run_config({**DEFAULTS, "num-hidden-layers": 2, "num-rounds": 1, "local-steps": 1,
    "batch-size": 4, "max-length": 32, "max-examples-per-client": 8, "eval-examples": 8,
    "progress": False, "run-dir": d, "min-clients": 1, "dp": False, "secagg": False})
coord = Coordinator(run, InMemoryTransport(run, n), Path(d))
coord.model
coord.eval_data(n)
base = rss_mb()
peak = [base]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.02)
t = threading.Thread(target=sample, daemon=True)
t.start()
coord.run_federation()
stop.set(); t.join()
after = rss_mb()
print(json.dumps({"clients": n, "rss_before_round_mb": base, "peak_rss_round_mb": peak[0],
                  "rss_after_round_mb": after, "growth_mb": after - base}))
"""


LOAD_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from fedpeft.core.models import EMBEDDED, ModelConfig, dequantised_dir, load_fresh
t = time.perf_counter(); dequantised_dir(EMBEDDED["smollm2-135m"]); first = time.perf_counter() - t
t = time.perf_counter(); load_fresh(ModelConfig("smollm2-135m")); load = time.perf_counter() - t
print(json.dumps({"cache_check_seconds": first, "load_from_cache_seconds": load}))
"""


def load_time() -> dict[str, float]:
    """Second load of the embedded LLM (the dequantised cache exists), in a fresh process."""
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(ROOT)], capture_output=True,
                          text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


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
    parser.add_argument("--only-rss", action="store_true", help="rerun only the memory part")
    parser.add_argument("--only-rounds", action="store_true", help="rerun only the round times")
    args = parser.parse_args()
    if args.only_rounds or args.only_rss:
        saved: dict[str, object] = json.loads(RESULTS.read_text())
        if args.only_rounds:
            saved["round_time"] = round_times(args.quick)
        else:
            saved["rss"] = rss_scaling([1, 10] if args.quick else [1, 10, 100])
            saved["smollm2_load"] = load_time()
        RESULTS.write_text(json.dumps(saved, indent=2))
        print(json.dumps(saved["round_time" if args.only_rounds else "rss"], indent=2))
        return
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                                  "quick": args.quick}
    results["bytes"] = bytes_table()
    results["smollm2_load"] = load_time()
    results["round_time"] = round_times(args.quick)
    results["rss"] = rss_scaling([1, 10] if args.quick else [1, 10, 100])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def _has_sst2() -> bool:
    from fedpeft.data.paths import data_available

    return data_available("sst2_train.tsv") and data_available("sst2_dev.tsv")


if __name__ == "__main__":
    main()
