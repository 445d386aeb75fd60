"""Measured audits of the presets (issue 17, item 4): the one-run bound beside the claim at
epsilon 1 / 8 and without DP, and the extra time of an audited run.

Each arm is one whole in-process federation of a preset
(:class:`~fedpeft.simulations.inmemory.InMemoryTransport`, as ``fedpeft simulate
--in-process``) with ``--canaries`` black-box canaries planted in the clients' data and, for
the DP arms, ``--gradient-canaries`` white-box gradient canaries inside DP-SGD; then
:func:`fedpeft.report.audit.audit_all`. The ``-plain`` arm is the same epsilon-8 federation
without canaries: the audited arm's wall time (training + scoring) over it is the overhead.

Usage::

    python -m benchmarks.audit_bench [--presets sst2-lora,chat-lora] [--arms ...]
                                     [--canaries M] [--gradient-canaries G] [--out PATH]

Writes ``benchmarks/results/audit.json`` after every arm and a Markdown table beside it; an
arm already stored with the same settings is reused unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.population_bench import THREADS, _load, machine, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "audit.json"
ARMS = ("eps8-plain", "eps8", "eps1", "no-dp")


def arm_overrides(arm: str, canaries: int, gradient: int) -> dict[str, Any]:
    """Run-config overrides of ``arm`` on top of its preset."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {ARMS}")
    if arm == "no-dp":
        return {"dp": False, "audit-canaries": canaries}
    eps = 8.0 if arm.startswith("eps8") else 1.0
    base: dict[str, Any] = {"dp": True, "dp-level": "record", "dp-target-epsilon": eps}
    if arm == "eps8-plain":
        return base
    return {**base, "audit-canaries": canaries, "audit-gradient-canaries": gradient}


def run_arm(preset: str, arm: str, overrides: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import torch

    from fedpeft.coordinator.server import Coordinator
    from fedpeft.report.audit import audit_all
    from fedpeft.runconfig.config import DEFAULTS, parse_run_config
    from fedpeft.runconfig.presets import get_preset
    from fedpeft.simulations.inmemory import InMemoryTransport

    torch.set_num_threads(THREADS)
    p = get_preset(preset)
    run = parse_run_config({**DEFAULTS, **p.config, "preset": preset, **overrides,
                            "run-dir": str(run_dir), "resume": False, "progress": False})
    start = time.perf_counter()
    summary = Coordinator(run, InMemoryTransport(run, p.clients), run_dir).run_federation()
    trained = time.perf_counter() - start
    row: dict[str, Any] = {"preset": preset, "arm": arm, "overrides": overrides,
                           "clients": p.clients, "stopped": summary.stopped_reason,
                           "train_seconds": trained}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    metric = "accuracy" if "accuracy" in rows[-1]["eval"] else "perplexity"
    row["metric"] = {metric: [float(r["eval"][metric]) for r in rows]}
    if overrides.get("audit-canaries") or overrides.get("audit-gradient-canaries"):
        t0 = time.perf_counter()
        row["audits"] = audit_all(run_dir)
        row["audit_seconds"] = time.perf_counter() - t0
    row["seconds"] = time.perf_counter() - start
    return row


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| preset | arm | claimed epsilon | audit | audited epsilon (95 %) | m | ceiling | "
             "TPR at 1 % FPR | mean score in / out | wall s (train + audit) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["arms"]:
        audits = r.get("audits") or [None]
        for a in audits:
            if a is None:
                lines.append(f"| {r['preset']} | {r['arm']} | - | none | - | - | - | - | - | "
                             f"{r['seconds']:.0f} |")
                continue
            claim = a.get("claimed_epsilon")
            lines.append(
                f"| {r['preset']} | {r['arm']} | {'-' if claim is None else f'{claim:.2f}'} | "
                f"{a['access']} | {a['epsilon_lower_bound']:.2f}"
                + (f" ({a['bound_from'].rsplit('.', 3)[-3]})"
                   if a.get("bound_from") not in (None, "all") else "")
                + f" | {a['canaries']} | {a['ceiling']:.2f} | "
                f"{a['tpr_at_fpr'].get('0.01', float('nan')):.3f} | "
                f"{a['mean_score_included']:.3g} / {a['mean_score_excluded']:.3g} | "
                f"{r['train_seconds']:.0f} + {r.get('audit_seconds', 0.0):.0f} |")
    for preset in sorted({r["preset"] for r in doc["arms"]}):
        plain = next((r for r in doc["arms"] if r["preset"] == preset
                      and r["arm"] == "eps8-plain"), None)
        audited = next((r for r in doc["arms"] if r["preset"] == preset and r["arm"] == "eps8"),
                       None)
        if plain and audited:
            lines.append("")
            lines.append(f"{preset}: the audited epsilon-8 run took {audited['seconds']:.0f} s "
                         f"(training and scoring) against {plain['seconds']:.0f} s without "
                         f"canaries: **{audited['seconds'] / plain['seconds']:.2f}x**.")
    return "\n".join(lines) + "\n"


def _write(out: Path, doc: dict[str, Any]) -> None:
    write_result(out, doc, markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--presets", default="sst2-lora,chat-lora")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--canaries", type=int, default=0,
                    help="black-box canaries (0: 1000 for sst2-lora, 64 for the chat presets)")
    ap.add_argument("--gradient-canaries", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    arms = [a for a in args.arms.split(",") if a]
    for a in arms:
        arm_overrides(a, 1, 1)  # unknown arms fail before anything runs
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="audit-bench-"))
    previous = {} if args.fresh else _load(args.out)
    done = {r["key"]: r for r in previous.get("arms", [])}
    doc: dict[str, Any] = {"meta": {"machine": machine(), "work_dir": str(work),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}, "arms": []}
    for preset in presets:
        m = args.canaries or (1000 if preset.startswith("sst2") else 64)
        for arm in arms:
            overrides = arm_overrides(arm, m, args.gradient_canaries)
            key = hashlib.sha256(json.dumps([preset, overrides], sort_keys=True).encode()
                                 ).hexdigest()[:16]
            if key in done:
                print(f"{preset} {arm}: reused", flush=True)
                doc["arms"].append(done[key])
                continue
            print(f"{preset} {arm}: {overrides}", flush=True)
            row = {"key": key, **run_arm(preset, arm, overrides, work / f"{preset}-{arm}")}
            for a in row.get("audits", []):
                print(f"  {a['access']}: epsilon >= {a['epsilon_lower_bound']:.3f} "
                      f"(claimed {a.get('claimed_epsilon')}), m {a['canaries']}", flush=True)
            print(f"  {row['seconds']:.0f} s", flush=True)
            doc["arms"].append(row)
            _write(args.out, doc)
    _write(args.out, doc)
    print(markdown(doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
