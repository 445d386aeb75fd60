"""Ledger rollback/reset detection (anchors, receipts) and the lock on the ledger's own inode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from fedpeft.privacy.accounting.budget import Budget
from fedpeft.privacy.accounting.errors import (
    LedgerCorruptedError,
    LedgerError,
    LedgerLockedError,
    LedgerReceiptError,
    LedgerRollbackError,
)
from fedpeft.privacy.accounting.events import EventMetadata, PoissonSampledGaussianEvent
from fedpeft.privacy.accounting.ledger import (
    RECEIPT_MAX_CHARS,
    Ledger,
    LedgerHead,
    anchor_path,
    head_path,
    read_ledger,
)

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5
BUDGET = Budget(8.0, DELTA)


def meta(round_number: int, event_id: str) -> EventMetadata:
    return EventMetadata(round_number=round_number, dataset_size=1000, delta=DELTA,
                         clip_norm=1.0, run_id="run-1", event_id=event_id)


def ev(steps: int = 10) -> PoissonSampledGaussianEvent:
    return PoissonSampledGaussianEvent(0.05, 1.0, steps)


def round_(led: Ledger, r: int) -> None:
    led.reserve(ev(10 + r), meta(r, f"ev{r}"))
    led.commit(f"ev{r}")


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(ledger path, anchor dir): a ledger with 2 committed rounds (5 records), anchored."""
    path = tmp_path / "ledgers" / "c.ledger.jsonl"
    anchors = tmp_path / "anchors"
    with Ledger(path, client_id="c", budget=BUDGET, anchor_dir=anchors) as led:
        round_(led, 0)
        round_(led, 1)
    return path, anchors


def open_(path: Path, anchors: Path | None, **kw: Any) -> Ledger:
    return Ledger(path, client_id="c", budget=BUDGET, anchor_dir=anchors, **kw)


def anchor_json(path: Path, anchors: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(anchor_path(path, "c", anchors).read_text())
    return data


def copy_pair(path: Path, dest: Path) -> None:
    dest.mkdir()
    shutil.copy2(path, dest / path.name)
    shutil.copy2(head_path(path), dest / head_path(path).name)


def restore_pair(src: Path, path: Path) -> None:
    shutil.copy2(src / path.name, path)
    shutil.copy2(src / head_path(path).name, head_path(path))


# -- anchors --------------------------------------------------------------------------------
def test_anchor_written_at_creation_and_after_every_append(tmp_path: Path) -> None:
    path, anchors = tmp_path / "l" / "a.ledger.jsonl", tmp_path / "anchors"
    with Ledger(path, client_id="c", anchor_dir=anchors) as led:
        a = anchor_json(path, anchors)
        assert (a["count"], a["last_hash"]) == (1, led.head().last_hash)
        assert a["ledger_id"] == a["last_hash"] and a["client_id"] == "c"
        assert a["ledger_path"] == str(path.resolve())
        led.reserve(ev(), meta(0, "e0"))
        assert anchor_json(path, anchors)["count"] == 2
        led.commit("e0")
        assert anchor_json(path, anchors)["count"] == 3 == led.head().count
        assert anchor_json(path, anchors)["last_hash"] == led.head().last_hash


def test_deleting_ledger_and_head_with_anchor_present_is_refused(
        dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    path.unlink()
    head_path(path).unlink()
    with pytest.raises(LedgerRollbackError, match="anchor records 5 records") as info:
        open_(path, anchors)
    msg = str(info.value)
    assert str(path) in msg and "Training is refused" in msg and "NEWEST" in msg
    assert not path.exists()  # nothing was created
    with pytest.raises(LedgerRollbackError, match="missing but its anchor records 5"):
        read_ledger(path, anchor_dir=anchors, client_id="c")
    # The anchor is left as evidence.
    assert anchor_json(path, anchors)["count"] == 5


def test_recreating_an_empty_ledger_with_anchor_present_is_refused(
        dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    path.unlink()
    head_path(path).unlink()
    path.write_bytes(b"")  # e.g. `touch` after deleting, or a crash of a resetting process
    with pytest.raises(LedgerRollbackError, match="ledger is empty but its anchor records 5"):
        open_(path, anchors)
    assert path.read_bytes() == b""


def test_restarted_ledger_with_anchor_present_is_refused(dirs: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    path, anchors = dirs
    path.unlink()
    head_path(path).unlink()
    with Ledger(path, client_id="c", budget=BUDGET) as led:  # a reset without the anchor dir
        for r in range(3):
            round_(led, r)  # now longer than the anchored ledger, but a different history
    with pytest.raises(LedgerRollbackError, match="header is not the anchored"):
        open_(path, anchors)


def test_restoring_an_older_ledger_and_head_copy_is_refused(dirs: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    path, anchors = dirs
    copy_pair(path, tmp_path / "backup")  # 5 records
    with open_(path, anchors) as led:
        round_(led, 2)  # 7 records
    restore_pair(tmp_path / "backup", path)
    read_ledger(path)  # the restored pair is self-consistent: only the anchor notices
    with pytest.raises(LedgerRollbackError,
                       match="has 5 records but its anchor records 7 .restored from an older"):
        open_(path, anchors)
    with pytest.raises(LedgerRollbackError, match="restored from an older copy"):
        read_ledger(path, anchor_dir=anchors)
    with pytest.raises(LedgerRollbackError, match="restored from an older copy"):
        from fedpeft.privacy.accounting.report import reports_from_path
        reports_from_path(path.parent, anchor_dir=anchors)


def test_restoring_an_older_copy_that_was_continued_is_refused(dirs: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    path, anchors = dirs
    copy_pair(path, tmp_path / "backup")
    with open_(path, anchors) as led:
        round_(led, 2)  # 7 records
    restore_pair(tmp_path / "backup", path)
    with open_(path, None) as led:  # continued without the anchor dir: a forked history
        round_(led, 5)  # 7 records again, another last hash
    with pytest.raises(LedgerRollbackError, match="record 7 of the ledger differs"):
        open_(path, anchors)


def test_anchor_repaired_after_crash_between_head_and_anchor_write(
        dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    afile = anchor_path(path, "c", anchors)
    old_anchor = afile.read_bytes()
    with open_(path, anchors) as led:
        led.reserve(ev(3), meta(7, "crash"))
    afile.write_bytes(old_anchor)  # the crash: head updated, anchor not
    with open_(path, anchors) as led:
        assert any("anchor was one append behind" in n for n in led.notes)
        assert [e.metadata.event_id for e in led.pending()] == ["crash"]  # kept: spent
    assert anchor_json(path, anchors)["count"] == 6


def test_anchor_and_head_repaired_after_crash_right_after_the_append(
        dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    afile = anchor_path(path, "c", anchors)
    old_anchor, old_head = afile.read_bytes(), head_path(path).read_bytes()
    with open_(path, anchors) as led:
        led.reserve(ev(3), meta(7, "crash"))
    afile.write_bytes(old_anchor)
    head_path(path).write_bytes(old_head)
    with open_(path, anchors):
        pass
    assert anchor_json(path, anchors)["count"] == 6
    assert json.loads(head_path(path).read_text())["count"] == 6
    assert read_ledger(path, anchor_dir=anchors).notes == ()


def test_ledger_ahead_of_anchor_by_more_than_one_is_refused(dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    afile = anchor_path(path, "c", anchors)
    old_anchor = afile.read_bytes()
    with open_(path, anchors) as led:
        round_(led, 2)
    afile.write_bytes(old_anchor)  # an anchor restored from an older backup
    with pytest.raises(LedgerRollbackError, match="2 more than its anchor records"):
        open_(path, anchors)
    with pytest.raises(LedgerRollbackError, match="2 more than its anchor"):
        read_ledger(path, anchor_dir=anchors)
    # The documented way out, if the ledger is known to be the newest: move the anchor aside.
    afile.unlink()
    with open_(path, anchors) as led:
        assert any("anchor created" in n for n in led.notes)
    assert anchor_json(path, anchors)["count"] == 7


def test_anchor_of_another_ledger_is_refused(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path, anchors = dirs
    other = tmp_path / "elsewhere" / "c.ledger.jsonl"
    Ledger(other, client_id="c", anchor_dir=anchors).close()
    shutil.copy2(anchor_path(path, "c", anchors), anchor_path(other, "c", anchors))
    with pytest.raises(LedgerRollbackError, match="anchor belongs to client 'c' at"):
        Ledger(other, client_id="c", anchor_dir=anchors)


def test_anchors_keyed_by_path_and_client(tmp_path: Path) -> None:
    anchors = tmp_path / "anchors"
    a, b = tmp_path / "x" / "c.ledger.jsonl", tmp_path / "y" / "c.ledger.jsonl"
    with Ledger(a, client_id="c", anchor_dir=anchors) as la:
        round_(la, 0)
    Ledger(b, client_id="c", anchor_dir=anchors).close()
    assert anchor_path(a, "c", anchors) != anchor_path(b, "c", anchors)
    assert anchor_path(a, "c", anchors) != anchor_path(a, "d", anchors)
    assert anchor_json(a, anchors)["count"] == 3 and anchor_json(b, anchors)["count"] == 1
    assert len(list(anchors.iterdir())) == 2
    Ledger(a, client_id="c", anchor_dir=anchors).close()


def test_missing_anchor_is_created_from_an_existing_ledger(tmp_path: Path) -> None:
    path, anchors = tmp_path / "l" / "c.ledger.jsonl", tmp_path / "anchors"
    with Ledger(path, client_id="c") as led:  # written before anchors existed
        round_(led, 0)
    assert "no anchor" in read_ledger(path, anchor_dir=anchors).notes[-1]
    with Ledger(path, client_id="c", anchor_dir=anchors) as led:
        assert any("anchor created" in n for n in led.notes)
    assert anchor_json(path, anchors)["count"] == 3


def test_unreadable_anchor_is_refused(dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    anchor_path(path, "c", anchors).write_text("{not json")
    with pytest.raises(LedgerCorruptedError, match="anchor .* is unreadable"):
        open_(path, anchors)


def test_anchor_dir_must_not_be_the_ledger_dir(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="anchor_dir=.*ledger's own directory"):
        Ledger(tmp_path / "c.ledger.jsonl", client_id="c", anchor_dir=tmp_path)


def test_without_anchor_dir_a_deleted_ledger_starts_over(tmp_path: Path) -> None:
    # The documented limit for library users without anchors (and for a device owner who
    # deletes the anchor too): only a coordinator receipt notices, see the receipt tests.
    path = tmp_path / "c.ledger.jsonl"
    with Ledger(path, client_id="c") as led:
        round_(led, 0)
    path.unlink()
    head_path(path).unlink()
    with Ledger(path, client_id="c") as led:
        assert led.entries() == ()


# -- creation and the lock on the ledger's own inode ----------------------------------------
def test_empty_ledger_without_head_counts_as_new(tmp_path: Path) -> None:
    path, anchors = tmp_path / "l" / "c.ledger.jsonl", tmp_path / "anchors"
    path.parent.mkdir()
    path.write_bytes(b"")  # crash right after O_EXCL creation
    with pytest.raises(LedgerError, match="has no records yet"):
        read_ledger(path)
    ino = path.stat().st_ino
    with Ledger(path, client_id="c", anchor_dir=anchors) as led:
        round_(led, 0)
    assert path.stat().st_ino == ino  # the header was appended in place
    assert len(read_ledger(path, anchor_dir=anchors).entries) == 1


def test_torn_header_without_head_counts_as_new(tmp_path: Path) -> None:
    path = tmp_path / "c.ledger.jsonl"
    path.write_bytes(b'{"budget_delta":1e-05,"budget_epsilon":8.0,"client_')
    with Ledger(path, client_id="c") as led:
        assert led.head().count == 1
    assert read_ledger(path).client_id == "c"


def test_empty_ledger_with_create_false_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.ledger.jsonl"
    with pytest.raises(LedgerError, match="create=False"):
        Ledger(path, client_id="c", create=False)
    path.write_bytes(b"")
    with pytest.raises(LedgerError, match="no records yet"):
        Ledger(path, client_id="c", create=False)


def test_torn_tail_is_truncated_in_place(dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    good, ino = path.read_bytes(), path.stat().st_ino
    with path.open("ab") as f:
        f.write(b'{"clip_norm":1.0,"dataset_size":1000,"delta":1e-05,"ev')
    with open_(path, anchors) as led:
        assert path.read_bytes() == good and path.stat().st_ino == ino
        round_(led, 2)
    assert len(read_ledger(path, anchor_dir=anchors).entries) == 3


@pytest.mark.parametrize("side", [".lock", ".head", "anchor", "all"])
def test_deleting_side_files_does_not_let_a_second_writer_in(
        dirs: tuple[Path, Path], side: str) -> None:
    path, anchors = dirs
    legacy_lock = path.with_name(path.name + ".lock")
    legacy_lock.write_bytes(b"")  # left over from an older version: tolerated, not used
    with open_(path, anchors) as led:
        if side in (".lock", "all"):
            legacy_lock.unlink()
        if side in (".head", "all"):
            head_path(path).unlink()
        if side in ("anchor", "all"):
            anchor_path(path, "c", anchors).unlink()
        for anchor_dir in (anchors, None):
            with pytest.raises(LedgerLockedError, match="locked by another writer"):
                open_(path, anchor_dir)
        round_(led, 2)  # the holder goes on writing (and rewrites the side files)
    assert len(read_ledger(path, anchor_dir=anchors).entries) == 3


def test_legacy_lock_file_held_by_an_old_process_is_ignored(dirs: tuple[Path, Path]) -> None:
    import fcntl

    path, anchors = dirs
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        open_(path, anchors).close()
    finally:
        os.close(fd)


def test_side_file_deleted_while_locked_second_writer_locked_out_across_processes(
        dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from fedpeft.privacy.accounting.ledger import Ledger
        from fedpeft.privacy.accounting.errors import LedgerLockedError
        try:
            Ledger({str(path)!r}, client_id="c", anchor_dir={str(anchors)!r})
        except LedgerLockedError:
            print("LOCKED")
        else:
            print("ACQUIRED")
    """)
    with open_(path, anchors):
        head_path(path).unlink()
        anchor_path(path, "c", anchors).unlink()
        held = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, check=True)
    assert held.stdout.strip() == "LOCKED", held.stderr


def test_ledger_replaced_under_a_writer_refuses_its_next_append(
        dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path, anchors = dirs
    copy = tmp_path / "copy.ledger.jsonl"
    with open_(path, anchors) as led:
        shutil.copy2(path, copy)
        os.replace(copy, path)  # a new inode at the path; the writer's lock is on the old one
        with pytest.raises(LedgerCorruptedError, match="deleted or replaced while this writer"):
            led.reserve(ev(), meta(9, "orphan"))
        with pytest.raises(LedgerError, match="closed"):
            led.commit("ev0")
    assert "orphan" not in path.read_text()


def test_inode_replaced_between_open_and_lock_is_retried(
        dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    path, anchors = dirs
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock_after_replace(fd: int, op: int) -> None:
        if not calls and op & fcntl.LOCK_EX:
            # Another party swaps the file in after we opened it, before we lock it.
            copy = tmp_path / "swap.ledger.jsonl"
            shutil.copy2(path, copy)
            os.replace(copy, path)
        calls.append(fd)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_replace)
    with open_(path, anchors) as led:
        round_(led, 2)
    monkeypatch.undo()
    ex_calls = len(calls)
    assert ex_calls >= 3  # first lock (stale inode), retry lock, unlock
    assert len(read_ledger(path, anchor_dir=anchors).entries) == 3


def test_inode_that_keeps_changing_gives_up_with_locked_error(
        dirs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    path, anchors = dirs
    real_flock = fcntl.flock

    def always_replace(fd: int, op: int) -> None:
        if op & fcntl.LOCK_EX:
            copy = tmp_path / "swap.ledger.jsonl"
            shutil.copy2(path, copy)
            os.replace(copy, path)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", always_replace)
    with pytest.raises(LedgerLockedError, match="kept being replaced"):
        open_(path, anchors)


def test_concurrent_creation_makes_exactly_one_ledger(tmp_path: Path) -> None:
    path, anchors = tmp_path / "l" / "c.ledger.jsonl", tmp_path / "anchors"
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def create() -> None:
        barrier.wait()
        try:
            with Ledger(path, client_id="c", budget=BUDGET, anchor_dir=anchors):
                outcomes.append("opened")
        except LedgerLockedError:
            outcomes.append("locked")
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcomes.append(repr(exc))

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(outcomes) <= {"opened", "locked"} and "opened" in outcomes, outcomes
    assert len(path.read_bytes().splitlines()) == 1  # one header
    snap = read_ledger(path, anchor_dir=anchors)
    assert snap.head.count == 1 and snap.notes == ()


# -- receipts --------------------------------------------------------------------------------
def test_receipt_round_trip_and_verify_ok(dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    with open_(path, anchors) as led:
        first = led.head()
        assert first.count == 5
        wire = first.as_wire()
        assert wire == f"5:{first.last_hash}" and LedgerHead.parse(wire) == first
        spent = led.spent_events()
        led.verify_receipt(LedgerHead.parse(wire))
        assert led.spent_events() == spent  # a receipt never changes accounting
        round_(led, 2)
        led.verify_receipt(first)  # an older receipt is contained in the ledger
        led.verify_receipt(led.head())
    assert read_ledger(path).head == led.head()


def test_future_receipt_is_refused(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path, anchors = dirs
    copy_pair(path, tmp_path / "backup")
    with open_(path, anchors) as led:
        round_(led, 2)
        receipt = led.head()  # what the coordinator acknowledged
    restore_pair(tmp_path / "backup", path)
    anchor_path(path, "c", anchors).unlink()  # the device owner removed the anchor too
    with open_(path, anchors) as led:  # the anchor cannot tell any more...
        with pytest.raises(LedgerRollbackError, match="receipt for record 7 but the ledger "
                                                      "has only 5"):
            led.verify_receipt(receipt)  # ...the receipt can


def test_forked_receipt_is_refused(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    path, anchors = dirs
    with open_(path, anchors) as led:
        receipt = led.head()
    # Everything deleted (anchor too), a fresh ledger run up to the same length.
    path.unlink()
    head_path(path).unlink()
    anchor_path(path, "c", anchors).unlink()
    with open_(path, anchors) as led:
        round_(led, 0)
        round_(led, 1)
        assert led.head().count == receipt.count
        with pytest.raises(LedgerRollbackError, match="record 5 of the ledger differs"):
            led.verify_receipt(receipt)
        with pytest.raises(LedgerRollbackError, match="differs"):
            led.verify_receipt(LedgerHead(1, receipt.last_hash))


@pytest.mark.parametrize("bad", [
    "", "5", "5:", ":" + "a" * 64, "0:" + "a" * 64, "-5:" + "a" * 64, "+5:" + "a" * 64,
    "05:" + "a" * 64, "5:" + "a" * 63, "5:" + "a" * 65, "5:" + "A" * 64, "5:" + "g" * 64,
    " 5:" + "a" * 64, "5:" + "a" * 64 + "\n", "5 :" + "a" * 64, "1" * 19 + ":" + "a" * 64,
    "\u0665:" + "a" * 64, "5:" + "a" * 64 + ":1", "9" * 200, "5:" + "a" * 10_000,
])
def test_malformed_receipt_strings_raise_a_typed_error(bad: str) -> None:
    with pytest.raises(LedgerReceiptError):
        LedgerHead.parse(bad)


def test_receipt_parse_bounds_and_types() -> None:
    with pytest.raises(LedgerReceiptError, match=f"at most {RECEIPT_MAX_CHARS}"):
        LedgerHead.parse("7:" + "a" * 1_000_000)
    for value in (None, 7, b"7:" + b"a" * 64):
        with pytest.raises(LedgerReceiptError, match="must be a string"):
            LedgerHead.parse(value)  # type: ignore[arg-type]
    with pytest.raises(LedgerReceiptError, match="count=0"):
        LedgerHead(0, "a" * 64)
    with pytest.raises(LedgerReceiptError, match="count=True"):
        LedgerHead(True, "a" * 64)
    with pytest.raises(LedgerReceiptError, match="last_hash"):
        LedgerHead(1, "xyz")
    assert LedgerHead.parse("1" * 18 + ":" + "a" * 64).count == int("1" * 18)


def test_verify_receipt_rejects_non_heads(dirs: tuple[Path, Path]) -> None:
    path, anchors = dirs
    with open_(path, anchors) as led:
        with pytest.raises(LedgerReceiptError, match="must be a LedgerHead"):
            led.verify_receipt(led.head().as_wire())  # type: ignore[arg-type]
