"""The utility sweep: accuracy / perplexity against epsilon, bytes and time, in one command.

Usage (from the project root)::

    .venv/bin/python -m benchmarks.utility --size small      # what docs/results.md reports
    .venv/bin/python -m benchmarks.utility --size smoke      # a minute; what CI runs
    .venv/bin/python -m benchmarks.utility --size full --jobs 4

Each cell runs in its own subprocess; finished cells are stored in the results file as they
complete and skipped on the next invocation (``--rerun`` recomputes them), so an interrupted
sweep resumes. ``--only sst2,technique,limits,chat`` picks parts; ``--seeds`` overrides the size's
seed count. The Markdown tables are printed and written next to the JSON results. SST-2 needs
``../shared/data/sst2_train.tsv`` and ``sst2_dev.tsv`` (or ``FEDPEFT_DATA_DIR``); without them
the SST-2 parts are skipped with a message.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.utility.grid import PARTS, Cell, grid, rekey  # noqa: E402
from benchmarks.utility.table import markdown  # noqa: E402
from fedpeft.data.paths import data_available  # noqa: E402

#: The parts that need the SST-2 files.
SST2_PARTS: tuple[str, ...] = ("sst2", "technique", "limits", "methods")

RESULTS_DIR = ROOT / "benchmarks" / "results"


def _load(path: Path) -> dict[str, Any]:
    if path.is_file():
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc
    return {"cells": {}}


def _save(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _start(cell: Cell, work: Path, threads: int) -> tuple[subprocess.Popen[str], Path]:
    run_dir = Path(tempfile.mkdtemp(prefix="cell-", dir=work))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FLWR_TELEMETRY_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.utility.cell"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    request = {"cell": dataclasses.asdict(cell), "run_dir": str(run_dir), "threads": threads}
    if proc.stdin is None:
        raise RuntimeError("subprocess has no stdin")
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    return proc, run_dir


def _finish(proc: subprocess.Popen[str], cell: Cell, log_dir: Path) -> dict[str, Any]:
    out = proc.stdout.read() if proc.stdout is not None else ""
    proc.wait()
    (log_dir / f"{cell.key}.log").write_text(out)
    for line in out.splitlines():
        if line.startswith("UTILITY-RESULT "):
            row: dict[str, Any] = json.loads(line[len("UTILITY-RESULT "):])
            return row
    tail = "\n".join(out.splitlines()[-15:])
    raise RuntimeError(f"cell {cell.label!r} (seed {cell.seed}) failed with exit code "
                       f"{proc.returncode}:\n{tail}")


def run_sweep(cells: list[Cell], results: Path, jobs: int, rerun: bool,
              work: Path) -> dict[str, Any]:
    doc = _load(results)
    doc.setdefault("cells", {})
    rekey(doc["cells"], cells)
    unique: list[Cell] = []  # a run may appear in two tables: run it once, first place first
    for c in cells:
        if all(u.key != c.key for u in unique):
            unique.append(c)
    todo = [c for c in unique if rerun or c.key not in doc["cells"]]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    log_dir = results.parent / "utility-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(unique)} cells, {len(unique) - len(todo)} already done, {len(todo)} to run "
          f"({jobs} at a time, {threads} threads each)", flush=True)
    running: list[tuple[subprocess.Popen[str], Cell, float]] = []
    pending = list(todo)
    failures: list[str] = []
    while pending or running:
        while pending and len(running) < jobs:
            cell = pending.pop(0)
            proc, _ = _start(cell, work, threads)
            running.append((proc, cell, time.time()))
        proc, cell, t0 = running.pop(0)
        try:
            row = _finish(proc, cell, log_dir)
        except RuntimeError as exc:
            failures.append(str(exc))
            print(f"FAILED {cell.label} (seed {cell.seed}); log in {log_dir}", flush=True)
            continue
        doc["cells"][cell.key] = row
        _save(results, doc)
        print(f"[{time.time() - t0:6.0f} s] {cell.group:15s} {cell.label:55s} seed {cell.seed}: "
              f"{row['metric']} {row['initial']:.4f} -> {row['final']:.4f}"
              + (f", epsilon {row['epsilon']:.2f}" if row.get("epsilon") else ""), flush=True)
    if failures:
        raise SystemExit("some cells failed:\n" + "\n\n".join(failures))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.utility", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="smoke | small | full (default small)")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated parts: {', '.join(PARTS)}")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: size's)")
    ap.add_argument("--jobs", type=int, default=1, help="cells run side by side (default 1)")
    ap.add_argument("--results", default="", help="results JSON (default "
                    "benchmarks/results/utility-SIZE.json)")
    ap.add_argument("--rerun", action="store_true", help="recompute finished cells")
    ap.add_argument("--table-only", action="store_true",
                    help="run nothing: write the tables of the cells already finished")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs={args.jobs} must be >= 1")
    only = tuple(p.strip() for p in args.only.split(",") if p.strip())
    if not (data_available("sst2_train.tsv") and data_available("sst2_dev.tsv")):
        dropped = [p for p in only if p in SST2_PARTS]
        if dropped:
            print(f"SST-2 files not found (../shared/data or FEDPEFT_DATA_DIR): skipping "
                  f"{dropped}", flush=True)
        only = tuple(p for p in only if p not in SST2_PARTS)
    cells = grid(args.size, only, args.seeds)
    results = Path(args.results) if args.results else RESULTS_DIR / f"utility-{args.size}.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        doc = _load(results)
        doc.setdefault("cells", {})
        rekey(doc["cells"], cells)
    else:
        with tempfile.TemporaryDirectory(prefix="fedpeft-utility-") as work:
            doc = run_sweep(cells, results, args.jobs, args.rerun, Path(work))
        doc["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}
        doc["size"] = args.size
        _save(results, doc)
    table = markdown({**doc["cells"][c.key], "group": c.group, "label": c.label}
                     for c in cells if c.key in doc["cells"])
    results.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
