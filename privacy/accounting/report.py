"""Per-client and federation-wide privacy reports, computed from ledger files alone.

Epsilon is recomputed from the ledger's events (pending reservations count as spent); cached
display values in the ledger are ignored.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from privacy.accounting.accountant import DEFAULT_ACCOUNTANT, compute_epsilon
from privacy.accounting.budget import check_round
from privacy.accounting.errors import LedgerError
from privacy.accounting.ledger import LEDGER_SUFFIX, LedgerSnapshot, read_ledger

#: Delta used when a ledger has neither a budget nor any event to take delta from.
FALLBACK_DELTA = 1e-5


@dataclass(frozen=True)
class ClientPrivacyReport:
    """Privacy spent by one client, from its ledger.

    ``epsilon_curve`` holds ``(round_number, cumulative PRV epsilon)`` after each round the
    client joined. ``exhausted`` means another round like its last one would exceed the budget.
    """

    client_id: str
    ledger_path: str
    rounds_joined: int
    round_numbers: tuple[int, ...]
    total_steps: int
    sample_rates: tuple[float, ...]
    noise_multipliers: tuple[float, ...]
    epsilon_prv: float
    epsilon_rdp: float
    delta: float
    budget_epsilon: float | None
    budget_left: float | None
    exhausted: bool
    pending_events: int
    epsilon_curve: tuple[tuple[int, float], ...]
    notes: tuple[str, ...]


@dataclass(frozen=True)
class FederationSummary:
    """Federation-wide aggregation of client reports (PRV epsilons)."""

    clients: int
    epsilon_min: float
    epsilon_median: float
    epsilon_max: float
    exhausted: int


def _unique(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(set(values)))


def client_report(snapshot: LedgerSnapshot) -> ClientPrivacyReport:
    """Report for one verified ledger snapshot."""
    entries = snapshot.entries
    events = snapshot.spent_events()
    if snapshot.budget is not None:
        delta = snapshot.budget.delta
    elif entries:
        delta = min(e.metadata.delta for e in entries)  # smallest delta: strongest claim
    else:
        delta = FALLBACK_DELTA
    prv = compute_epsilon(events, delta, "prv").epsilon
    rdp = compute_epsilon(events, delta, "rdp").epsilon
    rounds = sorted({e.metadata.round_number for e in entries})
    curve: list[tuple[int, float]] = []
    for r in rounds:
        prefix = [e.event for e in entries if e.metadata.round_number <= r]
        curve.append((r, compute_epsilon(prefix, delta, DEFAULT_ACCOUNTANT).epsilon))
    budget_eps = None if snapshot.budget is None else snapshot.budget.epsilon_max
    budget_left = None
    exhausted = False
    if snapshot.budget is not None:
        budget_left = max(0.0, snapshot.budget.epsilon_max - prv) if math.isfinite(prv) else 0.0
        if entries:
            exhausted = not check_round(events, entries[-1].event, snapshot.budget).allowed
        else:
            exhausted = False
    return ClientPrivacyReport(
        client_id=snapshot.client_id,
        ledger_path=str(snapshot.path),
        rounds_joined=len(rounds),
        round_numbers=tuple(rounds),
        total_steps=sum(e.steps for e in events),
        sample_rates=_unique([e.sample_rate for e in events]),
        noise_multipliers=_unique([e.noise_multiplier for e in events]),
        epsilon_prv=prv,
        epsilon_rdp=rdp,
        delta=delta,
        budget_epsilon=budget_eps,
        budget_left=budget_left,
        exhausted=exhausted,
        pending_events=sum(1 for e in entries if e.status == "pending"),
        epsilon_curve=tuple(curve),
        notes=snapshot.notes,
    )


def find_ledgers(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it is a file, else every ``*.ledger.jsonl`` below it (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(p.rglob("*" + LEDGER_SUFFIX))
    raise LedgerError(f"path={str(p)!r} is neither a ledger file nor a directory.")


def reports_from_path(path: str | os.PathLike[str]) -> list[ClientPrivacyReport]:
    """Reports for every ledger at ``path``; any corrupted ledger raises (fail closed)."""
    return [client_report(read_ledger(p)) for p in find_ledgers(path)]


def summarize(reports: Sequence[ClientPrivacyReport]) -> FederationSummary:
    """Min/median/max PRV epsilon and number of exhausted clients."""
    if not reports:
        return FederationSummary(0, math.nan, math.nan, math.nan, 0)
    eps = [r.epsilon_prv for r in reports]
    return FederationSummary(len(reports), min(eps), float(statistics.median(eps)), max(eps),
                             sum(1 for r in reports if r.exhausted))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_to_dict(reports: Sequence[ClientPrivacyReport]) -> dict[str, Any]:
    """JSON-ready dict: ``{"clients": [...], "summary": {...}}`` (inf written as "inf")."""
    data: dict[str, Any] = _json_safe({"clients": [asdict(r) for r in reports],
                                       "summary": asdict(summarize(reports))})
    return data


def write_report_json(reports: Sequence[ClientPrivacyReport],
                      path: str | os.PathLike[str]) -> Path:
    """Write :func:`report_to_dict` to ``path`` (atomically) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report_to_dict(reports), indent=2, allow_nan=False) + "\n",
                   encoding="utf-8")
    os.replace(tmp, out)
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def _fmt_many(values: tuple[float, ...]) -> str:
    return ",".join(_fmt(v, ".4g") for v in values) if values else "-"


TABLE_COLUMNS = ("client", "rounds joined", "steps", "q", "sigma", "epsilon PRV",
                 "epsilon RDP", "delta", "budget left")


def render_table(reports: Sequence[ClientPrivacyReport]) -> str:
    """Plain-text table (one row per client) plus a federation summary line."""
    rows = [TABLE_COLUMNS] + [
        (r.client_id, str(r.rounds_joined), str(r.total_steps), _fmt_many(r.sample_rates),
         _fmt_many(r.noise_multipliers), _fmt(r.epsilon_prv), _fmt(r.epsilon_rdp),
         format(r.delta, ".3g"),
         _fmt(r.budget_left) + (" (exhausted)" if r.exhausted else ""))
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    s = summarize(reports)
    lines.append("")
    lines.append(f"clients: {s.clients}  epsilon PRV min/median/max: {_fmt(s.epsilon_min)}/"
                 f"{_fmt(s.epsilon_median)}/{_fmt(s.epsilon_max)}  exhausted: {s.exhausted}")
    return "\n".join(lines)


def plot_epsilon(reports: Sequence[ClientPrivacyReport],
                 path: str | os.PathLike[str]) -> Path:
    """PNG of cumulative PRV epsilon over rounds, one line per client (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for r in reports:
            xs = [rn for rn, _ in r.epsilon_curve]
            ys = [e for _, e in r.epsilon_curve]
            ax.plot(xs, ys, marker="o", markersize=3, label=r.client_id)
        budgets = sorted({r.budget_epsilon for r in reports if r.budget_epsilon is not None})
        for b in budgets:
            ax.axhline(b, linestyle="--", linewidth=0.8, color="grey")
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative epsilon (PRV upper bound)")
        deltas = sorted({r.delta for r in reports})
        ax.set_title("Privacy spent per client (delta=" + ",".join(f"{d:.3g}" for d in deltas)
                     + ")")
        if reports and len(reports) <= 20:
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=120)
    finally:
        plt.close(fig)
    return out
