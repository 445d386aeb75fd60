"""Exportable state of a :class:`fedpeft.secagg.client.SecAggClient` and its binary codec.

Flower keeps a client's state between messages only as bytes (node-local ``context.state``), so
the client is exported after every message and imported before the next one
(``SecAggClient.export_state`` / ``import_state``). :class:`ClientState` is that state as plain
fields; :func:`encode_state` and :func:`decode_state` are the strict, versioned codec (no pickle).
Pure functions on bytes: no I/O, no randomness.

Layout: ``MAGIC | u8 version | body | SHA-256(MAGIC | version | body)``. Integers are
big-endian; the update's raw words are little-endian. ``ids`` is ``u32 count | count x u64``
(strictly increasing, ``count <= MAX_PARTICIPANTS``), ``shares`` is ``u32 count | count x
(u64 owner | 66 B Shamir share)`` (owners strictly increasing) and ``?`` is a ``u8`` presence
flag (0 or 1) before an optional field. Body, in order:

* ``u64 client_id``; ``u8 len | session_id`` (8..64 B);
* ``? config``: ``f64 clip, u8 bits, f64 expected_dropout, f64 max_abort_prob, f64
  corrupt_fraction``, then
  ``? (u32 threshold, u32 degree)``;
* ``? u64 expected_vector_length``; ``u8 stage`` code (:data:`STAGE_CODES`);
  ``? (u32 len | UTF-8 abort_reason)``;
* ``? update``: ``u8 dtype`` code (:data:`DTYPE_CODES`) ``| u8 ndim (= 1) | u64 length |``
  little-endian values (``length <= MAX_VECTOR_LENGTH``); ``? 32 B rounding_seed``;
* ``? setup``: ``u8 bits, u16 threshold, u16 degree, f64 clip, u32 vector_length, u8
  authenticated, 32 B graph seed, ids participants`` (the accepted SETUP message);
* ``ids`` graph neighbours; ``u32 count | count x (u64 id | 32 B enc pk | 32 B mask pk | 32 B
  commitment)`` peer keys; ``ids`` share holders (U2); ``shares`` held self-mask shares;
  ``shares`` held key shares; ``u8 len | own self-mask share`` (0 or 66 B); ``ids`` the
  survivor set the client signed (consistency check; empty outside it);
* ``32 B enc sk | 32 B mask sk | 32 B self-mask seed`` (public keys are re-derived on import).

security: an encoded state holds the client's private keys, self-mask seed, held shares and
plaintext update. The digest detects truncation and corruption only (not tampering: the state
never leaves the device). :class:`ClientState`'s ``repr`` omits every secret field.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt

from fedpeft.secagg import messages as msg
from fedpeft.secagg.config import MAX_CLIENT_ID, SecAggConfig
from fedpeft.secagg.errors import SecAggConfigError, StateError
from fedpeft.secagg.kdf import KEY_BYTES
from fedpeft.secagg.prg import SEED_BYTES
from fedpeft.secagg.shamir import SHARE_BYTES
from fedpeft.secagg.stages import Stage

__all__ = [
    "ClientState", "DTYPE_CODES", "STAGE_CODES", "STATE_MAGIC", "STATE_VERSION", "decode_state",
    "encode_state",
]

#: Exported client state: ``MAGIC | u8 version | body | SHA-256(MAGIC | version | body)``.
STATE_MAGIC = b"FPSC"
#: Format version; any other version is refused on import (no migration).
STATE_VERSION = 4  # 2: config corrupt_fraction; 3: SETUP authenticated flag; 4: signed survivors
_DIGEST_BYTES = 32
#: Explicit wire codes (independent of enum order) for the stage and the update dtype.
STAGE_CODES: dict[Stage, int] = {
    Stage.SETUP: 0, Stage.ADVERTISE_KEYS: 1, Stage.SHARE_KEYS: 2, Stage.COLLECT_MASKED: 3,
    Stage.DONE: 4, Stage.ABORTED: 5, Stage.CONSISTENCY_CHECK: 6,
}
_CODE_STAGES = {v: k for k, v in STAGE_CODES.items()}
#: Wire codes of the update dtypes that can be exported (``uint32``: field words, sent as they
#: are; a float update is quantised by the client at the masked-input stage).
DTYPE_CODES: dict[np.dtype[Any], int] = {
    np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3,
    # already encoded field words (the distributed discrete Gaussian's output, mod 2^bits)
    np.dtype(np.uint32): 4,
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_STAGE_RANK = {Stage.SETUP: 0, Stage.ADVERTISE_KEYS: 1, Stage.SHARE_KEYS: 2, Stage.COLLECT_MASKED: 3,
               Stage.CONSISTENCY_CHECK: 3, Stage.DONE: 4}


@dataclass(frozen=True, eq=False)
class ClientState:
    """Every field of one client's round state, as exported (one per ``SecAggClient`` attribute).

    ``decode_state`` checks the format (bounds, codes, sorted ids, session length); the
    client re-checks the stored SETUP against the protocol rules and then calls
    :meth:`check_invariants`. Secret fields are left out of ``repr``.
    """

    client_id: int
    session_id: bytes
    config: SecAggConfig | None
    expected_vector_length: int | None
    stage: Stage
    abort_reason: str | None
    update: npt.NDArray[Any] | None = field(repr=False)
    rounding_seed: bytes | None = field(repr=False)
    setup: msg.Setup | None
    graph_neighbours: frozenset[int]
    peers: dict[int, msg.PeerKeys]
    u2: frozenset[int]  # neighbours whose shares reached the client
    held_b: dict[int, bytes] = field(repr=False)
    held_sk: dict[int, bytes] = field(repr=False)
    own_b_share: bytes = field(repr=False)
    enc_sk: bytes = field(repr=False)
    mask_sk: bytes = field(repr=False)
    self_seed: bytes = field(repr=False)
    signed_survivors: frozenset[int] = frozenset()  # the survivor set signed (consistency check)

    def check_invariants(self) -> None:
        """Cross-field consistency of a decoded state (raises :class:`StateError`)."""
        stage, reason, update, setup = self.stage, self.abort_reason, self.update, self.setup
        expected, neighbours = self.expected_vector_length, self.graph_neighbours
        peers, u2, held_b, held_sk = self.peers, self.u2, self.held_b, self.held_sk
        own_share = self.own_b_share

        def bad(what: str) -> NoReturn:
            raise StateError(f"inconsistent client state (stage={stage.name}): {what}; do not use it")

        if (reason is not None) != (stage is Stage.ABORTED):
            bad(f"abort_reason={reason!r} must be set exactly when the stage is ABORTED")
        if len(own_share) not in (0, SHARE_BYTES):
            bad(f"own share length={len(own_share)} must be 0 or {SHARE_BYTES}")
        if setup is None and (neighbours or peers or u2 or held_b or held_sk or own_share):
            bad("neighbours, peers or shares present without a SETUP")
        if not set(peers) <= neighbours or not u2 <= set(peers):
            bad("peers must be graph neighbours and share holders must be peers")
        if not set(held_b) <= set(peers) or not set(held_sk) <= set(peers):
            bad("held shares from clients that are not peers")
        if update is not None:
            n = update.shape[0]
            if (setup is not None and n != setup.vector_length) or (expected is not None and n != expected):
                bad(f"update length={n} differs from the round's vector length")
            if (update.dtype == np.uint32 and setup is not None and setup.bits < 32
                    and bool(np.any(update >> np.uint32(setup.bits)))):
                bad(f"field words >= 2^bits={setup.bits}")
        if stage is Stage.ABORTED:
            return
        rank = _STAGE_RANK[stage]
        if (setup is not None) != (rank >= 1):
            bad("a SETUP is stored exactly from stage ADVERTISE_KEYS on")
        if rank < 2 and peers:
            bad("peer keys stored before SHARE_KEYS")
        if (rank >= 2) != bool(own_share):
            bad("own self-mask share is stored exactly from stage SHARE_KEYS on")
        if rank < 3 and (u2 or held_b or held_sk):
            bad("held shares stored before COLLECT_MASKED")
        if rank >= 3 and update is not None:
            bad("plaintext update kept after the masked input was sent")
        if (stage in (Stage.COLLECT_MASKED, Stage.CONSISTENCY_CHECK)
                and not set(held_b) == set(held_sk) == u2):
            bad("held shares must come from exactly the share holders")
        if bool(self.signed_survivors) != (stage is Stage.CONSISTENCY_CHECK):
            bad("a signed survivor set is stored exactly in stage CONSISTENCY_CHECK")
        if stage is Stage.CONSISTENCY_CHECK and not (
                setup is not None and setup.authenticated
                and self.client_id in self.signed_survivors
                and self.signed_survivors <= set(setup.participants)):
            bad("the consistency check belongs to authenticated rounds, over participants, "
                "this client among them")
        if stage is Stage.DONE and (held_b or held_sk):
            bad("held shares kept after the unmask reply")


def encode_state(s: ClientState) -> bytes:
    """Serialise ``s`` (the layout in the module docstring); :class:`StateError` if it cannot."""
    w: list[bytes] = []
    w.append(_u64(s.client_id, "client_id"))
    w.append(_blob8(s.session_id, "session_id"))
    w.append(_encode_config(s.config))
    w.append(_opt_u64(s.expected_vector_length, "expected_vector_length"))
    w.append(struct.pack(">B", STAGE_CODES[s.stage]))
    reason = None if s.abort_reason is None else s.abort_reason.encode("utf-8")
    w.append(b"\x00" if reason is None else b"\x01" + struct.pack(">I", len(reason)) + reason)
    w.append(_encode_update(s.update))
    w.append(_opt_fixed(s.rounding_seed, SEED_BYTES, "rounding_seed"))
    w.append(_encode_setup(s.setup))
    w.append(_encode_ids(sorted(s.graph_neighbours)))  # checked against the re-derived graph
    w.append(struct.pack(">I", len(s.peers)))
    for cid in sorted(s.peers):
        p = s.peers[cid]
        w.append(struct.pack(">Q", cid) + p.enc_pk + p.mask_pk + p.commitment)
    w.append(_encode_ids(sorted(s.u2)))
    w.append(_encode_shares(s.held_b))
    w.append(_encode_shares(s.held_sk))
    w.append(_blob8(s.own_b_share, "own share"))
    w.append(_encode_ids(sorted(s.signed_survivors)))
    # security: raw secrets; public keys are re-derived from them on import
    w.append(s.enc_sk + s.mask_sk + s.self_seed)
    head = STATE_MAGIC + struct.pack(">B", STATE_VERSION)
    body = b"".join(w)
    return head + body + hashlib.sha256(head + body).digest()


def decode_state(data: bytes) -> ClientState:
    """Parse :func:`encode_state` output; :class:`StateError` for any malformed input.

    Checks type, magic, version and digest first, then every field strictly (truncation,
    trailing bytes, flags, codes, counts, sorted ids, finite clip, session length). Protocol
    checks of the stored SETUP and :meth:`ClientState.check_invariants` are left to the caller.
    """
    body = _open_state(data)
    r = _StateReader(body)
    client_id = r.u(">Q", "client_id")
    session_id = r.take(r.u(">B", "session_id length"), "session_id")
    config = _decode_config(r)
    expected = r.u(">Q", "expected_vector_length") if r.flag("expected_vector_length") else None
    code = r.u(">B", "stage")
    if code not in _CODE_STAGES:
        raise StateError(f"stage code={code} unknown; the state is corrupt")
    stage = _CODE_STAGES[code]
    reason: str | None = None
    if r.flag("abort_reason"):
        raw = r.take(r.u(">I", "abort_reason length"), "abort_reason")
        try:
            reason = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateError("abort_reason is not valid UTF-8; the state is corrupt") from exc
    update = _decode_update(r)
    rounding_seed = r.take(SEED_BYTES, "rounding_seed") if r.flag("rounding_seed") else None
    setup = _decode_setup(r)
    neighbours = frozenset(r.ids("graph neighbours"))
    peer_count = r.u(">I", "peer count")
    if peer_count > msg.MAX_PARTICIPANTS:
        raise StateError(f"peer count={peer_count} exceeds {msg.MAX_PARTICIPANTS}")
    peer_list = [
        msg.PeerKeys(r.u(">Q", "peer id"), r.take(KEY_BYTES, "peer enc pk"),
                     r.take(KEY_BYTES, "peer mask pk"), r.take(msg.COMMIT_BYTES, "peer commitment"))
        for _ in range(peer_count)
    ]
    _sorted_unique([p.client_id for p in peer_list], "peer ids")
    u2 = frozenset(r.ids("share holders (u2)"))
    held_b = _decode_shares(r, "held self-mask shares")
    held_sk = _decode_shares(r, "held key shares")
    own_share = r.take(r.u(">B", "own share length"), "own share")
    signed = frozenset(r.ids("signed survivors"))
    enc_sk = r.take(KEY_BYTES, "enc sk")
    mask_sk = r.take(KEY_BYTES, "mask sk")
    self_seed = r.take(SEED_BYTES, "self-mask seed")
    r.end()
    if not msg.MIN_SESSION_BYTES <= len(session_id) <= msg.MAX_SESSION_BYTES:
        raise StateError(f"session_id length={len(session_id)} out of range; the state is corrupt")
    return ClientState(
        client_id=client_id, session_id=session_id, config=config, expected_vector_length=expected,
        stage=stage, abort_reason=reason, update=update, rounding_seed=rounding_seed, setup=setup,
        graph_neighbours=neighbours, peers={p.client_id: p for p in peer_list}, u2=u2,
        held_b=held_b, held_sk=held_sk, own_b_share=own_share, enc_sk=enc_sk, mask_sk=mask_sk,
        self_seed=self_seed, signed_survivors=signed,
    )


# ---- format helpers (big-endian integers; the update's raw words are little-endian) ---------


class _StateReader:
    """Strict cursor over an exported state body; every failure is a :class:`StateError`."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise StateError(f"client state truncated reading {what}: need {n} bytes at offset "
                             f"{self._pos}, have {len(self._data) - self._pos}; re-export the state")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u(self, fmt: str, what: str) -> int:
        return int(struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0])

    def f64(self, what: str) -> float:
        return float(struct.unpack(">d", self.take(8, what))[0])

    def flag(self, what: str) -> bool:
        value = self.u(">B", f"{what} presence flag")
        if value not in (0, 1):
            raise StateError(f"{what} presence flag={value} must be 0 or 1; the state is corrupt")
        return value == 1

    def ids(self, what: str) -> tuple[int, ...]:
        count = self.u(">I", f"{what} count")
        if count > msg.MAX_PARTICIPANTS:
            raise StateError(f"{what} count={count} exceeds {msg.MAX_PARTICIPANTS}; the state is corrupt")
        values = struct.unpack(f">{count}Q", self.take(8 * count, what))
        _sorted_unique(list(values), what)
        return tuple(int(v) for v in values)

    def end(self) -> None:
        if self._pos != len(self._data):
            raise StateError(f"{len(self._data) - self._pos} trailing bytes after the client state body")


def _open_state(data: bytes) -> bytes:
    """Check type, magic, version and digest; return the body."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"state type={type(data).__name__} must be bytes (from export_state)")
    raw = bytes(data)
    head = len(STATE_MAGIC) + 1
    if len(raw) < head + _DIGEST_BYTES:
        raise StateError(f"client state length={len(raw)} is shorter than the minimum "
                         f"{head + _DIGEST_BYTES} bytes; it is truncated or not a client state")
    if raw[: len(STATE_MAGIC)] != STATE_MAGIC:
        raise StateError(f"client state magic={raw[:4]!r} != {STATE_MAGIC!r}: not a SecAggClient state")
    if raw[len(STATE_MAGIC)] != STATE_VERSION:
        raise StateError(f"client state version={raw[len(STATE_MAGIC)]} unsupported (expected "
                         f"{STATE_VERSION}); export and import with the same fedpeft version")
    # security: no field is trusted before the digest over the whole state checks out
    if hashlib.sha256(raw[:-_DIGEST_BYTES]).digest() != raw[-_DIGEST_BYTES:]:
        # integrity against truncation/corruption only (not authenticity: the state never leaves the device)
        raise StateError("client state checksum mismatch: the state is truncated, garbled or has "
                         "trailing bytes; do not use it (abort this round)")
    return raw[head:-_DIGEST_BYTES]


def _sorted_unique(values: list[int], what: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise StateError(f"{what} must be strictly increasing; the state is corrupt")


def _u64(value: int, what: str) -> bytes:
    if not 0 <= value <= MAX_CLIENT_ID:
        raise StateError(f"{what}={value} does not fit in an unsigned 64-bit integer; cannot export")
    return struct.pack(">Q", value)


def _opt_u64(value: int | None, what: str) -> bytes:
    return b"\x00" if value is None else b"\x01" + _u64(value, what)


def _blob8(value: bytes, what: str) -> bytes:
    if len(value) > 255:
        raise StateError(f"{what} length={len(value)} exceeds 255 bytes; cannot export")
    return struct.pack(">B", len(value)) + value


def _opt_fixed(value: bytes | None, size: int, what: str) -> bytes:
    if value is None:
        return b"\x00"
    if len(value) != size:
        raise StateError(f"{what} length={len(value)} must be {size}; cannot export")
    return b"\x01" + value


def _encode_config(c: SecAggConfig | None) -> bytes:
    if c is None:
        return b"\x00"
    out = b"\x01" + struct.pack(">dBddd", float(c.clip), c.bits, float(c.expected_dropout),
                                float(c.max_abort_prob), float(c.corrupt_fraction))
    if c.threshold is None or c.degree is None:
        return out + b"\x00"
    return out + b"\x01" + struct.pack(">II", c.threshold, c.degree)


def _decode_config(r: _StateReader) -> SecAggConfig | None:
    if not r.flag("config"):
        return None
    clip, bits = r.f64("config clip"), r.u(">B", "config bits")
    dropout, max_abort = r.f64("config expected_dropout"), r.f64("config max_abort_prob")
    gamma = r.f64("config corrupt_fraction")
    threshold = degree = None
    if r.flag("config threshold/degree"):
        threshold, degree = r.u(">I", "config threshold"), r.u(">I", "config degree")
    try:
        return SecAggConfig(clip=clip, bits=bits, expected_dropout=dropout, max_abort_prob=max_abort,
                            threshold=threshold, degree=degree, corrupt_fraction=gamma)
    except SecAggConfigError as exc:
        raise StateError(f"stored config is invalid: {exc}") from exc


def _encode_update(update: npt.NDArray[Any] | None) -> bytes:
    if update is None:
        return b"\x00"
    dtype = np.dtype(update.dtype).newbyteorder("=")
    if dtype not in DTYPE_CODES:
        raise StateError(f"update dtype={update.dtype} cannot be exported; use float16, float32, "
                         "float64 or uint32 field words")
    raw = np.ascontiguousarray(update, dtype=dtype.newbyteorder("<")).tobytes()
    shape = struct.pack(f">B{update.ndim}Q", update.ndim, *update.shape)
    return b"\x01" + struct.pack(">B", DTYPE_CODES[dtype]) + shape + raw


def _decode_update(r: _StateReader) -> npt.NDArray[Any] | None:
    if not r.flag("update"):
        return None
    code = r.u(">B", "update dtype")
    if code not in _CODE_DTYPES:
        raise StateError(f"update dtype code={code} unknown; the state is corrupt")
    dtype = _CODE_DTYPES[code]
    ndim = r.u(">B", "update ndim")
    if ndim != 1:
        raise StateError(f"update ndim={ndim} must be 1; the state is corrupt")
    length = r.u(">Q", "update length")
    if length > msg.MAX_VECTOR_LENGTH:
        raise StateError(f"update length={length} exceeds {msg.MAX_VECTOR_LENGTH}; the state is corrupt")
    raw = r.take(length * dtype.itemsize, "update values")
    words = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    out: npt.NDArray[Any] = words.astype(dtype)
    return out


def _encode_setup(s: msg.Setup | None) -> bytes:
    if s is None:
        return b"\x00"
    return (b"\x01" + struct.pack(">BHHdIB", s.bits, s.threshold, s.degree, s.clip, s.vector_length,
                                   int(s.authenticated))
            + s.graph_seed + _encode_ids(list(s.participants)))


def _decode_setup(r: _StateReader) -> msg.Setup | None:
    if not r.flag("setup"):
        return None
    bits, threshold, degree = r.u(">B", "setup bits"), r.u(">H", "setup threshold"), r.u(">H", "setup degree")
    clip = r.f64("setup clip")
    if not (math.isfinite(clip) and clip > 0):
        raise StateError(f"setup clip={clip} must be finite and positive; the state is corrupt")
    length = r.u(">I", "setup vector_length")
    authenticated = r.flag("setup authenticated")
    seed = r.take(msg.GRAPH_SEED_BYTES, "setup graph seed")
    return msg.Setup(bits, threshold, degree, clip, length, seed, r.ids("setup participants"),
                     authenticated)


def _encode_ids(ids: list[int]) -> bytes:
    return struct.pack(f">I{len(ids)}Q", len(ids), *ids)


def _encode_shares(shares: dict[int, bytes]) -> bytes:
    return struct.pack(">I", len(shares)) + b"".join(struct.pack(">Q", o) + shares[o] for o in sorted(shares))


def _decode_shares(r: _StateReader, what: str) -> dict[int, bytes]:
    count = r.u(">I", f"{what} count")
    if count > msg.MAX_PARTICIPANTS:
        raise StateError(f"{what} count={count} exceeds {msg.MAX_PARTICIPANTS}; the state is corrupt")
    out: dict[int, bytes] = {}
    ids: list[int] = []
    for _ in range(count):
        owner = r.u(">Q", f"{what} owner")
        ids.append(owner)
        out[owner] = r.take(SHARE_BYTES, what)
    _sorted_unique(ids, f"{what} owners")
    return out
