"""Run one cell of the utility sweep and summarise its run directory.

Executed in a subprocess per cell (``python -m benchmarks.utility.cell``, the cell as JSON on
stdin, the result as one JSON line on stdout) so that each cell starts with a clean process:
its own model copy, its own memory peak, its own thread count.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.utility.grid import Cell


def summarise_run(run_dir: Path) -> dict[str, Any]:
    """The numbers the table needs, from ``metrics.jsonl`` (pure reading, no training)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the run did not start")
    metric = "accuracy" if "accuracy" in rows[0]["eval"] else "perplexity"
    trained = [r for r in rows if r.get("round", 0) > 0]
    curve = [float(r["eval"][metric]) for r in rows]
    ok = [int(r.get("ok", 0)) for r in trained]
    up = [float(r.get("bytes_up", 0)) / max(k, 1) for r, k in zip(trained, ok, strict=True)]
    eps = [r["dp_epsilon"]["max"] for r in trained if "dp_epsilon" in r]
    sigmas = sorted({float(c["dp-sigma"]) for r in trained for c in r.get("clients", [])
                     if "dp-sigma" in c})
    return {
        "metric": metric,
        "initial": curve[0],
        "final": curve[-1],
        "curve": curve,
        "rounds": len(trained),
        "skipped": sum(1 for r in trained if "skipped" in r),
        "epsilon": max(eps) if eps else None,
        "sigma": sigmas,
        "upload_bytes_per_client_round": statistics.fmean(up) if up else 0.0,
        # update coordinates clipped to secagg-clip, summed over clients and rounds
        "secagg_clipped": sum(int(r.get("secagg", {}).get("clipped", 0)) for r in trained),
        "round_seconds": statistics.fmean(float(r["seconds"]) for r in trained) if trained
        else 0.0,
    }


def run_cell(cell: Cell, run_dir: Path, threads: int) -> dict[str, Any]:
    """Train the cell's federation in this process and return its summary row."""
    import torch

    from fedpeft.coordinator.server import Coordinator
    from fedpeft.runconfig.config import DEFAULTS, parse_run_config
    from fedpeft.runconfig.presets import get_preset
    from fedpeft.simulations.inmemory import InMemoryTransport

    torch.set_num_threads(threads)
    preset = get_preset(cell.preset)
    flat = {**DEFAULTS, **preset.config, **cell.overrides, "seed": cell.seed,
            "run-dir": str(run_dir), "ledger-dir": str(run_dir / "ledgers"), "resume": False,
            "progress": False}
    run = parse_run_config(flat)
    start = time.perf_counter()
    summary = Coordinator(run, InMemoryTransport(run, cell.clients), run_dir).run_federation()
    row = {"group": cell.group, "label": cell.label, "seed": cell.seed, "key": cell.key,
           "target_epsilon": cell.epsilon, "clients": cell.clients,
           "overrides": cell.overrides, "seconds": time.perf_counter() - start,
           "stopped": summary.stopped_reason, **summarise_run(run_dir)}
    if row["stopped"] or row["skipped"] or row["rounds"] != run.federation.num_rounds:
        # Nothing drops out in process: a skipped round is a broken measurement, not a result.
        raise RuntimeError(f"cell {cell.label!r}: {row['rounds']} of "
                           f"{run.federation.num_rounds} rounds ran, {row['skipped']} skipped, "
                           f"stopped: {row['stopped'] or '-'}; see the log above")
    return row


def main() -> int:
    request = json.loads(sys.stdin.read())
    cell = Cell(**request["cell"])
    row = run_cell(cell, Path(request["run_dir"]), int(request["threads"]))
    print("UTILITY-RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
