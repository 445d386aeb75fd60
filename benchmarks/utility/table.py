"""Results rows -> Markdown tables (pure: rows in, text out)."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmarks.utility.grid import ANCHORS


def _mean_sd(values: Sequence[float], scale: float, digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    sd = statistics.stdev(values) * scale
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def group_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """Rows by (group, label), in first-seen order."""
    out: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((str(r["group"]), str(r["label"])), []).append(r)
    return out


#: Tables whose rows are compared with their first row.
FIRST_ROW_REFERENCE: tuple[str, ...] = ("sst2-technique", "sst2-limits")


def _sig3(sigma: float) -> float:
    """Sigma to 3 decimals; 3 significant digits below 0.01 (a clip-only run's 1e-4)."""
    return round(sigma, 3) if sigma >= 0.01 else float(f"{sigma:.3g}")


def _eps_text(eps: list[float]) -> str:
    if not eps:
        return "-"
    return f"{max(eps):.2f}" if max(eps) < 1e3 else f"{max(eps):.1e} (not private)"


def _reference(grouped: Mapping[tuple[str, str], list[Mapping[str, Any]]], group: str,
               label: str) -> float | None:
    """What a row's gap is measured against: the non-private federated run with the same
    skew (SST-2) or method (chat), or the table's first row (technique and limits tables)."""
    ref: list[Mapping[str, Any]] | None = None
    if (group == "sst2-main" and "alpha" in label) or group in ("chat", "sst2-methods"):
        ref = grouped.get((group, label.split(",")[0] + ", no DP"))
    elif group == "sst2-sentences":
        ref = grouped.get((group, label.rsplit(",", 1)[0] + ", no DP"))
    elif group in FIRST_ROW_REFERENCE:
        first = next((k for k in grouped if k[0] == group), None)
        ref = grouped[first] if first is not None and first[1] != label else None
    return statistics.fmean(float(r["final"]) for r in ref) if ref else None


def markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """One table per group: final metric (mean ± sd over seeds), gap, epsilon, bytes, time."""
    grouped = group_rows(rows)
    titles = {"sst2-main": "SST-2, MiniLM-L6, secure aggregation on (clip 16); with DP: "
                           "FFA-LoRA + DP-SGD with momentum, without: LoRA + AdamW; FedAvgM in both "
                           "(accuracy %; gap: to the non-private federated run with the same "
                           "alpha)",
              "sst2-technique": "SST-2 at epsilon 8, alpha 0.5, SecAgg clip 1: each technique "
                                "against DP-Adam (accuracy %; gap: to the first row)",
              "sst2-limits": "SST-2 at alpha 100, epsilon 8, seed 0: what limits the private "
                             "run (each row changes the first: the DP default aggregated by "
                             "plain FedAvg, SecAgg clip 1; accuracy %; gap: to the first row)",
              "chat": "chitchat, SmolLM2-135M, perplexity on held-out participants (gap: to "
                      "the same method without DP)",
              "sst2-methods": "SST-2, alpha 0.5, each adapter method at epsilon 8 and without "
                              "DP, the main table's optimisers, SecAgg on (accuracy %; gap: to "
                              "the same method without DP)",
              "sst2-sentences": "SST-2, alpha 0.5, the main table's runs evaluated on the "
                                "full sentences of sst2_dev.tsv only (eval-subset = sentences; "
                                "accuracy %; gap: to the same evaluation without DP)"}
    lines: list[str] = []
    for group in ("sst2-main", "sst2-technique", "sst2-limits", "chat", "sst2-methods",
                  "sst2-sentences"):
        keys = [k for k in grouped if k[0] == group]
        if not keys:
            continue
        cls = group.startswith("sst2")
        scale, digits = (100.0, 1) if cls else (1.0, 2)
        lines += [f"### {titles[group]}", "",
                  "| run | seeds | start | final | gap | epsilon reached | sigma "
                  "| upload / client / round | s / round |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for key in keys:
            rs = grouped[key]
            finals = [float(r["final"]) for r in rs]
            ref = _reference(grouped, group, key[1])
            gap = "-"
            if ref is not None and (rs[0].get("target_epsilon") is not None
                                    or group in FIRST_ROW_REFERENCE):
                gap = f"{(statistics.fmean(finals) - ref) * scale:+.{digits}f}"
            eps = [float(r["epsilon"]) for r in rs if r.get("epsilon") is not None]
            sig = sorted({_sig3(s) for r in rs for s in r.get("sigma", [])})
            sig_txt = "-" if not sig else (f"{sig[0]:g}" if len(sig) == 1
                                           else f"{sig[0]:g}-{sig[-1]:g}")
            up = statistics.fmean(float(r["upload_bytes_per_client_round"]) for r in rs)
            secs = statistics.fmean(float(r["round_seconds"]) for r in rs)
            lines.append(
                f"| {key[1]} | {len(rs)} | {_mean_sd([float(r['initial']) for r in rs], scale, digits)}"
                f" | {_mean_sd(finals, scale, digits)} | {gap} "
                f"| {_eps_text(eps)} | {sig_txt} | {up / 1e3:.0f} KB "
                f"| {secs:.0f} |")
        lines.append("")
    lines += ["### Published anchors (larger models, GLUE SST-2 dev set)", "",
              "| source | private | non-private |", "|---|---|---|"]
    lines += [f"| {a['source']} | {a['private']} | {a['non_private']} |" for a in ANCHORS]
    return "\n".join(lines) + "\n"
