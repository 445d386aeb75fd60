"""Population scale on SST-2: record-level against user-level DP over 1,000 clients (issue 15).

One federation, one seed, several arms side by side, each a whole in-process federation
(:class:`~fedpeft.simulations.inmemory.InMemoryTransport`: the coordinator, the clients, SecAgg+,
DP-SGD, the distributed discrete Gaussian and the ledgers run as in production):

``non-private``
    LoRA + AdamW (lr 0.002, head-lr 0.05), FedAvgM 0.5, SecAgg+ on: the best non-private
    setting of docs/results.md (``benchmarks.utility.grid.SST2_NODP``).
``user-eps8``
    The same local training (no per-example clipping), each sampled client's whole update
    clipped to ``dp-user-clip`` and noised inside SecAgg+ for user-level epsilon 8 against the
    coordinator (``dp-level = "user"``). The clip is the median norm of the clients' first
    non-private updates, measured by a probe before the arms run (Andrew et al. 2021). The
    SecAgg+ graph is pinned to the one the user-level plan picks by default: the complete
    graph with its largest threshold meeting the abort target
    (:meth:`~fedpeft.secagg.config.SecAggConfig.resolve_complete`), so that the noise is sized
    for ``threshold - 1`` shares.
``record-eps8``
    The ``sst2-lora`` preset's DP-SGD (FFA-LoRA, momentum 0.9, lr 0.5, head-lr 5, clip 1,
    SecAgg clip 16; ``benchmarks.utility.grid.SST2_DP``), record-level epsilon 8 per client.

Optional arms, run only while ``--budget-minutes`` allows: ``user-eps8-sparse`` (in the
default list: the cheapest SecAgg+ graph the general planner picks,
:meth:`~fedpeft.secagg.config.SecAggConfig.resolve`, degree 16 and threshold 9 at 100 clients,
which the user-level plan used before it moved to the complete graph: a tenth of the noise
shares accounted), ``user-eps3``, ``user-eps1`` (complete graph).

Usage::

    python -m benchmarks.population_bench [--quick] [--rounds R] [--out PATH] [--arms a,b]
                                          [--budget-minutes M] [--user-clip C] [--fresh]

Writes the JSON (``benchmarks/results/population.json`` by default) after every arm and a
Markdown table beside it (``.md``). An arm whose resolved run config matches one already in
the output file is reused, unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "population.json"
THREADS = 2
DELTA = 1e-5
#: A record-level client may join at most this many rounds: the smallest count that a client
#: sampled uniformly each round exceeds with probability at most this (its ledger refuses more).
RECORD_OVERFLOW = 0.02


@dataclass(frozen=True)
class Scale:
    """How big the federation is and how long it trains."""

    name: str
    clients: int
    examples_per_client: int
    clients_per_round: int
    rounds: int
    local_steps: int
    batch: int
    eval_examples: int
    layers: int = 0  # 0 = the whole model
    probe_clients: int = 20
    dp_batch: int = 30  # record level: the Poisson batch of DP-SGD
    dp_physical_batch: int = 16


FULL = Scale("full", clients=1000, examples_per_client=60, clients_per_round=100, rounds=10,
             local_steps=2, batch=30, eval_examples=872)
QUICK = Scale("quick", clients=30, examples_per_client=20, clients_per_round=10, rounds=2,
              local_steps=1, batch=8, eval_examples=64, layers=2, probe_clients=3, dp_batch=8,
              dp_physical_batch=8)

#: The issue's three arms: always run.
DEFAULT_ARMS = ("non-private", "user-eps8", "record-eps8")
#: Further rows, run (in the order asked) only while the time budget allows.
OPTIONAL_ARMS = ("user-eps8-sparse", "user-eps8-adaptive", "user-eps3", "user-eps1")
#: The adaptive arm (Andrew et al. 2021): no probe; it starts from the default clip and
#: follows the median update norm. lr 0.3 lets 10 rounds move the clip by up to e^1.5.
ADAPTIVE_START_CLIP, ADAPTIVE_QUANTILE, ADAPTIVE_LR = 1.0, 0.5, 0.3
#: What the full benchmark runs by default (quick: the issue's three arms).
FULL_ARMS = (*DEFAULT_ARMS, "user-eps8-sparse")


def user_participations(scale: Scale) -> int:
    """The smallest ``dp-user-participations`` that still lets every round fill: each of the
    ``rounds x clients_per_round`` slots needs a user below the cap."""
    return max(1, math.ceil(scale.rounds * scale.clients_per_round / scale.clients))


def record_planned_rounds(scale: Scale, overflow: float = RECORD_OVERFLOW) -> int:
    """Rounds a record-level client's noise is calibrated for: the smallest ``p`` such that a
    client sampled with rate ``clients_per_round / clients`` in each of ``rounds`` rounds is
    selected more than ``p`` times with probability at most ``overflow``."""
    q = min(1.0, scale.clients_per_round / scale.clients)
    n = scale.rounds
    for p in range(1, n + 1):
        tail = sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k) for k in range(p + 1, n + 1))
        if tail <= overflow:
            return p
    return n


def secagg_graph(n: int, *, complete: bool) -> tuple[int, int]:
    """(degree, threshold) of a round of ``n`` clients at the run-config defaults (expected
    dropout, abort target): the complete graph with its largest threshold (what the
    user-level plan picks) or the cheapest graph of the general planner."""
    from fedpeft.runconfig.config import DEFAULTS
    from fedpeft.secagg.config import SecAggConfig

    cfg = SecAggConfig(clip=1.0, expected_dropout=float(DEFAULTS["secagg-dropout"]),
                       max_abort_prob=float(DEFAULTS["secagg-max-abort"]))
    r = cfg.resolve_complete(n) if complete else cfg.resolve(n)
    return int(r.degree or 0), int(r.threshold or 0)


def base_config(scale: Scale, seed: int) -> dict[str, Any]:
    """Run-config overrides every arm shares (on top of the defaults and ``sst2-lora``)."""
    return {"dataset": "sst2", "model": "minilm-l6", "partitioner": "iid",
            "max-examples-per-client": scale.examples_per_client,
            "eval-examples": scale.eval_examples, "num-rounds": scale.rounds,
            "clients-per-round": scale.clients_per_round, "local-steps": scale.local_steps,
            "batch-size": scale.batch, "num-hidden-layers": scale.layers, "secagg": True,
            "weighting": "uniform", "seed": seed}


def arm_config(name: str, scale: Scale, seed: int, user_clip: float) -> dict[str, Any]:
    """The run-config overrides of arm ``name`` (raises ``ValueError`` for an unknown arm)."""
    from benchmarks.utility.grid import SST2_DP, SST2_NODP

    base = base_config(scale, seed)
    nodp = {**base, **SST2_NODP, "dp": False}
    if name == "non-private":
        return nodp
    if name.startswith("user-eps"):
        rest = name.removeprefix("user-eps")
        eps_text, _, variant = rest.partition("-")
        cfg = {**nodp, "dp": True, "dp-level": "user", "dp-user-epsilon": float(eps_text),
               "dp-user-delta": DELTA, "dp-user-clip": user_clip,
               "dp-user-participations": user_participations(scale)}
        if variant not in ("", "sparse", "adaptive"):
            raise ValueError(f"unknown arm {name!r}")
        if variant == "adaptive":
            cfg.update({"dp-user-clip": ADAPTIVE_START_CLIP,
                        "dp-user-clip-quantile": ADAPTIVE_QUANTILE,
                        "dp-user-clip-lr": ADAPTIVE_LR})
        # pinned, so that a stored row keeps meaning what it measured if a planner changes
        degree, threshold = secagg_graph(scale.clients_per_round,
                                         complete=variant != "sparse")
        cfg.update({"secagg-degree": degree, "secagg-threshold": threshold})
        return cfg
    if name.startswith("record-eps"):
        eps = float(name.removeprefix("record-eps"))
        return {**base, **SST2_DP, "dp": True, "dp-level": "record", "dp-target-epsilon": eps,
                "dp-epsilon-budget": eps, "dp-delta": DELTA, "batch-size": scale.dp_batch,
                "dp-physical-batch": scale.dp_physical_batch,
                "dp-planned-rounds": record_planned_rounds(scale)}
    raise ValueError(f"unknown arm {name!r}; known: {DEFAULT_ARMS + OPTIONAL_ARMS}")


def arm_label(name: str, config: dict[str, Any]) -> str:
    if name == "non-private":
        return "non-private: LoRA + AdamW"
    if name.startswith("user-eps"):
        graph = ("complete graph" if config["secagg-degree"] >= config["clients-per-round"] - 1
                 else f"degree {config['secagg-degree']}")
        extra = f", SecAgg+ {graph}, threshold {config['secagg-threshold']}"
        clip = (f"adaptive clip from {config['dp-user-clip']:.3g} (median, lr "
                f"{config['dp-user-clip-lr']:g})" if config.get("dp-user-clip-quantile")
                else f"update clip {config['dp-user-clip']:.3g}")
        return (f"user level, epsilon {config['dp-user-epsilon']:g}: LoRA + AdamW, "
                f"{clip}{extra}")
    return (f"record level, epsilon {config['dp-target-epsilon']:g}: FFA-LoRA + DP-SGD "
            "momentum")


def resolved(overrides: dict[str, Any]) -> dict[str, Any]:
    """The whole flat run config of an arm (defaults, then the preset, then the overrides)."""
    from fedpeft.runconfig.config import DEFAULTS
    from fedpeft.runconfig.presets import get_preset

    return {**DEFAULTS, **get_preset("sst2-lora").config, **overrides}


def config_key(scale: Scale, overrides: dict[str, Any]) -> str:
    doc = {"clients": scale.clients, "config": resolved(overrides)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    import numpy as np
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "torch_threads": THREADS,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
                               1),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


# -- the clip probe ---------------------------------------------------------------------------


def probe_update_norms(scale: Scale, seed: int) -> dict[str, Any]:
    """L2 norms of the first-round non-private updates of ``probe_clients`` clients of the
    SST-2 federation (:func:`probe_norms` on the non-private arm)."""
    return probe_norms(resolved(arm_config("non-private", scale, seed, 1.0)), scale.clients,
                       scale.probe_clients, seed)


def probe_norms(nonprivate: dict[str, Any], clients: int, probe_clients: int, seed: int
                ) -> dict[str, Any]:
    """L2 norms of the first-round updates of ``probe_clients`` of ``clients`` clients under
    the resolved non-private run config ``nonprivate``.

    Each client trains from the initial global adapter exactly as in round 1 of the
    non-private arm (its own :class:`~fedpeft.client.runtime.ClientRuntime`, plain transport,
    so the update comes back in the clear); the norm is of the flattened adapter update, the
    vector that user-level DP clips.
    """
    import numpy as np

    from fedpeft.client.runtime import ClientIdentity, ClientRuntime
    from fedpeft.core.protocol import (
        ADAPTER_KEY,
        FINGERPRINT_KEY,
        KIND_TRAIN,
        ROUND_KEY,
        UPDATE_KEY,
        Content,
    )
    from fedpeft.core.vector import flatten
    from fedpeft.core.wire import decode, encode
    from fedpeft.peft_methods import get_adapted
    from fedpeft.peft_methods.registry import initial_adapter_state
    from fedpeft.runconfig.config import parse_run_config

    flat = {**nonprivate, "secagg": False, "progress": False, "resume": False,
            "run-dir": str(Path(tempfile.gettempdir()) / "population-probe")}
    run = parse_run_config(flat)
    spec = get_adapted(run.model, run.adapter, run.seed).spec()
    payload = encode(initial_adapter_state(run.model, run.adapter, run.seed))
    message: Content = {ROUND_KEY: 1, FINGERPRINT_KEY: run.fingerprint(), ADAPTER_KEY: payload}
    picks = sorted(int(i) for i in np.random.default_rng([seed, 15]).choice(
        clients, size=min(probe_clients, clients), replace=False))
    norms: list[float] = []
    start = time.perf_counter()
    for i in picks:
        rt = ClientRuntime(run, ClientIdentity(client_id=f"client-{i}", partition_id=i,
                                               num_partitions=clients))
        reply = rt.handle(KIND_TRAIN, message)
        blob = reply.get(UPDATE_KEY)
        if not isinstance(blob, bytes):
            raise RuntimeError(f"probe client {i} returned no update: {reply}")
        norms.append(float(np.linalg.norm(flatten(decode(blob, spec), spec).astype(np.float64))))
    q = np.quantile(norms, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
    return {"clients": picks, "norms": norms, "min": q[0], "q25": q[1], "median": q[2],
            "q75": q[3], "max": q[4], "seconds": time.perf_counter() - start}


# -- one arm ----------------------------------------------------------------------------------


def _tail_metrics(path: Path, label: str, stop: threading.Event, metric: str = "accuracy"
                  ) -> None:
    """Print each round's row of ``metrics.jsonl`` as it appears (the log of a long run)."""
    seen = 0
    while True:
        done = stop.wait(5.0)
        if path.is_file():
            lines = path.read_text().splitlines()
            for line in lines[seen:]:
                try:
                    r = json.loads(line)
                except ValueError:
                    break  # a line being written: read it next time
                seen += 1
                acc = float(r.get("eval", {}).get(metric, float("nan")))
                print(f"  [{label}] round {r.get('round')}: {metric} {acc:.4f}"
                      + (f", {r['seconds']:.1f} s" if "seconds" in r else "")
                      + (f", ok {r.get('ok')}" if "ok" in r else "")
                      + (f", user epsilon max {r['dp_user_epsilon_max']:.3f}"
                         if "dp_user_epsilon_max" in r else "")
                      + (f", record epsilon max {r['dp_epsilon']['max']:.3f}"
                         if "dp_epsilon" in r else "")
                      + (f", SKIPPED {r['skipped']}" if "skipped" in r else ""), flush=True)
        if done:
            return


def summarise(run_dir: Path, metric: str = "accuracy") -> dict[str, Any]:
    """The numbers of one arm from its run directory (metrics.jsonl, privacy_report.json);
    ``best`` is the highest ``metric``, or the lowest for ``perplexity`` or ``loss``."""
    from fedpeft.core.protocol import STATUS_BUDGET_EXHAUSTED

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    trained = [r for r in rows if r.get("round", 0) > 0]
    curve = [float(r["eval"][metric]) for r in rows]
    lower_is_better = metric in ("perplexity", "loss")
    up = [float(r.get("bytes_up", 0)) / max(int(r.get("ok", 0)), 1) for r in trained]
    faults = [f for r in trained for f in r.get("faults", [])]
    out: dict[str, Any] = {
        "metric": metric, "curve": curve, "initial": curve[0], "final": curve[-1],
        "best": min(curve) if lower_is_better else max(curve),
        "rounds": len(trained), "skipped": sum(1 for r in trained if "skipped" in r),
        "survivors_per_round": [int(r.get("secagg", {}).get("survivors", r.get("ok", 0)))
                                for r in trained],
        "faults": len(faults),
        "budget_refusals": sum(1 for f in faults if f.get("status") == STATUS_BUDGET_EXHAUSTED),
        "seconds_per_round": statistics.fmean(float(r["seconds"]) for r in trained)
        if trained else 0.0,
        "seconds_per_round_each": [float(r["seconds"]) for r in trained],
        "upload_bytes_per_client_round": statistics.fmean(up) if up else 0.0,
        "secagg_clipped": sum(int(r.get("secagg", {}).get("clipped", 0)) for r in trained),
        "epsilon": None,
    }
    clips = [r["dp_user_clip"] for r in trained if "dp_user_clip" in r]
    if clips:  # adaptive clipping: the clip of each round and the noisy unclipped fraction
        out["adaptive_clip"] = {
            "clip_per_round": [float(c["clip"]) for c in clips],
            "unclipped_fraction_per_round": [float(c["unclipped_fraction"]) for c in clips],
            "count_std": float(clips[0]["count_std"])}
    report_path = run_dir / "privacy_report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if "user" in report:
        u = report["user"]
        out["epsilon"] = u["summary"].get("epsilon_max")
        out["user"] = {k: u[k] for k in ("delta", "epsilon_budget", "participations",
                                         "per_client_noise_std", "clip", "min_contributors",
                                         "bits", "releases", "aborted_rounds", "summary")}
        # the noise in the mean of the survivors, per coordinate, in units of the clip
        surv = [s for s in out["survivors_per_round"] if s > 0]
        if surv:
            k = statistics.fmean(surv)
            out["user"]["mean_noise_std_over_clip"] = (
                u["per_client_noise_std"] * math.sqrt(k) / k / u["clip"])
    if "record" in report:
        r = report["record"]
        out["epsilon"] = r["summary"].get("epsilon_max")
        out["record"] = {"delta": r["delta"], "epsilon_budget": r["epsilon_budget"],
                         "summary": r["summary"]}
        sigmas = sorted({float(c["dp-sigma"]) for row in trained for c in row.get("clients", [])
                         if "dp-sigma" in c})
        out["record"]["sigma"] = sigmas
        qs = sorted({float(c["dp-q"]) for row in trained for c in row.get("clients", [])
                     if "dp-q" in c})
        out["record"]["sample_rate"] = qs
    return out


def run_arm(name: str, scale: Scale, overrides: dict[str, Any], run_dir: Path
            ) -> dict[str, Any]:
    """Train one arm of the SST-2 federation in this process and summarise it."""
    return run_resolved(name, arm_label(name, overrides), config_key(scale, overrides),
                        overrides, resolved(overrides), scale.clients, run_dir)


def run_resolved(name: str, label: str, key: str, overrides: dict[str, Any],
                 config: dict[str, Any], clients: int, run_dir: Path,
                 metric: str = "accuracy") -> dict[str, Any]:
    """Train one arm's federation (the resolved flat run config ``config`` over ``clients``
    clients) in this process and summarise it."""
    import numpy as np
    import torch

    from fedpeft.coordinator.server import Coordinator
    from fedpeft.runconfig.config import parse_run_config
    from fedpeft.simulations.inmemory import InMemoryTransport

    torch.set_num_threads(THREADS)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "privacy_report.json"):
        (run_dir / stale).unlink(missing_ok=True)
    flat = {**config, "run-dir": str(run_dir), "ledger-dir": str(run_dir / "ledgers"),
            "resume": False, "progress": False}
    run = parse_run_config(flat)
    transport = InMemoryTransport(run, clients)
    stop = threading.Event()
    tail = threading.Thread(target=_tail_metrics,
                            args=(run_dir / "metrics.jsonl", name, stop, metric), daemon=True)
    tail.start()
    start = time.perf_counter()
    try:
        summary = Coordinator(run, transport, run_dir).run_federation()
    finally:
        stop.set()
        tail.join()
    row: dict[str, Any] = {"arm": name, "label": label, "key": key, "overrides": overrides,
                           "seconds": time.perf_counter() - start,
                           "stopped": summary.stopped_reason, **summarise(run_dir, metric)}
    norms = [float(v) for rt in transport.runtimes.values()
             for k, v in rt.last_local.items() if k == "user-update-norm"
             and isinstance(v, (int, float))]
    if norms:  # on-device metric, read here only because the simulation holds every device
        q = np.quantile(norms, [0.0, 0.25, 0.5, 0.75, 1.0]).tolist()
        clip = float(flat["dp-user-clip"])
        row["user_update_norms_last_round_joined"] = {
            "users": len(norms), "min": q[0], "q25": q[1], "median": q[2], "q75": q[3],
            "max": q[4], "fraction_clipped": sum(n > clip for n in norms) / len(norms)}
    return row


# -- the table --------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _noise(row: dict[str, Any]) -> str:
    if "user" in row:
        u = row["user"]
        return (f"{u['per_client_noise_std']:.3g} per client, {u['min_contributors']} shares "
                f"accounted (mean: {u.get('mean_noise_std_over_clip', float('nan')):.3g} x clip)")
    if "record" in row and row["record"]["sigma"]:
        s, q = row["record"]["sigma"], row["record"].get("sample_rate") or [float("nan")]
        return (f"sigma {s[0]:.3g}" + (f"-{s[-1]:.3g}" if s[-1] != s[0] else "")
                + f", q {q[0]:.2g}")
    return "-"


def markdown(doc: dict[str, Any]) -> str:
    arms = doc["arms"]
    ref = next((a["final"] for a in arms if a["arm"] == "non-private"), None)
    meta = doc["meta"]
    s = meta["scale"]
    layers = f" ({s['layers']} layers)" if s["layers"] else ""
    lines = [f"### SST-2, MiniLM-L6{layers}, "
             f"{s['clients']} clients x {s['examples_per_client']} sentences (IID), "
             f"{s['clients_per_round']} per round, {s['rounds']} rounds, SecAgg+ on "
             "(accuracy %; gap: to the non-private arm)", "",
             "| arm | start | final | best | gap | epsilon reached | noise | "
             "upload / client / round | s / round (median) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        gap = "-" if ref is None or a["arm"] == "non-private" else f"{100 * (a['final'] - ref):+.1f}"
        eps = "-" if a["epsilon"] is None else f"{a['epsilon']:.2f}"
        if "user" in a and a["epsilon"] is not None:  # accounted with the shares present
            eps += f" (planned {a['user']['epsilon_budget']:g})"
        lines.append(f"| {a['label']} | {_pct(a['initial'])} | {_pct(a['final'])} | "
                     f"{_pct(a['best'])} | {gap} | {eps} | {_noise(a)} | "
                     f"{a['upload_bytes_per_client_round'] / 1000:.0f} KB | "
                     f"{statistics.median(a['seconds_per_round_each'] or [0.0]):.0f} |")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def _load(out: Path) -> dict[str, Any]:
    if not out.is_file():
        return {}
    try:
        doc: dict[str, Any] = json.loads(out.read_text())
        return doc
    except ValueError:
        return {}


def write_result(out: Path, doc: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]) -> None:
    """Write ``doc`` to ``out`` atomically and its table (``render(doc)``) beside it (.md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(render(doc))


def finish(out: Path, doc: dict[str, Any], started: float,
           render: Callable[[dict[str, Any]], str]) -> int:
    """The end of an invocation: the wall time in the meta, the files, the table printed."""
    doc["meta"]["wall_seconds"] = time.time() - started
    write_result(out, doc, render)
    print(render(doc), flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')} ({doc['meta']['wall_seconds']:.0f} s)",
          flush=True)
    return 0


def _write(out: Path, doc: dict[str, Any]) -> None:
    write_result(out, doc, markdown)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds (0: the scale's)")
    ap.add_argument("--clients-per-round", type=int, default=0,
                    help="clients sampled per round (0: the scale's); the trade-off rows")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--arms", default="",
                    help=f"comma-separated arms (default: {','.join(FULL_ARMS)}; --quick: "
                         f"{','.join(DEFAULT_ARMS)}); known: "
                         f"{', '.join(DEFAULT_ARMS + OPTIONAL_ARMS)}")
    ap.add_argument("--budget-minutes", type=float, default=60.0,
                    help="optional arms start only if, at the pace of the slowest arm so far, "
                         "they end within this much wall time of the start (0: no limit)")
    ap.add_argument("--user-clip", type=float, default=0.0,
                    help="dp-user-clip (0: the median norm of the probe's updates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the arms' run directories go (default: a new temporary folder)")
    ap.add_argument("--fresh", action="store_true", help="rerun arms already in the output")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite the .md table from the stored JSON; run nothing")
    args = ap.parse_args(argv)
    if args.table_only:
        path: Path = args.out or DEFAULT_OUT
        stored = _load(path)
        if not stored.get("arms"):
            print(f"{path} holds no arms", file=sys.stderr)
            return 1
        path.with_suffix(".md").write_text(markdown(stored))
        print(markdown(stored), flush=True)
        return 0

    import torch

    torch.set_num_threads(THREADS)
    scale = QUICK if args.quick else FULL
    if args.rounds:
        scale = replace(scale, rounds=args.rounds)
    if args.clients_per_round:
        if not 0 < args.clients_per_round <= scale.clients:
            ap.error(f"--clients-per-round {args.clients_per_round} must be in "
                     f"1..{scale.clients} (the clients of the {scale.name} scale)")
        scale = replace(scale, clients_per_round=args.clients_per_round)
    out: Path = args.out or (Path(tempfile.gettempdir()) / "population-quick.json"
                             if args.quick else DEFAULT_OUT)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] or list(
        DEFAULT_ARMS if args.quick else FULL_ARMS)
    for a in arms:
        arm_config(a, scale, args.seed, 1.0)  # an unknown arm fails before anything runs
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="population-"))
    started = time.time()
    previous = {} if args.fresh else _load(out)
    meta: dict[str, Any] = {"quick": args.quick, "scale": asdict(scale), "seed": args.seed,
                            "machine": machine(), "work_dir": str(work),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"population bench: {scale}\n  arms {arms}, run directories under {work}", flush=True)
    clip = args.user_clip
    if any(a.startswith("user-") for a in arms):
        old_probe = previous.get("meta", {}).get("probe")
        if clip <= 0 and old_probe and previous["meta"].get("scale") == asdict(scale) \
                and previous["meta"].get("seed") == args.seed:
            probe = old_probe
            print(f"probe (stored): median update norm {probe['median']:.4f}", flush=True)
        elif clip <= 0:
            probe = probe_update_norms(scale, args.seed)
            print(f"probe: {len(probe['norms'])} clients' first non-private update norms "
                  f"{[round(n, 4) for n in probe['norms']]}\n  min {probe['min']:.4f}, "
                  f"median {probe['median']:.4f}, max {probe['max']:.4f} "
                  f"({probe['seconds']:.1f} s)", flush=True)
        else:
            probe = {"given": clip}
        meta["probe"] = probe
        clip = clip if clip > 0 else round(float(probe["median"]), 4)
    meta["choices"] = {
        "partitioner": "iid", "user_clip": clip if clip > 0 else None,
        "user_clip_rule": "median L2 norm of the probe's first-round non-private updates"
        if args.user_clip <= 0 else "given (--user-clip)",
        "user_participations": user_participations(scale),
        "record_planned_rounds": record_planned_rounds(scale),
        "record_planned_rounds_rule": f"smallest p with P(selected > p times) <= "
                                      f"{RECORD_OVERFLOW:g} at rate clients-per-round/clients",
        "delta": DELTA}
    done = {a["key"]: a for a in previous.get("arms", [])}
    old_meta = previous.get("meta", {})
    if old_meta:  # the invocations whose arms may be reused here
        meta["earlier_invocations"] = [*old_meta.get("earlier_invocations", []), {
            k: old_meta[k] for k in ("started", "wall_seconds", "machine", "skipped_for_time",
                                     "arms_run") if k in old_meta}]
    meta["arms_run"] = []
    doc: dict[str, Any] = {"meta": meta, "arms": []}
    for name in arms:
        overrides = arm_config(name, scale, args.seed, clip)
        key = config_key(scale, overrides)
        if key in done:
            print(f"arm {name}: reused from {out}", flush=True)
            doc["arms"].append(done[key])
            _write(out, doc)
            continue
        slowest = max((float(a["seconds"]) for a in doc["arms"]), default=0.0)
        elapsed = time.time() - started
        if (name not in DEFAULT_ARMS and args.budget_minutes > 0
                and elapsed + slowest > 60 * args.budget_minutes):
            why = (f"{elapsed / 60:.0f} min elapsed + {slowest / 60:.0f} min (the slowest arm) "
                   f"> --budget-minutes {args.budget_minutes:g}")
            print(f"arm {name}: skipped for time ({why})", flush=True)
            meta.setdefault("skipped_for_time", {})[name] = why
            _write(out, doc)
            continue
        print(f"arm {name}: {arm_label(name, overrides)}", flush=True)
        row = run_arm(name, scale, overrides, work / name)
        print(f"arm {name}: final accuracy {row['final']:.4f} (best {row['best']:.4f}), "
              f"epsilon {row['epsilon']}, {row['seconds_per_round']:.1f} s / round, "
              f"{row['seconds']:.0f} s", flush=True)
        if row["stopped"] or row["skipped"] or row["rounds"] != scale.rounds:
            print(f"WARNING arm {name}: {row['rounds']} of {scale.rounds} rounds, "
                  f"{row['skipped']} skipped, stopped: {row['stopped'] or '-'}", flush=True)
        doc["arms"].append(row)
        meta["arms_run"].append(name)
        meta["wall_seconds"] = time.time() - started
        _write(out, doc)
    return finish(out, doc, started, markdown)


if __name__ == "__main__":
    sys.exit(main())
