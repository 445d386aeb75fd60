"""``fedpeft report RUN_DIR``: a Markdown report with PNG plots from a run directory.

Reads what every run writes (``metrics.jsonl``, ``run_config.json``, ``privacy_report.json``
when DP was on), whether it came from ``fedpeft simulate`` or a deployment, and writes
``report.md`` plus ``report_metric.png``, ``report_epsilon.png``, ``report_bytes.png`` and
``report_time.png`` next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedpeft.core.errors import DataError
from fedpeft.privacy.auditing.report import audit_line, read_audits


def load_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: RUN_DIR must be a directory written by "
                        "`fedpeft simulate` or `fedpeft coordinator`")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i} is not valid JSON ({exc})") from exc
    if not rows:
        raise DataError(f"{path} has no rounds yet")
    return rows


def _metric_name(rows: list[dict[str, Any]]) -> str:
    ev = rows[-1].get("eval", {})
    return "accuracy" if "accuracy" in ev else "perplexity"


def _plot(path: Path, title: str, ylabel: str, series: dict[str, tuple[list[int], list[float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _clipped(row: dict[str, Any]) -> tuple[int, int] | None:
    """(coordinates, clients) clamped by SecAgg in a round; None for a round without SecAgg
    or from before the count was recorded."""
    sec = row.get("secagg")
    if not isinstance(sec, dict) or not isinstance(sec.get("clipped"), int):
        return None
    clients = sec.get("clients_clipped")
    return int(sec["clipped"]), int(clients) if isinstance(clients, int) else 0


def _clipped_text(row: dict[str, Any]) -> str:
    """'coordinates (clients)' clamped by SecAgg in a round, '-' where not recorded."""
    c = _clipped(row)
    return "-" if c is None else f"{c[0]} ({c[1]})"


def write_report(run_dir: Path) -> Path:
    """Write ``report.md`` and its plots; return the Markdown path."""
    rows = load_rows(run_dir)
    metric = _metric_name(rows)
    cfg_path = run_dir / "run_config.json"
    config = json.loads(cfg_path.read_text()).get("run_config", {}) if cfg_path.is_file() else {}
    rounds = [int(r["round"]) for r in rows]
    values = [float(r.get("eval", {}).get(metric, float("nan"))) for r in rows]
    _plot(run_dir / "report_metric.png", f"held-out {metric}", metric, {metric: (rounds, values)})
    trained = [r for r in rows if r["round"] > 0]
    tr = [int(r["round"]) for r in trained]
    _plot(run_dir / "report_bytes.png", "bytes per round", "MB",
          {"up": (tr, [r.get("bytes_up", 0) / 1e6 for r in trained]),
           "down": (tr, [r.get("bytes_down", 0) / 1e6 for r in trained])})
    _plot(run_dir / "report_time.png", "round time", "seconds",
          {"round": (tr, [float(r.get("seconds", 0.0)) for r in trained])})
    eps_rows = [r for r in trained if "dp_epsilon" in r]
    if eps_rows:
        er = [int(r["round"]) for r in eps_rows]
        _plot(run_dir / "report_epsilon.png", "epsilon over clients (PRV)", "epsilon",
              {k: (er, [float(r["dp_epsilon"][k]) for r in eps_rows])
               for k in ("min", "median", "max")})
    lines = [f"# Run report: {run_dir.name}", "",
             f"Preset: `{config.get('preset', '?')}`; model `{config.get('model', '?')}`, "
             f"method `{config.get('method', '?')}`; DP "
             f"{'on (' + str(config.get('dp-level', 'record')) + ' level)' if config.get('dp') else 'off'}, "
             f"secure aggregation {'on' if config.get('secagg') else 'off'}.", "",
             "| round | " + metric + " | eval loss | clients ok/selected | epsilon min/median/max "
             "| exhausted | MB up | MB down | seconds | SecAgg clipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = r.get("eval", {})
        eps = r.get("dp_epsilon")
        eps_s = f"{eps['min']:.2f}/{eps['median']:.2f}/{eps['max']:.2f}" if eps else "-"
        if "dp_user_epsilon_max" in r:  # user level: the largest per-user epsilon so far
            user_s = f"user max {float(r['dp_user_epsilon_max']):.2f}"
            eps_s = user_s if eps_s == "-" else f"{eps_s}; {user_s}"
        lines.append(
            f"| {r['round']} | {ev.get(metric, float('nan')):.4f} | {ev.get('loss', float('nan')):.4f} "
            f"| {r.get('ok', '-')}/{r.get('selected', '-')} | {eps_s} | {r.get('dp_exhausted', '-')} "
            f"| {r.get('bytes_up', 0) / 1e6:.3f} | {r.get('bytes_down', 0) / 1e6:.3f} "
            f"| {float(r.get('seconds', 0.0)):.1f} | {_clipped_text(r)} |")
    clipped = [r["round"] for r in rows if (_clipped(r) or (0, 0))[0] > 0]
    if clipped:
        lines += ["", f"SecAgg clipped update coordinates to secagg-clip="
                  f"`{config.get('secagg-clip', '?')}` in rounds "
                  f"{', '.join(str(n) for n in clipped)}: the aggregate is biased toward zero "
                  "there. Raise `secagg-clip` (docs/secagg.md, 'Choosing secagg-clip')."]
    audits = read_audits(run_dir)
    if audits:
        lines += ["", "## Privacy audit", ""]
        lines += [f"* {audit_line(a)}" for a in audits]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += ["", "Skipped rounds:"] + [f"- round {r['round']}: {r['skipped']}" for r in skipped]
    lines += ["", f"![{metric}](report_metric.png)", "", "![bytes](report_bytes.png)", "",
              "![time](report_time.png)"]
    if eps_rows:
        lines += ["", "![epsilon](report_epsilon.png)"]
    lines += ["", "## Configuration", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | `{v}` |" for k, v in sorted(config.items())]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
