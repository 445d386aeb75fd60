"""Append-only, hash-chained, crash-safe privacy ledger of mechanism events (one per client).

File ``<name>.ledger.jsonl``: one canonical JSON object per line (sorted keys, no spaces,
ASCII). Line 1 is a header (client id, budget); then ``reserve`` records (the event and its
metadata, written and fsynced *before* training) and ``commit`` records (after training).
Every record carries ``seq``, ``prev`` (hash of the previous record) and
``hash = sha256(prev + canonical_json(record without "hash"))``: editing, deleting,
reordering or inserting any line breaks the chain.

A sidecar ``<ledger>.head`` (replaced atomically after every append) holds the record count
and last hash, so truncating whole lines at the end is detected too. A torn final line
(crash mid-append) is proven never acknowledged when the head does not count it; only then
is it dropped (with a logged warning) -- otherwise loading raises
:class:`LedgerCorruptedError` and training is refused. Never reset a ledger to "fix" it.

Accounting rules: a reserved event without commit counts as SPENT (the noisy update may have
been released); commit is idempotent by event id; reserving an existing id is an error.
Epsilon is always recomputed from events; a cached epsilon in a commit record is labelled
display-only and never read back as truth.

Integrity here protects against crashes, disk faults and careless edits; it is not a MAC:
someone who can rewrite both files consistently can forge a history (the data owner's device
is trusted to protect its own data).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from privacy.accounting.budget import Budget, BudgetDecision, require_round
from privacy.accounting.errors import (
    EventValidationError,
    LedgerCorruptedError,
    LedgerError,
    LedgerLockedError,
)
from privacy.accounting.events import (
    EventMetadata,
    PoissonSampledGaussianEvent,
    utc_now,
    validate_identifier,
)

LOGGER = logging.getLogger(__name__)

LEDGER_SUFFIX = ".ledger.jsonl"
FORMAT_NAME = "fedpeft-privacy-ledger"
FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
CACHED_EPSILON_KEY = "cached_epsilon_display_only"
_READ_ATTEMPTS = 3

EntryStatus = Literal["pending", "committed"]

_HEADER_KEYS = frozenset({"kind", "seq", "prev", "hash", "format", "version", "client_id",
                          "created", "budget_epsilon", "budget_delta"})
_RESERVE_KEYS = frozenset({"kind", "seq", "prev", "hash", "event_id", "sample_rate",
                           "noise_multiplier", "steps", "round_number", "dataset_size", "delta",
                           "clip_norm", "run_id", "timestamp"})
_COMMIT_KEYS = frozenset({"kind", "seq", "prev", "hash", "event_id", "timestamp",
                          CACHED_EPSILON_KEY})


def canonical_json(record: dict[str, Any]) -> str:
    """Canonical JSON used for hashing and storage (sorted keys, compact, ASCII, no NaN)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def record_hash(prev: str, body: dict[str, Any]) -> str:
    """sha256(prev || canonical_json(body)) as hex; ``body`` excludes the ``hash`` key."""
    return hashlib.sha256((prev + canonical_json(body)).encode("ascii")).hexdigest()


def head_path(path: Path) -> Path:
    """Path of the sidecar head file of ledger ``path``."""
    return path.with_name(path.name + ".head")


def lock_path(path: Path) -> Path:
    """Path of the advisory writer lock file of ledger ``path``."""
    return path.with_name(path.name + ".lock")


@dataclass(frozen=True)
class LedgerEntry:
    """One reserved event with its metadata and status (pending counts as spent)."""

    event: PoissonSampledGaussianEvent
    metadata: EventMetadata
    status: EntryStatus
    cached_epsilon_display_only: float | None = None


@dataclass(frozen=True)
class LedgerSnapshot:
    """A verified, read-only view of a ledger file."""

    path: Path
    client_id: str
    created: str
    budget: Budget | None
    entries: tuple[LedgerEntry, ...]
    notes: tuple[str, ...]

    def spent_events(self) -> tuple[PoissonSampledGaussianEvent, ...]:
        """Every reserved event, committed or pending (pending counts as spent)."""
        return tuple(e.event for e in self.entries)


@dataclass
class _Parsed:
    records: list[dict[str, Any]]
    line_ends: list[int]  # byte offset just after each complete line
    torn_tail: bool
    head_stale: bool


class _Corrupt(Exception):
    def __init__(self, line: int | None, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


def _corrupted(path: Path, line: int | None, reason: str) -> LedgerCorruptedError:
    where = f" at line {line}" if line is not None else ""
    return LedgerCorruptedError(
        f"privacy ledger {str(path)!r} is corrupted{where}: {reason}. Training is refused "
        "because the privacy already spent cannot be established. Restore the ledger (and "
        "its .head file) from a backup or investigate; do not delete or edit it to reset "
        "the budget."
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _parse_line(raw: bytes, line: int) -> dict[str, Any]:
    try:
        text = raw.decode("ascii")
        obj = json.loads(text, object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Corrupt(line, f"not a valid JSON record ({exc})") from None
    if not isinstance(obj, dict):
        raise _Corrupt(line, "record is not a JSON object")
    if canonical_json(obj) != text:
        raise _Corrupt(line, "record is not in canonical form (the line was edited)")
    return obj


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


def _check_chain(records: list[dict[str, Any]]) -> None:
    prev = GENESIS_HASH
    for i, rec in enumerate(records):
        line = i + 1
        if rec.get("seq") != i or not _is_int(rec.get("seq")):
            raise _Corrupt(line, f"seq={rec.get('seq')!r}, expected {i} (lines deleted, "
                                 "inserted or reordered)")
        if rec.get("prev") != prev:
            raise _Corrupt(line, "hash chain broken: prev does not match the previous record "
                                 "(lines deleted, inserted or reordered)")
        body = {k: v for k, v in rec.items() if k != "hash"}
        if rec.get("hash") != record_hash(prev, body):
            raise _Corrupt(line, "record hash mismatch (the record was edited)")
        prev = rec["hash"]


def _entry_from_reserve(rec: dict[str, Any], line: int) -> LedgerEntry:
    if set(rec) != _RESERVE_KEYS:
        raise _Corrupt(line, f"reserve record has keys {sorted(rec)}")
    if not (_is_num(rec["sample_rate"]) and _is_num(rec["noise_multiplier"])
            and _is_int(rec["steps"]) and _is_int(rec["round_number"])
            and _is_int(rec["dataset_size"]) and _is_num(rec["delta"])
            and _is_num(rec["clip_norm"])):
        raise _Corrupt(line, "reserve record has fields of the wrong type")
    try:
        event = PoissonSampledGaussianEvent(float(rec["sample_rate"]),
                                            float(rec["noise_multiplier"]), rec["steps"])
        meta = EventMetadata(round_number=rec["round_number"],
                             dataset_size=rec["dataset_size"], delta=float(rec["delta"]),
                             clip_norm=float(rec["clip_norm"]), run_id=rec["run_id"],
                             event_id=rec["event_id"], timestamp=rec["timestamp"])
    except EventValidationError as exc:
        raise _Corrupt(line, f"invalid event: {exc}") from None
    return LedgerEntry(event, meta, "pending")


def _interpret(records: list[dict[str, Any]]) -> tuple[dict[str, Any], list[LedgerEntry]]:
    if not records:
        raise _Corrupt(1, "the ledger has no header record")
    header = records[0]
    if header.get("kind") != "header" or set(header) != _HEADER_KEYS:
        raise _Corrupt(1, "first record is not a valid header")
    if header["format"] != FORMAT_NAME or header["version"] != FORMAT_VERSION:
        raise _Corrupt(1, f"unsupported format {header['format']!r} v{header['version']!r}")
    entries: dict[str, LedgerEntry] = {}
    for i, rec in enumerate(records[1:], start=2):
        kind = rec.get("kind")
        if kind == "reserve":
            entry = _entry_from_reserve(rec, i)
            if entry.metadata.event_id in entries:
                raise _Corrupt(i, f"event_id={entry.metadata.event_id!r} reserved twice")
            entries[entry.metadata.event_id] = entry
        elif kind == "commit":
            if set(rec) != _COMMIT_KEYS:
                raise _Corrupt(i, f"commit record has keys {sorted(rec)}")
            eid = rec["event_id"]
            old = entries.get(eid) if isinstance(eid, str) else None
            if old is None:
                raise _Corrupt(i, f"commit of event_id={eid!r} that was never reserved")
            if old.status == "committed":
                raise _Corrupt(i, f"event_id={eid!r} committed twice")
            cached = rec[CACHED_EPSILON_KEY]
            if cached is not None and not _is_num(cached):
                raise _Corrupt(i, f"{CACHED_EPSILON_KEY}={cached!r} is not a number")
            entries[eid] = LedgerEntry(old.event, old.metadata, "committed",
                                       None if cached is None else float(cached))
        else:
            raise _Corrupt(i, f"unknown record kind {kind!r}")
    return header, list(entries.values())


def _read_head(path: Path) -> tuple[int, str] | None:
    hp = head_path(path)
    try:
        raw = hp.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw.decode("ascii"))
        count, last = obj["count"], obj["last_hash"]
        if not _is_int(count) or not isinstance(last, str) or set(obj) != {"count",
                                                                          "last_hash"}:
            raise ValueError("bad fields")
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise _corrupted(path, None, f"head file {str(hp)!r} is unreadable ({exc})") from None
    return count, last


def _plausible_torn(tail: bytes) -> bool:
    return tail.startswith(b'{"') and all(0x20 <= b < 0x7F for b in tail)


def _parse_file(path: Path, data: bytes, head: tuple[int, str] | None) -> _Parsed:
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline
    records: list[dict[str, Any]] = []
    line_ends: list[int] = []
    offset = 0
    try:
        for i, raw in enumerate(pieces, start=1):
            offset += len(raw) + 1
            records.append(_parse_line(raw, i))
            line_ends.append(offset)
        _check_chain(records)
    except _Corrupt as exc:
        raise _corrupted(path, exc.line, exc.reason) from None
    n = len(records)
    head_stale = False
    if head is None:
        if not (n == 1 and not tail):
            raise _corrupted(path, None, f"the head file {str(head_path(path))!r} is missing")
        head_stale = True  # crash between creating the ledger and writing its head
    else:
        count, last = head
        if n == count and count >= 1 and records[-1]["hash"] == last:
            pass
        elif n == count + 1 and count >= 1 and records[count - 1]["hash"] == last and not tail:
            head_stale = True  # crash after an append, before the head update: keep it
        else:
            raise _corrupted(
                path, n + 1 if n < count else None,
                f"the file has {n} complete records but its head file records {count} "
                "ending in a different hash (records truncated, removed or replaced)")
    torn = bool(tail)
    if torn:
        if head_stale or not _plausible_torn(tail):
            raise _corrupted(path, n + 1, "unexpected bytes after the last complete record "
                                          "(garbage appended)")
        LOGGER.warning("privacy ledger %s: dropping a torn final line (%d bytes) from an "
                       "interrupted write that was never acknowledged (not counted in the "
                       "head file)", path, len(tail))
    return _Parsed(records, line_ends, torn, head_stale)


def _read_consistent(path: Path) -> _Parsed:
    # The head is read before the file: a writer appends to the file first, so a concurrent
    # reader sees at least as many records as the head counts. If a writer appended more
    # than once in between, re-read a few times before declaring corruption.
    attempt = 0
    while True:
        attempt += 1
        head = _read_head(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if head is not None or head_path(path).exists():
                raise _corrupted(path, None, "the ledger file is missing but its head file "
                                             "exists (the ledger was deleted)") from None
            raise LedgerError(f"privacy ledger path={str(path)!r} does not exist; pass a "
                              f"ledger file ending in {LEDGER_SUFFIX!r}.") from None
        try:
            return _parse_file(path, data, head)
        except LedgerCorruptedError:
            if attempt >= _READ_ATTEMPTS:
                raise
            time.sleep(0.05)


def _load(path: Path) -> tuple[_Parsed, LedgerSnapshot]:
    parsed = _read_consistent(path)
    try:
        header, entries = _interpret(parsed.records)
    except _Corrupt as exc:
        raise _corrupted(path, exc.line, exc.reason) from None
    budget = None
    if header["budget_epsilon"] is not None or header["budget_delta"] is not None:
        try:
            budget = Budget(header["budget_epsilon"], header["budget_delta"])
        except EventValidationError as exc:
            raise _corrupted(path, 1, f"invalid budget in header ({exc})") from None
    notes: list[str] = []
    if parsed.torn_tail:
        notes.append("dropped a torn, never-acknowledged final line")
    if parsed.head_stale:
        notes.append("head file was one append behind (interrupted write); repaired on open")
    snap = LedgerSnapshot(path, str(header["client_id"]), str(header["created"]), budget,
                          tuple(entries), tuple(notes))
    return parsed, snap


def read_ledger(path: str | os.PathLike[str]) -> LedgerSnapshot:
    """Load and verify a ledger without locking or modifying it (for reports).

    Raises :class:`LedgerCorruptedError` if any integrity check fails.
    """
    return _load(Path(path))[1]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Ledger:
    """Writer handle on a client's ledger; holds an exclusive ``flock`` until closed.

    Use as a context manager. ``budget`` is stored in the header when the ledger is created;
    reopening with a different budget is refused.
    """

    def __init__(self, path: str | os.PathLike[str], *, client_id: str,
                 budget: Budget | None = None, create: bool = True) -> None:
        self.path = Path(path)
        if not self.path.name.endswith(LEDGER_SUFFIX):
            raise LedgerError(f"path={str(self.path)!r} must end with {LEDGER_SUFFIX!r} so "
                              "reports can find it.")
        validate_identifier(client_id, name="client_id")
        self._lock_fd: int | None = None
        self._acquire_lock()
        try:
            self._open(client_id, budget, create)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LedgerLockedError(
                f"privacy ledger {str(self.path)!r} is locked by another writer (lock file "
                f"{str(lock_path(self.path))!r}); run one client process per ledger."
            ) from None
        self._lock_fd = fd

    def _open(self, client_id: str, budget: Budget | None, create: bool) -> None:
        if not self.path.exists() and not head_path(self.path).exists():
            if not create:
                raise LedgerError(f"privacy ledger path={str(self.path)!r} does not exist "
                                  "and create=False.")
            self._create(client_id, budget)
        parsed, snap = _load(self.path)
        if snap.client_id != client_id:
            raise LedgerError(f"client_id={client_id!r} does not match the ledger's client "
                              f"{snap.client_id!r} in {str(self.path)!r}.")
        if budget is not None and snap.budget != budget:
            raise LedgerError(f"budget={budget!r} differs from the budget {snap.budget!r} "
                              f"recorded in {str(self.path)!r}; budgets are fixed when a "
                              "ledger is created.")
        if parsed.torn_tail:
            os.truncate(self.path, parsed.line_ends[-1])
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self._records = parsed.records
        if parsed.head_stale or parsed.torn_tail:
            self._write_head()
        self._snapshot = snap
        self._entries: dict[str, LedgerEntry] = {e.metadata.event_id: e for e in snap.entries}

    def _create(self, client_id: str, budget: Budget | None) -> None:
        body: dict[str, Any] = {
            "kind": "header", "seq": 0, "prev": GENESIS_HASH, "format": FORMAT_NAME,
            "version": FORMAT_VERSION, "client_id": client_id, "created": utc_now(),
            "budget_epsilon": None if budget is None else budget.epsilon_max,
            "budget_delta": None if budget is None else budget.delta,
        }
        record = dict(body, hash=record_hash(GENESIS_HASH, body))
        _atomic_write(self.path, (canonical_json(record) + "\n").encode("ascii"))
        self._records = [record]
        self._write_head()

    def close(self) -> None:
        """Release the writer lock (idempotent)."""
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------
    def _require_open(self) -> None:
        if self._lock_fd is None:
            raise LedgerError(f"privacy ledger {str(self.path)!r} is closed; open a new "
                              "Ledger to write.")

    def _write_head(self) -> None:
        head = {"count": len(self._records), "last_hash": self._records[-1]["hash"]}
        _atomic_write(head_path(self.path), (canonical_json(head) + "\n").encode("ascii"))

    def _append(self, body: dict[str, Any]) -> None:
        prev = self._records[-1]["hash"]
        body = dict(body, seq=len(self._records), prev=prev)
        record = dict(body, hash=record_hash(prev, body))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            _write_all(fd, (canonical_json(record) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._records.append(record)
        self._write_head()

    def reserve(self, event: PoissonSampledGaussianEvent, metadata: EventMetadata) -> LedgerEntry:
        """Durably record ``event`` as PENDING (spent) before training; returns the entry.

        Train only after this returns. Raises :class:`LedgerError` if the id exists.
        """
        self._require_open()
        if not isinstance(event, PoissonSampledGaussianEvent):
            raise EventValidationError(f"event={event!r} must be a PoissonSampledGaussianEvent.")
        if not isinstance(metadata, EventMetadata):
            raise EventValidationError(f"metadata={metadata!r} must be an EventMetadata.")
        if metadata.event_id in self._entries:
            raise LedgerError(f"event_id={metadata.event_id!r} is already reserved in "
                              f"{str(self.path)!r}; use a fresh event id per round.")
        self._append({
            "kind": "reserve", "event_id": metadata.event_id,
            "sample_rate": event.sample_rate, "noise_multiplier": event.noise_multiplier,
            "steps": event.steps, "round_number": metadata.round_number,
            "dataset_size": metadata.dataset_size, "delta": metadata.delta,
            "clip_norm": metadata.clip_norm, "run_id": metadata.run_id,
            "timestamp": metadata.timestamp,
        })
        entry = LedgerEntry(event, metadata, "pending")
        self._entries[metadata.event_id] = entry
        return entry

    def reserve_within_budget(self, event: PoissonSampledGaussianEvent,
                              metadata: EventMetadata, budget: Budget | None = None,
                              accountant: str = "prv") -> BudgetDecision:
        """Check the budget (the header's unless given) and reserve only if allowed.

        Raises :class:`BudgetExhaustedError` (nothing written) if the round would exceed it.
        """
        use = budget if budget is not None else self._snapshot.budget
        if use is None:
            raise LedgerError(f"privacy ledger {str(self.path)!r} has no budget; pass "
                              "budget= or create the ledger with one.")
        decision = require_round(self.spent_events(), event, use, accountant)
        self.reserve(event, metadata)
        return decision

    def commit(self, event_id: str, *, cached_epsilon_display_only: float | None = None) -> bool:
        """Mark a reserved event as committed. Idempotent: returns False if already committed.

        ``cached_epsilon_display_only`` is stored for display and never used for accounting.
        """
        self._require_open()
        entry = self._entries.get(event_id)
        if entry is None:
            raise LedgerError(f"event_id={event_id!r} was never reserved in "
                              f"{str(self.path)!r}; reserve it before training.")
        if entry.status == "committed":
            return False
        if cached_epsilon_display_only is not None and not _is_num(cached_epsilon_display_only):
            raise EventValidationError(f"cached_epsilon_display_only="
                                       f"{cached_epsilon_display_only!r} must be finite.")
        cached = None if cached_epsilon_display_only is None else float(
            cached_epsilon_display_only)
        self._append({"kind": "commit", "event_id": event_id, "timestamp": utc_now(),
                      CACHED_EPSILON_KEY: cached})
        self._entries[event_id] = LedgerEntry(entry.event, entry.metadata, "committed", cached)
        return True

    # -- reading ---------------------------------------------------------------------------
    @property
    def client_id(self) -> str:
        """Client id from the header."""
        return self._snapshot.client_id

    @property
    def budget(self) -> Budget | None:
        """Budget from the header (None if the ledger was created without one)."""
        return self._snapshot.budget

    @property
    def notes(self) -> tuple[str, ...]:
        """Recovery actions taken when the ledger was opened."""
        return self._snapshot.notes

    def entries(self) -> tuple[LedgerEntry, ...]:
        """All reserved events in reserve order, with their status."""
        return tuple(self._entries.values())

    def pending(self) -> tuple[LedgerEntry, ...]:
        """Reserved but uncommitted events (counted as spent)."""
        return tuple(e for e in self._entries.values() if e.status == "pending")

    def spent_events(self) -> tuple[PoissonSampledGaussianEvent, ...]:
        """Every reserved event, committed or pending: what the accountant composes."""
        return tuple(e.event for e in self._entries.values())

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries())
