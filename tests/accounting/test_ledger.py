"""Ledger tests: round trip, tamper detection, crash recovery, locking, monotonicity, format v2
(adjacency and sampling in reserve records; v1 files read as replace_one + seeded)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.privacy.accounting.accountant import compute_epsilon, epsilon
from fedpeft.privacy.accounting.budget import Budget
from fedpeft.privacy.accounting.errors import (
    BudgetExhaustedError,
    EventValidationError,
    LedgerCorruptedError,
    LedgerError,
    LedgerLockedError,
)
from fedpeft.privacy.accounting.events import EventMetadata, PoissonSampledGaussianEvent
from fedpeft.privacy.accounting.ledger import (
    FORMAT_VERSION,
    GENESIS_HASH,
    Ledger,
    canonical_json,
    composition_adjacency,
    head_path,
    read_ledger,
    record_hash,
)

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def meta(round_number: int, event_id: str | None = None, *, adjacency: str = "replace_one",
         sampling: str = "csprng") -> EventMetadata:
    kw = {} if event_id is None else {"event_id": event_id}
    return EventMetadata(round_number=round_number, dataset_size=1000, delta=DELTA,
                         clip_norm=1.0, run_id="run-1", adjacency=adjacency,
                         sampling=sampling, **kw)


def ev(steps: int = 10, sigma: float = 1.0, q: float = 0.05) -> PoissonSampledGaussianEvent:
    return PoissonSampledGaussianEvent(q, sigma, steps)


@pytest.fixture()
def ledger_path(tmp_path: Path) -> Path:
    """A ledger with 3 committed rounds (7 lines: header + 3 x (reserve, commit))."""
    path = tmp_path / "client-a.ledger.jsonl"
    with Ledger(path, client_id="client-a", budget=Budget(8.0, DELTA)) as led:
        for r in range(3):
            entry = led.reserve(ev(10 + r), meta(r, f"ev{r}"))
            led.commit(entry.metadata.event_id, cached_epsilon_display_only=0.5 * r)
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_round_trip(ledger_path: Path) -> None:
    snap = read_ledger(ledger_path)
    assert snap.client_id == "client-a"
    assert snap.budget == Budget(8.0, DELTA)
    assert [e.event.steps for e in snap.entries] == [10, 11, 12]
    assert [e.status for e in snap.entries] == ["committed"] * 3
    assert snap.entries[1].metadata.event_id == "ev1"
    assert snap.entries[2].cached_epsilon_display_only == 1.0
    assert snap.notes == ()
    with Ledger(ledger_path, client_id="client-a") as led:
        assert led.spent_events() == snap.spent_events()
        assert led.budget == Budget(8.0, DELTA)
    assert len(lines(ledger_path)) == 7
    assert json.loads(head_path(ledger_path).read_text())["count"] == 7
    header, reserve = json.loads(lines(ledger_path)[0]), json.loads(lines(ledger_path)[1])
    assert header["version"] == FORMAT_VERSION == 3 and header["level"] == "record"
    assert (reserve["adjacency"], reserve["sampling"]) == ("replace_one", "csprng")
    assert snap.format_version == 3 and snap.head.count == 7 and snap.level == "record"
    assert snap.adjacency == "replace_one" and snap.private_against_coordinator
    # The writer lock is on the ledger itself: no side lock file is created any more.
    assert not ledger_path.with_name(ledger_path.name + ".lock").exists()


def test_reopen_with_other_client_or_budget_refused(ledger_path: Path) -> None:
    with pytest.raises(LedgerError, match="client_id='client-b'"):
        Ledger(ledger_path, client_id="client-b")
    with pytest.raises(LedgerError, match="budget="):
        Ledger(ledger_path, client_id="client-a", budget=Budget(9.0, DELTA))
    # The failed opens released the lock.
    Ledger(ledger_path, client_id="client-a").close()


def _edit_number(path: Path) -> None:
    data = path.read_bytes().replace(b'"steps":11', b'"steps":1', 1)
    path.write_bytes(data)


def _edit_number_keep_canonical_and_rehash_line(path: Path) -> None:
    # Edit a value and recompute that line's own hash: the next record's prev breaks.
    from fedpeft.privacy.accounting.ledger import canonical_json, record_hash

    ls = lines(path)
    rec = json.loads(ls[3])
    rec["noise_multiplier"] = 5.0
    body = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = record_hash(rec["prev"], body)
    ls[3] = (canonical_json(rec) + "\n").encode()
    path.write_bytes(b"".join(ls))


def _delete_middle_line(path: Path) -> None:
    ls = lines(path)
    del ls[3]
    path.write_bytes(b"".join(ls))


def _delete_last_lines(path: Path) -> None:
    path.write_bytes(b"".join(lines(path)[:-2]))


def _reorder(path: Path) -> None:
    ls = lines(path)
    ls[3], ls[4] = ls[4], ls[3]
    path.write_bytes(b"".join(ls))


def _truncate_mid_line(path: Path) -> None:
    ls = lines(path)
    path.write_bytes(b"".join(ls[:3]) + ls[3][:25])


def _truncate_mid_last_line(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-20])


def _append_garbage_line(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"garbage\n")


def _append_garbage_no_newline(path: Path) -> None:
    with path.open("ab") as f:
        f.write(b"\x00\xffgarbage")


def _append_duplicate_commit(path: Path) -> None:
    ls = lines(path)
    with path.open("ab") as f:
        f.write(ls[-1])


def _delete_head(path: Path) -> None:
    head_path(path).unlink()


def _delete_ledger(path: Path) -> None:
    path.unlink()


def _whitespace_edit(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"steps":11', b'"steps": 11', 1))


TAMPERS = {
    "edit-number": (_edit_number, "line 4"),
    "edit-and-rehash": (_edit_number_keep_canonical_and_rehash_line, "line 5"),
    "delete-middle-line": (_delete_middle_line, "line 4"),
    "delete-last-lines": (_delete_last_lines, "head file"),
    "reorder": (_reorder, "line 4"),
    "truncate-mid-line": (_truncate_mid_line, "head file records"),
    "truncate-mid-last-line": (_truncate_mid_last_line, "head file records"),
    "append-garbage-line": (_append_garbage_line, "line 8"),
    "append-garbage-no-newline": (_append_garbage_no_newline, "head file records|line 8"),
    "append-duplicate-record": (_append_duplicate_commit, "line 8"),
    "delete-head": (_delete_head, "head file .* missing"),
    "delete-ledger": (_delete_ledger, "ledger was deleted"),
    "whitespace-edit": (_whitespace_edit, "line 4"),
    "truncate-to-empty": (lambda p: p.write_bytes(b""), "head file records"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampering_is_detected(ledger_path: Path, name: str) -> None:
    tamper, where = TAMPERS[name]
    tamper(ledger_path)
    with pytest.raises(LedgerCorruptedError, match=where) as info:
        read_ledger(ledger_path)
    msg = str(info.value)
    assert str(ledger_path) in msg and "Training is refused" in msg
    # A writer refuses too, and does not "repair" the evidence.
    before = ledger_path.read_bytes() if ledger_path.exists() else None
    with pytest.raises(LedgerCorruptedError):
        Ledger(ledger_path, client_id="client-a")
    after = ledger_path.read_bytes() if ledger_path.exists() else None
    assert before == after


def test_crash_between_reserve_and_commit_counts_as_spent(tmp_path: Path) -> None:
    path = tmp_path / "c.ledger.jsonl"
    led = Ledger(path, client_id="c")
    led.reserve(ev(10), meta(0, "r0"))
    led.commit("r0")
    led.reserve(ev(20), meta(1, "r1"))
    led.close()  # "crash": no commit for r1
    snap = read_ledger(path)
    assert [e.status for e in snap.entries] == ["committed", "pending"]
    spent = epsilon(snap.spent_events(), DELTA)
    assert spent == epsilon([ev(10), ev(20)], DELTA)
    assert spent > epsilon([ev(10)], DELTA)
    with Ledger(path, client_id="c") as led2:
        assert [e.metadata.event_id for e in led2.pending()] == ["r1"]
        assert led2.commit("r1") is True
        assert led2.commit("r1") is False  # idempotent
        assert led2.commit("r0") is False
        assert epsilon(led2.spent_events(), DELTA) == spent  # not double counted
        with pytest.raises(LedgerError, match="event_id='r1' is already reserved"):
            led2.reserve(ev(5), meta(2, "r1"))
        with pytest.raises(LedgerError, match="never reserved"):
            led2.commit("nope")
    assert len(read_ledger(path).entries) == 2


def test_torn_final_line_never_acknowledged_is_dropped(ledger_path: Path) -> None:
    # Simulate a crash in the middle of appending a reserve: a prefix of a record, no newline,
    # and the head file was not updated (it is updated only after the append is fsynced).
    head_before = head_path(ledger_path).read_bytes()
    good = ledger_path.read_bytes()
    torn = b'{"clip_norm":1.0,"dataset_size":1000,"delta":1e-05,"event_id":"ev3","kind":"res'
    ledger_path.write_bytes(good + torn)
    assert head_path(ledger_path).read_bytes() == head_before
    snap = read_ledger(ledger_path)
    assert len(snap.entries) == 3 and "torn" in snap.notes[0]
    with Ledger(ledger_path, client_id="client-a") as led:
        assert ledger_path.read_bytes() == good  # torn bytes removed under the lock
        led.reserve(ev(3), meta(3, "ev3"))
    assert len(read_ledger(ledger_path).entries) == 4


def test_complete_append_with_stale_head_is_kept(ledger_path: Path) -> None:
    # Crash after the append's fsync but before the head update: the record is kept (it may
    # have been acknowledged... it was not, but keeping it is conservative).
    head_before = head_path(ledger_path).read_bytes()
    with Ledger(ledger_path, client_id="client-a") as led:
        led.reserve(ev(7), meta(9, "late"))
    head_path(ledger_path).write_bytes(head_before)
    snap = read_ledger(ledger_path)
    assert snap.entries[-1].metadata.event_id == "late"
    assert snap.entries[-1].status == "pending"
    with Ledger(ledger_path, client_id="client-a"):
        pass
    assert json.loads(head_path(ledger_path).read_text())["count"] == 8
    assert read_ledger(ledger_path).notes == ()


def test_second_writer_is_locked_out_in_process(ledger_path: Path) -> None:
    with Ledger(ledger_path, client_id="client-a"):
        with pytest.raises(LedgerLockedError, match="locked by another writer"):
            Ledger(ledger_path, client_id="client-a")
        read_ledger(ledger_path)  # readers are not blocked
    Ledger(ledger_path, client_id="client-a").close()


def test_second_writer_is_locked_out_across_processes(ledger_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from fedpeft.privacy.accounting.ledger import Ledger
        from fedpeft.privacy.accounting.errors import LedgerLockedError
        try:
            Ledger({str(ledger_path)!r}, client_id="client-a")
        except LedgerLockedError:
            print("LOCKED")
        else:
            print("ACQUIRED")
    """)
    with Ledger(ledger_path, client_id="client-a"):
        held = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, check=True)
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    assert held.stdout.strip() == "LOCKED"
    assert free.stdout.strip() == "ACQUIRED"


def test_closed_ledger_refuses_writes(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "x.ledger.jsonl", client_id="x")
    led.close()
    with pytest.raises(LedgerError, match="closed"):
        led.reserve(ev(), meta(0))


def test_bad_ledger_name(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"\.ledger\.jsonl"):
        Ledger(tmp_path / "x.json", client_id="x")


def test_reserve_within_budget(tmp_path: Path) -> None:
    path = tmp_path / "b.ledger.jsonl"
    budget = Budget(2.0, DELTA)
    with Ledger(path, client_id="b", budget=budget) as led:
        d = led.reserve_within_budget(ev(50, sigma=1.0, q=0.02), meta(0, "ok"),
                                      accountant="rdp")
        assert d.allowed and d.epsilon_after <= 2.0
        with pytest.raises(BudgetExhaustedError, match="privacy_budget_exhausted"):
            led.reserve_within_budget(ev(5000, sigma=1.0, q=0.02), meta(1, "big"),
                                      accountant="rdp")
    assert [e.metadata.event_id for e in read_ledger(path).entries] == ["ok"]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.01, 0.05, 0.2]),
                          st.sampled_from([0.8, 1.0, 2.0]),
                          st.integers(1, 200)), min_size=1, max_size=6))
def test_epsilon_monotone_as_events_are_appended(
        tmp_path_factory: pytest.TempPathFactory,
        spec: list[tuple[float, float, int]]) -> None:
    path = tmp_path_factory.mktemp("mono") / "m.ledger.jsonl"
    previous = 0.0
    with Ledger(path, client_id="m") as led:
        for i, (q, sigma, steps) in enumerate(spec):
            led.reserve(PoissonSampledGaussianEvent(q, sigma, steps), meta(i))
            if i % 2 == 0:
                led.commit(led.entries()[-1].metadata.event_id)
            current = epsilon(read_ledger(path).spent_events(), DELTA, "rdp")
            assert current >= previous
            previous = current


def test_reader_during_concurrent_appends_sees_consistent_prefix(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "w.ledger.jsonl"
    Ledger(path, client_id="w").close()
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            with Ledger(path, client_id="w") as led:
                for i in range(40):
                    led.reserve(ev(1 + i), meta(i, f"e{i}"))
                    led.commit(f"e{i}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = 0
    while not done.is_set():
        snap = read_ledger(path)
        assert len(snap.entries) >= seen
        seen = len(snap.entries)
    thread.join()
    assert not errors
    assert len(read_ledger(path).entries) == 40


# -- format v2: adjacency and sampling ----------------------------------------------------
V1_TIME = "2024-05-01T12:00:00.000000+00:00"
V1_BUDGET = Budget(8.0, DELTA)  # frozen, safe to share as a default


def write_v1_ledger(path: Path, client_id: str, events: list[PoissonSampledGaussianEvent],
                    budget: Budget | None = V1_BUDGET) -> None:
    """A ledger exactly as format v1 wrote it (no adjacency/sampling), valid hash chain."""
    records: list[dict[str, object]] = []

    def add(body: dict[str, object]) -> None:
        prev = str(records[-1]["hash"]) if records else GENESIS_HASH
        body = dict(body, seq=len(records), prev=prev)
        records.append(dict(body, hash=record_hash(prev, body)))

    add({"kind": "header", "format": "fedpeft-privacy-ledger", "version": 1,
         "client_id": client_id, "created": V1_TIME,
         "budget_epsilon": None if budget is None else budget.epsilon_max,
         "budget_delta": None if budget is None else budget.delta})
    for i, e in enumerate(events):
        add({"kind": "reserve", "event_id": f"v1-{i}", "sample_rate": e.sample_rate,
             "noise_multiplier": e.noise_multiplier, "steps": e.steps, "round_number": i,
             "dataset_size": 1000, "delta": DELTA, "clip_norm": 1.0, "run_id": "run-v1",
             "timestamp": V1_TIME})
        add({"kind": "commit", "event_id": f"v1-{i}", "timestamp": V1_TIME,
             "cached_epsilon_display_only": None})
    path.write_bytes(b"".join((canonical_json(r) + "\n").encode("ascii") for r in records))
    head_path(path).write_text(canonical_json({"count": len(records),
                                               "last_hash": records[-1]["hash"]}) + "\n")


def _append_record(path: Path, body: dict[str, object]) -> None:
    """Append a correctly chained record by hand and update the head."""
    last = json.loads(lines(path)[-1])
    seq: int = last["seq"] + 1
    body = dict(body, seq=seq, prev=last["hash"])
    rec = dict(body, hash=record_hash(last["hash"], body))
    with path.open("ab") as f:
        f.write((canonical_json(rec) + "\n").encode("ascii"))
    head_path(path).write_text(canonical_json({"count": seq + 1,
                                               "last_hash": rec["hash"]}) + "\n")


def test_v1_ledger_reads_as_replace_one_and_seeded(tmp_path: Path) -> None:
    from fedpeft.privacy.accounting.report import (
        NOT_PRIVATE_AGAINST_COORDINATOR,
        client_report,
        render_table,
    )

    path = tmp_path / "old.ledger.jsonl"
    write_v1_ledger(path, "old", [ev(10), ev(20)])
    snap = read_ledger(path)
    assert snap.format_version == 1
    assert [(e.metadata.adjacency, e.metadata.sampling) for e in snap.entries] == [
        ("replace_one", "seeded")] * 2
    assert snap.adjacency == "replace_one"
    assert snap.private_against_coordinator is False
    report = client_report(snap)
    assert report.adjacency == "replace_one"
    assert report.private_against_coordinator is False
    table = render_table([report])
    assert f"old: {NOT_PRIVATE_AGAINST_COORDINATOR}" in table
    assert "replace_one" in table.splitlines()[3]  # the client's row (after level, header)

    # A v1 ledger is continued (never rewritten): new reserve records are v2-form.
    before = path.read_bytes()
    with Ledger(path, client_id="old", budget=Budget(8.0, DELTA)) as led:
        assert led.format_version == 1 and not led.private_against_coordinator
        led.reserve(ev(5), meta(2, "new", adjacency="add_remove"))
    assert path.read_bytes().startswith(before)
    new = json.loads(lines(path)[-1])
    assert (new["adjacency"], new["sampling"]) == ("add_remove", "csprng")
    again = read_ledger(path)
    assert [e.metadata.sampling for e in again.entries] == ["seeded", "seeded", "csprng"]
    assert again.adjacency == "replace_one"  # still: the v1 events are replace-one


def test_v1_form_record_after_v2_form_or_in_v2_ledger_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.ledger.jsonl"
    write_v1_ledger(path, "old", [ev(10)])
    with Ledger(path, client_id="old") as led:
        led.reserve(ev(5), meta(1, "v2rec"))
    v1_body: dict[str, object] = {
        "kind": "reserve", "event_id": "late-v1", "sample_rate": 0.05,
        "noise_multiplier": 1.0, "steps": 3, "round_number": 2, "dataset_size": 1000,
        "delta": DELTA, "clip_norm": 1.0, "run_id": "run-v1", "timestamp": V1_TIME}
    _append_record(path, v1_body)
    with pytest.raises(LedgerCorruptedError, match="line 5: reserve record has keys"):
        read_ledger(path)

    v2 = tmp_path / "new.ledger.jsonl"
    Ledger(v2, client_id="new").close()
    _append_record(v2, v1_body)
    with pytest.raises(LedgerCorruptedError, match=r"line 2: reserve record has keys .*v3"):
        read_ledger(v2)


def test_invalid_adjacency_or_sampling_in_a_record_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / "x.ledger.jsonl"
    with Ledger(path, client_id="x") as led:
        led.reserve(ev(5), meta(0, "a"))
    body = json.loads(lines(path)[1])
    for key, bad in (("adjacency", "substitute"), ("sampling", "urandom"), ("sampling", 1)):
        p = tmp_path / f"{key}-{bad}.ledger.jsonl"
        Ledger(p, client_id="x").close()
        rec = {k: v for k, v in body.items() if k not in ("seq", "prev", "hash")}
        _append_record(p, dict(rec, **{key: bad}))
        with pytest.raises(LedgerCorruptedError, match=f"invalid event: {key}="):
            read_ledger(p)


def test_event_metadata_validates_adjacency_and_sampling() -> None:
    m = meta(0)
    assert (m.adjacency, m.sampling) == ("replace_one", "csprng")
    with pytest.raises(EventValidationError, match="adjacency='add-remove'"):
        meta(0, adjacency="add-remove")
    with pytest.raises(EventValidationError, match="sampling='random'"):
        meta(0, sampling="random")


def test_composition_adjacency_is_replace_one_if_any() -> None:
    assert composition_adjacency([]) == "add_remove"
    assert composition_adjacency([meta(0, adjacency="add_remove")] * 3) == "add_remove"
    assert composition_adjacency([meta(0, adjacency="add_remove"),
                                  meta(1, adjacency="replace_one")]) == "replace_one"


def test_reserve_within_budget_composes_under_the_conservative_adjacency(
        tmp_path: Path) -> None:
    path = tmp_path / "adj.ledger.jsonl"
    budget = Budget(50.0, DELTA)
    with Ledger(path, client_id="adj", budget=budget) as led:
        first = led.reserve_within_budget(ev(40), meta(0, "a", adjacency="add_remove"),
                                          accountant="rdp")
        assert first.epsilon_after == compute_epsilon(
            [ev(40)], DELTA, "rdp", adjacency="add_remove").epsilon
        assert led.adjacency == "add_remove"
        # The proposed replace-one event makes the whole composition replace-one.
        second = led.reserve_within_budget(ev(40), meta(1, "b", adjacency="replace_one"),
                                           accountant="rdp")
        assert second.epsilon_after == compute_epsilon(
            [ev(40), ev(40)], DELTA, "rdp", adjacency="replace_one").epsilon
        assert second.epsilon_after > compute_epsilon(
            [ev(40), ev(40)], DELTA, "rdp", adjacency="add_remove").epsilon
        assert led.snapshot().adjacency == "replace_one"


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.01, 0.05, 0.2]),
                          st.sampled_from([0.8, 1.0, 2.0]),
                          st.integers(1, 100),
                          st.sampled_from(["add_remove", "replace_one"])),
                min_size=1, max_size=5))
def test_mixed_adjacency_is_never_composed_below_add_remove(
        tmp_path_factory: pytest.TempPathFactory,
        spec: list[tuple[float, float, int, str]]) -> None:
    path = tmp_path_factory.mktemp("adj") / "a.ledger.jsonl"
    with Ledger(path, client_id="a") as led:
        for i, (q, sigma, steps, adjacency) in enumerate(spec):
            led.reserve(PoissonSampledGaussianEvent(q, sigma, steps),
                        meta(i, adjacency=adjacency))
    snap = read_ledger(path)
    events = snap.spent_events()
    as_ledger = compute_epsilon(events, DELTA, "rdp", adjacency=snap.adjacency).epsilon
    optimistic = compute_epsilon(events, DELTA, "rdp", adjacency="add_remove").epsilon
    conservative = compute_epsilon(events, DELTA, "rdp", adjacency="replace_one").epsilon
    assert as_ledger >= optimistic
    if any(a == "replace_one" for *_, a in spec):
        assert snap.adjacency == "replace_one" and as_ledger == conservative
    else:
        assert snap.adjacency == "add_remove"
