"""Client side of SecAgg+ as a pure state machine: ``handle(bytes) -> bytes`` per stage.

Stages (see :mod:`privacy.secagg.stages`): SETUP -> ADVERTISE_KEYS -> SHARE_KEYS ->
COLLECT_MASKED -> DONE. Any violation raises a typed error and moves to ABORTED; an aborted
client never answers again (so it can never reveal both share kinds of a peer).
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import numpy as np
import numpy.typing as npt

from privacy.secagg import messages as msg
from privacy.secagg.config import MAX_CLIENT_ID, MIN_CLIENTS, SecAggConfig, min_safe_threshold
from privacy.secagg.errors import (
    AbortError,
    ProtocolError,
    RefusedError,
    SecAggConfigError,
    SecAggError,
    StageError,
    StateError,
    UpdateError,
)
from privacy.secagg.graph import neighbour_graph
from privacy.secagg.kdf import (
    decrypt_shares,
    key_view_digest,
    encrypt_shares,
    generate_keypair,
    KEY_BYTES,
    pairwise_mask_seed,
    public_from_private,
    self_mask_commitment,
    share_key,
)
from privacy.secagg.prg import SEED_BYTES, expand_mask
from privacy.secagg.quantize import QuantizationPlan, check_update, plan_quantization, quantize
from privacy.secagg.shamir import SHARE_BYTES, split
from privacy.secagg.stages import CLIENT_TRANSITIONS, Stage

_T = TypeVar("_T")

#: Exported client state: ``MAGIC | u8 version | body | SHA-256(MAGIC | version | body)``.
STATE_MAGIC = b"FPSC"
STATE_VERSION = 1
_DIGEST_BYTES = 32
#: Explicit wire codes (independent of enum order) for the stage and the update dtype.
_STAGE_CODES: dict[Stage, int] = {
    Stage.SETUP: 0, Stage.ADVERTISE_KEYS: 1, Stage.SHARE_KEYS: 2, Stage.COLLECT_MASKED: 3,
    Stage.DONE: 4, Stage.ABORTED: 5,
}
_CODE_STAGES = {v: k for k, v in _STAGE_CODES.items()}
_DTYPE_CODES: dict[np.dtype[Any], int] = {
    np.dtype(np.float16): 1, np.dtype(np.float32): 2, np.dtype(np.float64): 3,
}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_STAGE_RANK = {Stage.SETUP: 0, Stage.ADVERTISE_KEYS: 1, Stage.SHARE_KEYS: 2, Stage.COLLECT_MASKED: 3,
               Stage.DONE: 4}


class SecAggClient:
    """One client of one SecAgg+ round.

    ``config`` (optional) pins the parameters the client accepts; without it the client accepts
    the server's parameters subject to the security floor (``2 t > k``, ``n >= 3``).
    ``expected_vector_length`` (optional) pins the update length.
    """

    def __init__(
        self,
        client_id: int,
        session_id: bytes,
        config: SecAggConfig | None = None,
        *,
        expected_vector_length: int | None = None,
    ) -> None:
        if not 0 <= client_id <= MAX_CLIENT_ID:
            raise SecAggConfigError(f"client_id={client_id} must fit in an unsigned 64-bit integer")
        if not msg.MIN_SESSION_BYTES <= len(session_id) <= msg.MAX_SESSION_BYTES:
            raise SecAggConfigError(
                f"session_id length={len(session_id)} must be in "
                f"[{msg.MIN_SESSION_BYTES}, {msg.MAX_SESSION_BYTES}] bytes"
            )
        self.client_id = client_id
        self.session_id = bytes(session_id)
        self.config = config
        self.expected_vector_length = expected_vector_length
        self.stage = Stage.SETUP
        self.abort_reason: str | None = None
        self._update: npt.NDArray[np.floating[npt.NBitBase]] | None = None
        self._rounding_seed: bytes | None = None
        self._setup: msg.Setup | None = None
        self._plan: QuantizationPlan | None = None
        self._graph_neighbours: frozenset[int] = frozenset()
        self._peers: dict[int, msg.PeerKeys] = {}
        self._u2: frozenset[int] = frozenset()  # neighbours whose shares reached me
        self._held_b: dict[int, bytes] = {}
        self._held_sk: dict[int, bytes] = {}
        self._own_b_share = b""
        # security: fresh per-round secrets from the OS CSPRNG
        self._enc_sk, self._enc_pk = generate_keypair()
        self._mask_sk, self._mask_pk = generate_keypair()
        self._self_seed = os.urandom(SEED_BYTES)

    # ---- public API ---------------------------------------------------------------------

    def set_update(
        self, update: npt.NDArray[np.floating[npt.NBitBase]], rounding_seed: bytes | None = None
    ) -> None:
        """Provide the (DP-noised) float update before the masked-input stage.

        ``rounding_seed`` (32 B) drives stochastic rounding; default: ``os.urandom(32)``.
        """
        if self.stage not in (Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
            raise StageError(f"set_update in stage={self.stage.name}: the masked input was already sent")
        if not isinstance(update, np.ndarray) or update.ndim != 1:
            raise UpdateError(f"update shape={getattr(update, 'shape', None)} must be a 1-D array")
        length = self.expected_vector_length
        if length is not None:
            check_update(update, length)
        if rounding_seed is not None and len(rounding_seed) != SEED_BYTES:
            raise SecAggConfigError(f"rounding_seed length={len(rounding_seed)} must be {SEED_BYTES}")
        self._update = np.array(update, copy=True)
        self._rounding_seed = rounding_seed

    def handle(self, message: bytes) -> bytes:
        """Consume one server message for the current stage and return the reply."""
        if self.stage not in CLIENT_TRANSITIONS:
            raise StageError(f"client {self.client_id} is in final stage={self.stage.name}; "
                             f"reason={self.abort_reason}")
        kind, next_stage = CLIENT_TRANSITIONS[self.stage]
        try:
            header = msg.peek_header(message)
            if header.kind != kind:
                raise StageError(f"client {self.client_id} in stage={self.stage.name} got "
                                 f"{header.kind.name}; expected {kind.name}")
        except SecAggError as exc:
            self._fail(exc)
        if self.stage is Stage.SHARE_KEYS and self._update is None:
            # usage error, not a protocol violation: stay in stage so the caller can retry
            raise UpdateError(f"client {self.client_id}: call set_update() before the masked-input stage")
        handler: dict[Stage, Callable[[bytes], bytes]] = {
            Stage.SETUP: self._on_setup,
            Stage.ADVERTISE_KEYS: self._on_keys,
            Stage.SHARE_KEYS: self._on_forward,
            Stage.COLLECT_MASKED: self._on_unmask_request,
        }
        try:
            reply = handler[self.stage](message)
        except SecAggError as exc:
            self._fail(exc)
        self.stage = next_stage
        return reply

    @property
    def quantization(self) -> QuantizationPlan:
        """Quantisation plan (after SETUP)."""
        if self._plan is None:
            raise StageError("quantization plan is known only after the SETUP message")
        return self._plan

    # ---- state export / import (Flower context.state) -----------------------------------

    def export_state(self) -> bytes:
        """Serialise the complete client state (strict, versioned binary format; no pickle).

        security: the result holds the client's X25519 private keys, self-mask seed, held
        Shamir shares and plaintext update. It must stay on the device (e.g. Flower's node-local
        ``context.state``), never be sent to the server, and never be imported twice or rolled
        back to an older export: a stale state could answer a second unmask request and reveal
        both share kinds of a peer (see docs/secagg.md, "Client state between messages").
        """
        w: list[bytes] = []
        w.append(_u64(self.client_id, "client_id"))
        w.append(_blob8(self.session_id, "session_id"))
        w.append(_encode_config(self.config))
        w.append(_opt_u64(self.expected_vector_length, "expected_vector_length"))
        w.append(struct.pack(">B", _STAGE_CODES[self.stage]))
        reason = None if self.abort_reason is None else self.abort_reason.encode("utf-8")
        w.append(b"\x00" if reason is None else b"\x01" + struct.pack(">I", len(reason)) + reason)
        w.append(_encode_update(self._update))
        w.append(_opt_fixed(self._rounding_seed, SEED_BYTES, "rounding_seed"))
        w.append(_encode_setup(self._setup))
        w.append(_encode_ids(sorted(self._graph_neighbours)))  # checked against the re-derived graph
        w.append(struct.pack(">I", len(self._peers)))
        for cid in sorted(self._peers):
            p = self._peers[cid]
            w.append(struct.pack(">Q", cid) + p.enc_pk + p.mask_pk + p.commitment)
        w.append(_encode_ids(sorted(self._u2)))
        w.append(_encode_shares(self._held_b))
        w.append(_encode_shares(self._held_sk))
        w.append(_blob8(self._own_b_share, "own share"))
        # security: raw secrets; public keys are re-derived from them on import
        w.append(self._enc_sk + self._mask_sk + self._self_seed)
        head = STATE_MAGIC + struct.pack(">B", STATE_VERSION)
        body = b"".join(w)
        return head + body + hashlib.sha256(head + body).digest()

    @classmethod
    def import_state(cls, data: bytes, config: SecAggConfig | None = None) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output; it continues the round unchanged.

        Raises :class:`StateError` for truncated, garbled, trailing, unknown-version or
        inconsistent input; nothing is half-restored. ``config`` re-applies the local pin: it
        must equal the pin stored in the state (if any), and an already accepted SETUP must
        satisfy it.
        """
        body = _open_state(data)
        r = _StateReader(body)
        client_id = r.u(">Q", "client_id")
        session_id = r.take(r.u(">B", "session_id length"), "session_id")
        stored_config = _decode_config(r)
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
        enc_sk = r.take(KEY_BYTES, "enc sk")
        mask_sk = r.take(KEY_BYTES, "mask sk")
        self_seed = r.take(SEED_BYTES, "self-mask seed")
        r.end()

        if not msg.MIN_SESSION_BYTES <= len(session_id) <= msg.MAX_SESSION_BYTES:
            raise StateError(f"session_id length={len(session_id)} out of range; the state is corrupt")
        # security: a pinned config can be re-applied or kept, never silently replaced
        if stored_config is not None and config is not None and config != stored_config:
            raise StateError(f"config={config} differs from the pinned config={stored_config} the state "
                             "was created with; import with the same config (or None)")
        pin = config if config is not None else stored_config
        plan: QuantizationPlan | None = None
        if setup is not None:
            try:
                _validate_setup(setup, client_id, expected)  # security: same floor checks as at SETUP
                if pin is not None:
                    _check_pinned_config(setup, pin)
                plan = plan_quantization(setup.clip, len(setup.participants), setup.bits)
                derived = neighbour_graph(setup.participants, setup.degree, setup.graph_seed)[client_id]
            except SecAggError as exc:
                raise StateError(f"stored SETUP of client {client_id} is rejected: {exc}") from exc
            if derived != neighbours:
                raise StateError("stored graph neighbours differ from the graph of the stored SETUP")
        peers = {p.client_id: p for p in peer_list}
        _check_state_invariants(stage, reason, update, setup, expected, neighbours, peers, u2,
                                held_b, held_sk, own_share)
        try:
            enc_pk, mask_pk = public_from_private(enc_sk), public_from_private(mask_sk)
        except ValueError as exc:  # pragma: no cover - any 32 bytes are a valid X25519 scalar
            raise StateError(f"stored private key is invalid: {exc}") from exc

        client = cls.__new__(cls)  # all fields validated above: no half-restored client
        client.client_id = client_id
        client.session_id = session_id
        client.config = pin
        client.expected_vector_length = expected
        client.stage = stage
        client.abort_reason = reason
        client._update = update
        client._rounding_seed = rounding_seed
        client._setup = setup
        client._plan = plan
        client._graph_neighbours = neighbours
        client._peers = peers
        client._u2 = u2
        client._held_b = held_b
        client._held_sk = held_sk
        client._own_b_share = own_share
        client._enc_sk, client._enc_pk = enc_sk, enc_pk  # security: secrets restored on-device only
        client._mask_sk, client._mask_pk = mask_sk, mask_pk
        client._self_seed = self_seed
        return client

    # ---- stages -------------------------------------------------------------------------

    def _fail(self, exc: SecAggError) -> NoReturn:
        self.stage = Stage.ABORTED
        self.abort_reason = str(exc)
        raise exc

    def _on_setup(self, data: bytes) -> bytes:
        s = msg.decode_setup(data, self.session_id, self.client_id)
        n = len(s.participants)
        _validate_setup(s, self.client_id, self.expected_vector_length)
        if self.config is not None:
            _check_pinned_config(s, self.config)
        if self._update is not None and self._update.shape[0] != s.vector_length:
            raise UpdateError(f"update length={self._update.shape[0]} != round vector_length={s.vector_length}")
        try:
            self._plan = plan_quantization(s.clip, n, s.bits)
            graph = neighbour_graph(s.participants, s.degree, s.graph_seed)
        except SecAggConfigError as exc:
            raise ProtocolError(f"invalid round parameters from server: {exc}") from exc
        self._setup = s
        self._graph_neighbours = graph[self.client_id]
        own = self._own_keys()
        return msg.encode_advertise(self.session_id, self.client_id, own[:32], own[32:64], own[64:])

    def _on_keys(self, data: bytes) -> bytes:
        s = _need(self._setup)
        peers = msg.decode_keys(data, self.session_id, self.client_id)
        ids = {p.client_id for p in peers}
        if not ids <= self._graph_neighbours:  # security: share only with graph neighbours
            raise ProtocolError(f"server listed non-neighbours {sorted(ids - self._graph_neighbours)[:5]}")
        if len(peers) + 1 < s.threshold:
            raise AbortError(f"only {len(peers)} neighbours advertised keys; need threshold - 1 = "
                             f"{s.threshold - 1}")
        own = {self._enc_pk, self._mask_pk}
        for p in peers:  # security: reject reflected own keys and duplicated peer keys
            if p.enc_pk in own or p.mask_pk in own or p.enc_pk == p.mask_pk:
                raise ProtocolError(f"peer {p.client_id} advertises a key equal to another key")
        if len({p.mask_pk for p in peers}) != len(peers) or len({p.enc_pk for p in peers}) != len(peers):
            raise ProtocolError("two peers advertise the same public key (sybil or replay)")
        self._peers = {p.client_id: p for p in peers}
        index = {cid: i + 1 for i, cid in enumerate(s.participants)}  # Shamir x = 1-based index
        me = index[self.client_id]
        xs = [index[cid] for cid in sorted(ids)] + [me]
        b_shares = split(self._self_seed, s.threshold, xs)
        sk_shares = split(self._mask_sk, s.threshold, xs)
        self._own_b_share = b_shares[me]  # security: own key share is discarded, never revealed
        del sk_shares[me]
        cts: dict[int, bytes] = {}
        for cid in sorted(ids):
            key = share_key(self._enc_sk, self._peers[cid].enc_pk, self.session_id, self.client_id, cid)
            x = index[cid]
            view = key_view_digest(self._own_keys(), self._peer_keys(cid))
            cts[cid] = encrypt_shares(key, self.session_id, self.client_id, cid, b_shares[x], sk_shares[x], view)
        return msg.encode_shares(self.session_id, self.client_id, cts)

    def _own_keys(self) -> bytes:
        commit = self_mask_commitment(self.session_id, self.client_id, self._self_seed)
        return self._enc_pk + self._mask_pk + commit

    def _peer_keys(self, cid: int) -> bytes:
        p = self._peers[cid]
        return p.enc_pk + p.mask_pk + p.commitment

    def _on_forward(self, data: bytes) -> bytes:
        s = _need(self._setup)
        plan = _need(self._plan)
        update = _need(self._update)
        cts = msg.decode_forward(data, self.session_id, self.client_id)
        unknown = set(cts) - set(self._peers)
        if unknown:
            raise ProtocolError(f"forwarded shares from non-peers {sorted(unknown)[:5]}")
        if len(cts) + 1 < s.threshold:  # security: too few peers -> the sum would cover too few inputs
            raise AbortError(f"only {len(cts)} peers shared keys; need threshold - 1 = {s.threshold - 1}")
        for sender, ct in cts.items():
            key = share_key(self._enc_sk, self._peers[sender].enc_pk, self.session_id, self.client_id, sender)
            view = key_view_digest(self._peer_keys(sender), self._own_keys())
            b_share, sk_share = decrypt_shares(key, self.session_id, sender, self.client_id, ct, view)
            self._held_b[sender], self._held_sk[sender] = b_share, sk_share
        self._u2 = frozenset(cts)
        check_update(update, s.vector_length)
        seed = self._rounding_seed if self._rounding_seed is not None else os.urandom(SEED_BYTES)
        acc = quantize(update, plan, seed)
        acc += expand_mask(self._self_seed, s.vector_length)  # uint32 wraps mod 2^32
        for peer in sorted(self._u2):
            pseed = pairwise_mask_seed(self._mask_sk, self._peers[peer].mask_pk, self.session_id,
                                       self.client_id, peer)
            mask = expand_mask(pseed, s.vector_length)
            if self.client_id < peer:  # signed pairwise masks cancel in the sum
                acc += mask
            else:
                acc -= mask
        acc &= np.uint32(plan.modulus - 1)
        self._update = None  # drop the plaintext update once masked
        words = acc if plan.word_dtype is np.uint32 else acc.astype(np.uint16)
        return msg.encode_masked(self.session_id, self.client_id, words)

    def _on_unmask_request(self, data: bytes) -> bytes:
        s = _need(self._setup)
        survivors, dropped = msg.decode_unmask_request(data, self.session_id, self.client_id)
        sv, dr = set(survivors), set(dropped)
        if sv & dr:  # security: never reveal both the self-mask and the key share of one client
            raise RefusedError(f"clients {sorted(sv & dr)[:5]} listed as both survivor and dropped")
        if sv | dr != set(self._u2):  # security: the partition must be exactly my share holders
            raise RefusedError(
                f"survivors+dropped must equal the {len(self._u2)} peers whose shares I hold"
            )
        if len(sv) + 1 < s.threshold:  # security: refuse to unmask a sum over too few clients
            raise RefusedError(f"only {len(sv)} surviving peers; need threshold - 1 = {s.threshold - 1}")
        b = {i: self._held_b[i] for i in sv}
        b[self.client_id] = self._own_b_share  # I survived: my own self-mask share may be revealed
        sk = {i: self._held_sk[i] for i in dr}
        self._held_b.clear()
        self._held_sk.clear()
        return msg.encode_unmask_shares(self.session_id, self.client_id, b, sk)


def _validate_setup(s: msg.Setup, client_id: int, expected_vector_length: int | None) -> None:
    """Round-parameter checks every client applies to SETUP (also re-run on state import)."""
    n = len(s.participants)
    if s.vector_length < 1:
        raise ProtocolError(f"vector_length={s.vector_length} must be >= 1")
    if client_id not in s.participants:
        raise ProtocolError(f"client {client_id} is not in the participant list")
    if n < MIN_CLIENTS:
        raise RefusedError(f"n={n} participants < {MIN_CLIENTS}: the sum would reveal inputs")
    # security: the client enforces the threshold floor whatever the server says.
    if s.degree < 2 or not min_safe_threshold(min(s.degree, n - 1)) <= s.threshold <= min(s.degree, n - 1):
        raise RefusedError(
            f"threshold={s.threshold}, degree={s.degree} violate 2*threshold > degree + 1 for n={n}"
        )
    if expected_vector_length is not None and s.vector_length != expected_vector_length:
        raise ProtocolError(f"vector_length={s.vector_length} != expected {expected_vector_length}")


def _check_pinned_config(s: msg.Setup, c: SecAggConfig) -> None:
    """Raise unless the server's round parameters ``s`` agree with the local pin ``c``."""
    n = len(s.participants)
    if (c.bits, c.clip) != (s.bits, s.clip):
        raise ProtocolError(f"server bits={s.bits}, clip={s.clip} differ from local config "
                            f"bits={c.bits}, clip={c.clip}")
    if c.threshold is not None and c.degree is not None:
        if s.threshold < c.threshold or s.degree != min(c.degree, n - 1):
            raise RefusedError(f"server threshold={s.threshold}, degree={s.degree} differ from "
                               f"local threshold={c.threshold}, degree={c.degree}")


def _need(value: _T | None) -> _T:
    if value is None:
        raise StageError("protocol state missing for this stage")
    return value


# ---- state format helpers (big-endian integers; the update's raw words are little-endian) -----


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
    if any(b <= a for a, b in zip(values, values[1:])):
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
    out = b"\x01" + struct.pack(">dBdd", float(c.clip), c.bits, float(c.expected_dropout), float(c.max_abort_prob))
    if c.threshold is None or c.degree is None:
        return out + b"\x00"
    return out + b"\x01" + struct.pack(">II", c.threshold, c.degree)


def _decode_config(r: _StateReader) -> SecAggConfig | None:
    if not r.flag("config"):
        return None
    clip, bits = r.f64("config clip"), r.u(">B", "config bits")
    dropout, max_abort = r.f64("config expected_dropout"), r.f64("config max_abort_prob")
    threshold = degree = None
    if r.flag("config threshold/degree"):
        threshold, degree = r.u(">I", "config threshold"), r.u(">I", "config degree")
    try:
        return SecAggConfig(clip=clip, bits=bits, expected_dropout=dropout, max_abort_prob=max_abort,
                            threshold=threshold, degree=degree)
    except SecAggConfigError as exc:
        raise StateError(f"stored config is invalid: {exc}") from exc


def _encode_update(update: npt.NDArray[np.floating[npt.NBitBase]] | None) -> bytes:
    if update is None:
        return b"\x00"
    dtype = np.dtype(update.dtype).newbyteorder("=")
    if dtype not in _DTYPE_CODES:
        raise StateError(f"update dtype={update.dtype} cannot be exported; use float16, float32 or float64")
    raw = np.ascontiguousarray(update, dtype=dtype.newbyteorder("<")).tobytes()
    shape = struct.pack(f">B{update.ndim}Q", update.ndim, *update.shape)
    return b"\x01" + struct.pack(">B", _DTYPE_CODES[dtype]) + shape + raw


def _decode_update(r: _StateReader) -> npt.NDArray[np.floating[npt.NBitBase]] | None:
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
    out: npt.NDArray[np.floating[npt.NBitBase]] = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    return out


def _encode_setup(s: msg.Setup | None) -> bytes:
    if s is None:
        return b"\x00"
    return (b"\x01" + struct.pack(">BHHdI", s.bits, s.threshold, s.degree, s.clip, s.vector_length)
            + s.graph_seed + _encode_ids(list(s.participants)))


def _decode_setup(r: _StateReader) -> msg.Setup | None:
    if not r.flag("setup"):
        return None
    bits, threshold, degree = r.u(">B", "setup bits"), r.u(">H", "setup threshold"), r.u(">H", "setup degree")
    clip = r.f64("setup clip")
    if not (math.isfinite(clip) and clip > 0):
        raise StateError(f"setup clip={clip} must be finite and positive; the state is corrupt")
    length = r.u(">I", "setup vector_length")
    seed = r.take(msg.GRAPH_SEED_BYTES, "setup graph seed")
    return msg.Setup(bits, threshold, degree, clip, length, seed, r.ids("setup participants"))


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


def _check_state_invariants(
    stage: Stage, reason: str | None, update: npt.NDArray[np.floating[npt.NBitBase]] | None,
    setup: msg.Setup | None, expected: int | None, neighbours: frozenset[int],
    peers: dict[int, msg.PeerKeys], u2: frozenset[int], held_b: dict[int, bytes],
    held_sk: dict[int, bytes], own_share: bytes,
) -> None:
    """Cross-field consistency of a decoded state (raises :class:`StateError`)."""
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
    if stage is Stage.COLLECT_MASKED and not set(held_b) == set(held_sk) == u2:
        bad("held shares must come from exactly the share holders")
    if stage is Stage.DONE and (held_b or held_sk):
        bad("held shares kept after the unmask reply")
