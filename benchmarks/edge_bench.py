"""Edge footprint of one DP client: peak RSS and time per local DP-SGD step.

Each configuration runs in its own subprocess (so ``ru_maxrss`` is that client's peak alone):
a :class:`fedpeft.client.runtime.ClientRuntime` with DP on (Opacus hooks mode, Poisson batches of
expected size 8, sequences padded/truncated to ``max-length``) answers two ``train`` messages
from the initial global adapter, exactly as it would in a federation (ledger in a temporary
state directory, no secure aggregation: masking is a few ms and a few MB, see secagg.json).
Reported per configuration:

* ``rss_after_load_mb``: peak RSS once the base model, adapter and tokenised data are loaded;
* ``peak_rss_mb``: peak RSS after the two rounds (what the device must have free);
* ``seconds_per_step``: the second round's local training time / its DP steps (the first
  round includes Opacus' one-off set-up).

Usage: ``python benchmarks/edge_bench.py [--out benchmarks/results/edge.json] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SMOLLM = {"model": "smollm2-135m", "task": "causal_lm", "dataset": "chitchat",
          "partitioner": "natural"}
MINILM = {"model": "minilm-l6", "task": "classification", "num-labels": 2, "dataset": "sst2",
          "partitioner": "iid"}
# name -> run-config overrides (on top of COMMON)
CONFIGS: dict[str, dict[str, Any]] = {
    "minilm-l6 LoRA r=8": {**MINILM},
    "smollm2-135m LoRA r=8": {**SMOLLM},
    "smollm2-135m max-length 32": {**SMOLLM, "max-length": 32},
    "smollm2-135m dp-physical-batch 2": {**SMOLLM, "dp-physical-batch": 2},
    "smollm2-135m num-hidden-layers 15": {**SMOLLM, "num-hidden-layers": 15},
    "smollm2-135m num-hidden-layers 4": {**SMOLLM, "num-hidden-layers": 4},
}
COMMON: dict[str, Any] = {
    "method": "lora", "lora-r": 8, "lora-alpha": 16, "max-length": 64, "batch-size": 8,
    "max-examples-per-client": 64, "eval-examples": 8, "lr": 0.001, "dp": True,
    "dp-grad-sample-mode": "hooks", "dp-target-epsilon": 8.0, "dp-planned-rounds": 10,
    "secagg": False, "weighting": "uniform", "progress": False, "num-rounds": 2,
}
TARGETS_MB = {"minilm-l6 LoRA r=8": 1024.0, "smollm2-135m LoRA r=8": 2560.0}



def _num(value: object) -> float:
    """A reply/metrics field read as a number (a benchmark bug if it is not one)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")

def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def child(flat: dict[str, Any]) -> dict[str, Any]:
    """One client, in this process: load, then two DP rounds. Returns the measurements."""
    t0 = time.perf_counter()
    import torch

    from fedpeft.client.runtime import ClientIdentity, ClientRuntime
    from fedpeft.core.wire import encode as encode_tensors
    from fedpeft.peft_methods.registry import initial_adapter_state
    from fedpeft.runconfig.config import parse_run_config

    rss_imports = _maxrss_mb()
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as state_dir:
        run = parse_run_config({**flat, "run-dir": state_dir})
        rt = ClientRuntime(run, ClientIdentity("edge", 0, 1, state_dir=state_dir))
        data = rt.data()
        init = initial_adapter_state(run.model, run.adapter, run.seed)
        payload = encode_tensors(init)
        load_s = time.perf_counter() - t0
        rss_load = _maxrss_mb()
        rounds = []
        for server_round in (1, 2):
            reply = rt.handle("train", {"round": server_round, "fingerprint": run.fingerprint(),
                                        "adapter": payload}, {})
            if reply.get("status") != "ok":
                raise RuntimeError(f"round {server_round} failed: {reply}")
            # under DP timings stay on the device: read the runtime's local record
            rounds.append({**reply, **rt.last_local})
        trainable = sum(p.numel() for p in rt.model.adapter_parameters().values())
        info = rt.model.base_info
    last = rounds[-1]
    return {
        "rss_after_imports_mb": round(rss_imports, 1),
        "rss_after_load_mb": round(rss_load, 1),
        "peak_rss_mb": round(_maxrss_mb(), 1),
        "load_seconds": round(load_s, 2),
        "seconds_per_step": round(_num(last["train-seconds"]) / _num(last["steps"]), 3),
        "first_round_seconds_per_step": round(_num(rounds[0]["train-seconds"])
                                              / _num(rounds[0]["steps"]), 3),
        "steps_per_round": int(_num(last["steps"])),
        "examples": len(data), "seq_len": int(data.input_ids.shape[1]),
        "trainable_params": int(trainable),
        "base_params": int(sum(p.numel() for p in info.model.parameters())),
        "num_hidden_layers": int(info.model.config.num_hidden_layers),
        "dp_epsilon_after_2_rounds": _num(last["dp-epsilon"]),
        "torch_threads": torch.get_num_threads(),
    }


def run_one(name: str, overrides: dict[str, Any], steps: int, timeout: float) -> dict[str, Any]:
    flat = {**COMMON, "local-steps": steps, **overrides}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                          json.dumps(flat)], capture_output=True, text=True, timeout=timeout,
                         cwd=str(ROOT), check=False,
                         env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                              "PYTHONPATH": str(ROOT)})
    line = next((x for x in out.stdout.splitlines() if x.startswith("EDGE ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"{name}: child failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    res: dict[str, Any] = json.loads(line[len("EDGE "):])
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["config"] = {k: v for k, v in flat.items() if k not in COMMON or COMMON[k] != v}
    target = TARGETS_MB.get(name)
    if target is not None:
        res["target_peak_rss_mb"] = target
        res["meets_target"] = res["peak_rss_mb"] < target
    print(f"{name:38s} peak {res['peak_rss_mb']:7.1f} MB  load {res['rss_after_load_mb']:7.1f} MB"
          f"  {res['seconds_per_step']:.3f} s/step", flush=True)
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "edge.json"))
    parser.add_argument("--steps", type=int, default=3, help="DP steps per round")
    parser.add_argument("--only", action="append", default=[], help="run only these configs")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if args.child:
        print("EDGE " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.steps < 1:
        raise SystemExit(f"--steps={args.steps} must be >= 1")
    names = args.only or list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"--only {unknown}: unknown; known: {list(CONFIGS)}")
    t0 = time.time()
    load1 = os.getloadavg()[0]
    results = {name: run_one(name, CONFIGS[name], args.steps, args.timeout) for name in names}
    doc = {
        "benchmark": "edge footprint of one DP client (ClientRuntime, Opacus hooks mode, "
                     "LoRA r=8, expected batch 8, 2 rounds)",
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1min_at_start": round(load1, 2)},
        "common_config": {**COMMON, "local-steps": args.steps},
        "results": results,
        "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
