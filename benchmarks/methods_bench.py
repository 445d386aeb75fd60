"""What each adapter method costs under record-level DP-SGD (issue 18, item 4's cost columns).

For every registered method on both embedded models (full depth; BitFit on MiniLM-L6 only,
SmolLM2 has no bias terms; prefix tuning on SmolLM2 only, a decoder method): trainable tensors
and coordinates (every one of them is noised under DP-SGD and, under user-level DP, clipped and
noised in the SecAgg field), the upload per round (float32 safetensors, and the user-level
SecAgg words at ``secagg-bits`` bits a coordinate), the median DP-SGD step time (the method's
``auto`` engine, batch 32 x 32 tokens, Poisson q = 0.5, normalised to 32 examples) and the peak
RSS of a process that built the model and trained, each against LoRA in the same run. Every
(model, method) runs in its own subprocess (clean peak memory). Accuracy at a given epsilon is
the utility sweep's job (docs/results.md), not this file's.

Usage: python -m benchmarks.methods_bench [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dp_bench import BATCH, MODELS, ROWS, SEQ, _rss_mb  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "methods.json"
#: Rows that are one method with other run-config settings: label -> (method, overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bottleneck-parallel": ("bottleneck", {"bottleneck-placement": "parallel"})}
#: (model, method or variant) pairs that exist (BitFit needs bias terms).
PAIRS = [(m, a) for m in MODELS
         for a in ("lora", "ffa-lora", "prompt", "prefix", "ia3", "bitfit", "bottleneck",
                   "bottleneck-parallel")
         if not (m == "smollm2-135m" and a == "bitfit")
         and not (m == "minilm-l6" and a == "prefix")]  # prefix tuning: decoders only


def run_one(model_name: str, method: str, layers: int, steps: int, warmup: int) -> dict[str, Any]:
    """Measure one (model, method) in this process."""
    import statistics

    import torch

    torch.set_num_threads(2)
    from fedpeft.core.models import ModelConfig
    from fedpeft.core.wire import encode
    from fedpeft.data.tokenize import Encoded
    from fedpeft.peft_methods.registry import METHODS, AdapterConfig, build
    from fedpeft.privacy.csprng import DPRandomness
    from fedpeft.privacy.dp_sgd import DPConfig, dp_local_train
    from fedpeft.runconfig.config import DEFAULTS
    from fedpeft.training.config import TrainConfig

    task = MODELS[model_name]
    name, overrides = VARIANTS.get(method, (method, {}))
    entry = METHODS[name]
    settings = entry.parse({**DEFAULTS, **overrides})
    model = build(ModelConfig(model_name, task=task, num_hidden_layers=layers or None),  # type: ignore[arg-type]
                  AdapterConfig(name, settings), seed=0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (ROWS, SEQ), generator=gen)
    labels = ids.clone() if task == "causal_lm" else torch.randint(0, 2, (ROWS,), generator=gen)
    tti = torch.zeros_like(ids) if model_name == "minilm-l6" else None
    data = Encoded(ids, torch.ones_like(ids), labels, tti)
    mode = entry.grad_sample_modes[0]
    stamps: list[float] = []

    def train(k: int) -> list[int]:
        cfg = TrainConfig(local_steps=k, batch_size=BATCH, lr=1e-3, optimizer="sgd")
        model.train()
        dp = DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                      expected_batch_size=BATCH, grad_sample_mode=mode)  # type: ignore[arg-type]
        res = dp_local_train(model, data, cfg, dp, noise_multiplier=1.0,
                             randomness=DPRandomness.from_seed(1),
                             progress=lambda *_: stamps.append(time.perf_counter()))
        return res.batch_sizes

    train(1)
    stamps.clear()
    t0 = time.perf_counter()
    sizes = train(warmup + steps)
    times = [b - a for a, b in zip([t0, *stamps[:-1]], stamps, strict=True)]
    norm = [t * BATCH / max(s, 1) for t, s in zip(times, sizes, strict=True)][warmup:]
    state = model.adapter_state()
    bits = int(DEFAULTS["secagg-bits"])
    coords = sum(t.numel() for t in state.values())
    return {"model": model_name, "method": method, "layers": layers or "full",
            "grad_sample_mode": mode, "tensors": len(state), "coordinates": coords,
            "share_of_model": coords / model.num_total(),
            "upload_float32_bytes": len(encode(state)),
            "upload_secagg_bytes": (coords * bits + 7) // 8, "secagg_bits": bits,
            "median_step_s": statistics.median(norm), "step_s": norm,
            "peak_rss_mb": _rss_mb()}


def _subprocess(model: str, method: str, layers: int, steps: int, warmup: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", model, method, str(layers), str(steps), str(warmup)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model, "method": method, "error": tail[0][:300]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's step time, peak RSS and coordinates against LoRA on the same model."""
    lora = {r["model"]: r for r in rows if r["method"] == "lora" and "error" not in r}
    for r in rows:
        ref = lora.get(r["model"])
        if ref is None or "error" in r:
            continue
        r["step_vs_lora"] = r["median_step_s"] / ref["median_step_s"]
        r["rss_vs_lora"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        r["coordinates_vs_lora"] = r["coordinates"] / ref["coordinates"]
    return rows


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = ["### Adapter methods under record-level DP-SGD: size, upload, step time, memory",
             "",
             f"`python -m benchmarks.methods_bench{' --quick' if meta['quick'] else ''}`, "
             f"{meta['layers']} layers, batch {BATCH} x {SEQ} tokens, {meta['steps']} measured "
             f"steps, load average {meta['load_average_at_start']} at the start. Run-config "
             "default settings of each method (LoRA r 8 on q/v; prompt and prefix 16 tokens; "
             "(IA)3 and BitFit at PEFT's / the paper's default modules; bottleneck adapters of width 8, "
             "serial after attention and feed-forward outputs, parallel beside the "
             "feed-forward block; classification trains the head).",
             "",
             "| model | method | engine | coordinates (noised) | vs LoRA | upload float32 | "
             "upload SecAgg | step s | vs LoRA | peak RSS MB | vs LoRA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['method']} | {r['grad_sample_mode']} | {r['coordinates']:,} "
            f"({100 * r['share_of_model']:.2f} %) | {r.get('coordinates_vs_lora', 0):.2f}x | "
            f"{r['upload_float32_bytes'] / 1e3:.0f} KB | {r['upload_secagg_bytes'] / 1e3:.0f} KB "
            f"| {r['median_step_s']:.3f} | {r.get('step_vs_lora', 0):.2f}x | "
            f"{r['peak_rss_mb']:.0f} | {r.get('rss_vs_lora', 0):.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="2-layer models, 2 steps (smoke test)")
    ap.add_argument("--out", type=Path, default=None, help=f"JSON path (default {DEFAULT_OUT})")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        model, method, layers, steps, warmup = args.one
        print(json.dumps(run_one(model, method, int(layers), int(steps), int(warmup))))
        return 0
    layers, steps, warmup = (2, 2, 1) if args.quick else (0, 6, 2)
    out: Path = args.out or (Path("/tmp/methods-quick.json") if args.quick else DEFAULT_OUT)
    meta = {"quick": args.quick, "layers": layers or "full", "steps": steps, "warmup": warmup,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    for model, method in PAIRS:
        row = _subprocess(model, method, layers, steps, warmup)
        print(json.dumps({k: v for k, v in row.items() if k != "step_s"}), flush=True)
        rows.append(row)
    doc = {"meta": meta, "rows": with_ratios(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc), flush=True)
    failed = [f"{r['model']} {r['method']}" for r in rows if "error" in r]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
