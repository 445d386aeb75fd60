"""Append-only, hash-chained, crash-safe privacy ledger of mechanism events (one per client;
the coordinator keeps a user-level one of its releases).

Format
------
File ``<name>.ledger.jsonl``: one canonical JSON object per line (sorted keys, no spaces,
ASCII). Line 1 is a header (format, version, client id, budget); then ``reserve`` records
(the event and its metadata, written and fsynced *before* training) and ``commit`` records
(after training). Every record carries ``seq``, ``prev`` (hash of the previous record) and
``hash = sha256(prev + canonical_json(record without "hash"))``: editing, deleting,
reordering or inserting any line breaks the chain.

Version 2 (:data:`FORMAT_VERSION`) reserve records also carry ``adjacency``
(``"add_remove"`` | ``"replace_one"``: the neighbouring relation the event's guarantee holds
for) and ``sampling`` (``"csprng"`` | ``"seeded"``: whether the client's Poisson batches came
from an OS-keyed CSPRNG or were reproducible from a seed). Version 1 files are still read,
and their reserve records are read as what really happened when they were written:
adjacency ``"replace_one"`` (every v1 client released its dataset size n, so only the
replace-one guarantee holds) and sampling ``"seeded"`` (v1 batch sampling was derived from
the public run seed, so those rounds are not private against the coordinator). A v1 ledger
opened by this code is continued, never rewritten: new reserve records are appended in the
v2 form (after the first one, v1-form reserve records are refused).

Version 3 (:data:`FORMAT_VERSION`) headers carry ``level`` (:data:`LedgerLevel`, below);
v1 and v2 headers are read as level ``"record"`` and such ledgers are continued as they are.

Levels
------
A ``"record"`` ledger (a client's, on its device) holds that client's DP-SGD events:
``reserve`` and ``commit`` records. A ``"user"`` ledger (the coordinator's) holds one
*release* per round of user-level DP, the distributed discrete Gaussian under secure
aggregation (Kairouz, Liu and Steinke, ICML 2021; :mod:`.ddg`): a ``release`` record (the
:class:`~fedpeft.privacy.accounting.ddg.DistributedDiscreteGaussianEvent` of the noisy sum
actually released, and the sorted client ids of the users whose updates are in it), written
and fsynced before the sum may be unmasked; a ``commit`` record once it was; and ``abort``
records (a round that released nothing, and why; they spend nothing). A user's epsilon is the
composition of the releases that include the user (:func:`user_epsilons`). Each level's
records in a ledger of the other level are corruption, and each level's methods refuse on the
other level. Everything else below (hash chain, head, anchors, lock, receipts) is the same.

Accounting rules: a reserved event (or release) without commit counts as SPENT (the noisy
update may have been released); commit is idempotent by event id; reserving an existing id
is an error. Epsilon is always recomputed from events; a cached epsilon in a commit record is labelled
display-only and never read back as truth. A ledger composes under ``"replace_one"`` if any
of its events is replace-one, else ``"add_remove"`` (:attr:`LedgerSnapshot.adjacency`): the
more conservative relation wins, never the optimistic one.

Crash safety
------------
A sidecar ``<ledger>.head`` (replaced atomically after every append) holds the record count
and last hash, so truncating whole lines at the end is detected too. A torn final line
(crash mid-append) is proven never acknowledged when the head does not count it; only then
is it truncated away in place (with a logged warning) -- otherwise loading raises
:class:`LedgerCorruptedError` and training is refused. A complete record the head does not
count yet (crash between append and head update) is kept. An empty ledger file without a
head and without an anchor (crash right after creating the file) counts as new. Never reset
a ledger to "fix" it.

Writer lock
-----------
A :class:`Ledger` holds an exclusive ``fcntl.flock`` on the ledger file's own inode (the
open file description it appends through), not on a side file, so deleting any side file
(``.head``, an anchor, or the ``.lock`` file older versions used, which is now ignored)
cannot let a second writer in. The file is never replaced after creation: it is created
with ``O_CREAT | O_EXCL`` (or an existing one is opened), locked, and only then is the
header appended and fsynced; after locking, the writer checks that the path still names the
locked inode (``os.fstat`` vs ``os.stat``) and retries otherwise (a racing creator, or a file
unlinked or replaced in between), giving up with :class:`LedgerLockedError`. Every append
re-checks this, before and after writing, and refuses if the ledger was deleted or replaced
under the writer. Two processes creating the ledger at once: exactly one creates the file
(``O_EXCL``), the other opens it; whichever locks first writes the header, the other gets
:class:`LedgerLockedError` or, after the first closed, opens the finished ledger. flock is
advisory: it excludes writers that use this class, not other programs. Processes of older
versions locked only the ``.lock`` file; do not run them against the same ledger.

Anchors (rollback and reset detection on the device)
----------------------------------------------------
With ``anchor_dir`` (the client always passes one; ``None`` keeps the anchor-less behaviour
for library users), an anchor file in that separate directory records the ledger's
``(count, last_hash)``, the hash of its header (which ledger this is), the client id and the
resolved ledger path. It is written atomically (tmp + fsync + replace + directory fsync)
after the head, at creation and after every append. Its file name is keyed by
``sha256(resolved ledger path, client id)`` (:func:`anchor_path`), so two ledgers in
different directories with the same client id do not collide. On open:

* anchor present, ledger missing or empty (both ledger and head deleted): refused with
  :class:`LedgerRollbackError` (it would otherwise restart at epsilon 0);
* the ledger has fewer records than the anchor, its record ``count - 1`` has another hash,
  or its header is not the anchored one: refused ("restored from an older copy" or a
  different ledger);
* the ledger is ahead by exactly one record: the crash window between the head and the
  anchor write (or between the append and the head), repaired;
* ahead by more than one: refused as well. No crash explains it (the anchor is rewritten
  after every single append), so the anchor itself was restored from an older backup, or
  the ledger was written by a process not given this anchor directory. Either way the
  anchor can no longer vouch that this ledger is the newest copy, and a restore of the
  ledger directory and the anchor directory from backups taken at different times (the
  honest way to roll a ledger back by mistake) looks exactly like this; failing closed is
  the only choice that never forgets spending. If you know the ledger is the newest, move
  the anchor aside: a missing anchor is re-created from the ledger (with a warning).

:func:`read_ledger` with ``anchor_dir`` makes the same checks without repairing anything.
An anchor can only refuse; it never enters accounting.

Receipts (rollback and reset detection by the coordinator)
----------------------------------------------------------
:meth:`Ledger.head` returns a :class:`LedgerHead` ``(count, last_hash)``, sent to the
coordinator as ``"<count>:<hash>"`` (:meth:`LedgerHead.as_wire`). The coordinator keeps the
last one each client reported and sends it back the next round; the client parses it with
:meth:`LedgerHead.parse` and calls :meth:`Ledger.verify_receipt` before reserving:
:class:`LedgerRollbackError` if the ledger does not contain that record. A receipt is never
trusted for accounting: it can only cause a refusal, never lower or raise epsilon.

Limits
------
Integrity here protects against crashes, disk faults, careless edits and honest mistakes
(deleting the ledger, restoring an old copy); it is not a MAC, and the device owner can
still forge with enough effort: someone who deletes the ledger, its head and its anchor
starts a fresh ledger the device cannot tell apart from a new client (only a coordinator
receipt catches it, from the next round on, if the coordinator still holds one for that
client); someone who restores a consistent older copy of the ledger, head *and* anchor
defeats the anchor (again only a receipt catches it); someone who rewrites all files
consistently, or answers the coordinator with a forged head, defeats both. Anchors and
receipts detect accidental and casual rollback and reset; they do not make the device's
ledger tamper-proof against its owner (the data owner's device is trusted to protect its
own data).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from fedpeft.privacy.accounting.budget import Budget, BudgetDecision, require_round
from fedpeft.privacy.accounting.errors import (
    BudgetExhaustedError,
    EventValidationError,
    LedgerCorruptedError,
    LedgerError,
    LedgerLockedError,
    LedgerReceiptError,
    LedgerRollbackError,
)
from fedpeft.privacy.accounting.events import (
    Adjacency,
    EventMetadata,
    PoissonSampledGaussianEvent,
    Sampling,
    new_event_id,
    utc_now,
    validate_delta,
    validate_identifier,
)

if TYPE_CHECKING:
    from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent

LOGGER = logging.getLogger(__name__)

LEDGER_SUFFIX = ".ledger.jsonl"
FORMAT_NAME = "fedpeft-privacy-ledger"
FORMAT_VERSION = 3
#: Versions this code reads (v1: reserve records without adjacency/sampling; v3: ``level``).
SUPPORTED_VERSIONS = (1, 2, 3)
#: What a ledger accounts: ``"record"`` (a client's DP-SGD events) or ``"user"`` (the
#: coordinator's releases of user-level DP). Fixed when the ledger is created.
LedgerLevel = Literal["record", "user"]
LEVELS: tuple[LedgerLevel, ...] = ("record", "user")
#: Longest reason an ``abort`` record holds.
ABORT_REASON_MAX_CHARS = 1000
#: How v1 reserve records are read (see the module docstring).
V1_ADJACENCY: Adjacency = "replace_one"
V1_SAMPLING: Sampling = "seeded"
GENESIS_HASH = "0" * 64
CACHED_EPSILON_KEY = "cached_epsilon_display_only"
ANCHOR_SUFFIX = ".anchor.json"
ANCHOR_FORMAT = "fedpeft-privacy-ledger-anchor"
ANCHOR_VERSION = 1
#: Longest receipt string :meth:`LedgerHead.parse` accepts ("<count>:<64 hex>").
RECEIPT_MAX_CHARS = 96
_READ_ATTEMPTS = 3
_OPEN_ATTEMPTS = 5
_EPSILON_CACHE_MAX = 4096

EntryStatus = Literal["pending", "committed"]

_HEADER_KEYS = frozenset({"kind", "seq", "prev", "hash", "format", "version", "client_id",
                          "created", "budget_epsilon", "budget_delta"})
_RESERVE_KEYS_V1 = frozenset({"kind", "seq", "prev", "hash", "event_id", "sample_rate",
                              "noise_multiplier", "steps", "round_number", "dataset_size",
                              "delta", "clip_norm", "run_id", "timestamp"})
_HEADER_KEYS_V3 = _HEADER_KEYS | {"level"}
_RESERVE_KEYS = _RESERVE_KEYS_V1 | {"adjacency", "sampling"}
_RELEASE_KEYS = frozenset({"kind", "seq", "prev", "hash", "event_id", "sample_rate", "clip",
                           "granularity", "local_variance", "contributors", "dimension",
                           "beta", "steps", "round_number", "users", "others", "delta",
                           "run_id", "timestamp"})
_ABORT_KEYS = frozenset({"kind", "seq", "prev", "hash", "round_number", "reason",
                         "timestamp"})
_COMMIT_KEYS = frozenset({"kind", "seq", "prev", "hash", "event_id", "timestamp",
                          CACHED_EPSILON_KEY})
_ANCHOR_KEYS = frozenset({"format", "version", "client_id", "ledger_path", "ledger_id",
                          "count", "last_hash"})
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_RECEIPT_RE = re.compile(r"([1-9][0-9]{0,17}):([0-9a-f]{64})")


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


def anchor_path(ledger: str | os.PathLike[str], client_id: str,
                anchor_dir: str | os.PathLike[str]) -> Path:
    """Anchor file of ``ledger`` (of ``client_id``) in ``anchor_dir``.

    Named ``<client>.<sha256(resolved ledger path, client id)[:32]>.anchor.json`` so that
    ledgers in different directories with the same client id get different anchors.
    """
    validate_identifier(client_id, name="client_id")
    resolved = os.fsencode(Path(ledger).resolve())
    key = hashlib.sha256(resolved + b"\n" + client_id.encode("ascii")).hexdigest()[:32]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", client_id)
    return Path(anchor_dir) / f"{safe}.{key}{ANCHOR_SUFFIX}"


def composition_adjacency(metadata: Iterable[EventMetadata]) -> Adjacency:
    """``"replace_one"`` if any event is replace-one, else ``"add_remove"``.

    Replace-one is the more conservative relation: composing a mixed ledger under it never
    reports less than the truth; composing under add/remove could.
    """
    return ("replace_one" if any(m.adjacency == "replace_one" for m in metadata)
            else "add_remove")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v)))


@dataclass(frozen=True)
class LedgerHead:
    """A ledger position: ``count`` records, the last of which hashes to ``last_hash``.

    Clients report it to the coordinator as :meth:`as_wire`; the coordinator sends it back
    as a receipt, checked with :meth:`Ledger.verify_receipt`.
    """

    count: int
    last_hash: str

    def __post_init__(self) -> None:
        if not _is_int(self.count) or self.count < 1:
            raise LedgerReceiptError(f"count={self.count!r} must be an integer >= 1 (a ledger "
                                     "always has its header record).")
        if not isinstance(self.last_hash, str) or not _HEX64_RE.fullmatch(self.last_hash):
            raise LedgerReceiptError(f"last_hash={self.last_hash!r} must be 64 lowercase hex "
                                     "digits (a sha256 record hash).")

    def as_wire(self) -> str:
        """``"<count>:<last_hash>"``, e.g. ``"7:ab12..."``."""
        return f"{self.count}:{self.last_hash}"

    @classmethod
    def parse(cls, text: str) -> LedgerHead:
        """Parse :meth:`as_wire` output; :class:`LedgerReceiptError` if malformed.

        At most :data:`RECEIPT_MAX_CHARS` characters; the count has no sign, no leading zeros
        and at most 18 digits; the hash is 64 lowercase hex digits.
        """
        if not isinstance(text, str):
            raise LedgerReceiptError(f"ledger receipt of type {type(text).__name__} must be a "
                                     "string '<count>:<64 hex digits>'.")
        if len(text) > RECEIPT_MAX_CHARS:
            raise LedgerReceiptError(f"ledger receipt {text[:24]!r}... has {len(text)} "
                                     f"characters; at most {RECEIPT_MAX_CHARS} are allowed.")
        match = _RECEIPT_RE.fullmatch(text)
        if match is None:
            raise LedgerReceiptError(f"ledger receipt {text!r} is malformed; expected "
                                     "'<count>:<64 lowercase hex digits>'.")
        return cls(int(match.group(1)), match.group(2))


@dataclass(frozen=True)
class LedgerEntry:
    """One reserved event with its metadata and status (pending counts as spent)."""

    event: PoissonSampledGaussianEvent
    metadata: EventMetadata
    status: EntryStatus
    cached_epsilon_display_only: float | None = None


def validate_level(level: str, *, name: str = "level") -> LedgerLevel:
    """Return ``level`` if it is ``"record"`` or ``"user"``."""
    if level == "record":
        return "record"
    if level == "user":
        return "user"
    raise EventValidationError(
        f"{name}={level!r} must be one of {list(LEVELS)} ('record' for a client's DP-SGD "
        "ledger, 'user' for the coordinator's ledger of user-level releases).")


def _require_round_number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise EventValidationError(f"round_number={value!r} must be an integer >= 0.")
    return value


def _require_timestamp(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise EventValidationError(f"timestamp={value!r} must be a non-empty string.")
    return value


@dataclass(frozen=True)
class ReleaseMetadata:
    """What a user-level ledger records about a release besides the mechanism itself.

    ``users`` are the client ids whose updates are in the released sum (each a
    :func:`validate_identifier` id; at least one; stored sorted, duplicates refused: a user's
    update is in a sum at most once). ``delta`` is the delta the release is accounted at.
    """

    round_number: int
    users: tuple[str, ...]
    delta: float
    run_id: str
    event_id: str = field(default_factory=new_event_id)
    timestamp: str = field(default_factory=utc_now)
    #: users in the sum besides ``users`` that the recorder cannot name: a device records its
    #: own releases knowing only that at least the SecAgg threshold - 1 others are summed
    others: int = 0

    def __post_init__(self) -> None:
        _require_round_number(self.round_number)
        if isinstance(self.others, bool) or not isinstance(self.others, int) or self.others < 0:
            raise EventValidationError(f"others={self.others!r} must be an integer >= 0 (the "
                                       "users in the sum the recorder cannot name)")
        users: object = self.users
        if isinstance(users, (str, bytes)) or not isinstance(users, (tuple, list)):
            raise EventValidationError(
                f"users={users!r} must be a tuple of client-id strings (the users whose "
                "updates are in the released sum).")
        for i, user in enumerate(users):
            validate_identifier(user, name=f"users[{i}]")
        if not users:
            raise EventValidationError("users=() is empty: a release sums the updates of at "
                                       "least one user; record a round without one with "
                                       "Ledger.record_abort.")
        ordered = tuple(sorted(users))
        twice = sorted({a for a, b in zip(ordered, ordered[1:], strict=False) if a == b})
        if twice:
            raise EventValidationError(
                f"users lists {twice[:5]!r} more than once: a user's update can be in a sum "
                "only once; deduplicate the survivors' client ids (two nodes reporting the "
                "same client id must not both be summed).")
        object.__setattr__(self, "users", ordered)
        object.__setattr__(self, "delta", validate_delta(self.delta))
        validate_identifier(self.run_id, name="run_id")
        validate_identifier(self.event_id, name="event_id")
        _require_timestamp(self.timestamp)


@dataclass(frozen=True)
class ReleaseEntry:
    """One reserved release with its metadata and status (pending counts as spent)."""

    event: DistributedDiscreteGaussianEvent
    metadata: ReleaseMetadata
    status: EntryStatus


@dataclass(frozen=True)
class AbortRecord:
    """A user-level round that released nothing, and why (spends nothing)."""

    round_number: int
    reason: str
    timestamp: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        _require_round_number(self.round_number)
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise EventValidationError(f"reason={self.reason!r} must be a non-empty string "
                                       "saying why the round released nothing.")
        if len(self.reason) > ABORT_REASON_MAX_CHARS:
            raise EventValidationError(
                f"reason of {len(self.reason)} characters ({self.reason[:40]!r}...) is too "
                f"long; shorten it to at most {ABORT_REASON_MAX_CHARS} characters.")
        _require_timestamp(self.timestamp)


class UserBudgetExhaustedError(BudgetExhaustedError):
    """A release would take some users over the user-level budget (nothing was written).

    ``users`` maps each offending user to its epsilon after the release; ``epsilon_before``
    and ``epsilon_after`` are those of the worst of them.
    """

    def __init__(self, message: str, *, users: dict[str, float], epsilon_before: float,
                 epsilon_after: float, epsilon_max: float) -> None:
        super().__init__(message, epsilon_before=epsilon_before, epsilon_after=epsilon_after,
                         epsilon_max=epsilon_max)
        self.users = users


def user_events(releases: Iterable[ReleaseEntry],
                user: str) -> tuple[DistributedDiscreteGaussianEvent, ...]:
    """The events of the releases that include ``user`` (pending ones too), in order."""
    return tuple(r.event for r in releases if user in r.metadata.users)


def _histories(releases: Sequence[ReleaseEntry]) -> dict[str, tuple[int, ...]]:
    """User -> the positions in ``releases`` of the releases that include the user."""
    held: dict[str, list[int]] = {}
    for i, release in enumerate(releases):
        for user in release.metadata.users:
            held.setdefault(user, []).append(i)
    return {u: tuple(held[u]) for u in sorted(held)}


def user_epsilons(releases: Iterable[ReleaseEntry], delta: float) -> dict[str, float]:
    """User-level epsilon at ``delta`` of every user in any of ``releases`` (sorted by user).

    Each user's releases are composed with :func:`fedpeft.privacy.accounting.ddg.epsilon`;
    users with the same releases share one accountant call.
    """
    from fedpeft.privacy.accounting import ddg

    delta = validate_delta(delta)
    got = list(releases)
    out: dict[str, float] = {}
    # RDP composes by addition, so a history is its multiset of events, and k equal events
    # are one with k times the steps: users who joined equally many equal releases share a call
    cache: dict[frozenset[tuple[DistributedDiscreteGaussianEvent, int]], float] = {}
    for user, history in _histories(got).items():
        key = frozenset(Counter(got[i].event for i in history).items())
        if key not in cache:
            cache[key] = ddg.epsilon([dataclasses.replace(ev, steps=ev.steps * k)
                                      for ev, k in sorted(key, key=repr)], delta).epsilon
        out[user] = cache[key]
    return out


@dataclass(frozen=True)
class LedgerSnapshot:
    """A verified, read-only view of a ledger file.

    ``format_version`` is the header's version (a v1 ledger may hold v2 records appended
    later); ``head`` is its last record. ``level`` is the header's (v1/v2: ``"record"``); a
    record-level snapshot has ``entries``, a user-level one ``releases`` and ``aborts``.
    """

    path: Path
    client_id: str
    created: str
    budget: Budget | None
    entries: tuple[LedgerEntry, ...]
    notes: tuple[str, ...]
    head: LedgerHead
    format_version: int
    level: LedgerLevel = "record"
    releases: tuple[ReleaseEntry, ...] = ()
    aborts: tuple[AbortRecord, ...] = ()

    def spent_events(self) -> tuple[PoissonSampledGaussianEvent, ...]:
        """Every reserved event, committed or pending (pending counts as spent).

        Raises :class:`LedgerError` on a user-level snapshot (use :func:`user_epsilons`).
        """
        if self.level != "record":
            raise LedgerError(f"privacy ledger {str(self.path)!r} is a user-level ledger: it "
                              "holds releases, not DP-SGD events; compose them per user with "
                              "user_epsilons(snapshot.releases, delta).")
        return tuple(e.event for e in self.entries)

    @property
    def adjacency(self) -> Adjacency:
        """Adjacency to compose under (:func:`composition_adjacency` of all entries)."""
        return composition_adjacency(e.metadata for e in self.entries)

    @property
    def private_against_coordinator(self) -> bool:
        """False if any event's batches were seeded (reproducible by the coordinator)."""
        return not any(e.metadata.sampling == "seeded" for e in self.entries)


@dataclass
class _Parsed:
    records: list[dict[str, Any]]
    line_ends: list[int]  # byte offset just after each complete line
    torn_tail: bool
    head_stale: bool
    fresh: bool = False  # no complete record and no head: being created / crashed creating


@dataclass(frozen=True)
class _Anchor:
    client_id: str
    ledger_path: str
    ledger_id: str
    count: int
    last_hash: str


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


def _rolled_back(path: Path, found: str) -> LedgerRollbackError:
    return LedgerRollbackError(
        f"privacy ledger {str(path)!r} was rolled back or reset: {found}. Training is "
        "refused because privacy already spent would be forgotten. Restore the NEWEST copy "
        "of the ledger and its .head file; never delete, reset or replace a ledger with an "
        "older copy to regain budget."
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


def _strict_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)


def _parse_line(raw: bytes, line: int) -> dict[str, Any]:
    try:
        text = raw.decode("ascii")
        obj = _strict_json(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Corrupt(line, f"not a valid JSON record ({exc})") from None
    if not isinstance(obj, dict):
        raise _Corrupt(line, "record is not a JSON object")
    if canonical_json(obj) != text:
        raise _Corrupt(line, "record is not in canonical form (the line was edited)")
    return obj


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


def _entry_from_reserve(rec: dict[str, Any], line: int, *, v1_form: bool) -> LedgerEntry:
    if not (_is_num(rec["sample_rate"]) and _is_num(rec["noise_multiplier"])
            and _is_int(rec["steps"]) and _is_int(rec["round_number"])
            and _is_int(rec["dataset_size"]) and _is_num(rec["delta"])
            and _is_num(rec["clip_norm"])):
        raise _Corrupt(line, "reserve record has fields of the wrong type")
    if v1_form:
        adjacency, sampling = V1_ADJACENCY, V1_SAMPLING
    else:
        adjacency, sampling = rec["adjacency"], rec["sampling"]
    try:
        event = PoissonSampledGaussianEvent(float(rec["sample_rate"]),
                                            float(rec["noise_multiplier"]), rec["steps"])
        meta = EventMetadata(round_number=rec["round_number"],
                             dataset_size=rec["dataset_size"], delta=float(rec["delta"]),
                             clip_norm=float(rec["clip_norm"]), run_id=rec["run_id"],
                             event_id=rec["event_id"], timestamp=rec["timestamp"],
                             adjacency=adjacency, sampling=sampling)
    except EventValidationError as exc:
        raise _Corrupt(line, f"invalid event: {exc}") from None
    return LedgerEntry(event, meta, "pending")


def _release_from_record(rec: dict[str, Any], line: int) -> ReleaseEntry:
    from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent

    users = rec["users"]
    if not (all(_is_num(rec[k]) for k in ("sample_rate", "clip", "granularity",
                                          "local_variance", "beta", "delta"))
            and all(_is_int(rec[k]) for k in ("contributors", "dimension", "steps",
                                              "round_number", "others"))
            and isinstance(users, list) and all(isinstance(u, str) for u in users)):
        raise _Corrupt(line, "release record has fields of the wrong type")
    if users != sorted(set(users)):
        raise _Corrupt(line, "release record's users are not sorted and unique")
    try:
        event = DistributedDiscreteGaussianEvent(
            sample_rate=float(rec["sample_rate"]), clip=float(rec["clip"]),
            granularity=float(rec["granularity"]),
            local_variance=float(rec["local_variance"]), contributors=rec["contributors"],
            dimension=rec["dimension"], beta=float(rec["beta"]), steps=rec["steps"])
        meta = ReleaseMetadata(round_number=rec["round_number"], users=tuple(users),
                               delta=float(rec["delta"]), run_id=rec["run_id"],
                               event_id=rec["event_id"], timestamp=rec["timestamp"],
                               others=rec["others"])
        _check_contributors(event, meta)
    except EventValidationError as exc:
        raise _Corrupt(line, f"invalid release: {exc}") from None
    return ReleaseEntry(event, meta, "pending")


def _abort_from_record(rec: dict[str, Any], line: int) -> AbortRecord:
    try:
        return AbortRecord(rec["round_number"], rec["reason"], rec["timestamp"])
    except EventValidationError as exc:
        raise _Corrupt(line, f"invalid abort record: {exc}") from None


def _check_contributors(event: DistributedDiscreteGaussianEvent,
                        metadata: ReleaseMetadata) -> None:
    """A user is protected only by the other users' noise shares: at most
    ``users + others - 1``."""
    if event.contributors > len(metadata.users) + metadata.others - 1:
        raise EventValidationError(
            f"contributors={event.contributors} exceeds the {len(metadata.users)} named and "
            f"{metadata.others} unnamed users in the sum, minus one: only the other users' "
            "noise shares protect a user; count "
            "the survivors actually summed (minus one, minus colluders), never the planned "
            "clients.")


@dataclass
class _Interpreted:
    header: dict[str, Any]
    level: LedgerLevel
    entries: list[LedgerEntry]
    releases: list[ReleaseEntry]
    aborts: list[AbortRecord]


_OTHER_LEVEL_KINDS = {"record": ("release", "abort"), "user": ("reserve",)}


def _interpret(records: list[dict[str, Any]]) -> _Interpreted:
    if not records:
        raise _Corrupt(1, "the ledger has no header record")
    header = records[0]
    if header.get("kind") != "header" or set(header) not in (_HEADER_KEYS, _HEADER_KEYS_V3):
        raise _Corrupt(1, "first record is not a valid header")
    version = header["version"]
    if header["format"] != FORMAT_NAME or not _is_int(version) or (
            version not in SUPPORTED_VERSIONS):
        raise _Corrupt(1, f"unsupported format {header['format']!r} v{version!r} (this "
                          f"version reads {FORMAT_NAME!r} v{SUPPORTED_VERSIONS})")
    if (version >= 3) != ("level" in header):
        raise _Corrupt(1, f"a v{version} header {'must' if version >= 3 else 'cannot'} "
                          "carry a level")
    try:
        level = validate_level(header.get("level", "record"))
    except EventValidationError:
        raise _Corrupt(1, f"unknown ledger level {header['level']!r} (this version reads "
                          f"{list(LEVELS)})") from None
    v1_allowed = version == 1  # until the first v2-form reserve record
    entries: dict[str, LedgerEntry] = {}
    releases: dict[str, ReleaseEntry] = {}
    aborts: list[AbortRecord] = []
    for i, rec in enumerate(records[1:], start=2):
        kind = rec.get("kind")
        if kind in _OTHER_LEVEL_KINDS[level]:
            other = "user" if level == "record" else "record"
            raise _Corrupt(i, f"{kind!r} records belong in a {other}-level ledger, not in "
                              f"this {level}-level one")
        if kind == "reserve":
            keys = set(rec)
            if keys == _RESERVE_KEYS_V1 and v1_allowed:
                entry = _entry_from_reserve(rec, i, v1_form=True)
            elif keys == _RESERVE_KEYS:
                entry = _entry_from_reserve(rec, i, v1_form=False)
                v1_allowed = False
            else:
                raise _Corrupt(i, f"reserve record has keys {sorted(rec)} (ledger v{version})")
            if entry.metadata.event_id in entries:
                raise _Corrupt(i, f"event_id={entry.metadata.event_id!r} reserved twice")
            entries[entry.metadata.event_id] = entry
        elif kind == "release":
            if set(rec) != _RELEASE_KEYS:
                raise _Corrupt(i, f"release record has keys {sorted(rec)}")
            release = _release_from_record(rec, i)
            if release.metadata.event_id in releases:
                raise _Corrupt(i, f"event_id={release.metadata.event_id!r} reserved twice")
            releases[release.metadata.event_id] = release
        elif kind == "abort":
            if set(rec) != _ABORT_KEYS:
                raise _Corrupt(i, f"abort record has keys {sorted(rec)}")
            aborts.append(_abort_from_record(rec, i))
        elif kind == "commit":
            if set(rec) != _COMMIT_KEYS:
                raise _Corrupt(i, f"commit record has keys {sorted(rec)}")
            eid = rec["event_id"]
            cached = rec[CACHED_EPSILON_KEY]
            if cached is not None and not _is_num(cached):
                raise _Corrupt(i, f"{CACHED_EPSILON_KEY}={cached!r} is not a number")
            if level == "user":
                rel = releases.get(eid) if isinstance(eid, str) else None
                if rel is None:
                    raise _Corrupt(i, f"commit of event_id={eid!r} that was never reserved")
                if rel.status == "committed":
                    raise _Corrupt(i, f"event_id={eid!r} committed twice")
                if cached is not None:
                    raise _Corrupt(i, f"commit of release {eid!r} carries a cached epsilon "
                                      "(a release has one epsilon per user)")
                releases[eid] = ReleaseEntry(rel.event, rel.metadata, "committed")
                continue
            old = entries.get(eid) if isinstance(eid, str) else None
            if old is None:
                raise _Corrupt(i, f"commit of event_id={eid!r} that was never reserved")
            if old.status == "committed":
                raise _Corrupt(i, f"event_id={eid!r} committed twice")
            entries[eid] = LedgerEntry(old.event, old.metadata, "committed",
                                       None if cached is None else float(cached))
        else:
            raise _Corrupt(i, f"unknown record kind {kind!r}")
    return _Interpreted(header, level, list(entries.values()), list(releases.values()), aborts)


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
    if head is None and n == 0:
        # Created (O_EXCL) but the header was never completed: nothing was ever recorded.
        if tail and not _plausible_torn(tail):
            raise _corrupted(path, 1, "the file has no complete record and no head file, but "
                                      "holds bytes that are not a ledger record")
        return _Parsed([], [], bool(tail), False, fresh=True)
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


def _missing_ledger(path: Path) -> LedgerError:
    if head_path(path).exists():
        return _corrupted(path, None, "the ledger file is missing but its head file exists "
                                      "(the ledger was deleted)")
    return LedgerError(f"privacy ledger path={str(path)!r} does not exist; pass a ledger file "
                       f"ending in {LEDGER_SUFFIX!r}.")


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
            raise _missing_ledger(path) from None
        try:
            return _parse_file(path, data, head)
        except LedgerCorruptedError:
            if attempt >= _READ_ATTEMPTS:
                raise
            time.sleep(0.05)


def _snapshot(path: Path, parsed: _Parsed) -> LedgerSnapshot:
    try:
        got = _interpret(parsed.records)
    except _Corrupt as exc:
        raise _corrupted(path, exc.line, exc.reason) from None
    header = got.header
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
    return LedgerSnapshot(path, str(header["client_id"]), str(header["created"]), budget,
                          tuple(got.entries), tuple(notes),
                          LedgerHead(len(parsed.records), parsed.records[-1]["hash"]),
                          int(header["version"]), got.level, tuple(got.releases),
                          tuple(got.aborts))


def _not_yet_created(path: Path) -> LedgerError:
    return LedgerError(f"privacy ledger {str(path)!r} has no records yet (it is being "
                       "created, or the creating process stopped before writing its "
                       "header); open it with Ledger(...) to finish creating it.")


# -- anchors -------------------------------------------------------------------------------
def _read_anchor(path: Path, file: Path) -> _Anchor | None:
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = _strict_json(raw.decode("ascii"))
        if not isinstance(obj, dict) or set(obj) != _ANCHOR_KEYS:
            raise ValueError("wrong keys")
        if obj["format"] != ANCHOR_FORMAT or obj["version"] != ANCHOR_VERSION:
            raise ValueError(f"unsupported anchor format {obj['format']!r} "
                             f"v{obj['version']!r}")
        count, last, lid = obj["count"], obj["last_hash"], obj["ledger_id"]
        if not (_is_int(count) and count >= 1 and isinstance(last, str)
                and _HEX64_RE.fullmatch(last) and isinstance(lid, str)
                and _HEX64_RE.fullmatch(lid) and isinstance(obj["client_id"], str)
                and isinstance(obj["ledger_path"], str)):
            raise ValueError("fields of the wrong type")
    except (UnicodeDecodeError, ValueError) as exc:
        raise LedgerCorruptedError(
            f"privacy ledger anchor {str(file)!r} of ledger {str(path)!r} is unreadable "
            f"({exc}). Training is refused because the ledger cannot be checked against it. "
            "Restore the anchor from a backup; only if you are certain the ledger is its "
            "newest copy, move the anchor aside (it is then re-created from the ledger)."
        ) from None
    return _Anchor(obj["client_id"], obj["ledger_path"], lid, count, last)


def _anchor_rollback(path: Path, anchor_file: Path, found: str) -> LedgerRollbackError:
    return _rolled_back(path, f"{found} (anchor {str(anchor_file)!r})")


def _check_anchor(path: Path, anchor_file: Path, anchor: _Anchor, client_id: str,
                  records: list[dict[str, Any]]) -> bool:
    """Verify ``records`` against ``anchor``; True if the anchor is one record behind."""
    resolved = str(path.resolve())
    if anchor.client_id != client_id or anchor.ledger_path != resolved:
        raise _anchor_rollback(path, anchor_file, (
            f"the anchor belongs to client {anchor.client_id!r} at {anchor.ledger_path!r}, "
            f"not to client {client_id!r} at {resolved!r} (copied or edited)"))
    n = len(records)
    if n == 0:
        raise _anchor_rollback(path, anchor_file, (
            f"the ledger is empty but its anchor records {anchor.count} records (the ledger "
            "was deleted and restarted)"))
    if records[0]["hash"] != anchor.ledger_id:
        raise _anchor_rollback(path, anchor_file, (
            "the ledger's header is not the anchored ledger's header (the ledger was deleted "
            "and restarted, or replaced by another ledger)"))
    if n < anchor.count:
        raise _anchor_rollback(path, anchor_file, (
            f"the ledger has {n} records but its anchor records {anchor.count} (restored "
            "from an older copy)"))
    if records[anchor.count - 1]["hash"] != anchor.last_hash:
        raise _anchor_rollback(path, anchor_file, (
            f"record {anchor.count} of the ledger differs from the anchored one (restored "
            "from an older copy, or a different history)"))
    if n == anchor.count:
        return False
    if n == anchor.count + 1:
        return True  # crash between the head (or the append) and the anchor write
    raise _anchor_rollback(path, anchor_file, (
        f"the ledger has {n} records, {n - anchor.count} more than its anchor records "
        f"({anchor.count}); no crash explains more than one, so the anchor was itself restored "
        "from an older copy or the ledger was written without this anchor directory, and it "
        "cannot vouch that this is the newest ledger. If you are certain it is, move the "
        "anchor aside (it is re-created from the ledger)"))


def _check_receipt(path: Path, records: list[dict[str, Any]], receipt: LedgerHead) -> None:
    if not isinstance(receipt, LedgerHead):
        raise LedgerReceiptError(f"receipt={receipt!r} must be a LedgerHead; parse the "
                                 "coordinator's string with LedgerHead.parse.")
    n = len(records)
    if receipt.count > n:
        raise _rolled_back(path, (
            f"the coordinator holds a receipt for record {receipt.count} but the ledger has "
            f"only {n} records (deleted and restarted, or restored from an older copy)"))
    if records[receipt.count - 1]["hash"] != receipt.last_hash:
        raise _rolled_back(path, (
            f"record {receipt.count} of the ledger differs from the one the coordinator "
            "acknowledged (deleted and restarted, or restored from another copy)"))


def read_ledger(path: str | os.PathLike[str], *,
                anchor_dir: str | os.PathLike[str] | None = None,
                client_id: str | None = None) -> LedgerSnapshot:
    """Load and verify a ledger without locking or modifying it (for reports).

    Raises :class:`LedgerCorruptedError` if any integrity check fails. With ``anchor_dir``,
    also raises :class:`LedgerRollbackError` if the ledger is older than or not a
    continuation of its anchor (an anchor one record behind is accepted, not repaired), or,
    when ``client_id`` is given too (it names the anchor of a ledger that is gone), if the
    ledger is missing while its anchor exists. ``client_id``, if given, must match the
    ledger's.
    """
    p = Path(path)
    if client_id is not None:
        validate_identifier(client_id, name="client_id")
    try:
        parsed = _read_consistent(p)
    except LedgerError:
        if anchor_dir is not None and client_id is not None and not p.exists():
            afile = anchor_path(p, client_id, anchor_dir)
            anchor = _read_anchor(p, afile)
            if anchor is not None:
                raise _anchor_rollback(p, afile, (
                    f"the ledger file is missing but its anchor records {anchor.count} "
                    "records (the ledger was deleted)")) from None
        raise
    if parsed.fresh:
        if anchor_dir is not None and client_id is not None:
            afile = anchor_path(p, client_id, anchor_dir)
            anchor = _read_anchor(p, afile)
            if anchor is not None:
                _check_anchor(p, afile, anchor, client_id, [])
        raise _not_yet_created(p)
    snap = _snapshot(p, parsed)
    if client_id is not None and snap.client_id != client_id:
        raise LedgerError(f"client_id={client_id!r} does not match the ledger's client "
                          f"{snap.client_id!r} in {str(p)!r}.")
    if anchor_dir is not None:
        afile = anchor_path(p, snap.client_id, anchor_dir)
        anchor = _read_anchor(p, afile)
        if anchor is None:
            snap = dataclasses.replace(snap, notes=snap.notes + (
                f"no anchor in {str(anchor_dir)!r}: not checked for rollback",))
        else:
            _check_anchor(p, afile, anchor, snap.client_id, parsed.records)
    return snap


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` itself, so that a file just created, renamed or replaced in it
    survives a crash (the ledger's creation and its atomic head/anchor writes end with this;
    the client's SecAgg+ unmask markers too)."""
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


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Ledger:
    """Writer handle on a ledger; holds an exclusive ``flock`` on it until closed.

    Use as a context manager. ``budget`` and ``level`` (:data:`LedgerLevel`: ``"record"``
    for a client's ledger, ``"user"`` for the coordinator's release ledger) are stored in the
    header when the ledger is created; reopening with a different budget or level is
    refused. With ``anchor_dir`` (a directory separate from the ledger's, the same on every
    open), the ledger is checked against its anchor on open and the anchor is updated after
    every append (see the module docstring); a ledger that was deleted or rolled back raises
    :class:`LedgerRollbackError`.
    """

    def __init__(self, path: str | os.PathLike[str], *, client_id: str,
                 budget: Budget | None = None, create: bool = True,
                 anchor_dir: str | os.PathLike[str] | None = None,
                 level: LedgerLevel = "record") -> None:
        self.path = Path(path)
        if not self.path.name.endswith(LEDGER_SUFFIX):
            raise LedgerError(f"path={str(self.path)!r} must end with {LEDGER_SUFFIX!r} so "
                              "reports can find it.")
        validate_identifier(client_id, name="client_id")
        level = validate_level(level)
        self._fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._entries: dict[str, LedgerEntry] = {}
        self._releases: dict[str, ReleaseEntry] = {}
        self._aborts: list[AbortRecord] = []
        #: (delta, event ids a user holds) -> that user's epsilon (see _user_epsilon)
        self._epsilon_cache: dict[tuple[float, tuple[str, ...]], float] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._anchor_file: Path | None = None
        if anchor_dir is not None:
            adir = Path(anchor_dir)
            adir.mkdir(parents=True, exist_ok=True)
            if adir.resolve() == self.path.parent.resolve():
                raise LedgerError(f"anchor_dir={str(anchor_dir)!r} is the ledger's own "
                                  "directory; anchors must live elsewhere so that deleting "
                                  "or restoring the ledger directory is detected.")
            self._anchor_file = anchor_path(self.path, client_id, adir)
        self._precheck(create)
        self._fd = self._lock(create)
        try:
            self._open(client_id, budget, create, level)
        except BaseException:
            self.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------
    def _precheck(self, create: bool) -> None:
        """Refuse a missing ledger that has left traces, before creating anything."""
        if self.path.exists():
            return
        head_exists = head_path(self.path).exists()
        anchor = None
        if self._anchor_file is not None:
            anchor = _read_anchor(self.path, self._anchor_file)
        if (head_exists or anchor is not None) and self.path.exists():
            return  # created concurrently (file, then head, then anchor): checked under lock
        if head_exists:
            raise _missing_ledger(self.path)
        if anchor is not None and self._anchor_file is not None:
            raise _anchor_rollback(self.path, self._anchor_file, (
                f"the ledger file and its head are missing but its anchor records "
                f"{anchor.count} records for client {anchor.client_id!r} (both were deleted; "
                "starting over would reset epsilon to 0)"))
        if not create:
            raise LedgerError(f"privacy ledger path={str(self.path)!r} does not exist and "
                              "create=False.")

    def _lock(self, create: bool) -> int:
        """Open (or O_EXCL-create) the ledger and flock its inode; return the fd."""
        flags = os.O_RDWR | os.O_APPEND
        for _ in range(_OPEN_ATTEMPTS):
            try:
                fd = os.open(self.path, flags)
            except FileNotFoundError:
                if not create:
                    raise LedgerError(f"privacy ledger path={str(self.path)!r} does not "
                                      "exist and create=False.") from None
                try:
                    fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    continue  # another process created it just now: open theirs
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LedgerLockedError(
                    f"privacy ledger {str(self.path)!r} is locked by another writer; run one "
                    "client process per ledger."
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                # Still the file at the path? (It may have been unlinked or replaced between
                # our open and our flock; its lock would then protect nothing.)
                try:
                    current: os.stat_result | None = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and _same_file(current, os.fstat(fd)):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # unlinked or replaced between open and flock: lock the new one
        raise LedgerLockedError(
            f"privacy ledger {str(self.path)!r} kept being replaced or deleted while opening "
            f"it ({_OPEN_ATTEMPTS} attempts); make sure only one client process uses it.")

    def _open(self, client_id: str, budget: Budget | None, create: bool,
              level: LedgerLevel) -> None:
        fd = self._require_open()
        head = _read_head(self.path)
        parsed = _parse_file(self.path, _read_all(fd), head)
        anchor = None
        if self._anchor_file is not None:
            anchor = _read_anchor(self.path, self._anchor_file)
        if parsed.fresh:
            if anchor is not None and self._anchor_file is not None:
                _check_anchor(self.path, self._anchor_file, anchor, client_id, [])
            if not create:
                raise _not_yet_created(self.path)
            if parsed.torn_tail:
                os.ftruncate(fd, 0)
                os.fsync(fd)
            self._create(client_id, budget, level)
            return
        snap = _snapshot(self.path, parsed)
        if snap.client_id != client_id:
            raise LedgerError(f"client_id={client_id!r} does not match the ledger's client "
                              f"{snap.client_id!r} in {str(self.path)!r}.")
        if snap.level != level:
            raise LedgerError(f"level={level!r} does not match the ledger's level "
                              f"{snap.level!r} (format v{snap.format_version}) in "
                              f"{str(self.path)!r}; a ledger's level is fixed when it is "
                              f"created: open it with level={snap.level!r}, or use another "
                              "ledger file for the other level.")
        if budget is not None and snap.budget != budget:
            raise LedgerError(f"budget={budget!r} differs from the budget {snap.budget!r} "
                              f"recorded in {str(self.path)!r}; budgets are fixed when a "
                              "ledger is created.")
        notes = list(snap.notes)
        write_anchor = False
        if self._anchor_file is not None:
            if anchor is None:
                LOGGER.warning("privacy ledger %s: no anchor %s yet; creating it from the "
                               "ledger (first use of this anchor directory)", self.path,
                               self._anchor_file)
                notes.append("anchor created from the ledger (none existed)")
                write_anchor = True
            elif _check_anchor(self.path, self._anchor_file, anchor, client_id,
                               parsed.records):
                notes.append("anchor was one append behind (interrupted write); repaired on "
                             "open")
                write_anchor = True
        if parsed.torn_tail:
            os.ftruncate(fd, parsed.line_ends[-1])
            os.fsync(fd)
        self._records = parsed.records
        if parsed.head_stale or parsed.torn_tail:
            self._write_head()
        if write_anchor:
            self._write_anchor()
        self._snapshot = dataclasses.replace(snap, notes=tuple(notes))
        self._entries = {e.metadata.event_id: e for e in snap.entries}
        self._releases = {r.metadata.event_id: r for r in snap.releases}
        self._aborts = list(snap.aborts)

    def _create(self, client_id: str, budget: Budget | None, level: LedgerLevel) -> None:
        fd = self._require_open()
        body: dict[str, Any] = {
            "kind": "header", "seq": 0, "prev": GENESIS_HASH, "format": FORMAT_NAME,
            "version": FORMAT_VERSION, "client_id": client_id, "created": utc_now(),
            "budget_epsilon": None if budget is None else budget.epsilon_max,
            "budget_delta": None if budget is None else budget.delta, "level": level,
        }
        record = dict(body, hash=record_hash(GENESIS_HASH, body))
        _write_all(fd, (canonical_json(record) + "\n").encode("ascii"))
        os.fsync(fd)
        fsync_dir(self.path.parent)
        self._records = [record]
        self._write_head()
        self._write_anchor()
        self._snapshot = LedgerSnapshot(self.path, client_id, body["created"], budget, (), (),
                                        self.head(), FORMAT_VERSION, level)
        self._entries = {}
        self._releases = {}
        self._aborts = []

    def close(self) -> None:
        """Release the writer lock (idempotent)."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------
    def _require_open(self) -> int:
        if self._fd is None:
            raise LedgerError(f"privacy ledger {str(self.path)!r} is closed; open a new "
                              "Ledger to write.")
        return self._fd

    def _check_identity(self, fd: int) -> None:
        """Refuse if the ledger path no longer names the inode this writer locked."""
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            current = None
        if current is None or not _same_file(current, os.fstat(fd)):
            self.close()
            raise LedgerCorruptedError(
                f"privacy ledger {str(self.path)!r} was deleted or replaced while this writer "
                "held it. Training is refused: what this writer recorded is no longer in the "
                "ledger at that path. Restore the newest ledger; do not replace or delete a "
                "ledger in use.")

    def _write_head(self) -> None:
        head = {"count": len(self._records), "last_hash": self._records[-1]["hash"]}
        _atomic_write(head_path(self.path), (canonical_json(head) + "\n").encode("ascii"))

    def _write_anchor(self) -> None:
        if self._anchor_file is None:
            return
        anchor = {"format": ANCHOR_FORMAT, "version": ANCHOR_VERSION,
                  "client_id": str(self._records[0]["client_id"]),
                  "ledger_path": str(self.path.resolve()),
                  "ledger_id": self._records[0]["hash"], "count": len(self._records),
                  "last_hash": self._records[-1]["hash"]}
        _atomic_write(self._anchor_file, (canonical_json(anchor) + "\n").encode("ascii"))

    def _append(self, body: dict[str, Any]) -> None:
        fd = self._require_open()
        self._check_identity(fd)
        prev = self._records[-1]["hash"]
        body = dict(body, seq=len(self._records), prev=prev)
        record = dict(body, hash=record_hash(prev, body))
        _write_all(fd, (canonical_json(record) + "\n").encode("ascii"))
        os.fsync(fd)
        self._records.append(record)
        self._check_identity(fd)
        # Order matters for recovery: file, then head, then anchor (each may lag by one).
        self._write_head()
        self._write_anchor()

    def reserve(self, event: PoissonSampledGaussianEvent, metadata: EventMetadata) -> LedgerEntry:
        """Durably record ``event`` as PENDING (spent) before training; returns the entry.

        Train only after this returns. Raises :class:`LedgerError` if the id exists or the
        ledger is user-level.
        """
        self._require_open()
        self._require_level("record", "reserve")
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
            "timestamp": metadata.timestamp, "adjacency": metadata.adjacency,
            "sampling": metadata.sampling,
        })
        entry = LedgerEntry(event, metadata, "pending")
        self._entries[metadata.event_id] = entry
        return entry

    def reserve_within_budget(self, event: PoissonSampledGaussianEvent,
                              metadata: EventMetadata, budget: Budget | None = None,
                              accountant: str = "prv") -> BudgetDecision:
        """Check the budget (the header's unless given) and reserve only if allowed.

        The composition (ledger events plus the proposed one) is accounted under
        :func:`composition_adjacency` of all their metadata, so one replace-one event makes
        the whole ledger replace-one. Raises :class:`BudgetExhaustedError` (nothing
        written) if the round would exceed the budget.
        """
        self._require_open()
        self._require_level("record", "reserve_within_budget")
        if not isinstance(metadata, EventMetadata):
            raise EventValidationError(f"metadata={metadata!r} must be an EventMetadata.")
        use = budget if budget is not None else self._snapshot.budget
        if use is None:
            raise LedgerError(f"privacy ledger {str(self.path)!r} has no budget; pass "
                              "budget= or create the ledger with one.")
        adjacency = composition_adjacency(
            [e.metadata for e in self._entries.values()] + [metadata])
        decision = require_round(self.spent_events(), event, use, accountant,
                                 adjacency=adjacency)
        self.reserve(event, metadata)
        return decision

    def commit(self, event_id: str, *, cached_epsilon_display_only: float | None = None) -> bool:
        """Mark a reserved event (or release) as committed. Idempotent: returns False if
        already committed.

        ``cached_epsilon_display_only`` is stored for display and never used for accounting;
        a release takes none (it has one epsilon per user).
        """
        self._require_open()
        if self.level == "user":
            return self._commit_release(event_id, cached_epsilon_display_only)
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

    def _commit_release(self, event_id: str, cached: float | None) -> bool:
        release = self._releases.get(event_id)
        if release is None:
            raise LedgerError(f"event_id={event_id!r} was never reserved in "
                              f"{str(self.path)!r}; reserve the release before unmasking.")
        if cached is not None:
            raise EventValidationError(
                f"cached_epsilon_display_only={cached!r} cannot be stored with a release (it "
                "has one epsilon per user); commit it without one.")
        if release.status == "committed":
            return False
        self._append({"kind": "commit", "event_id": event_id, "timestamp": utc_now(),
                      CACHED_EPSILON_KEY: None})
        self._releases[event_id] = ReleaseEntry(release.event, release.metadata, "committed")
        return True

    # -- user level (the coordinator's releases) -------------------------------------------
    def _require_level(self, level: LedgerLevel, what: str) -> None:
        if self.level != level:
            raise LedgerError(
                f"{what} needs a {level}-level ledger, but {str(self.path)!r} is "
                f"{self.level}-level. Record-level ledgers hold a client's DP-SGD events "
                "(reserve, commit); user-level ledgers hold the coordinator's releases "
                "(reserve_release, commit, record_abort).")

    def reserve_release(self, event: DistributedDiscreteGaussianEvent,
                        metadata: ReleaseMetadata) -> ReleaseEntry:
        """Durably record a release as PENDING (spent) before the sum is unmasked.

        Unmask only after this returns. Raises :class:`LedgerError` if the id exists or the
        ledger is record-level, :class:`EventValidationError` if ``event.contributors``
        exceeds ``len(metadata.users) - 1`` (only the other users' noise protects a user).
        """
        from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent

        self._check_release(event, metadata, "reserve_release")
        # What is written is what is read back: floats as floats (the event compares equal).
        stored = DistributedDiscreteGaussianEvent(
            sample_rate=float(event.sample_rate), clip=float(event.clip),
            granularity=float(event.granularity), local_variance=float(event.local_variance),
            contributors=event.contributors, dimension=event.dimension,
            beta=float(event.beta), steps=event.steps)
        self._append({
            "kind": "release", "event_id": metadata.event_id,
            "sample_rate": stored.sample_rate, "clip": stored.clip,
            "granularity": stored.granularity, "local_variance": stored.local_variance,
            "contributors": stored.contributors, "dimension": stored.dimension,
            "beta": stored.beta, "steps": stored.steps,
            "round_number": metadata.round_number, "users": list(metadata.users),
            "others": metadata.others,
            "delta": metadata.delta, "run_id": metadata.run_id,
            "timestamp": metadata.timestamp,
        })
        release = ReleaseEntry(stored, metadata, "pending")
        self._releases[metadata.event_id] = release
        return release

    def _check_release(self, event: DistributedDiscreteGaussianEvent,
                       metadata: ReleaseMetadata, what: str) -> None:
        from fedpeft.privacy.accounting.ddg import DistributedDiscreteGaussianEvent

        self._require_open()
        self._require_level("user", what)
        if not isinstance(event, DistributedDiscreteGaussianEvent):
            raise EventValidationError(
                f"event={event!r} must be a DistributedDiscreteGaussianEvent.")
        if not isinstance(metadata, ReleaseMetadata):
            raise EventValidationError(f"metadata={metadata!r} must be a ReleaseMetadata.")
        _check_contributors(event, metadata)
        if metadata.event_id in self._releases:
            raise LedgerError(f"event_id={metadata.event_id!r} is already reserved in "
                              f"{str(self.path)!r}; use a fresh event id per release.")

    def _user_histories(self) -> dict[str, tuple[str, ...]]:
        """User -> the event ids of the releases (pending too) that include the user."""
        held: dict[str, list[str]] = {}
        for eid, release in self._releases.items():
            for user in release.metadata.users:
                held.setdefault(user, []).append(eid)
        return {u: tuple(ids) for u, ids in held.items()}

    def _user_epsilon(self, delta: float, ids: tuple[str, ...],
                      proposed: DistributedDiscreteGaussianEvent | None = None) -> float:
        """Epsilon of the releases ``ids`` (plus ``proposed``); the ledger's own releases are
        cached by their ids (an id names one release forever in an append-only ledger)."""
        from fedpeft.privacy.accounting import ddg

        events = [self._releases[i].event for i in ids]
        if proposed is not None:
            return ddg.epsilon(events + [proposed], delta).epsilon
        key = (delta, ids)
        if key not in self._epsilon_cache:
            if len(self._epsilon_cache) >= _EPSILON_CACHE_MAX:
                self._epsilon_cache.clear()
            self._epsilon_cache[key] = ddg.epsilon(events, delta).epsilon
        return self._epsilon_cache[key]

    def reserve_release_within_budget(self, event: DistributedDiscreteGaussianEvent,
                                      metadata: ReleaseMetadata,
                                      budget: Budget | None = None) -> dict[str, float]:
        """Reserve the release only if every user in it stays within ``budget`` (the
        header's unless given); return each of its users' epsilon after it.

        Each user's releases plus this one are composed (:func:`~.ddg.epsilon`, KLS 2021) at
        ``budget.delta``; users holding the same releases share one accountant call. Raises
        :class:`UserBudgetExhaustedError` (a :class:`BudgetExhaustedError`), with nothing
        written, naming the users who would exceed ``budget.epsilon_max``.
        """
        self._check_release(event, metadata, "reserve_release_within_budget")
        use = budget if budget is not None else self._snapshot.budget
        if use is None:
            raise LedgerError(f"privacy ledger {str(self.path)!r} has no budget; pass "
                              "budget= or create the ledger with one.")
        if not isinstance(use, Budget):
            raise EventValidationError(f"budget={use!r} must be a Budget.")
        histories = self._user_histories()
        after_by_history: dict[tuple[str, ...], float] = {}
        after: dict[str, float] = {}
        for user in metadata.users:
            ids = histories.get(user, ())
            if ids not in after_by_history:
                after_by_history[ids] = self._user_epsilon(use.delta, ids, event)
            after[user] = after_by_history[ids]
        over = {u: e for u, e in after.items()
                if not (math.isfinite(e) and e <= use.epsilon_max)}
        if over:
            worst = max(over, key=lambda u: over[u])
            before = self._user_epsilon(use.delta, histories.get(worst, ()))
            shown = ", ".join(f"{u} ({e:.4g})" for u, e in sorted(over.items())[:10])
            more = f" and {len(over) - 10} more" if len(over) > 10 else ""
            raise UserBudgetExhaustedError(
                f"release of round {metadata.round_number} refused: it would take "
                f"{len(over)} user(s) over the user-level budget epsilon_max="
                f"{use.epsilon_max:.4g} at delta={use.delta:.3g}: {shown}{more}; nothing was "
                "recorded. Leave these users out of the round (or release nothing); raise the "
                "budget only with the users' consent.",
                users=over, epsilon_before=before, epsilon_after=over[worst],
                epsilon_max=use.epsilon_max)
        self.reserve_release(event, metadata)
        for ids, value in after_by_history.items():
            key = (use.delta, ids + (metadata.event_id,))
            if len(self._epsilon_cache) >= _EPSILON_CACHE_MAX:
                self._epsilon_cache.clear()
            self._epsilon_cache[key] = value
        return dict(sorted(after.items()))

    def record_abort(self, round_number: int, reason: str) -> AbortRecord:
        """Durably record that round ``round_number`` released nothing, and why (at most
        :data:`ABORT_REASON_MAX_CHARS` characters). Spends nothing; never cancels a release
        already reserved (that one stays spent)."""
        self._require_open()
        self._require_level("user", "record_abort")
        abort = AbortRecord(round_number, reason)
        self._append({"kind": "abort", "round_number": abort.round_number,
                      "reason": abort.reason, "timestamp": abort.timestamp})
        self._aborts.append(abort)
        return abort

    def releases(self) -> tuple[ReleaseEntry, ...]:
        """All reserved releases in reserve order, with their status (pending = spent)."""
        self._require_level("user", "releases")
        return tuple(self._releases.values())

    def aborts(self) -> tuple[AbortRecord, ...]:
        """All abort records in order."""
        self._require_level("user", "aborts")
        return tuple(self._aborts)

    # -- receipts --------------------------------------------------------------------------
    def head(self) -> LedgerHead:
        """The ledger's current position (report it to the coordinator after commit)."""
        return LedgerHead(len(self._records), self._records[-1]["hash"])

    def verify_receipt(self, head: LedgerHead) -> None:
        """Refuse (:class:`LedgerRollbackError`) unless the ledger contains record ``head``.

        ``head`` is the position the coordinator last acknowledged (:meth:`LedgerHead.parse`
        of what it sent back). The receipt is never used for accounting: it can only cause
        a refusal. Raises :class:`LedgerReceiptError` if ``head`` is not a LedgerHead.
        """
        _check_receipt(self.path, self._records, head)

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

    @property
    def level(self) -> LedgerLevel:
        """The ledger's level from its header (``"record"`` for v1/v2 ledgers)."""
        return self._snapshot.level

    @property
    def format_version(self) -> int:
        """Format version of the ledger's header (1 for a continued v1 ledger)."""
        return self._snapshot.format_version

    @property
    def anchor_file(self) -> Path | None:
        """This ledger's anchor file (None without ``anchor_dir``)."""
        return self._anchor_file

    @property
    def adjacency(self) -> Adjacency:
        """Adjacency the ledger's events compose under (:attr:`LedgerSnapshot.adjacency`)."""
        return self.snapshot().adjacency

    @property
    def private_against_coordinator(self) -> bool:
        """False if any recorded event's batches were seeded (coordinator-reproducible)."""
        return self.snapshot().private_against_coordinator

    def entries(self) -> tuple[LedgerEntry, ...]:
        """All reserved events in reserve order, with their status (record level)."""
        self._require_level("record", "entries")
        return tuple(self._entries.values())

    def pending(self) -> tuple[LedgerEntry, ...]:
        """Reserved but uncommitted events (counted as spent; record level)."""
        self._require_level("record", "pending")
        return tuple(e for e in self._entries.values() if e.status == "pending")

    def spent_events(self) -> tuple[PoissonSampledGaussianEvent, ...]:
        """Every reserved event, committed or pending: what the accountant composes."""
        self._require_level("record", "spent_events")
        return tuple(e.event for e in self._entries.values())

    def snapshot(self) -> LedgerSnapshot:
        """A read-only view of the ledger as this writer holds it now."""
        return dataclasses.replace(self._snapshot, entries=tuple(self._entries.values()),
                                   releases=tuple(self._releases.values()),
                                   aborts=tuple(self._aborts), head=self.head())

    def __iter__(self) -> Iterator[LedgerEntry]:
        return iter(self.entries())
