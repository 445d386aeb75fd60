"""User-level ledger (format v3, level "user"): the coordinator's releases of the distributed
discrete Gaussian, with the same file machinery as the record-level ledger: round trip, level
checks, v2 continuation, tampering, torn lines, crashes, aborts, per-user budgets and cache."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.accounting import ddg
from fedpeft.privacy.accounting.budget import Budget
from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent
from fedpeft.privacy.accounting.errors import (
    BudgetExhaustedError,
    EventValidationError,
    LedgerCorruptedError,
    LedgerError,
    LedgerRollbackError,
)
from fedpeft.privacy.accounting.events import EventMetadata, PoissonSampledGaussianEvent
from fedpeft.privacy.accounting.ledger import (
    ABORT_REASON_MAX_CHARS,
    FORMAT_VERSION,
    GENESIS_HASH,
    AbortRecord,
    Ledger,
    ReleaseEntry,
    ReleaseMetadata,
    UserBudgetExhaustedError,
    canonical_json,
    head_path,
    read_ledger,
    record_hash,
    user_epsilons,
    user_events,
)

DELTA = 1e-5
BUDGET = Budget(5.0, DELTA)
OWNER = "coordinator"


def dev(contributors: int = 3, local_variance: float = 8000.0,
        sample_rate: float = 1.0) -> DistributedDiscreteGaussianEvent:
    """One release: 3 shares of variance 8000 cost epsilon ~2.94 (two ~4.35, three ~5.49)."""
    return DistributedDiscreteGaussianEvent(
        sample_rate=sample_rate, clip=1.0, granularity=0.01, local_variance=local_variance,
        contributors=contributors, dimension=1000, beta=math.exp(-0.5))


def rmeta(round_number: int, users: tuple[str, ...], event_id: str | None = None
          ) -> ReleaseMetadata:
    kw = {} if event_id is None else {"event_id": event_id}
    return ReleaseMetadata(round_number=round_number, users=users, delta=DELTA,
                           run_id="run-u", **kw)


def open_user(path: Path, **kw: Any) -> Ledger:
    return Ledger(path, client_id=OWNER, level="user", budget=BUDGET, **kw)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


FOUR = ("u1", "u2", "u3", "u4")


@pytest.fixture()
def user_path(tmp_path: Path) -> Path:
    """A user ledger: header, release r1 + commit, abort of round 2, release r3 (pending):
    5 records."""
    path = tmp_path / "coordinator.ledger.jsonl"
    with open_user(path) as led:
        led.reserve_release(dev(), rmeta(1, FOUR, "r1"))
        led.commit("r1")
        led.record_abort(2, "only 2 masked inputs arrived; nothing was released")
        led.reserve_release(dev(2), rmeta(3, ("u1", "u2", "u5"), "r3"))
    return path


def test_round_trip(user_path: Path) -> None:
    snap = read_ledger(user_path)
    assert snap.level == "user" and snap.format_version == FORMAT_VERSION == 3
    assert snap.client_id == OWNER and snap.budget == BUDGET and snap.entries == ()
    assert [(r.metadata.event_id, r.status) for r in snap.releases] == [
        ("r1", "committed"), ("r3", "pending")]
    assert snap.releases[0].event == dev() and snap.releases[1].event == dev(2)
    assert snap.releases[1].metadata.users == ("u1", "u2", "u5")
    m = snap.releases[1].metadata
    assert (m.round_number, m.delta, m.run_id, m.event_id) == (3, DELTA, "run-u", "r3")
    (abort,) = snap.aborts
    assert abort.round_number == 2 and "nothing was released" in abort.reason
    header = json.loads(lines(user_path)[0])
    assert (header["version"], header["level"]) == (3, "user")
    release = json.loads(lines(user_path)[1])
    assert release["kind"] == "release" and release["users"] == list(FOUR)
    assert release["contributors"] == 3 and release["local_variance"] == 8000.0
    assert snap.head.count == 5 and json.loads(head_path(user_path).read_text())["count"] == 5
    with open_user(user_path) as led:
        assert led.level == "user"
        assert led.releases() == snap.releases and led.aborts() == snap.aborts
        assert led.snapshot().releases == snap.releases


def test_reopen_and_continue(user_path: Path) -> None:
    before = user_path.read_bytes()
    with open_user(user_path) as led:
        assert led.commit("r3") is True
        led.reserve_release(dev(), rmeta(4, ("u2", "u3", "u4", "u6"), "r4"))
        led.commit("r4")
    assert user_path.read_bytes().startswith(before)
    snap = read_ledger(user_path)
    assert [r.status for r in snap.releases] == ["committed"] * 3
    assert user_epsilons(snap.releases, DELTA)["u2"] == pytest.approx(ddg.epsilon(
        [dev(), dev(2), dev()], DELTA).epsilon, rel=1e-12)


def test_release_metadata_is_validated() -> None:
    assert rmeta(0, ("b", "a", "c")).users == ("a", "b", "c")  # stored sorted
    with pytest.raises(EventValidationError, match=r"\['a'\] more than once"):
        rmeta(0, ("a", "b", "a"))
    with pytest.raises(EventValidationError, match="empty"):
        rmeta(0, ())
    with pytest.raises(EventValidationError, match=r"users\[1\]='bad id'"):
        rmeta(0, ("a", "bad id"))
    with pytest.raises(EventValidationError, match="tuple of client-id strings"):
        rmeta(0, "abc")  # type: ignore[arg-type]
    with pytest.raises(EventValidationError, match="round_number=-1"):
        rmeta(-1, ("a",))
    with pytest.raises(EventValidationError, match="delta=2"):
        ReleaseMetadata(round_number=0, users=("a",), delta=2, run_id="r")
    with pytest.raises(EventValidationError, match="reason=''"):
        AbortRecord(0, "")
    with pytest.raises(EventValidationError, match="too long"):
        AbortRecord(0, "x" * (ABORT_REASON_MAX_CHARS + 1))


def test_contributors_cannot_exceed_the_other_users(tmp_path: Path) -> None:
    path = tmp_path / "c.ledger.jsonl"
    with open_user(path) as led:
        before = path.read_bytes()
        with pytest.raises(EventValidationError, match="contributors=4 exceeds the 4 named and 0 unnamed"):
            led.reserve_release(dev(4), rmeta(0, FOUR))
        with pytest.raises(EventValidationError, match="DistributedDiscreteGaussianEvent"):
            led.reserve_release(PoissonSampledGaussianEvent(0.1, 1.0, 1),  # type: ignore[arg-type]
                                rmeta(0, FOUR))
        assert path.read_bytes() == before
        led.reserve_release(dev(3), rmeta(0, FOUR, "ok"))
        with pytest.raises(LedgerError, match="already reserved"):
            led.reserve_release(dev(3), rmeta(1, FOUR, "ok"))
        # a device names only itself; the others in the sum it counts but cannot name
        one = ReleaseMetadata(round_number=2, users=("dev-a",), delta=1e-5, run_id="run",
                              others=3)
        led.reserve_release(dev(3), one)
        with pytest.raises(EventValidationError, match="1 named and 2 unnamed"):
            led.reserve_release(dev(3), ReleaseMetadata(round_number=3, users=("dev-a",),
                                                        delta=1e-5, run_id="run", others=2))
    assert read_ledger(path).releases[-1].metadata.others == 3


def test_level_mismatch_is_refused(tmp_path: Path, user_path: Path) -> None:
    before = user_path.read_bytes()
    with pytest.raises(LedgerError, match="level='record' does not match the ledger's level "
                                          "'user'"):
        Ledger(user_path, client_id=OWNER)
    record = tmp_path / "client.ledger.jsonl"
    Ledger(record, client_id="client").close()
    with pytest.raises(LedgerError, match="level='user' does not match the ledger's level "
                                          "'record' \\(format v3\\)"):
        Ledger(record, client_id="client", level="user")
    with pytest.raises(EventValidationError, match="level='users'"):
        Ledger(tmp_path / "new.ledger.jsonl", client_id="x", level="users")  # type: ignore[arg-type]
    assert not (tmp_path / "new.ledger.jsonl").exists()
    assert user_path.read_bytes() == before
    open_user(user_path).close()  # the refused opens released the lock


def test_each_level_refuses_the_other_levels_api(tmp_path: Path, user_path: Path) -> None:
    from fedpeft.privacy.accounting.report import client_report, user_report

    e = PoissonSampledGaussianEvent(0.1, 1.0, 5)
    m = EventMetadata(round_number=0, dataset_size=100, delta=DELTA, clip_norm=1.0,
                      run_id="r")
    calls: tuple[Callable[[], object], ...]
    with open_user(user_path) as led:
        calls = (lambda: led.reserve(e, m), lambda: led.reserve_within_budget(e, m),
                 led.spent_events, led.entries, led.pending, lambda: list(led))
        for call in calls:
            with pytest.raises(LedgerError, match="needs a record-level ledger"):
                call()
        with pytest.raises(EventValidationError, match="one epsilon per user"):
            led.commit("r3", cached_epsilon_display_only=1.0)
    with pytest.raises(LedgerError, match="user-level ledger"):
        read_ledger(user_path).spent_events()
    with pytest.raises(LedgerError, match="user_report"):
        client_report(read_ledger(user_path))

    record = tmp_path / "client.ledger.jsonl"
    with Ledger(record, client_id="client") as led:
        calls = (lambda: led.reserve_release(dev(), rmeta(0, FOUR)),
                 lambda: led.reserve_release_within_budget(dev(), rmeta(0, FOUR), BUDGET),
                 lambda: led.record_abort(0, "why"), led.releases, led.aborts)
        for refused in calls:
            with pytest.raises(LedgerError, match="needs a user-level ledger"):
                refused()
    with pytest.raises(LedgerError, match="client_report"):
        user_report(read_ledger(record))


# -- records of the wrong kind, format v2 ------------------------------------------------------
def _append_record(path: Path, body: dict[str, Any]) -> None:
    """Append a correctly chained record by hand and update the head."""
    last = json.loads(lines(path)[-1])
    seq: int = last["seq"] + 1
    body = dict(body, seq=seq, prev=last["hash"])
    rec = dict(body, hash=record_hash(last["hash"], body))
    with path.open("ab") as f:
        f.write((canonical_json(rec) + "\n").encode("ascii"))
    head_path(path).write_text(canonical_json({"count": seq + 1,
                                               "last_hash": rec["hash"]}) + "\n")


def _body(record: bytes) -> dict[str, Any]:
    return {k: v for k, v in json.loads(record).items() if k not in ("seq", "prev", "hash")}


V2_TIME = "2025-01-01T00:00:00.000000+00:00"


def write_v2_ledger(path: Path, client_id: str) -> None:
    """A record-level ledger exactly as format v2 wrote it (header without a level)."""
    records: list[dict[str, Any]] = []

    def add(body: dict[str, Any]) -> None:
        prev = str(records[-1]["hash"]) if records else GENESIS_HASH
        body = dict(body, seq=len(records), prev=prev)
        records.append(dict(body, hash=record_hash(prev, body)))

    add({"kind": "header", "format": "fedpeft-privacy-ledger", "version": 2,
         "client_id": client_id, "created": V2_TIME, "budget_epsilon": 8.0,
         "budget_delta": DELTA})
    add({"kind": "reserve", "event_id": "v2-0", "sample_rate": 0.05, "noise_multiplier": 1.0,
         "steps": 10, "round_number": 0, "dataset_size": 1000, "delta": DELTA,
         "clip_norm": 1.0, "run_id": "run-v2", "timestamp": V2_TIME,
         "adjacency": "replace_one", "sampling": "csprng"})
    add({"kind": "commit", "event_id": "v2-0", "timestamp": V2_TIME,
         "cached_epsilon_display_only": None})
    path.write_bytes(b"".join((canonical_json(r) + "\n").encode("ascii") for r in records))
    head_path(path).write_text(canonical_json({"count": len(records),
                                               "last_hash": records[-1]["hash"]}) + "\n")


def test_v2_record_ledger_opens_and_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "old.ledger.jsonl"
    write_v2_ledger(path, "old")
    snap = read_ledger(path)
    assert (snap.format_version, snap.level, len(snap.entries)) == (2, "record", 1)
    with pytest.raises(LedgerError, match="level='user' does not match the ledger's level "
                                          "'record' \\(format v2\\)"):
        Ledger(path, client_id="old", level="user")
    before = path.read_bytes()
    with Ledger(path, client_id="old", level="record") as led:
        assert led.format_version == 2 and led.level == "record"
        led.reserve(PoissonSampledGaussianEvent(0.05, 1.0, 5),
                    EventMetadata(round_number=1, dataset_size=1000, delta=DELTA,
                                  clip_norm=1.0, run_id="run-v2", event_id="new"))
        led.commit("new")
    assert path.read_bytes().startswith(before)  # continued, never rewritten
    assert json.loads(lines(path)[0]) == json.loads(before.splitlines()[0])
    again = read_ledger(path)
    assert again.format_version == 2 and [e.metadata.event_id for e in again.entries] == [
        "v2-0", "new"]
    # User-level records cannot appear in a v2 (record-level) ledger.
    _append_record(path, {"kind": "abort", "round_number": 3, "reason": "x",
                          "timestamp": V2_TIME})
    with pytest.raises(LedgerCorruptedError, match="line 6: 'abort' records belong in a "
                                                   "user-level ledger, not in this record"):
        read_ledger(path)


def test_records_of_the_other_level_are_corruption(tmp_path: Path, user_path: Path) -> None:
    release = _body(lines(user_path)[1])
    record = tmp_path / "client.ledger.jsonl"
    with Ledger(record, client_id="client") as led:
        led.reserve(PoissonSampledGaussianEvent(0.05, 1.0, 5),
                    EventMetadata(round_number=0, dataset_size=1000, delta=DELTA,
                                  clip_norm=1.0, run_id="r", event_id="e0"))
    reserve = _body(lines(record)[1])
    _append_record(record, release)
    with pytest.raises(LedgerCorruptedError, match="line 3: 'release' records belong in a "
                                                   "user-level ledger"):
        read_ledger(record)
    _append_record(user_path, dict(reserve, event_id="e9"))
    with pytest.raises(LedgerCorruptedError, match="line 6: 'reserve' records belong in a "
                                                   "record-level ledger"):
        read_ledger(user_path)


def test_invalid_release_values_in_a_record_are_corruption(tmp_path: Path,
                                                          user_path: Path) -> None:
    body = _body(lines(user_path)[1])
    cases = {
        "unsorted": (dict(body, users=["u2", "u1", "u3", "u4"]), "not sorted and unique"),
        "too-many-contributors": (dict(body, contributors=4), "contributors=4 exceeds"),
        "variance": (dict(body, local_variance=0.5), "invalid release: local_variance"),
        "type": (dict(body, users="u1"), "wrong type"),
        "keys": ({k: v for k, v in body.items() if k != "beta"}, "release record has keys"),
    }
    for name, (rec, match) in cases.items():
        p = tmp_path / f"{name}.ledger.jsonl"
        open_user(p).close()
        _append_record(p, dict(rec, event_id=f"x-{name}"))
        with pytest.raises(LedgerCorruptedError, match=match):
            read_ledger(p)
    p = tmp_path / "commit.ledger.jsonl"
    with open_user(p) as led:
        led.reserve_release(dev(), rmeta(0, FOUR, "c0"))
    _append_record(p, {"kind": "commit", "event_id": "c0", "timestamp": V2_TIME,
                       "cached_epsilon_display_only": 1.5})
    with pytest.raises(LedgerCorruptedError, match="carries a cached epsilon"):
        read_ledger(p)


# -- tampering, torn lines, crashes ------------------------------------------------------------
def _edit_contributors(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"contributors":2', b'"contributors":1', 1))


def _drop_a_user(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"users":["u1","u2","u5"]',
                                               b'"users":["u1","u2"]', 1))


def _edit_and_rehash(path: Path) -> None:
    ls = lines(path)
    rec = json.loads(ls[1])
    rec["local_variance"] = 80000.0
    rec["hash"] = record_hash(rec["prev"], {k: v for k, v in rec.items() if k != "hash"})
    ls[1] = (canonical_json(rec) + "\n").encode()
    path.write_bytes(b"".join(ls))


def _delete_line(path: Path) -> None:
    ls = lines(path)
    del ls[3]  # the abort record
    path.write_bytes(b"".join(ls))


def _delete_last_line(path: Path) -> None:
    path.write_bytes(b"".join(lines(path)[:-1]))


TAMPERS = {
    "edit-contributors": (_edit_contributors, "line 5: record hash mismatch"),
    "drop-a-user": (_drop_a_user, "line 5: record hash mismatch"),
    "edit-and-rehash": (_edit_and_rehash, "line 3: hash chain broken"),
    "delete-line": (_delete_line, "line 4"),
    "delete-last-line": (_delete_last_line, "head file records 5"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_is_detected(user_path: Path, name: str) -> None:
    tamper, where = TAMPERS[name]
    tamper(user_path)
    with pytest.raises(LedgerCorruptedError, match=where) as info:
        read_ledger(user_path)
    assert "Training is refused" in str(info.value)
    before = user_path.read_bytes()
    with pytest.raises(LedgerCorruptedError):
        open_user(user_path)
    assert user_path.read_bytes() == before  # the evidence is not "repaired"


def test_torn_final_release_line_is_dropped(user_path: Path) -> None:
    good = user_path.read_bytes()
    head_before = head_path(user_path).read_bytes()
    torn = b'{"beta":0.6065306597126334,"clip":1.0,"contributors":3,"delta":1e-05,"dimen'
    user_path.write_bytes(good + torn)
    snap = read_ledger(user_path)
    assert len(snap.releases) == 2 and "torn" in snap.notes[0]
    with open_user(user_path) as led:
        assert user_path.read_bytes() == good and head_path(user_path).read_bytes() == head_before
        led.reserve_release(dev(), rmeta(5, FOUR, "r5"))
    assert [r.metadata.event_id for r in read_ledger(user_path).releases] == ["r1", "r3", "r5"]


def test_complete_release_with_stale_head_is_kept(user_path: Path) -> None:
    head_before = head_path(user_path).read_bytes()
    with open_user(user_path) as led:
        led.reserve_release(dev(), rmeta(6, FOUR, "late"))
    head_path(user_path).write_bytes(head_before)  # crash before the head update
    snap = read_ledger(user_path)
    assert snap.releases[-1].metadata.event_id == "late" and snap.releases[-1].status == "pending"
    with open_user(user_path):
        pass
    assert read_ledger(user_path).notes == ()


def test_crash_between_reserve_and_commit_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "crash.ledger.jsonl"
    led = open_user(path)
    led.reserve_release(dev(), rmeta(1, FOUR, "a"))
    led.commit("a")
    led.reserve_release(dev(), rmeta(2, FOUR, "b"))
    led.close()  # "crash": the sum may have been unmasked, b never committed
    snap = read_ledger(path)
    assert [r.status for r in snap.releases] == ["committed", "pending"]
    spent = user_epsilons(snap.releases, DELTA)
    assert spent == {u: ddg.epsilon([dev(), dev()], DELTA).epsilon for u in FOUR}
    with open_user(path) as again:
        assert again.commit("b") is True
        assert again.commit("b") is False and again.commit("a") is False  # idempotent
        assert user_epsilons(again.releases(), DELTA) == spent  # not counted twice
        with pytest.raises(LedgerError, match="never reserved"):
            again.commit("nope")
    assert len(read_ledger(path).releases) == 2


def test_aborts_spend_nothing(user_path: Path) -> None:
    spent = user_epsilons(read_ledger(user_path).releases, DELTA)
    with open_user(user_path) as led:
        before = user_path.read_bytes()
        with pytest.raises(EventValidationError, match="too long"):
            led.record_abort(7, "y" * (ABORT_REASON_MAX_CHARS + 1))
        with pytest.raises(EventValidationError, match="round_number=-1"):
            led.record_abort(-1, "why")
        assert user_path.read_bytes() == before
        got = led.record_abort(7, "z" * ABORT_REASON_MAX_CHARS)
        assert isinstance(got, AbortRecord) and led.aborts()[-1] == got
        led.record_abort(8, "the release would exceed the user-level budget")
    snap = read_ledger(user_path)
    assert [a.round_number for a in snap.aborts] == [2, 7, 8]
    assert user_epsilons(snap.releases, DELTA) == spent


def test_user_ledger_is_anchored_like_a_client_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "coordinator.ledger.jsonl"
    anchors = tmp_path / "anchors"
    with open_user(path, anchor_dir=anchors) as led:
        led.reserve_release(dev(), rmeta(1, FOUR, "a"))
    path.unlink()
    head_path(path).unlink()
    with pytest.raises(LedgerRollbackError, match="anchor"):
        open_user(path, anchor_dir=anchors)


# -- budgets and the per-user cache -------------------------------------------------------------
def test_budget_refusal_writes_nothing_and_names_the_users(tmp_path: Path) -> None:
    path = tmp_path / "b.ledger.jsonl"
    with open_user(path) as led:
        first = led.reserve_release_within_budget(dev(), rmeta(1, FOUR, "a"))
        assert first == {u: ddg.epsilon([dev()], DELTA).epsilon for u in FOUR}
        led.commit("a")
        led.reserve_release_within_budget(dev(), rmeta(2, ("u1", "u2", "u3", "u5"), "b"))
        before = path.read_bytes()
        # u1..u3 have two releases: a third (epsilon ~5.49) exceeds 5.0; u4 and u6 do not.
        with pytest.raises(UserBudgetExhaustedError) as info:
            led.reserve_release_within_budget(dev(), rmeta(3, ("u1", "u2", "u3", "u4", "u6")))
        err = info.value
        assert isinstance(err, BudgetExhaustedError)
        third = ddg.epsilon([dev()] * 3, DELTA).epsilon
        assert err.users == {"u1": third, "u2": third, "u3": third}
        assert err.epsilon_after == third > err.epsilon_max == 5.0
        assert err.epsilon_before == ddg.epsilon([dev()] * 2, DELTA).epsilon
        assert "u1 (" in str(err) and "u4" not in str(err) and "nothing was recorded" in str(err)
        assert path.read_bytes() == before and len(led.releases()) == 2
        ok = led.reserve_release_within_budget(dev(), rmeta(3, ("u4", "u5", "u6", "u7")))
        assert ok["u6"] == ddg.epsilon([dev()], DELTA).epsilon
        assert ok["u4"] == ok["u5"] == ddg.epsilon([dev()] * 2, DELTA).epsilon
    nobudget = tmp_path / "n.ledger.jsonl"
    with Ledger(nobudget, client_id=OWNER, level="user") as led:
        with pytest.raises(LedgerError, match="has no budget"):
            led.reserve_release_within_budget(dev(), rmeta(0, FOUR))
        assert led.reserve_release_within_budget(dev(), rmeta(0, FOUR), BUDGET)


def test_users_sharing_a_history_cost_one_accountant_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = tuple(f"user-{i:03d}" for i in range(100))
    calls: list[int] = []
    real = ddg.epsilon

    def counting(events: Any, delta: float, *args: Any) -> ddg.DDGEpsilon:
        calls.append(1)
        return real(events, delta, *args)

    path = tmp_path / "many.ledger.jsonl"
    with open_user(path) as led:
        monkeypatch.setattr(ddg, "epsilon", counting)
        led.reserve_release_within_budget(dev(99), rmeta(1, users, "a"))
        assert len(calls) == 1
        second = led.reserve_release_within_budget(dev(49), rmeta(2, users[:50], "b"))
        assert len(calls) == 2
        # Three histories ({a, b}, {a}, {}) in one round: three calls, nothing more.
        third = led.reserve_release_within_budget(
            dev(9), rmeta(3, users[45:55] + ("new-1", "new-2"), "c"))
        assert len(calls) == 5
        calls.clear()
        pure = user_epsilons(led.releases(), DELTA)  # a, ab, abc, ac, c
        assert len(calls) == 5
    monkeypatch.setattr(ddg, "epsilon", real)
    assert second == {u: real([dev(99), dev(49)], DELTA).epsilon for u in users[:50]}
    assert third["user-045"] == real([dev(99), dev(49), dev(9)], DELTA).epsilon
    assert third["user-050"] == real([dev(99), dev(9)], DELTA).epsilon
    assert third["new-1"] == real([dev(9)], DELTA).epsilon
    releases = read_ledger(path).releases
    assert pure == {u: real(user_events(releases, u), DELTA).epsilon for u in pure}
    assert set(pure) == set(users) | {"new-1", "new-2"}


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from(["a", "b", "c", "d", "e"]), min_size=2),
                          st.sampled_from([2000.0, 8000.0, 30000.0]),
                          st.sampled_from([1.0, 0.5]),
                          st.integers(1, 4)),
                min_size=1, max_size=6))
def test_user_epsilons_compose_each_users_releases_and_only_grow(
        tmp_path_factory: pytest.TempPathFactory,
        spec: list[tuple[set[str], float, float, int]]) -> None:
    path = tmp_path_factory.mktemp("prop") / "p.ledger.jsonl"
    previous: dict[str, float] = {}
    with Ledger(path, client_id=OWNER, level="user", budget=Budget(1e6, DELTA)) as led:
        for i, (users, variance, q, shares) in enumerate(spec):
            event = dev(min(shares, len(users) - 1), variance, q)
            got = led.reserve_release_within_budget(event, rmeta(i, tuple(users)))
            if i % 2 == 0:
                led.commit(led.releases()[-1].metadata.event_id)
            releases: tuple[ReleaseEntry, ...] = read_ledger(path).releases
            now = user_epsilons(releases, DELTA)
            assert set(now) == set().union(*(u for u, *_ in spec[:i + 1]))
            for user, eps in now.items():
                # equal up to float summation order (equal events compose as one, k steps)
                assert eps == pytest.approx(
                    ddg.epsilon(user_events(releases, user), DELTA).epsilon, rel=1e-12)
                assert eps >= previous.get(user, 0.0) * (1 - 1e-12)
            assert got == pytest.approx({u: now[u] for u in sorted(users)}, rel=1e-12)
            previous = now
