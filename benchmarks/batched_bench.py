"""Batched multi-client training against one-by-one training, side by side in one run (issue 16).

Every arm trains the same clients from the same start, on the same data, in this process:

``sst2-minilm``
    MiniLM-L6 (all 6 layers, max length 64), SST-2 sentences from ``../shared/data`` (60 a
    client), plain local training, 2 steps of batch 16 (the issue's workload).
``chat-smollm-dp``
    SmolLM2-135M (all 30 layers), chitchat (its participants, max length 64), record-level
    DP-SGD, expected batch 2, physical batch 2 (the chat presets' micro-batch).
``chat-smollm-user``
    The same model and data, plain local training with batch 8 (the user-level path trains
    without per-example clipping).

For each: client updates per second one by one (``ClientRuntime.train_alone``'s computation)
and batched (``batch-clients`` = all of them, ``batch-rows`` rows a pass). Then the round time
against clients per round (MiniLM, both paths), and the share of a client's time in an
in-process round (SecAgg+ on) that is not training, both paths. Dropout is left as the models
have it (MiniLM 0.1, SmolLM2 0): the paths draw different masks, not different amounts.

Usage::

    python -m benchmarks.batched_bench [--quick] [--out PATH]

Writes ``benchmarks/results/batched.json`` and ``batched.png``; docs/benchmarks.md summarises.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "batched.json"
THREADS = 2


def _runtimes(flat: dict[str, Any], clients: int) -> list[Any]:
    from fedpeft.client.runtime import ClientIdentity, ClientRuntime
    from fedpeft.runconfig.config import parse_run_config

    run = parse_run_config({"progress": False, "secagg": False, "dp": False, **flat})
    return [ClientRuntime(run, ClientIdentity(f"client-{i}", i, clients)) for i in range(clients)]


ROWS = {"sst2-minilm": 64, "chat-smollm-dp": 16, "chat-smollm-user": 16}
"""Default ``batch-rows`` per arm: SmolLM2's 49k-row LM head makes big passes memory-bound."""
CURVE = (1, 4, 16, 64, 256, 1000)


def _workload(name: str, quick: bool) -> tuple[dict[str, Any], int, str]:
    """(run-config overrides, clients, mechanism) of a named arm."""
    if name == "sst2-minilm":
        return ({"dataset": "sst2", "model": "minilm-l6", "task": "classification",
                 "method": "lora", "max-length": 64, "max-examples-per-client": 60,
                 "local-steps": 2, "batch-size": 16, "lr": 0.002, "partitioner": "iid"},
                8 if quick else 48, "plain")
    common = {"dataset": "chitchat", "model": "smollm2-135m", "task": "causal_lm",
              "method": "lora", "max-length": 64, "max-examples-per-client": 32,
              "local-steps": 2, "lr": 0.002}
    if quick:
        common["num-hidden-layers"] = 2
    if name == "chat-smollm-dp":
        return ({**common, "batch-size": 2, "dp": True, "dp-noise-multiplier": 1.0,
                 "dp-physical-batch": 2}, 4 if quick else 24, "dp")
    if name == "chat-smollm-user":
        return {**common, "batch-size": 8}, 4 if quick else 16, "plain"
    raise ValueError(f"unknown arm {name!r}")


def measure(runtimes: list[Any], mechanism: str, rows: int) -> dict[str, Any]:
    """One-by-one then batched training of the same clients from the same start."""
    from fedpeft.privacy.csprng import DPRandomness
    from fedpeft.privacy.dp_sgd import dp_local_train
    from fedpeft.privacy.dp_sgd_batched import batched_dp_local_train
    from fedpeft.training.batched import batched_local_train
    from fedpeft.training.trainer import local_train

    first = runtimes[0]
    model, run = first.model, first.run
    start = model.adapter_state()
    datas = [rt.data() for rt in runtimes]
    cfg = run.train
    sigma = 1.0
    t0 = time.perf_counter()
    for rt, data in zip(runtimes, datas, strict=True):
        model.load_adapter_state(start)
        if mechanism == "dp":
            model.train()
            dp_local_train(model, data, cfg, run.dp, noise_multiplier=sigma,
                           randomness=DPRandomness.from_os())
            model.eval()
        else:
            local_train(model, data, cfg, generator=rt.shuffle_generator(1))
    alone = time.perf_counter() - t0
    model.load_adapter_state(start)
    t0 = time.perf_counter()
    if mechanism == "dp":
        model.train()
        out = batched_dp_local_train(model, datas, [start] * len(datas), cfg, run.dp,
                                     noise_multipliers=[sigma] * len(datas),
                                     randomnesses=[DPRandomness.from_os() for _ in datas],
                                     micro_batch=rows)
    else:
        out = batched_local_train(model, datas, [start] * len(datas), cfg,
                                  generators=[rt.shuffle_generator(1) for rt in runtimes],
                                  micro_batch=rows)
    batched = time.perf_counter() - t0
    if any(e is not None for e in out.errors):
        raise RuntimeError(f"batched training failed for some clients: {out.errors}")
    k = len(runtimes)
    return {"clients": k, "rows_per_pass": rows, "examples": [len(d) for d in datas],
            "alone_s": alone, "batched_s": batched,
            "alone_updates_per_s": k / alone, "batched_updates_per_s": k / batched,
            "speedup": alone / batched}


def round_overhead(flat: dict[str, Any], clients: int, batch_clients: int) -> dict[str, Any]:
    """One in-process round (SecAgg+ on, non-private): the clients' share of time not training."""
    from fedpeft.coordinator.server import Coordinator
    from fedpeft.runconfig.config import parse_run_config
    from fedpeft.simulations.inmemory import InMemoryTransport

    with tempfile.TemporaryDirectory() as tmp:
        run = parse_run_config({**flat, "run-dir": tmp, "num-rounds": 1, "secagg": True,
                                "weighting": "uniform", "dp": False, "progress": False,
                                "resume": False, "eval-examples": 32,
                                "batch-clients": batch_clients, "min-clients": 2,
                                "secagg-dropout": 0.1, "secagg-max-abort": 0.5})
        transport = InMemoryTransport(run, clients)
        spent: dict[str, float] = {}
        inner = transport.exchange

        def timed(kind: str, messages: Any, timeout: float) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(kind, messages, timeout)
            finally:
                spent[kind] = spent.get(kind, 0.0) + time.perf_counter() - t0

        transport.exchange = timed  # type: ignore[method-assign]
        t0 = time.perf_counter()
        Coordinator(run, transport, Path(tmp)).run_federation()
        wall = time.perf_counter() - t0
        train = 0.0
        for rt in transport.runtimes.values():
            train += float(rt.last_local.get("train-seconds", 0.0))  # type: ignore[arg-type]
    client_side = sum(spent.values())
    if train <= 0.0 or client_side <= 0.0:
        raise RuntimeError(f"the {clients}-client round trained nothing (was it skipped?): {spent}")
    return {"clients": clients, "batch_clients": batch_clients, "round_wall_s": wall,
            "client_side_s": client_side, "training_s": train,
            "not_training_share": 1 - train / client_side, "by_kind_s": spent}


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": THREADS, "load_average_at_start": list(os.getloadavg())}


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    arms = doc["arms"]
    names = list(arms)
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], [arms[n]["alone_updates_per_s"] for n in names], 0.4,
            label="one by one")
    ax1.bar([i + 0.2 for i in x], [arms[n]["batched_updates_per_s"] for n in names], 0.4,
            label="batched")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("client updates / s")
    ax1.set_title("Throughput, 2 CPU cores")
    ax1.legend()
    curve = doc["round_time"]
    ks = [r["clients"] for r in curve]
    ax2.plot(ks, [r["alone_s"] for r in curve], "o-", label="one by one")
    ax2.plot(ks, [r["batched_s"] for r in curve], "s-", label="batched")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("clients per round")
    ax2.set_ylabel("training time of a round (s)")
    ax2.set_title("MiniLM-L6 SST-2, 2 steps x 16")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--rows", type=int, default=None,
                        help="batch-rows of the batched path (default: per arm, see ROWS)")
    args = parser.parse_args(argv)
    import torch

    from fedpeft.data.paths import data_available

    torch.set_num_threads(THREADS)
    doc: dict[str, Any] = {"meta": {"machine": machine(), "quick": args.quick,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
                           "arms": {}, "round_time": [], "overhead": []}
    have_sst2 = data_available("sst2_train.tsv")
    arms = ["sst2-minilm"] if have_sst2 else []
    arms += ["chat-smollm-dp", "chat-smollm-user"]
    for name in arms:
        flat, clients, mechanism = _workload(name, args.quick)
        row = measure(_runtimes(flat, clients), mechanism, args.rows or ROWS[name])
        doc["arms"][name] = {**row, "mechanism": mechanism, "config": flat}
        print(f"{name}: {row['alone_updates_per_s']:.2f} -> {row['batched_updates_per_s']:.2f} "
              f"updates/s ({row['speedup']:.2f}x)", flush=True)
    if have_sst2:
        flat, _, _ = _workload("sst2-minilm", args.quick)
        for k in (1, 4) if args.quick else CURVE:
            row = measure(_runtimes(flat, k), "plain", args.rows or ROWS["sst2-minilm"])
            doc["round_time"].append(row)
            print(f"round of {k}: {row['alone_s']:.1f} s -> {row['batched_s']:.1f} s", flush=True)
        k = 8 if args.quick else 32
        for batch in (1, k):
            row = round_overhead(flat, k, batch)
            doc["overhead"].append(row)
            print(f"in-process round, {k} clients, batch-clients {batch}: "
                  f"{row['not_training_share']:.1%} of the clients' time not training", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    if doc["round_time"]:
        plot(doc, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
