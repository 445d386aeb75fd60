"""Malformed, replayed, misrouted and tampered messages: typed errors, never a wrong aggregate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.secagg import SecAggConfig, Stage, run_in_memory
from fedpeft.secagg import messages as msg
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.errors import (
    AbortError,
    MalformedMessageError,
    ProtocolError,
    RefusedError,
    SecAggError,
    ShareDecryptionError,
    StageError,
    UpdateError,
)
from fedpeft.secagg.quantize import decode_signed, quantize
from fedpeft.secagg.server import SecAggServer

SID = b"adversarial-session"
IDS = [11, 22, 33, 44, 55]
CFG = SecAggConfig(clip=1e-2, threshold=4, degree=4, max_abort_prob=1.0)
L = 16


def _ups() -> dict[int, np.ndarray]:
    rng = np.random.default_rng(9)
    return {c: (rng.standard_normal(L) * 1e-3).astype(np.float32) for c in IDS}


SEEDS = {c: bytes([c]) * 32 for c in IDS}


def _round_to(stage: Stage) -> tuple[SecAggServer, dict[int, SecAggClient], dict[int, bytes]]:
    """Advance a fresh round until the server awaits replies of ``stage``; return requests."""
    server = SecAggServer(CFG, IDS, L, SID)
    clients = {c: SecAggClient(c, SID, CFG) for c in IDS}
    ups = _ups()
    for c in IDS:
        clients[c].set_update(ups[c], SEEDS[c])
    requests = server.start()
    steps = [server.on_advertise, server.on_shares, server.on_masked]
    while server.stage is not stage:
        replies = {c: clients[c].handle(m) for c, m in requests.items()}
        out = steps.pop(0)(replies)
        assert isinstance(out, dict)
        requests = out
    return server, clients, requests


def _replies(clients: dict[int, SecAggClient], requests: dict[int, bytes]) -> dict[int, bytes]:
    return {c: clients[c].handle(m) for c, m in requests.items()}


def _exact(result_sum: np.ndarray, survivors: tuple[int, ...]) -> bool:
    from fedpeft.secagg.quantize import plan_quantization

    plan = plan_quantization(CFG.clip, len(IDS), CFG.bits)
    ups = _ups()
    expect = sum(decode_signed(quantize(ups[c], plan, SEEDS[c]), 32) for c in survivors)
    return bool(np.array_equal(result_sum, expect))


def test_client_refuses_to_reveal_both_share_kinds() -> None:
    server, clients, requests = _round_to(Stage.UNMASK)
    me, other = IDS[0], IDS[1]
    evil = msg.encode_unmask_request(SID, me, [i for i in IDS if i != me], [other])
    with pytest.raises(RefusedError, match="both survivor and dropped"):
        clients[me].handle(evil)
    assert clients[me].stage is Stage.ABORTED
    with pytest.raises(StageError):  # and it never answers again
        clients[me].handle(requests[me])


def test_client_refuses_partition_other_than_its_share_holders() -> None:
    _, clients, _ = _round_to(Stage.UNMASK)
    me = IDS[0]
    with pytest.raises(RefusedError, match="peers whose shares I hold"):
        clients[me].handle(msg.encode_unmask_request(SID, me, IDS[1:3], []))


def test_second_unmask_request_is_refused_after_answering() -> None:
    _, clients, requests = _round_to(Stage.UNMASK)
    me = IDS[0]
    clients[me].handle(requests[me])
    evil = msg.encode_unmask_request(SID, me, [], [i for i in IDS if i != me])
    with pytest.raises(StageError):
        clients[me].handle(evil)


def test_tampered_or_misrouted_share_fails_aead() -> None:
    _, clients, requests = _round_to(Stage.COLLECT_MASKED)
    a, b = IDS[0], IDS[1]
    tampered = bytearray(requests[a])
    tampered[-5] ^= 1
    with pytest.raises(ShareDecryptionError, match="authentication"):
        clients[a].handle(bytes(tampered))
    # b's forward message re-addressed to a: ciphertexts for b are not for a
    cts = msg.decode_forward(requests[b], SID, b)
    rerouted = msg.encode_forward(SID, IDS[2], cts)  # b's ciphertexts sent to IDS[2]
    with pytest.raises((ShareDecryptionError, ProtocolError)):
        clients[IDS[2]].handle(rerouted)


def test_key_list_corruption_is_detected_by_key_confirmation() -> None:
    """A peer's mask key altered in one client's KEYS message makes its shares fail AEAD."""
    server, clients, requests = _round_to(Stage.SHARE_KEYS)
    a = IDS[0]
    peers = msg.decode_keys(requests[a], SID, a)
    bad = [msg.PeerKeys(p.client_id, p.enc_pk, bytes(32 - 1) + b"\x09", p.commitment)
           if i == 0 else p for i, p in enumerate(peers)]
    requests[a] = msg.encode_keys(SID, a, bad)
    fwd = server.on_shares(_replies(clients, requests))
    victim = peers[0].client_id
    with pytest.raises(ShareDecryptionError):
        clients[victim].handle(fwd[victim])


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda d: d[:-1], MalformedMessageError),  # truncated vector
        (lambda d: d + b"\x00", MalformedMessageError),  # trailing byte
        (lambda d: b"XXXX" + d[4:], MalformedMessageError),  # bad magic
        (lambda d: d[:5] + bytes([99]) + d[6:], MalformedMessageError),  # unknown kind
        (lambda d: d[:5] + bytes([int(msg.Kind.SHARES)]) + d[6:], StageError),  # wrong kind
    ],
)
def test_server_rejects_malformed_masked_input(mutate, error) -> None:  # type: ignore[no-untyped-def]
    server, clients, requests = _round_to(Stage.COLLECT_MASKED)
    replies = _replies(clients, requests)
    replies[IDS[1]] = mutate(replies[IDS[1]])
    with pytest.raises(error):
        server.on_masked(replies)
    assert server.stage is Stage.ABORTED and server.abort_reason


@pytest.mark.parametrize("case", ["short_vector", "unknown_sender", "other_client_header", "other_session"])
def test_server_rejects_wrong_length_session_sender_and_unknown_ids(case: str) -> None:
    server, clients, requests = _round_to(Stage.COLLECT_MASKED)
    replies = _replies(clients, requests)
    a, b = IDS[0], IDS[1]
    if case == "short_vector":
        replies[a] = msg.encode_masked(SID, a, np.zeros(L - 1, dtype=np.uint32), 32)
        err: type[SecAggError] = MalformedMessageError
    elif case == "unknown_sender":
        replies[999] = replies[a]
        err = ProtocolError
    elif case == "other_client_header":
        replies[a] = replies[b]
        err = MalformedMessageError
    else:
        replies[a] = msg.encode_masked(b"other-session", a, np.zeros(L, np.uint32), 32)
        err = MalformedMessageError
    with pytest.raises(err):
        server.on_masked(replies)
    assert server.stage is Stage.ABORTED


def test_drop_invalid_treats_faulty_client_as_dropped_and_sum_stays_exact() -> None:
    def corrupt(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is Stage.COLLECT_MASKED and direction == "reply" and cid == IDS[2]:
            return data[:-3]
        return data

    run = run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=corrupt, drop_invalid=True)
    assert IDS[2] not in run.result.survivors and IDS[2] in run.server.faults
    assert _exact(run.result.int_sum, run.result.survivors)


def test_replayed_advertisement_is_rejected() -> None:
    server, clients, requests = _round_to(Stage.ADVERTISE_KEYS)
    replies = _replies(clients, requests)
    a, b = IDS[0], IDS[1]
    body = replies[a][len(msg.encode_header(msg.Kind.ADVERTISE, SID, a)):]
    replies[b] = msg.encode_header(msg.Kind.ADVERTISE, SID, b) + body
    with pytest.raises(ProtocolError, match="already in use"):
        server.on_advertise(replies)


def test_client_enforces_threshold_floor_and_own_config() -> None:
    client = SecAggClient(IDS[0], SID, None)
    weak = msg.Setup(32, 2, 4, 1e-2, L, bytes(32), tuple(IDS))  # 2t <= k + 1
    with pytest.raises(RefusedError, match="2\\*threshold > degree \\+ 1"):
        client.handle(msg.encode_setup(SID, IDS[0], weak))
    pinned = SecAggClient(IDS[0], SID, CFG)
    other_clip = msg.Setup(32, 4, 4, 1.0, L, bytes(32), tuple(IDS))
    with pytest.raises(ProtocolError, match="clip"):
        pinned.handle(msg.encode_setup(SID, IDS[0], other_clip))
    tiny = SecAggClient(1, SID, None)
    with pytest.raises(RefusedError, match="participants"):
        tiny.handle(msg.encode_setup(SID, 1, msg.Setup(32, 2, 1, 1.0, L, bytes(32), (1, 2))))


def test_missing_or_bad_update_is_a_usage_error() -> None:
    server, clients, requests = _round_to(Stage.SHARE_KEYS)
    fresh = SecAggClient(IDS[0], SID, CFG, expected_vector_length=L)
    with pytest.raises(UpdateError, match="length"):
        fresh.set_update(np.zeros(L + 1, dtype=np.float32))
    with pytest.raises(UpdateError, match="NaN"):
        fresh.set_update(np.full(L, np.nan, dtype=np.float32))


def test_inconsistent_share_in_unmask_reply_aborts_never_wrong_sum() -> None:
    def corrupt(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is Stage.UNMASK and direction == "reply" and cid == IDS[0]:
            b = bytearray(data)
            b[-1 - 66 - 4 - 8 - 10] ^= 0xFF  # inside the last self-mask share
            return bytes(b)
        return data

    with pytest.raises(AbortError):
        run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=corrupt)


# ---- fuzz: truncations, extensions and byte flips anywhere except the masked payload ------

_STAGES = [Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stage=st.sampled_from(_STAGES),
    direction=st.sampled_from(["request", "reply"]),
    who=st.sampled_from(IDS),
    op=st.sampled_from(["truncate", "extend", "flip"]),
    where=st.floats(0.0, 1.0, exclude_max=True),
)
def test_fuzzed_messages_give_typed_error_or_exact_sum(
    stage: Stage, direction: str, who: int, op: str, where: float
) -> None:
    def mutate(s: Stage, d: str, cid: int, data: bytes) -> bytes:
        if (s, d, cid) != (stage, direction, who):
            return data
        pos = int(where * len(data))
        if op == "truncate":
            return data[:pos]
        if op == "extend":
            return data + b"\x00"
        if s is Stage.COLLECT_MASKED and d == "reply":
            header = len(msg.encode_header(msg.Kind.MASKED, SID, cid)) + 5
            pos = int(where * header)  # a flipped input word is just another input (no integrity)
        b = bytearray(data)
        b[pos] ^= 0x5A
        return bytes(b)

    try:
        run = run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=mutate)
    except SecAggError:
        return
    assert _exact(run.result.int_sum, run.result.survivors)
