"""Fuzzing every decoder that reads peer or stored bytes: only typed errors, never a wrong sum.

Decoders: ``fedpeft.core.wire.decode``, every ``messages.decode_*`` and ``peek_header``,
``state.decode_state``, ``SecAggClient.handle`` at each client stage and the server's ``on_*``
at each server stage. Inputs are random bytes or mutations of a valid message (bit flips, byte
sets, truncation, extension, splices, duplicated and deleted sections, a new body after the
header), passed as ``bytes``, ``bytearray``, a memoryview or a non-contiguous memoryview. The
only exceptions allowed are :class:`fedpeft.core.errors.FedPeftError` subclasses; a server run
that completes must return exactly the sum of the inputs it received. The fast tier runs a
smoke of each; the ``slow`` twins run the same checks on more than 10,000 cases in all. The
valid messages come from one honest round (fresh X25519 keys each session).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.core.errors import FedPeftError, PayloadError
from fedpeft.core.wire import MAX_HEADER_DEPTH, TensorSpec, decode, encode
from fedpeft.deploy.certs import build_identities
from fedpeft.secagg import SecAggConfig, Stage, run_in_memory
from fedpeft.secagg import messages as msg
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.errors import (
    MalformedMessageError,
    ProtocolError,
    SecAggConfigError,
    SecAggError,
    StateError,
)
from fedpeft.secagg.quantize import MAX_CLIP, MIN_CLIP, plan_quantization, quantize
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.state import decode_state
from tests.secagg.test_adversarial import CFG, IDS, SEEDS, SID, L, _exact, _ups
from tests.secagg.test_state_codec import HEAD, STATES, _seal

WHO = IDS[0]
TRUST, IDENTITIES = build_identities(IDS)
_BASE_STAGES = [Stage.SETUP, Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED]
#: (authenticated, stage): both protocol variants, the consistency check only when authenticated
_CLIENT_CASES = [(False, s) for s in _BASE_STAGES] + [(True, s) for s in
                                                      [*_BASE_STAGES, Stage.CONSISTENCY_CHECK]]
_SERVER_CASES = [(auth, s) for auth in (False, True) for s in
                 [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED,
                  *([Stage.CONSISTENCY_CHECK] if auth else []), Stage.UNMASK]]


def _tier(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _capture(authenticated: bool) -> tuple[dict[msg.Kind, bytes], dict[Stage, tuple[bytes, bytes]]]:
    """One honest round: a valid message of every kind to or from ``WHO``, and ``WHO``'s exported
    state with the request it handles at each client stage (signed, with the consistency
    check, when ``authenticated``)."""
    server = SecAggServer(CFG, IDS, L, SID, graph_seed=bytes(32),
                          trust=TRUST if authenticated else None)
    clients = {c: SecAggClient(c, SID, CFG, identity=IDENTITIES[c] if authenticated else None)
               for c in IDS}
    ups = _ups()
    for c in IDS:
        clients[c].set_update(ups[c], SEEDS[c])
    messages: dict[msg.Kind, bytes] = {}
    states: dict[Stage, tuple[bytes, bytes]] = {}
    requests = server.start()
    steps = [server.on_advertise, server.on_shares, server.on_masked,
             *([server.on_consistency] if authenticated else []), server.on_unmask]
    for step in steps:
        states[clients[WHO].stage] = (clients[WHO].export_state(), requests[WHO])
        replies = {c: clients[c].handle(m) for c, m in requests.items()}
        for data in (requests[WHO], replies[WHO]):
            messages[msg.peek_header(data).kind] = data
        out = step(replies)
        requests = out if isinstance(out, dict) else {}
    return messages, states


CAPTURES = {auth: _capture(auth) for auth in (False, True)}
MESSAGES, CLIENT_STATES = CAPTURES[False]
SIGNED_MESSAGES = CAPTURES[True][0]

# ---- inputs: random bytes or edits of a valid message, in any bytes-like wrapper ------------

Edit = tuple[str, int, int, bytes]
_EDITS = st.lists(st.tuples(
    st.sampled_from(["flip", "set", "truncate", "extend", "splice", "duplicate", "delete", "body"]),
    st.integers(0, 1 << 16), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=64),
), min_size=1, max_size=3)
#: Random bytes (``bytes``) or edits of the valid message (``list``).
SOURCES: st.SearchStrategy[bytes | list[Edit]] = st.one_of(st.binary(max_size=300), _EDITS)
WRAPS = st.sampled_from(["bytes", "bytearray", "memoryview", "strided"])


def _mutate(base: bytes, edits: list[Edit], head: int) -> bytes:
    """Apply ``edits`` to ``base``; ``head`` is the header length (``body`` replaces the rest)."""
    b = bytearray(base)
    for op, i, j, blob in edits:
        n = len(b)
        at, to, width = i % (n + 1), j % (n + 1), 1 + j % 16
        if op == "flip" and at < n:
            b[at] ^= 1 << (j % 8)
        elif op == "set" and at < n:
            b[at] = blob[0]
        elif op == "truncate":
            del b[at:]
        elif op == "extend":
            b += blob
        elif op == "splice":
            b[at : at + len(blob)] = blob
        elif op == "duplicate":  # e.g. a second copy of one id or one share
            b[to:to] = b[at : at + width]
        elif op == "delete":
            del b[at : at + width]
        elif op == "body":
            b[head:] = blob
    return bytes(b)


def _input(base: bytes, source: bytes | list[Edit], head: int) -> bytes:
    return source if isinstance(source, bytes) else _mutate(base, source, head)


def _wrap(data: bytes, how: str) -> Any:
    """``data`` as ``bytes``, ``bytearray``, a memoryview or a non-contiguous memoryview."""
    if how == "bytearray":
        return bytearray(data)
    if how == "memoryview":
        return memoryview(data)
    if how == "strided":
        buf = bytearray(2 * len(data))
        buf[::2] = data
        return memoryview(buf)[::2]
    return data


def _msg_head(data: bytes) -> int:
    return 4 + 3 + (data[6] if len(data) > 6 else 0) + 8


# ---- fedpeft.core.wire.decode ---------------------------------------------------------------

SPEC = {"a": TensorSpec((2, 3), torch.float32), "b": TensorSpec((4,), torch.float16)}
PAYLOAD = encode({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)})
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=3), kids, max_size=3),
    max_leaves=8,
)
_INDEX = st.integers(-3, 40) | st.booleans() | st.integers(2**62, 2**66) | _JSON
_ENTRY = _JSON | st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "X"]) | _JSON,
    "shape": st.lists(_INDEX, max_size=3) | _JSON,
    "data_offsets": st.lists(_INDEX, max_size=3) | _JSON,
})


def _framed(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


#: A plausible header (right key names, hostile values) and a data section.
HEADERS = st.builds(lambda h, d: _framed(json.dumps(h).encode(), d),
                    st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), _ENTRY, max_size=4),
                    st.binary(max_size=48))


def _check_wire(data: bytes, wrap: str) -> None:
    try:
        out = decode(_wrap(data, wrap), SPEC)
    except PayloadError:
        return
    assert {k: TensorSpec.of(v) for k, v in out.items()} == SPEC  # accepted => matches the spec


@_tier(100)
@given(source=st.one_of(SOURCES, HEADERS), wrap=WRAPS)
def test_wire_decode_gives_payload_error(source: bytes | list[Edit], wrap: str) -> None:
    _check_wire(_input(PAYLOAD, source, 8), wrap)


@pytest.mark.slow
@_tier(2000)
@given(source=st.one_of(SOURCES, HEADERS), wrap=WRAPS)
def test_wire_decode_gives_payload_error_many(source: bytes | list[Edit], wrap: str) -> None:
    _check_wire(_input(PAYLOAD, source, 8), wrap)


# ---- secagg.messages: every decoder and peek_header -----------------------------------------

DECODERS: dict[str, tuple[msg.Kind, Callable[[bytes], object]]] = {
    "keys_signed": (msg.Kind.KEYS, lambda d: msg.decode_keys(d, SID, WHO)),
    "advertise_signed": (msg.Kind.ADVERTISE, lambda d: msg.decode_advertise(d, SID, WHO)),
    "unmask_request_signed": (msg.Kind.UNMASK_REQUEST, lambda d: msg.decode_unmask_request(d, SID, WHO)),
    "consistency_request_signed": (msg.Kind.CONSISTENCY_REQUEST,
                                   lambda d: msg.decode_consistency_request(d, SID, WHO)),
    "consistency_signature_signed": (msg.Kind.CONSISTENCY_SIGNATURE,
                                     lambda d: msg.decode_consistency_signature(d, SID, WHO)),
    "peek_header": (msg.Kind.SETUP, msg.peek_header),
    "setup": (msg.Kind.SETUP, lambda d: msg.decode_setup(d, SID, WHO)),
    "keys": (msg.Kind.KEYS, lambda d: msg.decode_keys(d, SID, WHO)),
    "forward": (msg.Kind.FORWARD_SHARES, lambda d: msg.decode_forward(d, SID, WHO)),
    "unmask_request": (msg.Kind.UNMASK_REQUEST, lambda d: msg.decode_unmask_request(d, SID, WHO)),
    "advertise": (msg.Kind.ADVERTISE, lambda d: msg.decode_advertise(d, SID, WHO)),
    "shares": (msg.Kind.SHARES, lambda d: msg.decode_shares(d, SID, WHO)),
    "masked": (msg.Kind.MASKED, lambda d: msg.decode_masked(d, SID, WHO, L, CFG.bits)),
    "unmask_shares": (msg.Kind.UNMASK_SHARES, lambda d: msg.decode_unmask_shares(d, SID, WHO)),
}


def _check_decoder(name: str, source: bytes | list[Edit], wrap: str) -> None:
    kind, decoder = DECODERS[name]
    base = (SIGNED_MESSAGES if name.endswith("_signed") else MESSAGES)[kind]
    try:
        decoder(_wrap(_input(base, source, _msg_head(base)), wrap))
    except SecAggError:
        pass


@pytest.mark.parametrize("name", sorted(DECODERS))
@_tier(50)
@given(source=SOURCES, wrap=WRAPS)
def test_message_decoders_give_typed_errors(name: str, source: bytes | list[Edit], wrap: str) -> None:
    _check_decoder(name, source, wrap)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECODERS))
@_tier(700)
@given(source=SOURCES, wrap=WRAPS)
def test_message_decoders_give_typed_errors_many(name: str, source: bytes | list[Edit], wrap: str) -> None:
    _check_decoder(name, source, wrap)


# ---- secagg.state.decode_state (bodies re-sealed, so the parser past the digest is reached) ---


def _check_state(which: int, source: bytes | list[Edit], sealed: bool, wrap: str) -> None:
    base = STATES[which]
    if sealed:
        body = base[len(HEAD) : -32]
        data = _seal(_input(body, source, 9 + body[8]))  # "body" keeps client id and session id
    else:
        data = _input(base, source, len(HEAD))
    try:
        decode_state(_wrap(data, wrap))
    except StateError:
        pass


@_tier(80)
@given(which=st.integers(0, len(STATES) - 1), source=SOURCES, sealed=st.booleans(), wrap=WRAPS)
def test_decode_state_gives_state_error(which: int, source: bytes | list[Edit], sealed: bool,
                                        wrap: str) -> None:
    _check_state(which, source, sealed, wrap)


@pytest.mark.slow
@_tier(1000)
@given(which=st.integers(0, len(STATES) - 1), source=SOURCES, sealed=st.booleans(), wrap=WRAPS)
def test_decode_state_gives_state_error_many(which: int, source: bytes | list[Edit], sealed: bool,
                                             wrap: str) -> None:
    _check_state(which, source, sealed, wrap)


# ---- SecAggClient.handle at each client stage ------------------------------------------------


def _check_client(auth: bool, stage: Stage, source: bytes | list[Edit], wrap: str) -> None:
    state, request = CAPTURES[auth][1][stage]
    client = SecAggClient.import_state(state, identity=IDENTITIES[WHO] if auth else None)
    try:
        reply = client.handle(_wrap(_input(request, source, _msg_head(request)), wrap))
    except SecAggError:
        assert client.stage is Stage.ABORTED and client.abort_reason  # fails closed
        return
    assert isinstance(reply, bytes) and client.stage is not stage


@pytest.mark.parametrize("auth, stage", _CLIENT_CASES, ids=lambda c: str(getattr(c, "name", c)))
@_tier(30)
@given(source=SOURCES, wrap=WRAPS)
def test_client_handle_gives_typed_errors(auth: bool, stage: Stage, source: bytes | list[Edit],
                                          wrap: str) -> None:
    _check_client(auth, stage, source, wrap)


@pytest.mark.slow
@pytest.mark.parametrize("auth, stage", _CLIENT_CASES, ids=lambda c: str(getattr(c, "name", c)))
@_tier(300)
@given(source=SOURCES, wrap=WRAPS)
def test_client_handle_gives_typed_errors_many(auth: bool, stage: Stage, source: bytes | list[Edit],
                                               wrap: str) -> None:
    _check_client(auth, stage, source, wrap)


# ---- SecAggServer.on_* at each server stage: typed error or the exact sum --------------------


def _expected_modular(survivors: tuple[int, ...],
                      deltas: dict[int, npt.NDArray[np.uint32]]) -> npt.NDArray[np.uint32]:
    """Sum mod 2^32 of the survivors' quantised inputs, plus any change to a masked input the
    server accepted (a well-formed masked vector is just another input: no integrity)."""
    plan = plan_quantization(CFG.clip, len(IDS), CFG.bits)
    ups, acc = _ups(), np.zeros(L, dtype=np.uint32)
    for c in survivors:
        acc += quantize(ups[c], plan, SEEDS[c])
        acc += deltas.get(c, np.zeros(L, dtype=np.uint32))
    return acc


def _check_server(auth: bool, stage: Stage, who: int, source: bytes | list[Edit], wrap: str,
                  drop_invalid: bool) -> None:
    deltas: dict[int, npt.NDArray[np.uint32]] = {}

    def tamper(s: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if (s, direction, cid) != (stage, "reply", who):
            return data
        bad = _input(data, source, _msg_head(data))
        if s is Stage.COLLECT_MASKED:
            try:
                got = msg.decode_masked(bad, SID, cid, L, CFG.bits)
            except SecAggError:
                pass
            else:
                deltas[cid] = got - msg.decode_masked(data, SID, cid, L, CFG.bits)
        out: bytes = _wrap(bad, wrap)
        return out

    try:
        run = run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=tamper,
                            drop_invalid=drop_invalid, identities=IDENTITIES if auth else None,
                            trust=TRUST if auth else None)
    except SecAggError:
        return
    result = run.result
    assert np.array_equal(result.modular_sum, _expected_modular(result.survivors, deltas))
    if not any(c in deltas and deltas[c].any() for c in result.survivors):
        assert _exact(result.int_sum, result.survivors)
    if stage not in (Stage.UNMASK, Stage.CONSISTENCY_CHECK):  # later: its masked input is in
        assert set(result.survivors).isdisjoint(run.server.faults)


@pytest.mark.parametrize("auth, stage", _SERVER_CASES, ids=lambda c: str(getattr(c, "name", c)))
@_tier(15)
@given(who=st.sampled_from(IDS), source=SOURCES, wrap=WRAPS, drop_invalid=st.booleans())
def test_server_stages_give_typed_error_or_exact_sum(auth: bool, stage: Stage, who: int,
                                                     source: bytes | list[Edit], wrap: str,
                                                     drop_invalid: bool) -> None:
    _check_server(auth, stage, who, source, wrap, drop_invalid)


@pytest.mark.slow
@pytest.mark.parametrize("auth, stage", _SERVER_CASES, ids=lambda c: str(getattr(c, "name", c)))
@_tier(150)
@given(who=st.sampled_from(IDS), source=SOURCES, wrap=WRAPS, drop_invalid=st.booleans())
def test_server_stages_give_typed_error_or_exact_sum_many(auth: bool, stage: Stage, who: int,
                                                          source: bytes | list[Edit], wrap: str,
                                                          drop_invalid: bool) -> None:
    _check_server(auth, stage, who, source, wrap, drop_invalid)


# ---- regressions: the cases the attacker review reproduced -----------------------------------


def test_deeply_nested_header_is_payload_error_not_recursion() -> None:
    with pytest.raises(PayloadError, match="nests deeper"):
        decode(_framed(b"[" * 100000 + b"]" * 100000), SPEC)
    with pytest.raises(PayloadError, match="nests deeper"):
        decode(_framed(b'{"a": ' * 5000 + b"1" + b"}" * 5000), SPEC)
    deep = {"a": {"shape": [[[[2]]]], "dtype": "F32", "data_offsets": [0, 8]}}  # depth 6
    with pytest.raises(PayloadError, match="nests deeper"):
        decode(_framed(json.dumps(deep).encode()), SPEC)
    assert MAX_HEADER_DEPTH == 4
    # brackets inside strings do not count
    text = {"__metadata__": {"note": "[[[[[{{{{\\\"]"}, "a": {"dtype": "F32", "shape": [2],
                                                              "data_offsets": [0, 8]}}
    out = decode(_framed(json.dumps(text).encode(), bytes(8)), {"a": TensorSpec((2,), torch.float32)})
    assert out["a"].shape == (2,)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]},  # bool dimension
    {"dtype": "F32", "shape": [-1, -2], "data_offsets": [0, 8]},  # negative dimensions
    {"dtype": "F32", "shape": [2**64, 2**64], "data_offsets": [0, 8]},  # product overflows u64
    {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]},  # size != offsets
    {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, "8"]},  # malformed offsets
    {"dtype": "F32", "shape": [1, 2], "data_offsets": [8, 0]},
    {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8, 16]},
    {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 2**70]},
    {"dtype": "F32", "shape": [1] * 100 + [2], "data_offsets": [0, 8]},  # too many dimensions
    [1, 2],  # not an object
], ids=lambda e: str(e)[:40])
def test_malformed_header_entries_are_payload_errors(entry: object) -> None:
    header = json.dumps({"a": entry}).encode()
    with pytest.raises(PayloadError, match="adapter payload does not match"):
        decode(_framed(header, bytes(8)), {"a": TensorSpec((1, 2), torch.float32)})


@pytest.mark.parametrize("header", [
    b'{"a": 1, "a": 2}',  # duplicate keys
    b'{"a": {"shape": [' + b"9" * 5000 + b"]}}",  # int beyond the digit limit (ValueError)
    b'{"__metadata__": [1]}',  # metadata not a str -> str map
    b"\xff\xfe{}",  # not UTF-8
])
def test_malformed_headers_are_payload_errors(header: bytes) -> None:
    with pytest.raises(PayloadError):
        decode(_framed(header), SPEC)


@pytest.mark.parametrize("wrap", ["bytearray", "memoryview", "strided"])
def test_wire_decode_accepts_bytes_likes(wrap: str) -> None:
    out = decode(_wrap(PAYLOAD, wrap), SPEC)
    assert torch.equal(out["a"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("payload", [None, "not bytes" * 10, 12345678, [1, 2, 3]])
def test_wire_decode_rejects_other_types(payload: object) -> None:
    with pytest.raises(PayloadError, match="must be bytes"):
        decode(payload, SPEC)  # type: ignore[arg-type]


def test_non_contiguous_memoryviews_to_client_and_server_complete_a_round() -> None:
    def strided(s: Stage, direction: str, cid: int, data: bytes) -> bytes:
        out: bytes = _wrap(data, "strided")
        return out

    assert not _wrap(b"abc", "strided").c_contiguous
    run = run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=strided)
    assert run.result.survivors == tuple(IDS) and _exact(run.result.int_sum, run.result.survivors)
    state, request = CLIENT_STATES[Stage.SETUP]
    a, b = SecAggClient.import_state(state), SecAggClient.import_state(state)
    assert a.handle(_wrap(request, "strided")) == b.handle(request)
    assert msg.peek_header(_wrap(request, "strided")) == msg.peek_header(request)


@pytest.mark.parametrize("value", [42, None, "setup", 1.5])
def test_client_rejects_non_bytes_message_and_aborts(value: object) -> None:
    client = SecAggClient.import_state(CLIENT_STATES[Stage.SETUP][0])
    with pytest.raises(MalformedMessageError, match="must be bytes"):
        client.handle(value)  # type: ignore[arg-type]
    assert client.stage is Stage.ABORTED


@pytest.mark.parametrize("bad_key", ["x", True, 1.0, None, b"\x0b"], ids=repr)
def test_server_rejects_non_int_reply_keys(bad_key: object) -> None:
    server = SecAggServer(CFG, IDS, L, SID)
    clients = {c: SecAggClient(c, SID, CFG) for c in IDS}
    replies: dict[Any, bytes] = {c: clients[c].handle(m) for c, m in server.start().items()}
    replies[bad_key] = replies[IDS[0]]
    with pytest.raises(ProtocolError, match="keys must be int client ids"):
        server.on_advertise(replies)
    assert server.stage is Stage.ABORTED and server.abort_reason


@pytest.mark.parametrize("clip", [1e-300, 1e300, MIN_CLIP / 2, MAX_CLIP * 2])
def test_clip_outside_bounds_is_config_error(clip: float) -> None:
    with pytest.raises(SecAggConfigError, match=r"MIN_CLIP, MAX_CLIP\] = \[1e-12, 1e\+12\]"):
        SecAggConfig(clip=clip)
    with pytest.raises(SecAggConfigError, match="clip"):
        plan_quantization(clip, 3)
    setup = msg.Setup(32, 4, 4, clip, L, bytes(32), tuple(IDS))  # a server that sends it anyway
    client = SecAggClient(WHO, SID)
    with pytest.raises(ProtocolError, match="clip"):
        client.handle(msg.encode_setup(SID, WHO, setup))
    assert client.stage is Stage.ABORTED


def test_clip_bounds_are_inclusive_and_give_finite_scales() -> None:
    for clip in (MIN_CLIP, MAX_CLIP):
        plan = SecAggConfig(clip=clip).quantization(len(IDS))
        assert np.isfinite(plan.scale) and plan.scale > 0


def test_every_error_the_fuzzers_allow_is_a_fedpeft_error() -> None:
    assert all(issubclass(e, FedPeftError) for e in (PayloadError, SecAggError, StateError))
