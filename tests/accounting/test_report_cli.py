"""Reports and CLI tests (from ledger files alone)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedpeft.privacy.accounting.accountant import epsilon
from fedpeft.privacy.accounting.budget import Budget
from fedpeft.privacy.accounting.cli import add_privacy_parser
from fedpeft.privacy.accounting.errors import LedgerCorruptedError
from fedpeft.privacy.accounting.events import EventMetadata
from fedpeft.privacy.accounting.events import PoissonSampledGaussianEvent as E
from fedpeft.privacy.accounting.ledger import Ledger
from fedpeft.privacy.accounting.report import (
    NOT_PRIVATE_AGAINST_COORDINATOR,
    TABLE_COLUMNS,
    plot_epsilon,
    render_table,
    reports_from_path,
    summarize,
    write_report_json,
)

DELTA = 1e-5


def _make_run(root: Path) -> dict[str, list[E]]:
    spec = {
        "alice": [E(0.02, 1.0, 20), E(0.02, 1.0, 20), E(0.04, 1.2, 10)],
        "bob": [E(0.05, 1.5, 30)],
        "carol": [E(0.02, 1.0, 200)] * 4,
    }
    for cid, events in spec.items():
        budget = Budget(3.0, DELTA)
        with Ledger(root / cid / f"{cid}.ledger.jsonl", client_id=cid, budget=budget) as led:
            for r, ev in enumerate(events):
                m = EventMetadata(round_number=r + 1, dataset_size=2000, delta=DELTA,
                                  clip_norm=1.0, run_id="run-7")
                led.reserve(ev, m)
                if not (cid == "bob"):
                    led.commit(m.event_id)
    return spec


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_privacy_parser(parser.add_subparsers(dest="command"))
    return parser


def test_reports_from_directory(tmp_path: Path) -> None:
    spec = _make_run(tmp_path)
    reports = reports_from_path(tmp_path)
    assert [r.client_id for r in reports] == ["alice", "bob", "carol"]
    alice, bob, carol = reports
    assert alice.rounds_joined == 3 and alice.total_steps == 50
    assert alice.sample_rates == (0.02, 0.04) and alice.noise_multipliers == (1.0, 1.2)
    # EventMetadata defaults to replace_one: the ledger composes under it.
    assert alice.adjacency == "replace_one" and alice.private_against_coordinator
    assert alice.epsilon_prv == epsilon(spec["alice"], DELTA, "prv", adjacency="replace_one")
    assert alice.epsilon_rdp == epsilon(spec["alice"], DELTA, "rdp", adjacency="replace_one")
    assert alice.budget_left == pytest.approx(3.0 - alice.epsilon_prv)
    assert [rn for rn, _ in alice.epsilon_curve] == [1, 2, 3]
    assert alice.epsilon_curve[-1][1] == alice.epsilon_prv
    assert bob.pending_events == 1 and bob.epsilon_prv > 0  # pending counts as spent
    assert carol.exhausted and not alice.exhausted
    s = summarize(reports)
    assert s.clients == 3 and s.exhausted == 1
    assert s.epsilon_min <= s.epsilon_median <= s.epsilon_max
    assert s.epsilon_max == max(r.epsilon_prv for r in reports)

    table = render_table(reports)
    assert table.splitlines()[0].startswith("level: record")
    header = table.splitlines()[1]
    for col in TABLE_COLUMNS:
        assert col in header
    assert "alice" in table and "(exhausted)" in table
    assert "adjacency: every client's epsilon is composed under replace_one" in table
    assert NOT_PRIVATE_AGAINST_COORDINATOR not in table

    out = write_report_json(reports, tmp_path / "out" / "report.json")
    data = json.loads(out.read_text())
    assert data["summary"]["clients"] == 3
    assert data["clients"][0]["epsilon_prv"] == alice.epsilon_prv
    assert data["clients"][0]["adjacency"] == "replace_one"
    assert data["clients"][0]["private_against_coordinator"] is True
    assert data["summary"]["adjacency"] == "replace_one"
    assert data["summary"]["not_private_against_coordinator"] == 0

    png = plot_epsilon(reports, tmp_path / "out" / "eps.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _ledger(root: Path, cid: str, rounds: list[tuple[E, str, str]]) -> None:
    with Ledger(root / f"{cid}.ledger.jsonl", client_id=cid, budget=Budget(20.0, DELTA)) as led:
        for r, (ev, adjacency, sampling) in enumerate(rounds):
            m = EventMetadata(round_number=r, dataset_size=2000, delta=DELTA, clip_norm=1.0,
                              run_id="run-8", adjacency=adjacency, sampling=sampling)
            led.reserve(ev, m)
            led.commit(m.event_id)


def test_report_adjacency_and_seeded_sampling(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    e = E(0.02, 1.0, 100)
    _ledger(tmp_path, "ann", [(e, "add_remove", "csprng")] * 2)
    _ledger(tmp_path, "ben", [(e, "add_remove", "csprng"), (e, "replace_one", "csprng")])
    _ledger(tmp_path, "cat", [(e, "add_remove", "seeded"), (e, "add_remove", "csprng")])
    ann, ben, cat = reports_from_path(tmp_path)
    assert (ann.adjacency, ann.private_against_coordinator) == ("add_remove", True)
    assert (ben.adjacency, ben.private_against_coordinator) == ("replace_one", True)
    assert (cat.adjacency, cat.private_against_coordinator) == ("add_remove", False)
    # Each client is composed under its own adjacency; mixed never composes optimistically.
    assert ann.epsilon_prv == epsilon([e, e], DELTA, "prv", adjacency="add_remove")
    assert ben.epsilon_prv == epsilon([e, e], DELTA, "prv", adjacency="replace_one")
    assert ben.epsilon_prv > ann.epsilon_prv
    assert ben.epsilon_rdp == epsilon([e, e], DELTA, "rdp", adjacency="replace_one")
    assert ben.epsilon_curve[-1][1] == ben.epsilon_prv
    s = summarize([ann, ben, cat])
    assert s.adjacency == "mixed" and s.not_private_against_coordinator == 1
    assert summarize([ann, cat]).adjacency == "add_remove"

    table = render_table([ann, ben, cat])
    rows = table.splitlines()[1:]  # after the "level: record" line
    assert "adjacency" in rows[0]
    assert "add_remove" in rows[2] and "replace_one" in rows[3]
    assert rows[4].startswith("cat *") and not rows[2].startswith("ann *")
    assert f"* cat: {NOT_PRIVATE_AGAINST_COORDINATOR}" in table
    assert "ann: NOT" not in table and "ben: NOT" not in table
    assert "adjacency: mixed (2 add_remove, 1 replace_one)" in table
    assert "not private against the coordinator: 1" in table

    data = json.loads(write_report_json([ann, ben, cat], tmp_path / "r.json").read_text())
    assert [(c["client_id"], c["adjacency"], c["private_against_coordinator"])
            for c in data["clients"]] == [("ann", "add_remove", True),
                                          ("ben", "replace_one", True),
                                          ("cat", "add_remove", False)]
    assert data["summary"]["adjacency"] == "mixed"
    assert data["summary"]["not_private_against_coordinator"] == 1

    args = _parser().parse_args(["privacy", "report", str(tmp_path)])
    assert args.func(args) == 0
    assert NOT_PRIVATE_AGAINST_COORDINATOR in capsys.readouterr().out


def test_report_fails_closed_on_corrupted_ledger(tmp_path: Path) -> None:
    _make_run(tmp_path)
    bad = tmp_path / "bob" / "bob.ledger.jsonl"
    bad.write_bytes(bad.read_bytes().replace(b'"steps":30', b'"steps":3'))
    with pytest.raises(LedgerCorruptedError, match="bob.ledger.jsonl"):
        reports_from_path(tmp_path)


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _make_run(tmp_path)
    args = _parser().parse_args(["privacy", "report", str(tmp_path), "--json-out",
                                 str(tmp_path / "r.json"), "--png-out", str(tmp_path / "p.png")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "epsilon PRV" in out and "carol" in out
    assert (tmp_path / "r.json").exists() and (tmp_path / "p.png").exists()
    single = _parser().parse_args(["privacy", "report",
                                   str(tmp_path / "bob" / "bob.ledger.jsonl")])
    assert single.func(single) == 0
    assert "alice" not in capsys.readouterr().out


def test_cli_report_empty_dir(tmp_path: Path) -> None:
    args = _parser().parse_args(["privacy", "report", str(tmp_path)])
    assert args.func(args) == 1


def test_cli_plan_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["privacy", "plan", "--target-epsilon", "5", "--delta", "1e-5",
                                 "--rounds", "4", "--sample-rate", "0.02", "--local-steps",
                                 "30", "--accountant", "rdp", "--json"])
    assert args.func(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["epsilon_per_round"]) == 4
    assert data["epsilon_per_round"][-1] <= 5.0
    assert data["total_steps"] == 120
    text = _parser().parse_args(["privacy", "plan", "--target-epsilon", "5", "--delta",
                                 "1e-5", "--rounds", "2", "--sample-rate", "0.02",
                                 "--local-steps", "30", "--accountant", "rdp"])
    assert text.func(text) == 0
    assert "noise multiplier" in capsys.readouterr().out


# -- levels: record and user (the coordinator's release ledger) ------------------------------
def _make_user_ledger(root: Path, sample_rate: float = 1.0) -> Path:
    import math

    from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent
    from fedpeft.privacy.accounting.ledger import ReleaseMetadata

    path = root / "user-ledger" / "coordinator.ledger.jsonl"

    def dev(contributors: int) -> DistributedDiscreteGaussianEvent:
        return DistributedDiscreteGaussianEvent(
            sample_rate=sample_rate, clip=1.0, granularity=0.01, local_variance=8000.0,
            contributors=contributors, dimension=1000, beta=math.exp(-0.5))

    with Ledger(path, client_id="coordinator", level="user", budget=Budget(6.0, DELTA)) as led:
        m1 = ReleaseMetadata(round_number=1, users=("u1", "u2", "u3", "u4"), delta=DELTA,
                             run_id="run-9")
        led.reserve_release(dev(3), m1)
        led.commit(m1.event_id)
        led.record_abort(2, "only 2 masked inputs arrived; nothing was released")
        led.reserve_release(dev(2), ReleaseMetadata(round_number=3, users=("u1", "u2", "u5"),
                                                    delta=DELTA, run_id="run-9"))
    return path


def test_user_ledger_report_table_and_json_say_level_user(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.privacy.accounting import ddg
    from fedpeft.privacy.accounting.ledger import read_ledger, user_events
    from fedpeft.privacy.accounting.report import (
        USER_LEVEL_AGAINST,
        USER_TABLE_COLUMNS,
        render_user_table,
        reports_by_level,
    )

    path = _make_user_ledger(tmp_path)
    got = reports_by_level(tmp_path)
    assert got.levels == ("user",) and got.record == () and reports_from_path(tmp_path) == []
    (rep,) = got.user
    assert rep.level == "user" and rep.against == USER_LEVEL_AGAINST
    assert not rep.amplification_claimed and rep.owner == "coordinator"
    assert (rep.releases, rep.pending_releases, rep.aborted_rounds) == (2, 1, 1)
    releases = read_ledger(path).releases
    by_user = {u.user: u for u in rep.users}
    assert sorted(by_user) == ["u1", "u2", "u3", "u4", "u5"]
    for name, u in by_user.items():
        assert u.epsilon == ddg.epsilon(user_events(releases, name), DELTA).epsilon
    u1 = by_user["u1"]
    assert (u1.releases_joined, u1.round_numbers, u1.min_contributors, u1.pending_releases) == (
        2, (1, 3), 2, 1)
    assert u1.budget_left == pytest.approx(6.0 - u1.epsilon)

    table = render_user_table(rep)
    first = table.splitlines()[0]
    assert first.startswith("level: user (against the coordinator: the coordinator knows who "
                            "is in each round, so no amplification by sampling is claimed")
    header = table.splitlines()[2]
    for col in USER_TABLE_COLUMNS:
        assert col in header
    assert "u1" in table and "1,3" in table and "aborted rounds: 1 (rounds 2" in table
    assert "level: record" not in table

    out = tmp_path / "r.json"
    args = _parser().parse_args(["privacy", "report", str(tmp_path), "--json-out", str(out),
                                 "--png-out", str(tmp_path / "p.png")])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("level: user (") and "level: record" not in captured.out
    assert "nothing written" in captured.err and not (tmp_path / "p.png").exists()
    data = json.loads(out.read_text())
    assert data["levels"] == ["user"] and data["clients"] == []
    (doc,) = data["user_ledgers"]
    assert doc["level"] == "user" and doc["summary"]["level"] == "user"
    assert doc["summary"]["users"] == 5 and doc["aborted_rounds"] == 1
    assert doc["aborts"][0]["round_number"] == 2
    assert "nothing was released" in doc["aborts"][0]["reason"]
    assert {u["user"]: u["epsilon"] for u in doc["users"]} == {
        n: u.epsilon for n, u in by_user.items()}


def test_user_report_flags_claimed_amplification(tmp_path: Path) -> None:
    from fedpeft.privacy.accounting.report import render_user_table, reports_by_level

    _make_user_ledger(tmp_path, sample_rate=0.5)
    (rep,) = reports_by_level(tmp_path).user
    assert rep.amplification_claimed and rep.sample_rates == (0.5,)
    assert "2 of 2 releases claim amplification by sampling at q=0.5" in rep.against
    assert render_user_table(rep).startswith("level: user (against the coordinator")


def test_record_report_says_level_record_and_both_levels_get_their_own_table(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.privacy.accounting.report import RECORD_LEVEL_LINE, reports_by_level

    _make_run(tmp_path / "ledgers")
    only_record = _parser().parse_args(["privacy", "report", str(tmp_path / "ledgers"),
                                        "--json-out", str(tmp_path / "rec.json")])
    assert only_record.func(only_record) == 0
    out = capsys.readouterr().out
    assert out.startswith(RECORD_LEVEL_LINE) and RECORD_LEVEL_LINE.startswith("level: record")
    assert "level: user" not in out
    rec = json.loads((tmp_path / "rec.json").read_text())
    assert rec["levels"] == ["record"] and rec["user_ledgers"] == []
    assert rec["summary"]["level"] == "record" and rec["clients"][0]["level"] == "record"

    _make_user_ledger(tmp_path)
    got = reports_by_level(tmp_path)
    assert got.levels == ("record", "user")
    assert [r.client_id for r in got.record] == ["alice", "bob", "carol"]
    args = _parser().parse_args(["privacy", "report", str(tmp_path), "--json-out",
                                 str(tmp_path / "both.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    record_at, user_at = out.index("level: record"), out.index("level: user")
    assert record_at == 0 < user_at
    assert "alice" in out[:user_at] and "u1" in out[user_at:] and "u1" not in out[:user_at]
    both = json.loads((tmp_path / "both.json").read_text())
    assert both["levels"] == ["record", "user"] and len(both["clients"]) == 3
    assert [d["level"] for d in both["user_ledgers"]] == ["user"]


def test_report_shows_the_audited_bound_beside_the_claim(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory with an audit.json: `fedpeft privacy report RUN_DIR/ledgers` prints the
    audited lower bound, its confidence and canaries beside the claimed epsilon."""
    _make_run(tmp_path / "ledgers")
    (tmp_path / "audit.json").write_text(json.dumps({
        "level": "record", "method": "one run (Steinke, Nasr, Jagielski 2023)",
        "epsilon_lower_bound": 0.42, "confidence": 0.95, "canaries": 1000, "ceiling": 5.09,
        "claimed_epsilon": 3.0, "claimed_adjacency": "replace-one",
        "tpr_at_fpr": {"0.01": 0.02}}))
    args = _parser().parse_args(["privacy", "report", str(tmp_path / "ledgers")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert ("audit, record level (one run (Steinke, Nasr, Jagielski 2023)): epsilon >= 0.42 at "
            "95% confidence from 1000 canaries (at most 5.09") in out
    assert "claimed epsilon 3 (replace-one)" in out and "not the guarantee" in out
