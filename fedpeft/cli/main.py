"""The ``fedpeft`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fedpeft.core.errors import FedPeftError
from fedpeft.core.protocol import Scalar
from fedpeft.runconfig.config import DEFAULTS
from fedpeft.runconfig.overrides import parse_overrides

# --flag -> run-config key, for the common overrides
OVERRIDES: dict[str, str] = {
    "rounds": "num-rounds",
    "clients_per_round": "clients-per-round",
    "local_steps": "local-steps",
    "lr": "lr",
    "method": "method",
    "rank": "lora-r",
    "seed": "seed",
    "batch_size": "batch-size",
    "layers": "num-hidden-layers",
    "examples_per_client": "max-examples-per-client",
    "aggregation": "aggregation",
}


def summary_table(run_dir: Path) -> str:
    """Per-round table from ``metrics.jsonl``: metric, loss, clients, bytes, time."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return f"(no metrics at {path})"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = (f"{'round':>5} {'eval':>22} {'train loss':>10} {'ok/sel':>7} {'MB up':>8} "
            f"{'MB down':>8} {'sec':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ev = r.get("eval", {})
        metric = (f"acc {ev['accuracy']:.4f}" if "accuracy" in ev else
                  f"ppl {ev.get('perplexity', float('nan')):.2f}")
        tl = r.get("train_loss")
        lines.append(
            f"{r['round']:>5} {metric:>22} {tl if tl is None else f'{tl:.4f}'!s:>10} "
            f"{str(r.get('ok', '-')) + '/' + str(r.get('selected', '-')):>7} "
            f"{r.get('bytes_up', 0) / 1e6:>8.3f} {r.get('bytes_down', 0) / 1e6:>8.3f} "
            f"{r.get('seconds', 0):>7.1f}")
        for f in r.get("faults", []):
            lines.append(f"      fault: {f}")
    lines.append(headline(run_dir, rows))
    return "\n".join(lines)


def headline(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """One line: the held-out metric before and after, and which DP level the run had."""
    try:
        flat = json.loads((run_dir / "run_config.json").read_text())["run_config"]
        dp, level, secagg = bool(flat.get("dp")), str(flat.get("dp-level", "record")), bool(
            flat.get("secagg"))
    except (OSError, ValueError, KeyError, TypeError):
        dp, level, secagg = True, "unknown (run_config.json unreadable)", True
    evals = [r["eval"] for r in rows if r.get("eval")]
    if not evals:
        return "held-out metric: none recorded"
    name = "accuracy" if "accuracy" in evals[0] else "perplexity"
    first, last = float(evals[0].get(name, float("nan"))), float(evals[-1].get(name, float("nan")))
    return (f"held-out {name}: {first:.4g} before -> {last:.4g} after; DP level: "
            f"{level if dp else 'off'}; secure aggregation {'on' if secagg else 'off'}")


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedpeft.runconfig.presets import get_preset

    preset = get_preset(args.preset)
    config: dict[str, Scalar] = {**preset.config, "preset": preset.name}
    for attr, key in OVERRIDES.items():
        value = getattr(args, attr)
        if value is not None:
            config[key] = value
    config.update(parse_overrides(args.set or []))
    if args.no_progress:
        config["progress"] = False
    clients = args.clients or preset.clients
    run_dir = Path(args.run_dir or f"runs/{preset.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"fedpeft: preset {preset.name} ({preset.description}); {clients} clients; "
          f"run directory {run_dir}", flush=True)
    if args.in_process:
        from fedpeft.coordinator.server import Coordinator
        from fedpeft.runconfig.config import parse_run_config
        from fedpeft.simulations.inmemory import InMemoryTransport

        run = parse_run_config({**DEFAULTS, **config, "run-dir": str(run_dir.resolve())})
        population = clients + run.user_dp.canaries  # the audit's canary clients join
        summary = Coordinator(run, InMemoryTransport(run, population)).run_federation()
        ok = not summary.stopped_reason
        status = "finished:completed" if ok else f"stopped: {summary.stopped_reason}"
    else:
        from fedpeft.simulations.launcher import simulate

        result = simulate(config, clients, run_dir, stream=not args.quiet)
        status = result.status
        summary_file = run_dir / "summary.json"
        if summary_file.is_file():
            doc = json.loads(summary_file.read_text())
            if doc.get("stopped_reason"):
                status = f"stopped: {doc['stopped_reason']}"
        ok = status == "finished:completed"
    print()
    print(summary_table(run_dir))
    print_privacy_report(run_dir)
    print(f"\nrun status: {status}; outputs in {run_dir}")
    args.finished_run_dir = run_dir
    return 0 if ok else 1


def cmd_audit(args: argparse.Namespace) -> int:
    """Run a federation with canaries (or take a finished one) and audit it."""
    from fedpeft.privacy.auditing.report import audit_line
    from fedpeft.report.audit import DEFAULT_CANARIES, audit_all

    if args.existing:
        run_dir = Path(args.existing)
    else:
        sets = parse_overrides(args.set or [])
        canaries = args.canaries or int(sets.get("audit-canaries", 0)) or DEFAULT_CANARIES
        args.set = [*(args.set or []), f"audit-canaries={canaries}"]
        if args.gradient_canaries:  # white box: DP-SGD's clipped sums instrumented
            args.set.append(f"audit-gradient-canaries={args.gradient_canaries}")
        if args.user_canaries:  # canary clients, added to the population
            args.set.append(f"audit-user-canaries={args.user_canaries}")
        rc = cmd_simulate(args)
        if rc != 0:
            print("fedpeft: the federation did not complete; nothing audited", file=sys.stderr)
            return rc
        run_dir = args.finished_run_dir
    print(f"\nauditing {run_dir} ...", flush=True)
    for doc in audit_all(run_dir, confidence=args.confidence):
        print(audit_line(doc))
    print(f"written: {run_dir / 'audit.json'}")
    return 0


def print_privacy_report(run_dir: Path) -> None:
    """Recompute every epsilon from the ledgers and print each level's table (+JSON, PNG):
    record level from the clients' ledgers, user level from the coordinator's; then the
    audited lower bound beside the claim when the run was audited."""
    from fedpeft.privacy.auditing.report import audit_line, read_audits

    _print_ledger_reports(run_dir)
    for audit in read_audits(run_dir):
        print(audit_line(audit))


def _print_ledger_reports(run_dir: Path) -> None:
    user_dir = run_dir / "user-ledger"
    user_level = user_dir.is_dir() and any(user_dir.glob("*.ledger.jsonl"))
    if user_level:
        print_user_report(user_dir, run_dir)
    ledgers = run_dir / "ledgers"
    record_files = list(ledgers.glob("*.ledger.jsonl")) if ledgers.is_dir() else []
    if user_level and not _run_had_record_dp(run_dir):
        return
    if not record_files:
        if _run_had_dp(run_dir):
            print("\nprivacy: differential privacy was on, but no client trained in this run "
                  "(no ledger was written): no privacy was spent and no update was released; "
                  "see the rounds' faults and SecAgg aborts above")
        else:
            print("\nprivacy: differential privacy was off in this run (no ledgers)")
        return
    from fedpeft.privacy.accounting.report import (
        plot_epsilon,
        render_table,
        reports_from_path,
        write_report_json,
    )

    reports = reports_from_path(ledgers)
    print("\nprivacy report, record level (epsilon recomputed from each client's ledger):")
    print(render_table(reports))
    write_report_json(reports, run_dir / "privacy_ledgers.json")
    plot_epsilon(reports, run_dir / "privacy_epsilon.png")
    print(f"written: {run_dir / 'privacy_ledgers.json'}, {run_dir / 'privacy_epsilon.png'}")


#: Users listed one per row in the printed user-level table (more: the summary and the JSON).
MAX_PRINTED_USERS = 30


def print_user_report(user_dir: Path, run_dir: Path) -> None:
    """Print the coordinator's user-level report (epsilon per user, recomputed)."""
    from dataclasses import replace

    from fedpeft.privacy.accounting.report import (
        render_user_table,
        reports_by_level,
        user_report_to_dict,
    )

    reports = reports_by_level(user_dir, anchor_dir=run_dir / "user-ledger-anchors").user
    print("\nprivacy report, user level (epsilon recomputed from the coordinator's ledger):")
    for report in reports:
        shown = report
        if len(report.users) > MAX_PRINTED_USERS:
            top = sorted(report.users, key=lambda u: -u.epsilon)[:MAX_PRINTED_USERS]
            shown = replace(report, users=tuple(top))
        print(render_user_table(shown))
        if shown is not report:
            print(f"(the {MAX_PRINTED_USERS} users with the largest epsilon of "
                  f"{len(report.users)} are listed; every user is in the JSON)")
    clips = _adaptive_clips(run_dir)
    if clips:
        print(f"adaptive clipping (Andrew et al. 2021): clip {clips[0]['clip']:.4g} in round 1, "
              f"{clips[-1]['next_clip']:.4g} next; noisy fraction of unclipped updates last "
              f"round {clips[-1]['unclipped_fraction']:.3f} (count noise std "
              f"{clips[-1]['count_std']:.3g} users, released inside the same accounted sum)")
    out = run_dir / "privacy_user_level.json"
    out.write_text(json.dumps([user_report_to_dict(r) for r in reports], indent=1))
    print(f"written: {out}")


def _adaptive_clips(run_dir: Path) -> list[dict[str, float]]:
    """The rounds' adaptive-clipping rows of ``metrics.jsonl`` (empty: a fixed clip)."""
    from fedpeft.report.run_report import load_rows

    try:
        rows = load_rows(run_dir)
    except FedPeftError:  # no metrics (yet): nothing to show
        return []
    return [r["dp_user_clip"] for r in rows if isinstance(r.get("dp_user_clip"), dict)]


def _run_had_record_dp(run_dir: Path) -> bool:
    """Whether the run's recorded config had record-level DP (True when unknown)."""
    try:
        doc = json.loads((run_dir / "run_config.json").read_text())
        return str(doc["run_config"].get("dp-level", "record")) in ("record", "both")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def _run_had_dp(run_dir: Path) -> bool:
    """Whether the run's recorded config had DP on (True when it cannot be read: the
    report must never claim DP was off when it does not know)."""
    try:
        doc = json.loads((run_dir / "run_config.json").read_text())
        return bool(doc["run_config"]["dp"])
    except (OSError, ValueError, KeyError, TypeError):
        return True


def cmd_presets(args: argparse.Namespace) -> int:
    from fedpeft.runconfig.presets import PRESETS

    for p in PRESETS.values():
        print(f"{p.name:<14} {p.clients:>3} clients  {p.description}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedpeft.report.run_report import write_report

    out = write_report(Path(args.run_dir))
    print(f"wrote {out}")
    return 0


def _add_run_arguments(sim: argparse.ArgumentParser) -> None:
    """The arguments of a simulated federation (``simulate``, ``audit``)."""
    sim.add_argument("--preset", default="chat-lora")
    sim.add_argument("--clients", type=int, help="number of virtual clients")
    sim.add_argument("--rounds", type=int)
    sim.add_argument("--clients-per-round", type=int)
    sim.add_argument("--local-steps", type=int)
    sim.add_argument("--lr", type=float)
    sim.add_argument("--method", choices=["lora", "ffa-lora", "prompt"])
    sim.add_argument("--rank", type=int, help="LoRA rank")
    sim.add_argument("--seed", type=int)
    sim.add_argument("--batch-size", type=int)
    sim.add_argument("--layers", type=int, help="cut the model to its first N layers")
    sim.add_argument("--examples-per-client", type=int)
    sim.add_argument("--aggregation", choices=["fedavg", "fedavgm", "fedadam", "fedyogi"])
    sim.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="any run config key (see pyproject.toml [tool.flwr.app.config])")
    sim.add_argument("--run-dir")
    sim.add_argument("--in-process", action="store_true",
                     help="run coordinator and clients in this process, without Flower/Ray")
    sim.add_argument("--quiet", action="store_true", help="do not stream Flower's log")
    sim.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulated federation")
    _add_run_arguments(sim)
    sim.set_defaults(func=cmd_simulate)
    aud = sub.add_parser("audit", help="run a federation with canaries and audit its privacy "
                                       "empirically (one-run lower bound on epsilon)")
    _add_run_arguments(aud)
    aud.add_argument("--canaries", type=int, default=None,
                     help="canaries to plant (default: the run's audit-canaries, else 1000)")
    aud.add_argument("--gradient-canaries", type=int, default=0, metavar="M",
                     help="also audit DP-SGD white box with M gradient canaries "
                          "(audit-gradient-canaries; record-level DP runs)")
    aud.add_argument("--user-canaries", type=int, default=0, metavar="M",
                     help="also audit user-level DP with M canary clients added to the "
                          "population (audit-user-canaries; dp-level = user runs)")
    aud.add_argument("--confidence", type=float, default=0.95)
    aud.add_argument("--existing", metavar="RUN_DIR",
                     help="audit this finished run (it ran with audit-canaries > 0); run nothing")
    aud.set_defaults(func=cmd_audit)
    pre = sub.add_parser("presets", help="list simulation presets")
    pre.set_defaults(func=cmd_presets)
    rep = sub.add_parser("report", help="Markdown report + plots of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)
    from fedpeft.cli.data_inspect import add_data_parser

    add_data_parser(sub)
    try:
        from fedpeft.privacy.accounting.cli import add_privacy_parser
    except ImportError:  # pragma: no cover - privacy CLI not installed
        pass
    else:
        add_privacy_parser(sub)
    try:
        from fedpeft.deploy.commands import add_deploy_parsers
    except ImportError:  # pragma: no cover - deployment commands not installed
        pass
    else:
        add_deploy_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result: Any = args.func(args)
        return int(result)
    except FedPeftError as exc:
        print(f"fedpeft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
