"""``fedpeft privacy plan``, ``plan-user`` and ``report`` (wired into fedpeft/cli/main.py).

Errors derive from :class:`fedpeft.core.errors.FedPeftError`; the top-level CLI prints them and
exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedpeft.privacy.accounting.accountant import ACCOUNTANTS, ADJACENCIES, DEFAULT_ACCOUNTANT

#: ``--adjacency`` choices on the command line (dashes) -> the accounting names (underscores).
ADJACENCY_CHOICES: dict[str, str] = {a.replace("_", "-"): a for a in sorted(ADJACENCIES,
                                                                          reverse=True)}


def _target_arguments(parser: argparse.ArgumentParser, sample_rate_help: str) -> None:
    """The target every plan command takes: epsilon at delta after rounds at a sampling rate."""
    parser.add_argument("--target-epsilon", type=float, required=True)
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--sample-rate", type=float, required=True, help=sample_rate_help)


def add_privacy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``privacy plan`` and ``privacy report`` on an argparse subparsers object.

    Each leaf parser sets ``func`` to :func:`cmd_plan` or :func:`cmd_report`.
    """
    privacy: argparse.ArgumentParser = subparsers.add_parser(
        "privacy", help="differential privacy planning and reports")
    sub = privacy.add_subparsers(dest="privacy_command", required=True)

    p = sub.add_parser("plan", help="calibrate the noise multiplier for a target epsilon")
    _target_arguments(p, "expected batch size / local dataset size")
    p.add_argument("--local-steps", type=int, required=True, help="DP-SGD steps per round")
    p.add_argument("--accountant", choices=list(ACCOUNTANTS), default=DEFAULT_ACCOUNTANT)
    p.add_argument("--adjacency", choices=list(ADJACENCY_CHOICES), default="replace-one",
                   help="neighbouring relation: replace-one (default; the client releases its "
                        "dataset size n through q and sigma) or add-remove (n stays private)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_plan)

    u = sub.add_parser("plan-user", help="provision user-level distributed discrete Gaussian "
                                         "noise for a target epsilon (issue 15; not yet wired "
                                         "into runs)")
    _target_arguments(u, "Poisson rate at which users are sampled into a round")
    u.add_argument("--clip", type=float, required=True, help="L2 clip of a user's update")
    u.add_argument("--clients-per-round", type=int, required=True,
                   help="most clients summed in a round (plans the field)")
    u.add_argument("--min-contributors", type=int, required=True,
                   help="fewest noise shares protecting a user in an accepted round (the "
                        "SecAgg threshold minus one, minus clients that may collude)")
    u.add_argument("--dimension", type=int, required=True, help="adapter coordinates")
    u.add_argument("--bits", type=int, default=20, help="SecAgg field bits per coordinate")
    u.add_argument("--json", action="store_true", help="print JSON instead of text")
    u.set_defaults(func=cmd_plan_user)

    r = sub.add_parser("report", help="privacy report from ledger files (record- and "
                                      "user-level, each level in its own table)")
    r.add_argument("path", help="a *.ledger.jsonl file or a directory searched recursively")
    r.add_argument("--json-out", default=None, help="write the report as JSON here")
    r.add_argument("--png-out", default=None, help="write an epsilon-over-rounds plot here")
    r.set_defaults(func=cmd_report)
    return privacy


def cmd_plan(args: argparse.Namespace) -> int:
    """Print sigma and the cumulative epsilon after each round; return the exit code."""
    from fedpeft.privacy.accounting.calibrate import plan

    adjacency = ADJACENCY_CHOICES[args.adjacency]  # argparse allowed only these keys
    result = plan(args.target_epsilon, args.delta, args.rounds, args.sample_rate,
                  args.local_steps, args.accountant, adjacency)
    shown = result.adjacency.replace("_", "-")  # JSON keeps the accounting name
    if args.json:
        print(json.dumps({
            "noise_multiplier": result.noise_multiplier,
            "target_epsilon": result.target_epsilon, "delta": result.delta,
            "rounds": result.rounds, "sample_rate": result.sample_rate,
            "local_steps": result.local_steps, "total_steps": result.total_steps,
            "accountant": result.accountant, "adjacency": result.adjacency,
            "epsilon_per_round": list(result.epsilon_per_round),
        }, indent=2))
        return 0
    print(f"noise multiplier: {result.noise_multiplier:.6g}  (accountant {result.accountant}, "
          f"adjacency {shown}, target epsilon {result.target_epsilon:g} at delta "
          f"{result.delta:g}, "
          f"{result.total_steps} steps = {result.rounds} rounds x {result.local_steps}, "
          f"q={result.sample_rate:g})")
    print("round  cumulative epsilon")
    for i, eps in enumerate(result.epsilon_per_round, start=1):
        print(f"{i:>5}  {eps:.4f}")
    return 0


def cmd_plan_user(args: argparse.Namespace) -> int:
    """Print the least per-client noise meeting a user-level target; return the exit code."""
    from fedpeft.privacy.ddg_mechanism import provision

    got = provision(target_epsilon=args.target_epsilon, delta=args.delta, rounds=args.rounds,
                    sample_rate=args.sample_rate, clip=args.clip,
                    min_contributors=args.min_contributors,
                    clients_per_round=args.clients_per_round, dimension=args.dimension,
                    bits=args.bits)
    doc = {
        "level": "user", "mechanism": "distributed discrete Gaussian",
        "epsilon": got.epsilon, "target_epsilon": args.target_epsilon, "delta": args.delta,
        "rounds": args.rounds, "sample_rate": args.sample_rate, "clip": args.clip,
        "min_contributors": args.min_contributors,
        "clients_per_round": args.clients_per_round, "dimension": args.dimension,
        "padded_dimension": got.plan.padded, "bits": got.plan.bits,
        "noise_std_per_client": got.noise_std, "granularity": got.plan.granularity,
        "local_variance": float(got.plan.local_variance),
        "summed_noise_multiplier": got.noise_std * args.min_contributors ** 0.5 / args.clip,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"level: user (distributed discrete Gaussian under secure aggregation); epsilon "
          f"{got.epsilon:.4f} <= target {args.target_epsilon:g} at delta {args.delta:g} after "
          f"{args.rounds} rounds, q={args.sample_rate:g}")
    print(f"each client adds noise of std {got.noise_std:.6g} (update units; integer variance "
          f"{float(got.plan.local_variance):.6g} on a grid of {got.plan.granularity:.4g}); "
          f"counting only {args.min_contributors} shares per sum, the summed noise is "
          f"{doc['summed_noise_multiplier']:.4g} x clip")
    print(f"field: {got.plan.bits} bits per coordinate, {got.plan.padded} coordinates "
          f"(padded from {args.dimension}), planned for {args.clients_per_round} clients")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Print the privacy table of each level found (record-level clients in one table, each
    user-level ledger in its own); optionally write JSON/PNG. Returns the exit code."""
    from fedpeft.privacy.accounting.report import (
        plot_epsilon,
        render_table,
        render_user_table,
        reports_by_level,
        write_report_json,
    )

    got = reports_by_level(args.path)
    if not got.levels:
        print(f"no ledger files (*.ledger.jsonl) found under {args.path}", file=sys.stderr)
        return 1
    tables = ([render_table(got.record)] if got.record else []) + [
        render_user_table(u) for u in got.user]
    print("\n\n".join(tables))
    from fedpeft.privacy.auditing.report import audit_line, read_audits

    for audit in read_audits(Path(args.path)):
        print(audit_line(audit))
    if args.json_out:
        print(f"wrote {write_report_json(got.record, args.json_out, got.user)}")
    if args.png_out:
        if got.record:
            print(f"wrote {plot_epsilon(got.record, args.png_out)}")
        else:
            print("no record-level ledgers: --png-out plots clients' epsilon over rounds, "
                  "nothing written", file=sys.stderr)
    return 0
