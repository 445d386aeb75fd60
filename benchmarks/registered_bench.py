"""Resident memory of one process against the number of registered virtual clients (issue 16).

One in-process federation (:class:`~fedpeft.simulations.inmemory.InMemoryTransport`) per size:
``N`` registered clients (SST-2 from ``../shared/data``, IID, 6 examples each, MiniLM-L6 LoRA,
max length 64), one round of 32 sampled clients, SecAgg+ on, non-private, batched 32 at a
time. RSS is read (``/proc/self/status``) after the model is loaded, after registration and
after the round; each size runs in a fresh process so sizes do not share an allocator.

Usage::

    python -m benchmarks.registered_bench [--sizes 100,1000,10000] [--out PATH]

Writes ``benchmarks/results/registered.json``; docs/benchmarks.md summarises.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "registered.json"
PER_ROUND = 32


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def one_size(n: int) -> dict[str, Any]:
    """Register ``n`` clients and run one round of :data:`PER_ROUND`, in this process."""
    import torch

    from fedpeft.coordinator.server import Coordinator
    from fedpeft.peft_methods import get_adapted
    from fedpeft.runconfig.config import DEFAULTS, parse_run_config
    from fedpeft.simulations.inmemory import InMemoryTransport

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        run = parse_run_config({
            **DEFAULTS, "run-dir": tmp, "dataset": "sst2", "model": "minilm-l6",
            "task": "classification", "method": "lora", "partitioner": "iid",
            "max-length": 64, "max-examples-per-client": 6, "local-steps": 1, "batch-size": 6,
            "num-rounds": 1, "clients-per-round": PER_ROUND, "min-clients": 2, "dp": False,
            "secagg": True, "secagg-max-abort": 0.5, "eval-examples": 32, "progress": False,
            "resume": False, "batch-clients": PER_ROUND, "weighting": "uniform"})
        get_adapted(run.model, run.adapter, run.seed)
        loaded = rss_bytes()
        t0 = time.perf_counter()
        transport = InMemoryTransport(run, n)
        registered = rss_bytes()
        register_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = Coordinator(run, transport, Path(tmp)).run_federation()
        round_s = time.perf_counter() - t0
        after = rss_bytes()
        if summary.rounds_completed != 1:
            raise RuntimeError(f"the round of {n} registered clients did not complete: "
                               f"{summary.stopped_reason}")
    mib = 2 ** 20
    return {"registered": n, "per_round": PER_ROUND, "rss_loaded_mib": loaded / mib,
            "rss_registered_mib": registered / mib, "rss_after_round_mib": after / mib,
            "register_s": register_s, "round_s": round_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_size(args.one)))
        return 0
    from fedpeft.data.paths import data_available

    if not data_available("sst2_train.tsv"):
        print("registered_bench: needs sst2_train.tsv in ../shared/data; skipped")
        return 0
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        out = subprocess.run([sys.executable, "-m", "benchmarks.registered_bench", "--one",
                              str(n)], cwd=ROOT, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n} registered: RSS {row['rss_loaded_mib']:.0f} -> "
              f"{row['rss_registered_mib']:.0f} -> {row['rss_after_round_mib']:.0f} MiB; "
              f"round {row['round_s']:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
