"""The client state codec (``fedpeft.secagg.state``): exact layout, bounds, fuzzing, no leaks.

``test_state.py`` checks export/import through :class:`SecAggClient`; this file pins the byte
layout independently (built by hand from the documented format) and checks the codec's limits.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.secagg import SecAggConfig, Stage
from fedpeft.secagg import messages as msg
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.errors import StageError, StateError
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.state import STATE_MAGIC, STATE_VERSION, ClientState, decode_state, encode_state

SID = b"layout-session"
HEAD = STATE_MAGIC + bytes([STATE_VERSION])


def _seal(body: bytes) -> bytes:
    return HEAD + body + hashlib.sha256(HEAD + body).digest()


def _ids(*values: int) -> bytes:
    return struct.pack(f">I{len(values)}Q", len(values), *values)


# ---- exact layout ---------------------------------------------------------------------------

REASON = "peer 12 misbehaved \u2713"
FULL = ClientState(
    client_id=11, session_id=SID,
    config=SecAggConfig(clip=1e-2, expected_dropout=0.2, threshold=4, degree=5, max_abort_prob=1.0),
    expected_vector_length=3, stage=Stage.ABORTED, abort_reason=REASON,
    update=np.array([1.5, -2.0, 0.25], dtype=np.float32), rounding_seed=b"\x04" * 32,
    setup=msg.Setup(32, 4, 5, 1e-2, 3, bytes(range(32)), (11, 12, 13)),
    graph_neighbours=frozenset({12, 13}),
    peers={12: msg.PeerKeys(12, b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)},
    u2=frozenset({12}), held_b={12: b"\x05" * 66}, held_sk={12: b"\x06" * 66}, own_b_share=b"\x07" * 66,
    enc_sk=b"\x08" * 32, mask_sk=b"\x09" * 32, self_seed=b"\x0a" * 32,
)
FULL_BODY = b"".join([
    struct.pack(">Q", 11), bytes([len(SID)]) + SID,
    b"\x01" + struct.pack(">dBddd", 1e-2, 32, 0.2, 1.0, 0.05) + b"\x01" + struct.pack(">II", 4, 5),
    b"\x01" + struct.pack(">Q", 3),
    bytes([5]),  # ABORTED
    b"\x01" + struct.pack(">I", len(REASON.encode())) + REASON.encode(),
    b"\x01" + bytes([2, 1]) + struct.pack(">Q", 3) + np.array([1.5, -2.0, 0.25], dtype="<f4").tobytes(),
    b"\x01" + b"\x04" * 32,
    b"\x01" + struct.pack(">BHHdIB", 32, 4, 5, 1e-2, 3, 0) + bytes(range(32)) + _ids(11, 12, 13),
    _ids(12, 13),
    struct.pack(">IQ", 1, 12) + b"\x01" * 32 + b"\x02" * 32 + b"\x03" * 32,
    _ids(12),
    struct.pack(">IQ", 1, 12) + b"\x05" * 66,
    struct.pack(">IQ", 1, 12) + b"\x06" * 66,
    bytes([66]) + b"\x07" * 66,
    _ids(),  # signed survivors (consistency check): none outside that stage
    b"\x08" * 32 + b"\x09" * 32 + b"\x0a" * 32,
])


def _same_state(a: ClientState, b: ClientState) -> None:
    for name in ClientState.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
        else:
            assert type(x) is type(y) and x == y, name


def test_every_field_encodes_to_the_documented_layout() -> None:
    assert encode_state(FULL) == _seal(FULL_BODY)


def test_the_documented_layout_decodes_to_every_field() -> None:
    got = decode_state(_seal(FULL_BODY))
    _same_state(got, FULL)
    got.check_invariants()  # a consistent ABORTED state


def test_fresh_client_export_matches_the_layout() -> None:
    c = SecAggClient(7, SID)
    body = b"".join([struct.pack(">Q", 7), bytes([len(SID)]) + SID, b"\x00\x00\x00\x00\x00\x00\x00",
                     _ids(), struct.pack(">I", 0), _ids(), struct.pack(">I", 0), struct.pack(">I", 0),
                     b"\x00", _ids(), c._enc_sk + c._mask_sk + c._self_seed])
    assert c.export_state() == _seal(body)


def test_repr_leaves_out_every_secret() -> None:
    text = repr(FULL)
    for secret in (b"\x04" * 32, b"\x05" * 66, b"\x06" * 66, b"\x07" * 66, b"\x08" * 32, b"\x09" * 32,
                   b"\x0a" * 32):
        assert repr(secret) not in text and secret.hex() not in text
    for name in ("update", "rounding_seed", "held_b", "held_sk", "own_b_share", "enc_sk", "mask_sk",
                 "self_seed"):
        assert f"{name}=" not in text
    assert "client_id=11" in text and "stage=<Stage.ABORTED" in text


# ---- bounds ----------------------------------------------------------------------------------


def _fresh(**parts: bytes) -> bytes:
    """A sealed SETUP-stage state with the named segments replaced."""
    seg = {"client_id": struct.pack(">Q", 7), "session": bytes([len(SID)]) + SID, "config": b"\x00",
           "expected": b"\x00", "stage": b"\x00", "reason": b"\x00", "update": b"\x00", "seed": b"\x00",
           "setup": b"\x00", "neighbours": _ids(), "peers": struct.pack(">I", 0), "u2": _ids(),
           "held_b": struct.pack(">I", 0), "held_sk": struct.pack(">I", 0), "own": b"\x00",
           "signed": _ids(), "secrets": bytes(96)}
    assert set(parts) <= set(seg)
    seg.update(parts)
    return _seal(b"".join(seg.values()))


def test_minimal_state_decodes() -> None:
    s = decode_state(_fresh())
    assert s.stage is Stage.SETUP and s.client_id == 7 and s.setup is None and s.update is None
    SecAggClient.import_state(_fresh())


TOO_MANY = struct.pack(">I", msg.MAX_PARTICIPANTS + 1)


@pytest.mark.parametrize(("parts", "match"), [
    ({"session": bytes([7]) + b"x" * 7}, "session_id length=7 out of range"),
    ({"session": bytes([65]) + b"x" * 65}, "session_id length=65 out of range"),
    ({"neighbours": TOO_MANY}, "graph neighbours count=65537 exceeds 65536"),
    ({"u2": TOO_MANY}, r"share holders \(u2\) count=65537 exceeds"),
    ({"peers": TOO_MANY}, "peer count=65537 exceeds 65536"),
    ({"held_b": TOO_MANY}, "held self-mask shares count=65537 exceeds"),
    ({"held_sk": TOO_MANY}, "held key shares count=65537 exceeds"),
    ({"update": b"\x01\x02\x01" + struct.pack(">Q", msg.MAX_VECTOR_LENGTH + 1)},
     "update length=4294967296 exceeds"),
    ({"update": b"\x01\x02\x02" + struct.pack(">QQ", 1, 1)}, "update ndim=2 must be 1"),
    ({"update": b"\x01\x07"}, "update dtype code=7 unknown"),
    ({"stage": b"\x05", "reason": b"\x01" + struct.pack(">I", 2) + b"\xff\xfe"}, "not valid UTF-8"),
    ({"stage": b"\x07"}, "stage code=7 unknown"),
    ({"seed": b"\x02"}, "rounding_seed presence flag=2"),
    ({"neighbours": _ids(3, 2)}, "graph neighbours must be strictly increasing"),
    ({"u2": _ids(4, 4)}, "strictly increasing"),
    ({"peers": struct.pack(">IQ", 2, 5) + bytes(96) + struct.pack(">Q", 5) + bytes(96)},
     "peer ids must be strictly"),
    ({"held_b": struct.pack(">IQ", 2, 9) + bytes(66) + struct.pack(">Q", 8) + bytes(66)},
     "owners must be strictly"),
    ({"setup": b"\x01" + struct.pack(">BHHdI", 32, 2, 2, math.inf, 3) + bytes(32) + _ids(7, 8, 9)},
     "setup clip=inf must be finite"),
    ({"setup": b"\x01" + struct.pack(">BHHdI", 32, 2, 2, -1.0, 3) + bytes(32) + _ids(7, 8, 9)},
     "setup clip=-1.0 must be finite and positive"),
    ({"config": b"\x01" + struct.pack(">dBdd", 1.0, 7, 0.2, 0.01) + b"\x00"},
     "stored config is invalid: bits=7"),
    ({"own": bytes([200]), "secrets": bytes(10)}, "truncated reading own share: need 200 bytes"),
    ({"secrets": bytes(95)}, "truncated reading self-mask seed"),
    ({"secrets": bytes(97)}, "1 trailing bytes"),
])
def test_out_of_range_fields_raise_state_error(parts: dict[str, bytes], match: str) -> None:
    with pytest.raises(StateError, match=match):
        decode_state(_fresh(**parts))
    with pytest.raises(StateError, match=match):
        SecAggClient.import_state(_fresh(**parts))


def test_format_valid_but_inconsistent_state_is_refused_on_import() -> None:
    data = _fresh(own=bytes([5]) + bytes(5))
    assert decode_state(data).own_b_share == bytes(5)  # the format is fine
    with pytest.raises(StateError, match="own share length=5 must be 0 or 66"):
        SecAggClient.import_state(data)
    with pytest.raises(StateError, match="abort_reason=None must be set exactly when the stage is ABORTED"):
        SecAggClient.import_state(_fresh(stage=b"\x05"))


def test_values_that_cannot_be_exported_raise_state_error() -> None:
    fields = {name: getattr(FULL, name) for name in ClientState.__dataclass_fields__}
    with pytest.raises(StateError, match="client_id=18446744073709551616 does not fit"):
        encode_state(ClientState(**{**fields, "client_id": 1 << 64}))
    with pytest.raises(StateError, match="rounding_seed length=3 must be 32"):
        encode_state(ClientState(**{**fields, "rounding_seed": b"abc"}))
    with pytest.raises(StateError, match="session_id length=256 exceeds 255"):
        encode_state(ClientState(**{**fields, "session_id": bytes(256)}))
    with pytest.raises(StateError, match="update dtype=int32 cannot be exported"):
        encode_state(ClientState(**{**fields, "update": np.zeros(3, dtype=np.int32)}))


# ---- fuzzing ---------------------------------------------------------------------------------


def _round_states() -> list[bytes]:
    """Exports of one client of a real 5-client round at every stage (and of an aborted one)."""
    cfg = SecAggConfig(clip=1e-2, threshold=3, degree=4, max_abort_prob=1.0)
    ids = [21, 22, 23, 24, 25]
    server = SecAggServer(cfg, ids, 6, SID)
    clients = {c: SecAggClient(c, SID, cfg, expected_vector_length=6) for c in ids}
    for c in ids:
        clients[c].set_update(np.linspace(-5e-3, 5e-3, 6, dtype=np.float32), bytes([c]) * 32)
    out = [clients[23].export_state()]
    requests = server.start()
    for step in (server.on_advertise, server.on_shares, server.on_masked, server.on_unmask):
        replies = {c: clients[c].handle(m) for c, m in requests.items()}
        out.append(clients[23].export_state())
        result = step(replies)
        requests = result if isinstance(result, dict) else {}
    aborted = SecAggClient.import_state(out[2])
    with pytest.raises(StageError):
        aborted.handle(msg.MAGIC + bytes([msg.VERSION, 1, len(SID)]) + SID + struct.pack(">Q", 23))
    return [*out, aborted.export_state(), encode_state(FULL), _fresh()]


STATES = _round_states()


def _import_or_state_error(data: bytes) -> None:
    try:
        client = SecAggClient.import_state(data)
    except StateError:
        return
    assert client.export_state() == data  # anything accepted is canonical


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(STATES) - 1), edits=st.lists(
    st.tuples(st.sampled_from(["set", "insert", "delete", "cut"]), st.integers(0, 1 << 20),
              st.integers(0, 255)),
    min_size=1, max_size=4))
def test_mutated_body_with_valid_digest_is_state_error_or_canonical(
    which: int, edits: list[tuple[str, int, int]]
) -> None:
    body = bytearray(STATES[which][len(HEAD):-32])
    for op, pos, byte in edits:
        i = pos % (len(body) + 1)
        if op == "set" and i < len(body):
            body[i] = byte
        elif op == "insert":
            body[i:i] = bytes([byte])
        elif op == "delete":
            del body[i : i + 1 + byte % 8]
        elif op == "cut":
            del body[i:]
    _import_or_state_error(_seal(bytes(body)))


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), sealed=st.booleans())
def test_arbitrary_bytes_are_state_error_or_canonical(data: bytes, sealed: bool) -> None:
    _import_or_state_error(_seal(data) if sealed else data)
