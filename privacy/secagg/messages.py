"""Explicit, strictly parsed wire format of the protocol messages.

Every message is ``header || body``; integers are big-endian except the masked vector
(little-endian words). Header: ``b"FPSA" | u8 version | u8 kind | u8 len(session) | session |
u64 client_id`` where ``client_id`` is the client the message is from (client -> server) or to
(server -> client). Parsers reject truncation, trailing bytes, unknown kinds, duplicate or
unsorted id lists and out-of-range sizes with :class:`MalformedMessageError`. No pickle/json.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from privacy.secagg.errors import MalformedMessageError, StageError
from privacy.secagg.kdf import KEY_BYTES, SHARE_CIPHERTEXT_BYTES
from privacy.secagg.shamir import SHARE_BYTES

MAGIC = b"FPSA"
VERSION = 1
MAX_SESSION_BYTES = 64
MIN_SESSION_BYTES = 8
MAX_PARTICIPANTS = 1 << 16
MAX_VECTOR_LENGTH = (1 << 32) - 1
GRAPH_SEED_BYTES = 32
COMMIT_BYTES = 32


class Kind(enum.IntEnum):
    """Message kinds (server -> client: 1..4, client -> server: 11..14)."""

    SETUP = 1
    KEYS = 2
    FORWARD_SHARES = 3
    UNMASK_REQUEST = 4
    ADVERTISE = 11
    SHARES = 12
    MASKED = 13
    UNMASK_SHARES = 14


class _Reader:
    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessageError(f"message type={type(data).__name__} must be bytes")
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self._pos + n > len(self._view):
            raise MalformedMessageError(
                f"message truncated reading {what}: need {n} bytes at offset {self._pos}, "
                f"have {len(self._view) - self._pos}"
            )
        out = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return out

    def view(self, n: int, what: str) -> memoryview:
        if n < 0 or self._pos + n > len(self._view):
            raise MalformedMessageError(f"message truncated reading {what}: need {n} bytes")
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple[int | float, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def u(self, fmt: str, what: str) -> int:
        value = self.unpack(fmt, what)[0]
        return int(value)

    def end(self) -> None:
        if self._pos != len(self._view):
            raise MalformedMessageError(f"{len(self._view) - self._pos} trailing bytes after message")

    def ids(self, what: str, limit: int = MAX_PARTICIPANTS) -> tuple[int, ...]:
        count = self.u(">I", f"{what} count")
        if count > limit:
            raise MalformedMessageError(f"{what} count={count} exceeds {limit}")
        values = struct.unpack(f">{count}Q", self.take(8 * count, what))
        _check_sorted_unique(values, what)
        return tuple(values)


def _check_sorted_unique(values: tuple[int, ...] | list[int], what: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise MalformedMessageError(f"{what} must be strictly increasing (sorted, no duplicates)")


@dataclass(frozen=True)
class Header:
    """Parsed header."""

    kind: Kind
    session_id: bytes
    client_id: int


def encode_header(kind: Kind, session_id: bytes, client_id: int) -> bytes:
    """Header bytes."""
    return MAGIC + struct.pack(">BBB", VERSION, int(kind), len(session_id)) + session_id + struct.pack(
        ">Q", client_id
    )


def _read_header(r: _Reader) -> Header:
    if r.take(4, "magic") != MAGIC:
        raise MalformedMessageError("bad magic: not a fedpeft secagg message")
    version, kind, sid_len = r.unpack(">BBB", "header")
    if version != VERSION:
        raise MalformedMessageError(f"version={version} unsupported (expected {VERSION})")
    try:
        parsed_kind = Kind(int(kind))
    except ValueError as exc:
        raise MalformedMessageError(f"unknown message kind={kind}") from exc
    if not MIN_SESSION_BYTES <= int(sid_len) <= MAX_SESSION_BYTES:
        raise MalformedMessageError(f"session id length={sid_len} out of range")
    session_id = r.take(int(sid_len), "session id")
    return Header(parsed_kind, session_id, r.u(">Q", "client id"))


def peek_header(data: bytes) -> Header:
    """Parse only the header (for dispatch and stage checks)."""
    return _read_header(_Reader(data))


def open_message(data: bytes, expected: Kind, session_id: bytes, client_id: int) -> _Reader:
    """Check header kind, session and party; return a reader positioned at the body."""
    r = _Reader(data)
    header = _read_header(r)
    if header.kind != expected:
        raise StageError(f"message kind={header.kind.name} not accepted now; expected {expected.name}")
    if header.session_id != session_id:  # security: no cross-session replay
        raise MalformedMessageError(
            f"session id {header.session_id.hex()} does not match {session_id.hex()}"
        )
    if header.client_id != client_id:  # security: sender/recipient must match the channel
        raise MalformedMessageError(f"message names client_id={header.client_id}, channel is {client_id}")
    return r


# ---- server -> client -------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """Round parameters, public graph seed and the sorted participant list."""

    bits: int
    threshold: int
    degree: int
    clip: float
    vector_length: int
    graph_seed: bytes
    participants: tuple[int, ...]


def encode_setup(session_id: bytes, to: int, m: Setup) -> bytes:
    return (
        encode_header(Kind.SETUP, session_id, to)
        + struct.pack(">BHHdI", m.bits, m.threshold, m.degree, m.clip, m.vector_length)
        + m.graph_seed
        + struct.pack(f">I{len(m.participants)}Q", len(m.participants), *m.participants)
    )


def decode_setup(data: bytes, session_id: bytes, me: int) -> Setup:
    r = open_message(data, Kind.SETUP, session_id, me)
    bits, threshold, degree, clip, length = r.unpack(">BHHdI", "setup parameters")
    seed = r.take(GRAPH_SEED_BYTES, "graph seed")
    participants = r.ids("participants")
    r.end()
    return Setup(int(bits), int(threshold), int(degree), float(clip), int(length), seed, participants)


@dataclass(frozen=True)
class PeerKeys:
    """Advertised keys of one neighbour."""

    client_id: int
    enc_pk: bytes
    mask_pk: bytes
    commitment: bytes


def encode_keys(session_id: bytes, to: int, peers: list[PeerKeys]) -> bytes:
    peers = sorted(peers, key=lambda p: p.client_id)
    body = b"".join(struct.pack(">Q", p.client_id) + p.enc_pk + p.mask_pk + p.commitment for p in peers)
    return encode_header(Kind.KEYS, session_id, to) + struct.pack(">I", len(peers)) + body


def decode_keys(data: bytes, session_id: bytes, me: int) -> list[PeerKeys]:
    r = open_message(data, Kind.KEYS, session_id, me)
    count = r.u(">I", "peer count")
    if count > MAX_PARTICIPANTS:
        raise MalformedMessageError(f"peer count={count} exceeds {MAX_PARTICIPANTS}")
    peers = [
        PeerKeys(r.u(">Q", "peer id"), r.take(KEY_BYTES, "enc pk"), r.take(KEY_BYTES, "mask pk"),
                 r.take(COMMIT_BYTES, "commitment"))
        for _ in range(count)
    ]
    r.end()
    _check_sorted_unique([p.client_id for p in peers], "peer ids")
    return peers


def encode_forward(session_id: bytes, to: int, cts: dict[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">Q", s) + cts[s] for s in sorted(cts))
    return encode_header(Kind.FORWARD_SHARES, session_id, to) + struct.pack(">I", len(cts)) + body


def decode_forward(data: bytes, session_id: bytes, me: int) -> dict[int, bytes]:
    r = open_message(data, Kind.FORWARD_SHARES, session_id, me)
    return _read_ciphertexts(r, "forwarded shares")


def encode_unmask_request(session_id: bytes, to: int, survivors: list[int], dropped: list[int]) -> bytes:
    s, d = sorted(survivors), sorted(dropped)
    return (
        encode_header(Kind.UNMASK_REQUEST, session_id, to)
        + struct.pack(f">I{len(s)}Q", len(s), *s)
        + struct.pack(f">I{len(d)}Q", len(d), *d)
    )


def decode_unmask_request(data: bytes, session_id: bytes, me: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    r = open_message(data, Kind.UNMASK_REQUEST, session_id, me)
    survivors = r.ids("survivors")
    dropped = r.ids("dropped")
    r.end()
    return survivors, dropped


# ---- client -> server -------------------------------------------------------------------


def encode_advertise(session_id: bytes, me: int, enc_pk: bytes, mask_pk: bytes, commitment: bytes) -> bytes:
    return encode_header(Kind.ADVERTISE, session_id, me) + enc_pk + mask_pk + commitment


def decode_advertise(data: bytes, session_id: bytes, sender: int) -> tuple[bytes, bytes, bytes]:
    r = open_message(data, Kind.ADVERTISE, session_id, sender)
    out = (r.take(KEY_BYTES, "enc pk"), r.take(KEY_BYTES, "mask pk"), r.take(COMMIT_BYTES, "commitment"))
    r.end()
    return out


def encode_shares(session_id: bytes, me: int, cts: dict[int, bytes]) -> bytes:
    body = b"".join(struct.pack(">Q", rcv) + cts[rcv] for rcv in sorted(cts))
    return encode_header(Kind.SHARES, session_id, me) + struct.pack(">I", len(cts)) + body


def decode_shares(data: bytes, session_id: bytes, sender: int) -> dict[int, bytes]:
    r = open_message(data, Kind.SHARES, session_id, sender)
    return _read_ciphertexts(r, "shares")


def _read_ciphertexts(r: _Reader, what: str) -> dict[int, bytes]:
    count = r.u(">I", f"{what} count")
    if count > MAX_PARTICIPANTS:
        raise MalformedMessageError(f"{what} count={count} exceeds {MAX_PARTICIPANTS}")
    ids: list[int] = []
    out: dict[int, bytes] = {}
    for _ in range(count):
        cid = r.u(">Q", f"{what} id")
        ids.append(cid)
        out[cid] = r.take(SHARE_CIPHERTEXT_BYTES, f"{what} ciphertext")
    r.end()
    _check_sorted_unique(ids, f"{what} ids")
    return out


def encode_masked(session_id: bytes, me: int, words: npt.NDArray[np.uint16] | npt.NDArray[np.uint32]) -> bytes:
    item = words.dtype.itemsize
    return (
        encode_header(Kind.MASKED, session_id, me)
        + struct.pack(">BI", item, words.shape[0])
        + words.astype(words.dtype.newbyteorder("<"), copy=False).tobytes()
    )


def decode_masked(
    data: bytes, session_id: bytes, sender: int, length: int, dtype: type[np.uint16] | type[np.uint32]
) -> npt.NDArray[np.uint16] | npt.NDArray[np.uint32]:
    r = open_message(data, Kind.MASKED, session_id, sender)
    item, count = r.unpack(">BI", "vector header")
    want = np.dtype(dtype).itemsize
    if int(item) != want or int(count) != length:  # security: exact size, no padding/truncation
        raise MalformedMessageError(
            f"masked vector from client {sender} has word size={item}, length={count}; "
            f"expected {want} and {length}"
        )
    words = np.frombuffer(r.view(want * length, "masked vector"), dtype=np.dtype(dtype).newbyteorder("<"))
    r.end()
    return words


def encode_unmask_shares(session_id: bytes, me: int, b_shares: dict[int, bytes], sk_shares: dict[int, bytes]) -> bytes:
    def block(shares: dict[int, bytes]) -> bytes:
        return struct.pack(">I", len(shares)) + b"".join(struct.pack(">Q", o) + shares[o] for o in sorted(shares))

    return encode_header(Kind.UNMASK_SHARES, session_id, me) + block(b_shares) + block(sk_shares)


def decode_unmask_shares(data: bytes, session_id: bytes, sender: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
    r = open_message(data, Kind.UNMASK_SHARES, session_id, sender)
    blocks: list[dict[int, bytes]] = []
    for what in ("self-mask shares", "key shares"):
        count = r.u(">I", f"{what} count")
        if count > MAX_PARTICIPANTS:
            raise MalformedMessageError(f"{what} count={count} exceeds {MAX_PARTICIPANTS}")
        ids: list[int] = []
        block: dict[int, bytes] = {}
        for _ in range(count):
            owner = r.u(">Q", f"{what} owner")
            ids.append(owner)
            block[owner] = r.take(SHARE_BYTES, what)
        _check_sorted_unique(ids, f"{what} owners")
        blocks.append(block)
    r.end()
    return blocks[0], blocks[1]
