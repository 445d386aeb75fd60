"""DP-SGD step cost: ``privacy.dp_sgd.dp_local_train`` against non-private ``local_train``.

LoRA (r=8, q/v projections; classification also trains the head) on SmolLM2-135M (causal LM)
and all-MiniLM-L6 (classification), batch 32 x 32 tokens, SGD. Modes: non-private, and the
Opacus per-example engines hooks, functorch, ew (expanded weights) and ghost clipping.

Every configuration runs in its own subprocess (clean peak memory). Step times are taken from
the progress callback; the first ``--warmup`` steps are dropped and the median of the rest is
reported. DP batches are Poisson (expected size 32 from 64 rows, q = 0.5), so each DP step
time is normalised to 32 examples (time * 32 / actual batch size) before the median.
Peak memory is the process's peak RSS (``resource.getrusage``) during training minus the
peak after the model was loaded and one warm-up step ran.

Usage: python benchmarks/dp_bench.py [--quick] [--layers N] [--out PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("nonprivate", "hooks", "functorch", "ew", "ghost")
MODELS = {"smollm2-135m": "causal_lm", "minilm-l6": "classification"}
BATCH, SEQ, ROWS = 32, 32, 64
SECTION = "## DP-SGD step cost"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(model_name: str, mode: str, layers: int | None, steps: int, warmup: int,
            threads: int) -> dict[str, Any]:
    """Measure one configuration in this process."""
    import torch

    torch.set_num_threads(threads)
    from client.trainer import local_train
    from fedpeft.config import TrainConfig
    from fedpeft.models import ModelConfig
    from fedpeft.tokenize import Encoded
    from peft_methods.lora import LoraSettings
    from peft_methods.registry import AdapterConfig, build
    from privacy.dp_sgd import DPConfig, dp_local_train

    task = MODELS[model_name]
    model = build(ModelConfig(model_name, task=task, num_hidden_layers=layers),  # type: ignore[arg-type]
                  AdapterConfig("lora", LoraSettings(r=8)), seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (ROWS, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone() if task == "causal_lm" else torch.randint(0, 2, (ROWS,), generator=gen)
    tti = torch.zeros_like(ids) if model_name == "minilm-l6" else None
    data = Encoded(ids, mask, labels, tti)
    total = warmup + steps
    stamps: list[float] = []

    def progress(step: int, n: int, loss: float) -> None:
        stamps.append(time.perf_counter())

    def train(k: int) -> list[int]:
        cfg = TrainConfig(local_steps=k, batch_size=BATCH, lr=1e-3, optimizer="sgd")
        model.train()
        if mode == "nonprivate":
            local_train(model, data, cfg, generator=torch.Generator().manual_seed(1),
                        progress=progress)
            return [BATCH] * k
        dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=BATCH, grad_sample_mode=mode)  # type: ignore[arg-type]
        res = dp_local_train(model, data, cfg, dp, noise_multiplier=1.0,
                             generator=torch.Generator().manual_seed(1),
                             noise_generator=torch.Generator().manual_seed(2), progress=progress)
        return res.batch_sizes

    train(1)  # warm-up outside the measured run (allocator, kernels)
    base_rss = _rss_mb()
    stamps.clear()
    t0 = time.perf_counter()
    sizes = train(total)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps)]
    norm = [t * BATCH / max(s, 1) for t, s in zip(times, sizes)][warmup:]
    return {"model": model_name, "mode": mode, "layers": layers or "full",
            "median_step_s": statistics.median(norm), "step_s": norm,
            "batch_sizes": sizes[warmup:], "peak_rss_mb": _rss_mb(),
            "rss_after_load_mb": base_rss, "train_rss_increase_mb": _rss_mb() - base_rss,
            "trainable": model.num_trainable()}


def _subprocess(model: str, mode: str, layers: int | None, steps: int, warmup: int,
                threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", model, mode, str(layers or 0), str(steps),
           str(warmup), str(threads)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "mode": mode, "layers": layers or "full", "error": tail[0][:300]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [SECTION, "",
             f"`python benchmarks/dp_bench.py{' --quick' if meta['quick'] else ''}` on "
             f"{meta['machine']} ({meta['threads']} torch threads), torch {meta['torch']}, "
             f"opacus {meta['opacus']}. LoRA r=8 (q/v; classification also trains the head), "
             f"batch {BATCH} x {SEQ} tokens, SGD, layers: {meta['layers']}. Median of "
             f"{meta['steps']} steps after {meta['warmup']} warm-up steps; DP steps are "
             f"Poisson batches (expected {BATCH}) normalised to {BATCH} examples. Memory: "
             "peak RSS increase during training over the process's peak after loading and one "
             "warm-up step (one subprocess per row). Raw data: `benchmarks/results/dp.json`.",
             "", "| model | mode | step (s) | x non-private | peak RSS (MB) | train RSS + (MB) |",
             "|---|---|---|---|---|---|"]
    base = {r["model"]: r.get("median_step_s") for r in results if r["mode"] == "nonprivate"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = r["median_step_s"] / base[r["model"]] if base.get(r["model"]) else float("nan")
        lines.append(f"| {r['model']} | {r['mode']} | {r['median_step_s']:.3f} | {ratio:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['train_rss_increase_mb']:.0f} |")
    lines += ["", meta.get("verdict", ""), ""]
    return "\n".join(lines)


def write_md(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in text:  # replace only our own section (up to the next "## " heading)
        start = text.index(SECTION)
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2-layer models, 3 steps")
    ap.add_argument("--layers", type=int, default=None, help="cut models to N layers")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="benchmarks/results/dp.json")
    ap.add_argument("--md", default="docs/benchmarks.md")
    ap.add_argument("--one", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        model, mode, layers, steps, warmup, threads = args.one
        res = run_one(model, mode, int(layers) or None, int(steps), int(warmup), int(threads))
        print(json.dumps(res))
        return
    import opacus
    import torch

    layers = 2 if args.quick and args.layers is None else args.layers
    steps = args.steps or (3 if args.quick else 5)
    results = []
    for model in MODELS:
        for mode in args.modes.split(","):
            r = _subprocess(model, mode, layers, steps, args.warmup, args.threads)
            print(json.dumps({k: v for k, v in r.items() if k not in ("step_s",)}), flush=True)
            results.append(r)
    base = {r["model"]: r.get("median_step_s") for r in results if r["mode"] == "nonprivate"}
    best: dict[str, tuple[str, float]] = {}
    for r in results:
        if r["mode"] != "nonprivate" and "error" not in r and base.get(r["model"]):
            ratio = r["median_step_s"] / base[r["model"]]
            if r["model"] not in best or ratio < best[r["model"]][1]:
                best[r["model"]] = (r["mode"], ratio)
    hooks = {r["model"]: r["median_step_s"] / base[r["model"]] for r in results
             if r["mode"] == "hooks" and "error" not in r and base.get(r["model"])}
    verdict = ("Target (default mode within 1.1x of non-private): "
               + "; ".join(f"{m}: hooks {hooks.get(m, float('nan')):.2f}x, best {b[0]} "
                           f"{b[1]:.2f}x -> {'met' if hooks.get(m, 9) <= 1.1 else 'NOT met'}"
                           for m, b in best.items()) + ".")
    if any(b[1] < 0.9 for b in best.values()):  # DP does strictly more work than plain SGD
        verdict += (" CAUTION: a DP mode measured faster than non-private (ratio < 0.9), so "
                    "the CPU was contended during the run; the ratios are inconclusive.")
    meta = {"quick": args.quick, "layers": layers or "full", "steps": steps,
            "warmup": args.warmup, "threads": args.threads, "torch": torch.__version__,
            "opacus": opacus.__version__, "machine": f"{platform.machine()} CPU "
            f"({os.cpu_count()} cores visible)", "verdict": verdict}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_md(Path(args.md), render(results, meta))
    print(verdict)


if __name__ == "__main__":
    main()
