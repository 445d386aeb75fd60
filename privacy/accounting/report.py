"""Per-client, per-user and federation-wide privacy reports, computed from ledger files alone.

Every report names its level. Record level (clients' ledgers, :func:`client_report`):
epsilon is recomputed from the ledger's events (pending reservations count as spent); cached
display values in the ledger are ignored. Each ledger is composed under its own adjacency
(:attr:`LedgerSnapshot.adjacency`: ``"replace_one"`` if any of its events is replace-one,
else ``"add_remove"``). A client with any seeded-sampling event (all v1 ledgers) is marked
NOT private against the coordinator: the coordinator knows the seed its batches came from.

User level (the coordinator's release ledger, :func:`user_report`): each user's epsilon is the
composition of the releases that include the user (distributed discrete Gaussian, KLS 2021;
:func:`~fedpeft.privacy.accounting.ledger.user_epsilons`), pending releases included, stated
against the coordinator; aborted rounds are listed with their reasons.
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

from fedpeft.privacy.accounting.accountant import DEFAULT_ACCOUNTANT, compute_epsilon
from fedpeft.privacy.accounting.budget import check_round
from fedpeft.privacy.accounting.errors import LedgerError
from fedpeft.privacy.accounting.events import ADJACENCIES
from fedpeft.privacy.accounting.ledger import (
    LEDGER_SUFFIX,
    AbortRecord,
    LedgerSnapshot,
    read_ledger,
    user_epsilons,
)

#: Text marking a client whose ledger has seeded-sampling events.
NOT_PRIVATE_AGAINST_COORDINATOR = "NOT private against the coordinator (seeded batch sampling)"

#: Delta used when a ledger has neither a budget nor any event to take delta from.
FALLBACK_DELTA = 1e-5

#: First line of a record-level table.
RECORD_LEVEL_LINE = ("level: record (each client's DP-SGD over its own records, accounted on "
                     "its device)")
#: What a user-level epsilon holds against when no release claims amplification by sampling.
USER_LEVEL_AGAINST = ("against the coordinator: the coordinator knows who is in each round, so "
                      "no amplification by sampling is claimed")


@dataclass(frozen=True)
class ClientPrivacyReport:
    """Privacy spent by one client, from its ledger.

    ``epsilon_curve`` holds ``(round_number, cumulative PRV epsilon)`` after each round the
    client joined. ``exhausted`` means another round like its last one would exceed the budget.
    ``adjacency`` is the neighbouring relation all epsilons here are composed under;
    ``private_against_coordinator`` is False if any round's batches were seeded (reproducible
    by the coordinator), so those epsilons do not hold against it.
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
    adjacency: str
    private_against_coordinator: bool
    level: str = "record"


@dataclass(frozen=True)
class FederationSummary:
    """Federation-wide aggregation of client reports (PRV epsilons).

    ``adjacency`` is ``"add_remove"`` or ``"replace_one"`` when every client's epsilon is
    composed under it, ``"mixed"`` otherwise (``"-"`` without clients);
    ``not_private_against_coordinator`` counts clients with seeded-sampling events.
    """

    clients: int
    epsilon_min: float
    epsilon_median: float
    epsilon_max: float
    exhausted: int
    adjacency: str
    not_private_against_coordinator: int
    level: str = "record"


def _unique(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(sorted(set(values)))


def client_report(snapshot: LedgerSnapshot) -> ClientPrivacyReport:
    """Report for one verified record-level ledger snapshot (a user-level one raises
    :class:`LedgerError`: use :func:`user_report`)."""
    if snapshot.level != "record":
        raise LedgerError(f"privacy ledger {str(snapshot.path)!r} is {snapshot.level}-level; "
                          "report it with user_report(snapshot).")
    entries = snapshot.entries
    events = snapshot.spent_events()
    adjacency = snapshot.adjacency
    if snapshot.budget is not None:
        delta = snapshot.budget.delta
    elif entries:
        delta = min(e.metadata.delta for e in entries)  # smallest delta: strongest claim
    else:
        delta = FALLBACK_DELTA
    prv = compute_epsilon(events, delta, "prv", adjacency=adjacency).epsilon
    rdp = compute_epsilon(events, delta, "rdp", adjacency=adjacency).epsilon
    rounds = sorted({e.metadata.round_number for e in entries})
    curve: list[tuple[int, float]] = []
    for r in rounds:
        prefix = [e.event for e in entries if e.metadata.round_number <= r]
        # The whole ledger's adjacency (the conservative one), so the curve ends at epsilon_prv.
        curve.append((r, compute_epsilon(prefix, delta, DEFAULT_ACCOUNTANT,
                                         adjacency=adjacency).epsilon))
    budget_eps = None if snapshot.budget is None else snapshot.budget.epsilon_max
    budget_left = None
    exhausted = False
    if snapshot.budget is not None:
        budget_left = max(0.0, snapshot.budget.epsilon_max - prv) if math.isfinite(prv) else 0.0
        if entries:
            exhausted = not check_round(events, entries[-1].event, snapshot.budget,
                                        adjacency=adjacency).allowed
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
        adjacency=adjacency,
        private_against_coordinator=snapshot.private_against_coordinator,
    )


@dataclass(frozen=True)
class UserPrivacyReport:
    """Privacy one user spent in a user-level ledger, against the coordinator.

    ``min_contributors`` is the fewest noise shares that protected the user in any of its
    releases; ``pending_releases`` of them were reserved but not committed (spent).
    """

    user: str
    releases_joined: int
    round_numbers: tuple[int, ...]
    min_contributors: int
    epsilon: float
    delta: float
    budget_left: float | None
    pending_releases: int


@dataclass(frozen=True)
class UserLedgerReport:
    """Report of one user-level (coordinator) ledger: one :class:`UserPrivacyReport` per user.

    ``against`` says whom the epsilons hold against; ``amplification_claimed`` is True when
    any release's ``sample_rate`` is below 1 (amplification by sampling then enters the
    epsilons, which does not hold against a coordinator that chose the users). ``aborts``
    are the rounds that released nothing, with their reasons.
    """

    ledger_path: str
    owner: str
    against: str
    amplification_claimed: bool
    sample_rates: tuple[float, ...]
    delta: float
    budget_epsilon: float | None
    releases: int
    pending_releases: int
    aborted_rounds: int
    aborts: tuple[AbortRecord, ...]
    users: tuple[UserPrivacyReport, ...]
    notes: tuple[str, ...]
    level: str = "user"


def _against(sample_rates: tuple[float, ...], releases: int, sampled: int) -> str:
    if not sampled:
        return USER_LEVEL_AGAINST
    rates = ",".join(_fmt(q, ".4g") for q in sample_rates if q < 1.0)
    return (f"against the coordinator: the coordinator knows who is in each round, but "
            f"{sampled} of {releases} releases claim amplification by sampling at q={rates}, "
            "which holds only against parties that do not know who was sampled")


def user_report(snapshot: LedgerSnapshot) -> UserLedgerReport:
    """Report for one verified user-level ledger snapshot (a record-level one raises
    :class:`LedgerError`: use :func:`client_report`)."""
    if snapshot.level != "user":
        raise LedgerError(f"privacy ledger {str(snapshot.path)!r} is {snapshot.level}-level; "
                          "report it with client_report(snapshot).")
    releases = snapshot.releases
    if snapshot.budget is not None:
        delta = snapshot.budget.delta
    elif releases:
        delta = min(r.metadata.delta for r in releases)  # smallest delta: strongest claim
    else:
        delta = FALLBACK_DELTA
    eps = user_epsilons(releases, delta)
    users = []
    for user, value in eps.items():
        mine = [r for r in releases if user in r.metadata.users]
        left = None
        if snapshot.budget is not None:
            left = max(0.0, snapshot.budget.epsilon_max - value) if math.isfinite(value) else 0.0
        users.append(UserPrivacyReport(
            user=user, releases_joined=len(mine),
            round_numbers=tuple(sorted({r.metadata.round_number for r in mine})),
            min_contributors=min(r.event.contributors for r in mine), epsilon=value,
            delta=delta, budget_left=left,
            pending_releases=sum(1 for r in mine if r.status == "pending")))
    rates = _unique([r.event.sample_rate for r in releases])
    sampled = sum(1 for r in releases if r.event.sample_rate < 1.0)
    return UserLedgerReport(
        ledger_path=str(snapshot.path), owner=snapshot.client_id,
        against=_against(rates, len(releases), sampled), amplification_claimed=sampled > 0,
        sample_rates=rates, delta=delta,
        budget_epsilon=None if snapshot.budget is None else snapshot.budget.epsilon_max,
        releases=len(releases),
        pending_releases=sum(1 for r in releases if r.status == "pending"),
        aborted_rounds=len(snapshot.aborts), aborts=snapshot.aborts, users=tuple(users),
        notes=snapshot.notes)


@dataclass(frozen=True)
class LevelReports:
    """Reports of every ledger found, by level (each level is reported in its own table)."""

    record: tuple[ClientPrivacyReport, ...]
    user: tuple[UserLedgerReport, ...]

    @property
    def levels(self) -> tuple[str, ...]:
        """The levels present, ``"record"`` before ``"user"``."""
        return tuple(name for name, got in (("record", self.record), ("user", self.user))
                     if got)


def find_ledgers(path: str | os.PathLike[str]) -> list[Path]:
    """``path`` itself if it is a file, else every ``*.ledger.jsonl`` below it (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(p.rglob("*" + LEDGER_SUFFIX))
    raise LedgerError(f"path={str(p)!r} is neither a ledger file nor a directory.")


def reports_by_level(path: str | os.PathLike[str], *,
                     anchor_dir: str | os.PathLike[str] | None = None) -> LevelReports:
    """Reports for every ledger at ``path``, record- and user-level apart; any corrupted
    ledger raises (fail closed).

    With ``anchor_dir``, each ledger is also checked against its anchor there (a rolled-back
    ledger raises :class:`LedgerRollbackError`).
    """
    record: list[ClientPrivacyReport] = []
    user: list[UserLedgerReport] = []
    for p in find_ledgers(path):
        snap = read_ledger(p, anchor_dir=anchor_dir)
        if snap.level == "user":
            user.append(user_report(snap))
        else:
            record.append(client_report(snap))
    return LevelReports(tuple(record), tuple(user))


def reports_from_path(path: str | os.PathLike[str], *,
                      anchor_dir: str | os.PathLike[str] | None = None
                      ) -> list[ClientPrivacyReport]:
    """Record-level reports for every ledger at ``path``; any corrupted ledger raises (fail
    closed). User-level ledgers there are verified too and reported by
    :func:`reports_by_level`.

    With ``anchor_dir``, each ledger is also checked against its anchor there (a rolled-back
    ledger raises :class:`LedgerRollbackError`).
    """
    return list(reports_by_level(path, anchor_dir=anchor_dir).record)


def summarize(reports: Sequence[ClientPrivacyReport]) -> FederationSummary:
    """Min/median/max PRV epsilon and number of exhausted clients."""
    if not reports:
        return FederationSummary(0, math.nan, math.nan, math.nan, 0, "-", 0)
    eps = [r.epsilon_prv for r in reports]
    kinds = {r.adjacency for r in reports}
    adjacency = kinds.pop() if len(kinds) == 1 else "mixed"
    return FederationSummary(len(reports), min(eps), float(statistics.median(eps)), max(eps),
                             sum(1 for r in reports if r.exhausted), adjacency,
                             sum(1 for r in reports if not r.private_against_coordinator))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def user_report_to_dict(report: UserLedgerReport) -> dict[str, Any]:
    """JSON-ready dict of one user-level ledger report, with a ``summary`` of its users."""
    eps = [u.epsilon for u in report.users]
    summary: dict[str, Any] = {"level": "user", "users": len(eps), "releases": report.releases,
                               "aborted_rounds": report.aborted_rounds}
    if eps:
        summary.update(epsilon_min=min(eps), epsilon_median=float(statistics.median(eps)),
                       epsilon_max=max(eps),
                       at_budget=sum(1 for u in report.users if u.budget_left == 0.0))
    data: dict[str, Any] = _json_safe(dict(asdict(report), summary=summary))
    return data


def report_to_dict(reports: Sequence[ClientPrivacyReport],
                   user_ledgers: Sequence[UserLedgerReport] = ()) -> dict[str, Any]:
    """JSON-ready dict (inf written as "inf"): ``{"levels": [...], "clients": [...],
    "summary": {...}, "user_ledgers": [...]}``; clients and summary are record level (each
    says ``"level": "record"``), each user ledger says ``"level": "user"``."""
    levels = LevelReports(tuple(reports), tuple(user_ledgers)).levels
    data: dict[str, Any] = _json_safe({"levels": list(levels),
                                       "clients": [asdict(r) for r in reports],
                                       "summary": asdict(summarize(reports))})
    data["user_ledgers"] = [user_report_to_dict(u) for u in user_ledgers]
    return data


def write_report_json(reports: Sequence[ClientPrivacyReport],
                      path: str | os.PathLike[str],
                      user_ledgers: Sequence[UserLedgerReport] = ()) -> Path:
    """Write :func:`report_to_dict` to ``path`` (atomically) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report_to_dict(reports, user_ledgers), indent=2,
                              allow_nan=False) + "\n", encoding="utf-8")
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


TABLE_COLUMNS = ("client", "rounds joined", "steps", "q", "sigma", "adjacency",
                 "epsilon PRV", "epsilon RDP", "delta", "budget left")


def _adjacency_line(s: FederationSummary, reports: Sequence[ClientPrivacyReport]) -> str:
    if s.adjacency == "mixed":
        counts = {a: sum(1 for r in reports if r.adjacency == a) for a in ADJACENCIES}
        per = ", ".join(f"{n} {a}" for a, n in counts.items() if n)
        return (f"adjacency: mixed ({per}); each client's epsilon is composed under its own "
                "(replace_one if any of its rounds is replace_one)")
    return f"adjacency: every client's epsilon is composed under {s.adjacency}"


def _grid(rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns, a rule under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def render_table(reports: Sequence[ClientPrivacyReport]) -> str:
    """Plain-text record-level table: :data:`RECORD_LEVEL_LINE`, one row per client,
    warnings, and federation summary lines.

    Clients with seeded-sampling events are marked ``*`` and listed under the table as
    :data:`NOT_PRIVATE_AGAINST_COORDINATOR`.
    """
    rows = [TABLE_COLUMNS] + [
        (r.client_id + ("" if r.private_against_coordinator else " *"),
         str(r.rounds_joined), str(r.total_steps), _fmt_many(r.sample_rates),
         _fmt_many(r.noise_multipliers), r.adjacency, _fmt(r.epsilon_prv),
         _fmt(r.epsilon_rdp), format(r.delta, ".3g"),
         _fmt(r.budget_left) + (" (exhausted)" if r.exhausted else ""))
        for r in reports
    ]
    lines = [RECORD_LEVEL_LINE] + _grid(rows)
    seeded = [r for r in reports if not r.private_against_coordinator]
    if seeded:
        lines.append("")
        lines.extend(f"* {r.client_id}: {NOT_PRIVATE_AGAINST_COORDINATOR}; its epsilon holds "
                     "only against other parties" for r in seeded)
    s = summarize(reports)
    lines.append("")
    lines.append(f"clients: {s.clients}  epsilon PRV min/median/max: {_fmt(s.epsilon_min)}/"
                 f"{_fmt(s.epsilon_median)}/{_fmt(s.epsilon_max)}  exhausted: {s.exhausted}  "
                 f"not private against the coordinator: {s.not_private_against_coordinator}")
    lines.append(_adjacency_line(s, reports))
    return "\n".join(lines)


USER_TABLE_COLUMNS = ("user", "releases joined", "rounds", "min contributors", "epsilon",
                      "delta", "budget left")


def _fmt_rounds(rounds: tuple[int, ...], limit: int = 40) -> str:
    """``(1, 2, 3, 5)`` -> ``"1-3,5"`` (cut at ``limit`` characters)."""
    parts: list[str] = []
    for r in rounds:
        if parts and parts[-1].split("-")[-1] == str(r - 1):
            parts[-1] = parts[-1].split("-")[0] + f"-{r}"
        else:
            parts.append(str(r))
    text = ",".join(parts) or "-"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render_user_table(report: UserLedgerReport) -> str:
    """Plain-text table of one user-level ledger: a ``level: user (against ...)`` line, one
    row per user, then the releases, pending releases and aborted rounds."""
    rows = [USER_TABLE_COLUMNS] + [
        (u.user, str(u.releases_joined), _fmt_rounds(u.round_numbers), str(u.min_contributors),
         _fmt(u.epsilon), format(u.delta, ".3g"), _fmt(u.budget_left))
        for u in report.users
    ]
    lines = [f"level: user ({report.against})", f"ledger: {report.ledger_path} (owner "
             f"{report.owner})"]
    lines += _grid(rows) if report.users else ["(no releases yet)"]
    eps = [u.epsilon for u in report.users]
    spread = (f"  epsilon min/median/max: {_fmt(min(eps))}/"
              f"{_fmt(float(statistics.median(eps)))}/{_fmt(max(eps))}" if eps else "")
    aborted = str(report.aborted_rounds)
    if report.aborts:
        rounds = _fmt_rounds(tuple(sorted({a.round_number for a in report.aborts})))
        aborted += f" (rounds {rounds}; reasons in the JSON report)"
    lines += ["", f"users: {len(eps)}{spread}  releases: {report.releases} (pending, counted "
                  f"as spent: {report.pending_releases})  aborted rounds: {aborted}"]
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
        adjacency = summarize(reports).adjacency
        ax.set_title("Privacy spent per client (delta=" + ",".join(f"{d:.3g}" for d in deltas)
                     + f", adjacency={adjacency})")
        if reports and len(reports) <= 20:
            ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out, format="png", dpi=120)
    finally:
        plt.close(fig)
    return out
