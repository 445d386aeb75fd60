"""Population scale on chitchat: every participant with enough turns a client, user-level DP
against the non-private run of the same federation (issue 15, item 5).

The whole SmolLM2-135M (30 layers; cutting layers is no way to save time here: the model cut
to 4 layers starts at perplexity 6.7e7, above a uniform guess, so a gain on it says nothing
about chat). To fit this 2-core machine (about 3.5 s per client update of 8 sequences), the
federation is cut instead: 50 clients per round, 5 rounds of 2 local steps x batch 4, and the
table says so. One client per
chitchat participant (the ``natural`` partitioner): the ``clients`` participants with the most
turns, each capped at ``examples_per_client``; the participants left over are held out, and
the perplexity is measured on their turns (people no client holds).

Arms, ``<method>-<privacy>`` for method ``prompt`` (the ``chat-prompt`` preset's 16-token soft
prompt, AdamW lr 0.01) and ``lora`` (``chat-lora``: LoRA r 8 on q/v, lr 0.001):

``non-private``
    plain local training, SecAgg+ on.
``user-eps8``
    the same local training, each sampled client's whole update clipped to the median norm
    of a probe's first-round non-private updates (as in :mod:`benchmarks.population_bench`)
    and noised inside SecAgg+ (distributed discrete Gaussian) for user-level epsilon 8
    against the coordinator; the complete SecAgg+ graph with its largest threshold.
``record-eps8``
    the presets' record-level DP-SGD (DP-Adam, clip 1) at epsilon 8 per client.

Usage::

    python -m benchmarks.population_chat_bench [--quick] [--arms a,b] [--out PATH] [--fresh]

Writes ``benchmarks/results/population_chat.json`` after every arm and a Markdown table
beside it; an arm whose resolved run config is already stored there is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.population_bench import (
    DELTA,
    THREADS,
    Scale,
    _load,
    finish,
    machine,
    probe_norms,
    record_planned_rounds,
    run_resolved,
    secagg_graph,
    user_participations,
    write_result,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "population_chat.json"
METRIC = "perplexity"
METHODS = {"prompt": "chat-prompt", "lora": "chat-lora"}
PRIVACY = ("non-private", "user-eps8", "record-eps8")


@dataclass(frozen=True)
class ChatScale(Scale):
    """:class:`~benchmarks.population_bench.Scale` plus how many virtual clients train
    together (``batch-clients``, ``batch-rows``: :mod:`fedpeft.training.batched`); ``layers``
    0 is all 30."""

    batch_clients: int = 8
    batch_rows: int = 16


FULL = ChatScale("full", clients=1100, examples_per_client=32, clients_per_round=50,
                 rounds=5, local_steps=2, batch=4, eval_examples=128, layers=0,
                 probe_clients=12)
QUICK = ChatScale("quick", clients=40, examples_per_client=8, clients_per_round=10, rounds=2,
                  local_steps=1, batch=4, eval_examples=16, layers=1, probe_clients=3,
                  batch_clients=3, batch_rows=8)
FULL_ARMS = ("prompt-non-private", "prompt-user-eps8", "lora-non-private", "lora-user-eps8")


def _split(arm: str) -> tuple[str, str]:
    method, _, privacy = arm.partition("-")
    if method not in METHODS or privacy not in PRIVACY:
        raise ValueError(f"unknown arm {arm!r}: <method>-<privacy> with method in "
                         f"{sorted(METHODS)} and privacy in {PRIVACY}")
    return method, privacy


def resolved(method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The whole flat run config: defaults, then the method's chat preset, then overrides."""
    from fedpeft.runconfig.config import DEFAULTS
    from fedpeft.runconfig.presets import get_preset

    return {**DEFAULTS, **get_preset(METHODS[method]).config, **overrides}


def arm_config(arm: str, scale: ChatScale, seed: int, clip: float) -> dict[str, Any]:
    """The run-config overrides of ``arm`` (``clip``: the user-level update clip)."""
    method, privacy = _split(arm)
    base: dict[str, Any] = {
        "dataset": "chitchat", "partitioner": "natural",
        "max-examples-per-client": scale.examples_per_client,
        "eval-examples": scale.eval_examples, "num-rounds": scale.rounds,
        "clients-per-round": scale.clients_per_round, "local-steps": scale.local_steps,
        "batch-size": scale.batch, "num-hidden-layers": scale.layers, "secagg": True,
        "weighting": "uniform", "seed": seed}
    if privacy == "record-eps8":
        return {**base, "dp": True, "dp-level": "record", "dp-target-epsilon": 8.0,
                "dp-epsilon-budget": 8.0, "dp-delta": DELTA,
                "dp-planned-rounds": record_planned_rounds(scale)}
    nodp = {**base, "dp": False, "batch-clients": scale.batch_clients,
            "batch-rows": scale.batch_rows}
    if privacy == "non-private":
        return nodp
    degree, threshold = secagg_graph(scale.clients_per_round, complete=True)
    return {**nodp, "dp": True, "dp-level": "user", "dp-user-epsilon": 8.0,
            "dp-user-delta": DELTA, "dp-user-clip": clip,
            "dp-user-participations": user_participations(scale),
            "secagg-degree": degree, "secagg-threshold": threshold}


def arm_label(arm: str, overrides: dict[str, Any]) -> str:
    method, privacy = _split(arm)
    name = {"prompt": "soft prompt (16 tokens)", "lora": "LoRA r 8 q/v"}[method]
    if privacy == "non-private":
        return f"{name}, non-private"
    if privacy == "user-eps8":
        return (f"{name}, user level epsilon 8, update clip {overrides['dp-user-clip']:.3g}, "
                f"threshold {overrides['secagg-threshold']}")
    return f"{name}, record level epsilon 8 (DP-Adam, clip 1)"


def config_key(scale: ChatScale, method: str, overrides: dict[str, Any]) -> str:
    doc = {"clients": scale.clients, "config": resolved(method, overrides)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def markdown(doc: dict[str, Any]) -> str:
    s = doc["meta"]["scale"]
    model = (f"SmolLM2-135M cut to {s['layers']} of 30 layers" if s["layers"]
             else "SmolLM2-135M (all 30 layers)")
    lines = [f"### chitchat, {model}, {s['clients']} "
             f"clients (one per participant, the most active; at most "
             f"{s['examples_per_client']} turns each), {s['clients_per_round']} per round, "
             f"{s['rounds']} rounds x {s['local_steps']} local steps x batch {s['batch']}, "
             "SecAgg+ on (perplexity on held-out participants; kept: the share of the "
             "non-private gain)", "",
             "| arm | start | final | best | kept | epsilon reached | noise | "
             "upload / client / round | s / round (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    finals = {a["arm"].partition("-")[0]: a for a in doc["arms"]
              if a["arm"].endswith("-non-private")}
    for a in doc["arms"]:
        ref = finals.get(a["arm"].partition("-")[0])
        kept = "-"
        if ref is not None and a is not ref and ref["initial"] != ref["final"]:
            kept = f"{100 * (a['initial'] - a['final']) / (ref['initial'] - ref['final']):.0f} %"
        eps = "-" if a["epsilon"] is None else f"{a['epsilon']:.2f}"
        noise = "-"
        if "user" in a:
            u = a["user"]
            noise = (f"{u['per_client_noise_std']:.3g} per client, {u['min_contributors']} "
                     f"shares (mean: {u.get('mean_noise_std_over_clip', float('nan')):.3g} "
                     "x clip)")
        elif "record" in a and a["record"]["sigma"]:
            noise = f"sigma {a['record']['sigma'][0]:.3g}"
        lines.append(f"| {a['label']} | {a['initial']:.1f} | {a['final']:.1f} | "
                     f"{a['best']:.1f} | {kept} | {eps} | {noise} | "
                     f"{a['upload_bytes_per_client_round'] / 1000:.0f} KB | "
                     f"{statistics.median(a['seconds_per_round_each'] or [0.0]):.0f} |")
    return "\n".join(lines) + "\n"


def _write(out: Path, doc: dict[str, Any]) -> None:
    write_result(out, doc, markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test)")
    ap.add_argument("--arms", default="", help=f"comma-separated (default {','.join(FULL_ARMS)})")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None)
    ap.add_argument("--fresh", action="store_true", help="rerun arms already in the output")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(THREADS)
    scale = QUICK if args.quick else FULL
    out: Path = args.out or (Path(tempfile.gettempdir()) / "population-chat-quick.json"
                             if args.quick else DEFAULT_OUT)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(FULL_ARMS)
    for a in arms:
        arm_config(a, scale, args.seed, 1.0)  # an unknown arm fails before anything runs
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="population-chat-"))
    previous = {} if args.fresh else _load(out)
    started = time.time()
    same_scale = previous.get("meta", {}).get("scale") == asdict(scale)
    meta: dict[str, Any] = {"quick": args.quick, "scale": asdict(scale), "seed": args.seed,
                            "machine": machine(), "work_dir": str(work), "delta": DELTA,
                            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "probes": previous.get("meta", {}).get("probes", {})
                            if same_scale else {}}
    print(f"population chat bench: {scale}\n  arms {arms}, run directories under {work}",
          flush=True)
    done = {a["key"]: a for a in previous.get("arms", [])}
    doc: dict[str, Any] = {"meta": meta, "arms": []}
    for arm in arms:
        method, privacy = _split(arm)
        clip = 1.0
        if privacy == "user-eps8":
            probe = meta["probes"].get(method)
            if probe is None:
                probe = probe_norms(resolved(method, arm_config(f"{method}-non-private", scale,
                                                                args.seed, 1.0)),
                                    scale.clients, scale.probe_clients, args.seed)
                meta["probes"][method] = probe
                print(f"probe {method}: norms {[round(n, 4) for n in probe['norms']]}, median "
                      f"{probe['median']:.4f} ({probe['seconds']:.0f} s)", flush=True)
            clip = round(float(probe["median"]), 4)
        overrides = arm_config(arm, scale, args.seed, clip)
        key = config_key(scale, method, overrides)
        if key in done:
            print(f"arm {arm}: reused from {out}", flush=True)
            doc["arms"].append(done[key])
            _write(out, doc)
            continue
        label = arm_label(arm, overrides)
        print(f"arm {arm}: {label}", flush=True)
        row = run_resolved(arm, label, key, overrides, resolved(method, overrides),
                           scale.clients, work / arm, METRIC)
        print(f"arm {arm}: perplexity {row['initial']:.2f} -> {row['final']:.2f} (best "
              f"{row['best']:.2f}), epsilon {row['epsilon']}, {row['seconds']:.0f} s",
              flush=True)
        doc["arms"].append(row)
        meta["wall_seconds"] = time.time() - started
        _write(out, doc)
    return finish(out, doc, started, markdown)


if __name__ == "__main__":
    sys.exit(main())
