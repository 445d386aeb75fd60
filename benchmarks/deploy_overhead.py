"""Per-round overhead of a real Flower deployment: warm ClientApp executor vs Flower's default.

Starts, on loopback, a SuperLink with TLS + SuperNode authentication and two authenticated
SuperNodes (``fedpeft.deploy.runner``), runs the same small federation twice:

* ``cold``: ``flower-supernode --isolation subprocess`` (flwr 1.42 default: every message
  starts a new ``flwr-clientapp`` process that imports torch and loads the model again);
* ``warm``: ``--isolation process`` + ``fedpeft.client.warm_app`` (one long-lived
  ClientApp process per node; model and data stay loaded).

Per round (from the coordinator's ``metrics.jsonl``):
``overhead = round seconds - max over clients of their local training seconds``; it includes
message transport, SuperNode/SuperExec polling, ClientApp start-up (cold), the coordinator's
aggregation and its evaluation on the held-out split. Round 1 (model load) is reported apart.
The overhead hardly depends on how long local training takes, so it is also given as a share
of a round whose local training takes 30 s: ``overhead / (30 + overhead)``.

Usage: python benchmarks/deploy_overhead.py [--rounds 3] [--local-steps 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.deploy.certs import init_cert_dir  # noqa: E402
from fedpeft.deploy.runner import (  # noqa: E402
    ClientNode,
    full_run_config,
    start_client,
    start_superlink,
    submit_run,
)

TARGET_TRAIN_SECONDS = 30.0


def run_mode(warm: bool, rounds: int, local_steps: int, root: Path) -> dict[str, Any]:
    names = ["alice", "bob"]
    certs = init_cert_dir(root / "certs", nodes=2, names=names)
    link = start_superlink(certs.root, root / "coordinator", port=0)
    nodes: list[ClientNode] = []
    try:
        for i, name in enumerate(names):
            nodes.append(start_client(superlink=link.address, client_id=name, partition_id=i,
                                      num_partitions=2, state_dir=root / name,
                                      ca_cert=certs.ca_cert, node_key=certs.node_key(name),
                                      warm=warm))
        link.wait_for_nodes(2, timeout=120)
        config = full_run_config({
            "num-hidden-layers": 2, "num-rounds": rounds, "local-steps": local_steps,
            "batch-size": 4, "max-examples-per-client": 16, "eval-examples": 16,
            "max-length": 32, "lr": 0.01, "progress": False}, root / "run")
        t0 = time.perf_counter()
        result = submit_run(link, config, stream=False, timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        for node in nodes:
            node.stop()
        link.stop()
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    # Under DP, training times stay on each device (client-metrics.jsonl in its state dir).
    local: dict[int, float] = {}
    for name in names:
        path = root / name / "client-metrics.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            rec = json.loads(line)
            local[int(rec["round"])] = max(local.get(int(rec["round"]), 0.0),
                                           float(rec["train-seconds"]))
    per_round = []
    for r in rows:
        if r["round"] == 0:
            continue
        train = max([c.get("train-seconds", 0.0) for c in r["clients"]]
                    + [local.get(int(r["round"]), 0.0)])
        per_round.append({"round": r["round"], "round_seconds": round(r["seconds"], 3),
                          "max_train_seconds": round(train, 3),
                          "overhead_seconds": round(r["seconds"] - train, 3)})
    steady = [p["overhead_seconds"] for p in per_round if p["round"] > 1]
    mean_over = statistics.mean(steady) if steady else float("nan")
    return {
        "mode": "warm" if warm else "cold",
        "status": result.status,
        "wall_seconds_flwr_run": round(wall, 2),
        "rounds": per_round,
        "first_round_overhead_seconds": per_round[0]["overhead_seconds"] if per_round else None,
        "steady_overhead_seconds_mean": round(mean_over, 3),
        "steady_overhead_share_of_30s_round": round(mean_over / (TARGET_TRAIN_SECONDS + mean_over), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "deploy_overhead.json"))
    args = parser.parse_args()
    results = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory(prefix=f"fedpeft-deploy-{mode}-") as tmp:
            res = run_mode(mode == "warm", args.rounds, args.local_steps, Path(tmp))
        print(json.dumps(res, indent=2), flush=True)
        results.append(res)
    doc = {
        "benchmark": "deploy_overhead",
        "what": "per-round overhead = round seconds - max client local-training seconds; "
                "2 SuperNodes + SuperLink (TLS, node auth) + ServerApp on one machine",
        "model": "smollm2-135m cut to 2 layers, LoRA r=8, max-length 32, batch 4",
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.machine(), "note": "2 CPU cores shared by all "
                    "processes (and other users); all nodes co-located"},
        "target": "overhead < 20% of a round whose local training takes 30 s",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
