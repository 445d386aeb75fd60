"""Explicit, strictly parsed wire format of the protocol messages.

Every message is ``header || body``; integers are big-endian except the masked vector
(little-endian words). Header: ``b"FPSA" | u8 version | u8 kind | u8 len(session) | session |
u64 client_id`` where ``client_id`` is the client the message is from (client -> server) or to
(server -> client). Parsers reject truncation, trailing bytes, unknown kinds, duplicate or
unsorted id lists and out-of-range sizes with :class:`MalformedMessageError`. No pickle/json.

Below, ``ids`` is ``u32 count | count x u64``, strictly increasing, ``count <=``
:data:`MAX_PARTICIPANTS`. The messages follow the rounds of Bonawitz et al. (CCS 2017, sec. 4:
AdvertiseKeys, ShareKeys, MaskedInputCollection, ConsistencyCheck in authenticated rounds only,
Unmasking) restricted, as in SecAgg+ (Bell et al., CCS 2020), to each client's neighbours in the
public graph. Pure encoders/decoders on bytes: no I/O.

In an authenticated round (SETUP's flag; Bonawitz et al. sec. 6) each advertisement carries
the sender's node certificate (DER, :mod:`fedpeft.secagg.identity`) and its Ed25519 signature
over :func:`~fedpeft.secagg.identity.advertisement_message`, and the server forwards both
with the keys: ``? signed`` is ``u8 flag`` then, if 1, ``u16 len | certificate | 64 B
signature``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedpeft.secagg.errors import MalformedMessageError, StageError
from fedpeft.secagg.identity import MAX_CERT_BYTES, SIGNATURE_BYTES
from fedpeft.secagg.kdf import KEY_BYTES, SHARE_CIPHERTEXT_BYTES
from fedpeft.secagg.packing import pack_words, packed_size, unpack_words
from fedpeft.secagg.shamir import SHARE_BYTES

#: First 4 bytes of every message.
MAGIC = b"FPSA"
#: Wire-format version (header byte 5); any other value is rejected.
VERSION = 3  # 2: masked inputs bit-packed; 3: authenticated rounds (SETUP flag, signed keys)
#: Longest session id (the id binds every message and key to one round).
MAX_SESSION_BYTES = 64
#: Shortest session id.
MIN_SESSION_BYTES = 8
#: Largest count of any id or share list in a message.
MAX_PARTICIPANTS = 1 << 16
#: Largest update length (it travels as a u32).
MAX_VECTOR_LENGTH = (1 << 32) - 1
#: Length of the server's public graph seed in SETUP.
GRAPH_SEED_BYTES = 32
#: Length of a self-mask commitment (SHA-256, :func:`fedpeft.secagg.kdf.self_mask_commitment`).
COMMIT_BYTES = 32


class Kind(enum.IntEnum):
    """Message kinds, the ``u8 kind`` header byte (server -> client: 1..5, client -> server: 11..15).

    Each stage accepts exactly one kind (:mod:`fedpeft.secagg.stages`).
    """

    SETUP = 1
    KEYS = 2
    FORWARD_SHARES = 3
    UNMASK_REQUEST = 4
    CONSISTENCY_REQUEST = 5
    ADVERTISE = 11
    SHARES = 12
    MASKED = 13
    UNMASK_SHARES = 14
    CONSISTENCY_SIGNATURE = 15


class _Reader:
    """Strict cursor over one message; every failure is a :class:`MalformedMessageError`."""

    def __init__(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedMessageError(f"message type={type(data).__name__} must be bytes")
        view = memoryview(data)
        if not view.c_contiguous:  # only C-contiguous views can be cast; copy the others
            view = memoryview(view.tobytes())
        self._view = view.cast("B")
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

    def flag(self, what: str) -> bool:
        value = self.u(">B", f"{what} flag")
        if value not in (0, 1):
            raise MalformedMessageError(f"{what} flag={value} must be 0 or 1")
        return value == 1

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
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise MalformedMessageError(f"{what} must be strictly increasing (sorted, no duplicates)")


@dataclass(frozen=True)
class Header:
    """Parsed header: the message ``kind``, its ``session_id`` and the client it is from or to."""

    kind: Kind
    session_id: bytes
    client_id: int


def encode_header(kind: Kind, session_id: bytes, client_id: int) -> bytes:
    """``MAGIC | u8 VERSION | u8 kind | u8 len(session_id) | session_id | u64 client_id``."""
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
    """Parse only the header (for dispatch and stage checks); the body is not read.

    Raises :class:`MalformedMessageError` for bad magic, version, kind or session length.
    """
    return _read_header(_Reader(data))


def open_message(data: bytes, expected: Kind, session_id: bytes, client_id: int) -> _Reader:
    """Check header kind, session and party; return a reader positioned at the body.

    Raises :class:`StageError` for another kind and :class:`MalformedMessageError` for another
    session (no cross-session replay) or another ``client_id`` than the channel's.
    """
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
    """Round parameters, public graph seed and the sorted participant list (SETUP body).

    ``threshold`` is Shamir's t, ``degree`` the neighbour graph's k (Bell et al. CCS 2020),
    ``bits`` the modulus 2^bits, ``clip`` the per-coordinate bound of the quantisation grid.
    """

    bits: int
    threshold: int
    degree: int
    clip: float
    vector_length: int
    graph_seed: bytes
    participants: tuple[int, ...]
    authenticated: bool = False  # advertisements are signed and verified (identity.py)


def encode_setup(session_id: bytes, to: int, m: Setup) -> bytes:
    """SETUP message from the server to client ``to``, which opens the round.

    Body: ``u8 bits | u16 threshold | u16 degree | f64 clip | u32 vector_length |
    u8 authenticated | 32 B graph_seed | ids participants``.
    """
    return (
        encode_header(Kind.SETUP, session_id, to)
        + struct.pack(">BHHdIB", m.bits, m.threshold, m.degree, m.clip, m.vector_length,
                      int(m.authenticated))
        + m.graph_seed
        + struct.pack(f">I{len(m.participants)}Q", len(m.participants), *m.participants)
    )


def decode_setup(data: bytes, session_id: bytes, me: int) -> Setup:
    """Parse a SETUP addressed to client ``me`` (format only; the client checks the values)."""
    r = open_message(data, Kind.SETUP, session_id, me)
    bits, threshold, degree, clip, length = r.unpack(">BHHdI", "setup parameters")
    authenticated = r.flag("authenticated")
    seed = r.take(GRAPH_SEED_BYTES, "graph seed")
    participants = r.ids("participants")
    r.end()
    return Setup(int(bits), int(threshold), int(degree), float(clip), int(length), seed, participants,
                 authenticated)


@dataclass(frozen=True)
class PeerKeys:
    """Advertised keys of one neighbour (Bonawitz et al.'s ``c_pk``, ``s_pk``) and its commitment.

    ``enc_pk`` (X25519, 32 B) keys the share encryption, ``mask_pk`` (X25519, 32 B) the pairwise
    masks; ``commitment`` (32 B) commits to the self-mask seed.
    """

    client_id: int
    enc_pk: bytes
    mask_pk: bytes
    commitment: bytes
    certificate: bytes = b""  # DER node certificate (authenticated rounds only)
    signature: bytes = b""  # its Ed25519 signature of the advertisement


def _cert_and_signature(certificate: bytes, signature: bytes) -> bytes:
    """``u16 len | certificate | 64 B signature``."""
    if not 0 < len(certificate) <= MAX_CERT_BYTES or len(signature) != SIGNATURE_BYTES:
        raise MalformedMessageError(f"certificate of {len(certificate)} B / signature of "
                                    f"{len(signature)} B cannot be encoded")
    return struct.pack(">H", len(certificate)) + certificate + signature


def _read_cert_and_signature(r: _Reader, what: str) -> tuple[bytes, bytes]:
    length = r.u(">H", f"{what} certificate length")
    if not 0 < length <= MAX_CERT_BYTES:
        raise MalformedMessageError(f"{what} certificate length={length} must be in "
                                    f"1..{MAX_CERT_BYTES}")
    return r.take(length, f"{what} certificate"), r.take(SIGNATURE_BYTES, f"{what} signature")


def _signed(certificate: bytes, signature: bytes) -> bytes:
    """``? signed``: ``u8 0`` or ``u8 1 | u16 len | certificate | 64 B signature``."""
    if not certificate and not signature:
        return b"\x00"
    return b"\x01" + _cert_and_signature(certificate, signature)


def _read_signed(r: _Reader, what: str) -> tuple[bytes, bytes]:
    if not r.flag(f"{what} signed"):
        return b"", b""
    return _read_cert_and_signature(r, what)


def encode_keys(session_id: bytes, to: int, peers: list[PeerKeys]) -> bytes:
    """KEYS message from the server to client ``to``: the advertised keys of its neighbours.

    Body: ``u32 count | count x (u64 id | 32 B enc_pk | 32 B mask_pk | 32 B commitment |
    ? signed)``, sorted by id. The server lists only ``to``'s graph neighbours that advertised
    keys.
    """
    peers = sorted(peers, key=lambda p: p.client_id)
    body = b"".join(struct.pack(">Q", p.client_id) + p.enc_pk + p.mask_pk + p.commitment
                    + _signed(p.certificate, p.signature) for p in peers)
    return encode_header(Kind.KEYS, session_id, to) + struct.pack(">I", len(peers)) + body


def decode_keys(data: bytes, session_id: bytes, me: int) -> list[PeerKeys]:
    """Parse a KEYS message addressed to ``me`` (peer ids strictly increasing)."""
    r = open_message(data, Kind.KEYS, session_id, me)
    count = r.u(">I", "peer count")
    if count > MAX_PARTICIPANTS:
        raise MalformedMessageError(f"peer count={count} exceeds {MAX_PARTICIPANTS}")
    peers = []
    for _ in range(count):
        cid, enc_pk, mask_pk = r.u(">Q", "peer id"), r.take(KEY_BYTES, "enc pk"), r.take(KEY_BYTES, "mask pk")
        commitment = r.take(COMMIT_BYTES, "commitment")
        peers.append(PeerKeys(cid, enc_pk, mask_pk, commitment, *_read_signed(r, "peer")))
    r.end()
    _check_sorted_unique([p.client_id for p in peers], "peer ids")
    return peers


def encode_forward(session_id: bytes, to: int, cts: dict[int, bytes]) -> bytes:
    """FORWARD_SHARES message from the server to client ``to``: the shares addressed to it.

    Body: ``u32 count | count x (u64 sender | ciphertext)``, sorted by sender; ``cts`` maps
    each sender to its encrypted shares for ``to`` (``SHARE_CIPHERTEXT_BYTES`` each).
    """
    body = b"".join(struct.pack(">Q", s) + cts[s] for s in sorted(cts))
    return encode_header(Kind.FORWARD_SHARES, session_id, to) + struct.pack(">I", len(cts)) + body


def decode_forward(data: bytes, session_id: bytes, me: int) -> dict[int, bytes]:
    """Parse a FORWARD_SHARES message addressed to ``me``: sender -> ciphertext."""
    r = open_message(data, Kind.FORWARD_SHARES, session_id, me)
    return _read_ciphertexts(r, "forwarded shares")


@dataclass(frozen=True)
class Attestation:
    """One survivor's signature on the survivor set (the consistency check), with its node
    certificate (DER) so that every client can verify it."""

    signer: int
    certificate: bytes
    signature: bytes


def encode_unmask_request(session_id: bytes, to: int, survivors: list[int], dropped: list[int],
                          attestations: list[Attestation] | tuple[Attestation, ...] = ()) -> bytes:
    """UNMASK_REQUEST message from the server to client ``to``: ``ids survivors | ids dropped |
    u32 count | count x (u64 signer | u16 len | certificate | 64 B signature)``.

    The partition of ``to``'s share holders into those whose masked input arrived (reveal
    their self-mask share) and those that dropped (reveal their mask-key share); in an
    authenticated round, the survivors' signatures on the survivor set (sorted by signer;
    none in an unauthenticated round).
    """
    s, d = sorted(survivors), sorted(dropped)
    att = sorted(attestations, key=lambda a: a.signer)
    body = b"".join(struct.pack(">Q", a.signer) + _cert_and_signature(a.certificate, a.signature)
                    for a in att)
    return (
        encode_header(Kind.UNMASK_REQUEST, session_id, to)
        + struct.pack(f">I{len(s)}Q", len(s), *s)
        + struct.pack(f">I{len(d)}Q", len(d), *d)
        + struct.pack(">I", len(att)) + body
    )


def decode_unmask_request(
    data: bytes, session_id: bytes, me: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[Attestation, ...]]:
    """Parse an UNMASK_REQUEST addressed to ``me``: ``(survivors, dropped, attestations)``.

    Format only; the client refuses overlapping or incomplete lists (:class:`RefusedError`)
    and, in an authenticated round, too few valid signatures.
    """
    r = open_message(data, Kind.UNMASK_REQUEST, session_id, me)
    survivors = r.ids("survivors")
    dropped = r.ids("dropped")
    count = r.u(">I", "attestation count")
    if count > MAX_PARTICIPANTS:
        raise MalformedMessageError(f"attestation count={count} exceeds {MAX_PARTICIPANTS}")
    out = []
    for _ in range(count):
        signer = r.u(">Q", "attestation signer")
        out.append(Attestation(signer, *_read_cert_and_signature(r, "attestation")))
    r.end()
    _check_sorted_unique([a.signer for a in out], "attestation signers")
    return survivors, dropped, tuple(out)


def encode_consistency_request(session_id: bytes, to: int, survivors: list[int]) -> bytes:
    """CONSISTENCY_REQUEST from the server to client ``to``: ``ids survivors`` (the clients
    whose masked inputs the sum will hold; authenticated rounds only)."""
    s = sorted(survivors)
    return encode_header(Kind.CONSISTENCY_REQUEST, session_id, to) + struct.pack(f">I{len(s)}Q", len(s), *s)


def decode_consistency_request(data: bytes, session_id: bytes, me: int) -> tuple[int, ...]:
    """Parse a CONSISTENCY_REQUEST addressed to ``me``: the survivor set."""
    r = open_message(data, Kind.CONSISTENCY_REQUEST, session_id, me)
    survivors = r.ids("survivors")
    r.end()
    return survivors


# ---- client -> server -------------------------------------------------------------------


def encode_advertise(session_id: bytes, me: int, enc_pk: bytes, mask_pk: bytes, commitment: bytes,
                     certificate: bytes = b"", signature: bytes = b"") -> bytes:
    """ADVERTISE message from client ``me``: ``32 B enc_pk | 32 B mask_pk | 32 B commitment |
    ? signed`` (certificate and signature in authenticated rounds)."""
    return (encode_header(Kind.ADVERTISE, session_id, me) + enc_pk + mask_pk + commitment
            + _signed(certificate, signature))


def decode_advertise(data: bytes, session_id: bytes, sender: int) -> PeerKeys:
    """Parse an ADVERTISE from ``sender`` (format only; the server and the peers verify)."""
    r = open_message(data, Kind.ADVERTISE, session_id, sender)
    enc_pk, mask_pk = r.take(KEY_BYTES, "enc pk"), r.take(KEY_BYTES, "mask pk")
    commitment = r.take(COMMIT_BYTES, "commitment")
    out = PeerKeys(sender, enc_pk, mask_pk, commitment, *_read_signed(r, "advertisement"))
    r.end()
    return out


def encode_consistency_signature(session_id: bytes, me: int, signature: bytes) -> bytes:
    """CONSISTENCY_SIGNATURE from client ``me``: its 64-byte Ed25519 signature on the survivor
    set (:func:`fedpeft.secagg.identity.consistency_message`)."""
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedMessageError(f"signature of {len(signature)} B must be {SIGNATURE_BYTES}")
    return encode_header(Kind.CONSISTENCY_SIGNATURE, session_id, me) + signature


def decode_consistency_signature(data: bytes, session_id: bytes, sender: int) -> bytes:
    """Parse a CONSISTENCY_SIGNATURE from ``sender``: the signature."""
    r = open_message(data, Kind.CONSISTENCY_SIGNATURE, session_id, sender)
    sig = r.take(SIGNATURE_BYTES, "consistency signature")
    r.end()
    return sig


def encode_shares(session_id: bytes, me: int, cts: dict[int, bytes]) -> bytes:
    """SHARES message from client ``me``: ``u32 count | count x (u64 receiver | ciphertext)``.

    One ChaCha20-Poly1305 ciphertext per neighbour, holding ``me``'s Shamir shares of its
    self-mask seed and mask key (:func:`fedpeft.secagg.kdf.encrypt_shares`); sorted by receiver.
    """
    body = b"".join(struct.pack(">Q", rcv) + cts[rcv] for rcv in sorted(cts))
    return encode_header(Kind.SHARES, session_id, me) + struct.pack(">I", len(cts)) + body


def decode_shares(data: bytes, session_id: bytes, sender: int) -> dict[int, bytes]:
    """Parse a SHARES message from ``sender``: receiver -> ciphertext."""
    r = open_message(data, Kind.SHARES, session_id, sender)
    return _read_ciphertexts(r, "shares")


def _read_ciphertexts(r: _Reader, what: str) -> dict[int, bytes]:
    """``u32 count | count x (u64 id | ciphertext)`` to the end of the message."""
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


def encode_masked(session_id: bytes, me: int, words: npt.NDArray[np.uint32], bits: int) -> bytes:
    """MASKED message from client ``me``: its masked input.

    Body: ``u8 bits | u32 length | packed words`` (:func:`fedpeft.secagg.packing.pack_words`:
    ``bits`` bits a word, little-endian bit order); ``words`` is the masked input mod 2^bits.
    """
    return (encode_header(Kind.MASKED, session_id, me) + struct.pack(">BI", bits, words.shape[0])
            + pack_words(words, bits))


def decode_masked(data: bytes, session_id: bytes, sender: int, length: int,
                  bits: int) -> npt.NDArray[np.uint32]:
    """Parse a MASKED message from ``sender`` with exactly ``length`` words of ``bits`` bits."""
    r = open_message(data, Kind.MASKED, session_id, sender)
    got_bits, count = r.unpack(">BI", "vector header")
    if int(got_bits) != bits or int(count) != length:  # security: exact size, no padding/truncation
        raise MalformedMessageError(
            f"masked vector from client {sender} has bits={got_bits}, length={count}; "
            f"expected {bits} and {length}"
        )
    words = unpack_words(r.view(packed_size(length, bits), "masked vector"), length, bits)
    r.end()
    return words


def encode_unmask_shares(
    session_id: bytes, me: int, b_shares: dict[int, bytes], sk_shares: dict[int, bytes]
) -> bytes:
    """UNMASK_SHARES message from client ``me``: the shares the server asked for.

    Body: two blocks ``u32 count | count x (u64 owner | 66 B share)``, owners sorted: first the
    self-mask shares of the survivors (``me`` included), then the mask-key shares of the
    dropped clients; never both kinds for one owner (Bonawitz et al. CCS 2017, round 4).
    """

    def block(shares: dict[int, bytes]) -> bytes:
        body = b"".join(struct.pack(">Q", o) + shares[o] for o in sorted(shares))
        return struct.pack(">I", len(shares)) + body

    return encode_header(Kind.UNMASK_SHARES, session_id, me) + block(b_shares) + block(sk_shares)


def decode_unmask_shares(
    data: bytes, session_id: bytes, sender: int
) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Parse an UNMASK_SHARES message from ``sender``: ``(self-mask shares, key shares)``."""
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
