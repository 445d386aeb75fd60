"""Client state export/import (Flower ``context.state`` between messages).

A client exported and re-imported after every message (and after ``set_update``) must be
indistinguishable from one that never left memory: same attributes (checked field by field,
so a new, unexported attribute fails these tests), same deterministic replies and the same
exact integer sum. Malformed state input raises :class:`StateError`.
"""

from __future__ import annotations

import copy
import hashlib
import struct
from typing import Any

import numpy as np
import pytest

from fedpeft.secagg import SecAggConfig, Stage, run_in_memory
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.driver import DROP_STAGES
from fedpeft.secagg.errors import SecAggError, StageError, StateError
from fedpeft.secagg.messages import Kind, peek_header
from fedpeft.secagg.quantize import decode_signed, quantize
from fedpeft.secagg.server import AggregateResult, SecAggServer
from fedpeft.secagg.state import STATE_MAGIC, STATE_VERSION

SID = b"state-test-session"
CFG = SecAggConfig(clip=1e-2, threshold=4, degree=5, max_abort_prob=1.0)
IDS = [11, 12, 13, 14, 15, 16]
LENGTH = 40


def _updates(ids: list[int], length: int = LENGTH, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {c: (rng.standard_normal(length) * 3e-3).astype(np.float32) for c in ids}


def _seeds(ids: list[int]) -> dict[int, bytes]:
    return {c: hashlib.sha256(c.to_bytes(8, "big")).digest() for c in ids}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    return type(a) is type(b) and bool(a == b)


def _assert_same_client(a: SecAggClient, b: SecAggClient) -> None:
    va, vb = vars(a), vars(b)
    assert set(va) == set(vb), f"attribute sets differ: {set(va) ^ set(vb)}"
    for key in va:
        assert _same_value(va[key], vb[key]), f"attribute {key} differs after import"


def _roundtrip(c: SecAggClient, config: SecAggConfig | None = None) -> SecAggClient:
    data = c.export_state()
    d = SecAggClient.import_state(data, config)
    _assert_same_client(c, d)
    assert d.export_state() == data  # canonical: export(import(x)) == x
    return d


def _expected_sum(ups: dict[int, np.ndarray], survivors: tuple[int, ...], res: AggregateResult,
                  seeds: dict[int, bytes]) -> np.ndarray:
    out: np.ndarray = np.sum(
        [decode_signed(quantize(ups[c], res.plan, seeds[c]), res.plan.bits) for c in survivors], axis=0)
    return out


def _run_with_export(ups: dict[int, np.ndarray], seeds: dict[int, bytes], dropouts: dict[Stage, list[int]],
                     graph_seed: bytes | None = None, cfg: SecAggConfig = CFG) -> AggregateResult:
    """In-memory round where every client is exported and re-imported before and after every message."""
    ids = sorted(ups)
    server = SecAggServer(cfg, ids, LENGTH, SID, graph_seed=graph_seed)
    states = {c: SecAggClient(c, SID, cfg, expected_vector_length=LENGTH).export_state() for c in ids}
    for c in ids:
        client = SecAggClient.import_state(states[c])
        client.set_update(ups[c], seeds[c])
        states[c] = _roundtrip(client).export_state()  # only bytes survive between messages
    gone: set[int] = set()
    requests = server.start()
    result: AggregateResult | None = None
    for stage in DROP_STAGES:
        gone |= set(dropouts.get(stage, []))
        replies: dict[int, bytes] = {}
        for c, request in requests.items():
            if c in gone:
                continue
            client = SecAggClient.import_state(states[c])  # "a fresh process per message"
            replies[c] = client.handle(request)
            states[c] = _roundtrip(client).export_state()
        if stage is Stage.UNMASK:
            result = server.on_unmask(replies)
        else:
            requests = {Stage.ADVERTISE_KEYS: server.on_advertise, Stage.SHARE_KEYS: server.on_shares,
                        Stage.COLLECT_MASKED: server.on_masked}[stage](replies)
    assert result is not None
    return result


# ---- full rounds ---------------------------------------------------------------------------


def test_round_with_export_between_every_message_matches_in_memory_sum() -> None:
    ups, seeds = _updates(IDS), _seeds(IDS)
    res = _run_with_export(ups, seeds, {})
    ref = run_in_memory(CFG, ups, session_id=SID, rounding_seeds=seeds).result
    assert res.survivors == ref.survivors == tuple(IDS)
    assert np.array_equal(res.int_sum, ref.int_sum)
    assert np.array_equal(res.int_sum, _expected_sum(ups, res.survivors, res, seeds))


def test_round_with_export_and_dropouts_at_every_stage() -> None:
    ids = list(range(100, 120))
    ups, seeds = _updates(ids, seed=4), _seeds(ids)
    cfg = SecAggConfig(clip=1e-2, threshold=7, degree=12, max_abort_prob=1.0, corrupt_fraction=0.0)
    drops = {Stage.ADVERTISE_KEYS: [ids[0]], Stage.SHARE_KEYS: [ids[5]],
             Stage.COLLECT_MASKED: ids[10:12], Stage.UNMASK: [ids[15]]}
    res = _run_with_export(ups, seeds, drops, graph_seed=bytes(range(32)), cfg=cfg)
    ref = run_in_memory(cfg, ups, session_id=SID, rounding_seeds=seeds, graph_seed=bytes(range(32)),
                        dropouts=drops).result
    expected_survivors = set(ids) - {ids[0], ids[5], ids[10], ids[11]}
    assert set(res.survivors) == set(ref.survivors) == expected_survivors
    assert np.array_equal(res.int_sum, ref.int_sum)
    assert np.array_equal(res.int_sum, _expected_sum(ups, res.survivors, res, seeds))


# ---- per-stage round trips -------------------------------------------------------------------

ME = 13


def _reference() -> tuple[dict[Stage, SecAggClient], dict[Stage, bytes]]:
    """Snapshots of client ME at every stage and the request it receives there."""
    ups, seeds = _updates(IDS), _seeds(IDS)
    server = SecAggServer(CFG, IDS, LENGTH, SID)
    clients = {c: SecAggClient(c, SID, CFG, expected_vector_length=LENGTH) for c in IDS}
    for c in IDS:
        clients[c].set_update(ups[c], seeds[c])
    snaps: dict[Stage, SecAggClient] = {}
    requests_of: dict[Stage, bytes] = {}
    requests = server.start()
    for step in (server.on_advertise, server.on_shares, server.on_masked, server.on_unmask):
        stage = clients[ME].stage
        snaps[stage], requests_of[stage] = copy.deepcopy(clients[ME]), requests[ME]
        replies = {c: clients[c].handle(m) for c, m in requests.items()}
        out = step(replies)
        requests = out if isinstance(out, dict) else {}
    snaps[Stage.DONE] = copy.deepcopy(clients[ME])
    aborted = copy.deepcopy(snaps[Stage.SHARE_KEYS])
    with pytest.raises(StageError):
        aborted.handle(requests_of[Stage.SETUP])
    snaps[Stage.ABORTED] = aborted
    return snaps, requests_of


SNAPS, REQUESTS = _reference()


@pytest.mark.parametrize("stage", list(SNAPS), ids=lambda s: s.name)
def test_roundtrip_every_stage_preserves_every_attribute(stage: Stage) -> None:
    c = SNAPS[stage]
    d = _roundtrip(c)
    assert d.stage is stage
    assert (d._enc_pk, d._mask_pk) == (c._enc_pk, c._mask_pk)  # re-derived from the private keys


@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED], ids=lambda s: s.name)
def test_imported_client_replies_exactly_like_the_original(stage: Stage) -> None:
    """Replies of these stages are deterministic (ADVERTISE_KEYS' reply has random AEAD nonces)."""
    original = copy.deepcopy(SNAPS[stage])
    imported = SecAggClient.import_state(original.export_state())
    assert imported.handle(REQUESTS[stage]) == original.handle(REQUESTS[stage])
    _assert_same_client(original, imported)


def test_imported_client_at_advertise_keys_continues_identically() -> None:
    original = copy.deepcopy(SNAPS[Stage.ADVERTISE_KEYS])
    imported = SecAggClient.import_state(original.export_state())
    a, b = original.handle(REQUESTS[Stage.ADVERTISE_KEYS]), imported.handle(REQUESTS[Stage.ADVERTISE_KEYS])
    assert peek_header(a).kind is peek_header(b).kind is Kind.SHARES and len(a) == len(b)
    # Shamir polynomials are fresh randomness, so only the own share differs; everything else agrees
    assert len(original._own_b_share) == len(imported._own_b_share) == 66
    imported._own_b_share = original._own_b_share
    _assert_same_client(original, imported)


def test_aborted_client_stays_aborted_after_import() -> None:
    d = _roundtrip(SNAPS[Stage.ABORTED])
    assert d.stage is Stage.ABORTED and d.abort_reason == SNAPS[Stage.ABORTED].abort_reason
    with pytest.raises(StageError, match="final stage=ABORTED"):
        d.handle(REQUESTS[Stage.SHARE_KEYS])


def test_roundtrip_before_and_after_set_update_without_config_or_length() -> None:
    c = SecAggClient(7, SID)
    _roundtrip(c)
    c.set_update(np.arange(5, dtype=np.float64) * 0.1)  # type: ignore[arg-type]
    d = _roundtrip(c)
    assert d._rounding_seed is None and d.config is None and d.expected_vector_length is None


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_update_dtype_and_bits_preserved(dtype: type[np.floating[Any]]) -> None:
    c = SecAggClient(7, SID, expected_vector_length=4)
    c.set_update(np.array([1e-3, -0.0, 3.5, -7.25], dtype=dtype), b"\x01" * 32)
    d = _roundtrip(c)
    assert d._update is not None and d._update.dtype == np.dtype(dtype)


def test_unsupported_update_dtype_is_refused_on_export() -> None:
    if np.dtype(np.longdouble) == np.dtype(np.float64):
        pytest.skip("longdouble is float64 on this platform")
    c = SecAggClient(7, SID)
    c.set_update(np.zeros(3, dtype=np.longdouble))
    with pytest.raises(StateError, match="dtype"):
        c.export_state()


def test_comparison_detects_an_unexported_attribute() -> None:
    """Guard for the guard: an attribute that export_state forgets makes _roundtrip fail."""
    c = copy.deepcopy(SNAPS[Stage.SETUP])
    c.extra_field = 1  # type: ignore[attr-defined]
    with pytest.raises(AssertionError, match="attribute sets differ"):
        _roundtrip(c)
    c2 = copy.deepcopy(SNAPS[Stage.COLLECT_MASKED])
    d = SecAggClient.import_state(c2.export_state())
    d._held_b[next(iter(d._held_b))] = bytes(66)
    with pytest.raises(AssertionError, match="_held_b"):
        _assert_same_client(c2, d)


# ---- config pin ----------------------------------------------------------------------------


def test_config_pin_must_match_stored_config() -> None:
    data = SNAPS[Stage.ADVERTISE_KEYS].export_state()
    assert SecAggClient.import_state(data, CFG).config == CFG
    with pytest.raises(StateError, match="differs from the pinned config"):
        SecAggClient.import_state(data, SecAggConfig(clip=2e-2, threshold=4, degree=5, max_abort_prob=1.0))


def test_config_pin_reapplied_to_unpinned_state() -> None:
    c = copy.deepcopy(SNAPS[Stage.ADVERTISE_KEYS])
    c.config = None
    data = c.export_state()
    assert SecAggClient.import_state(data).config is None
    assert SecAggClient.import_state(data, CFG).config == CFG
    with pytest.raises(StateError, match="clip"):  # the accepted SETUP violates this pin
        SecAggClient.import_state(data, SecAggConfig(clip=1.0))


# ---- malformed input -------------------------------------------------------------------------

GOOD = SNAPS[Stage.COLLECT_MASKED].export_state()
HEAD = len(STATE_MAGIC) + 1


def _reseal(body: bytes) -> bytes:
    head = STATE_MAGIC + bytes([STATE_VERSION])
    return head + body + hashlib.sha256(head + body).digest()


@pytest.mark.parametrize("cut", [0, 1, 4, 5, 36, 37, 38, len(GOOD) // 2, len(GOOD) - 32, len(GOOD) - 1])
def test_truncated_state_raises(cut: int) -> None:
    with pytest.raises(StateError):
        SecAggClient.import_state(GOOD[:cut])


def test_flipped_version_bad_magic_trailing_and_bitflip_raise() -> None:
    bad_version = GOOD[:4] + bytes([STATE_VERSION + 1]) + GOOD[5:]
    with pytest.raises(StateError, match=f"version={STATE_VERSION + 1} unsupported"):
        SecAggClient.import_state(bad_version)
    with pytest.raises(StateError, match="magic"):
        SecAggClient.import_state(b"XXXX" + GOOD[4:])
    with pytest.raises(StateError, match="checksum"):
        SecAggClient.import_state(GOOD + b"\x00")
    flipped = bytearray(GOOD)
    flipped[len(GOOD) // 2] ^= 0x10
    with pytest.raises(StateError, match="checksum"):
        SecAggClient.import_state(bytes(flipped))
    with pytest.raises(StateError, match="must be bytes"):
        SecAggClient.import_state("not bytes")  # type: ignore[arg-type]


BODY = GOOD[HEAD:-32]


@pytest.mark.parametrize("cut", [0, 1, 8, 9, 30, len(BODY) // 3, len(BODY) // 2, len(BODY) - 96,
                                 len(BODY) - 1])
def test_truncated_body_with_valid_checksum_raises(cut: int) -> None:
    """The body parser itself is strict (not only the checksum)."""
    with pytest.raises(StateError):
        SecAggClient.import_state(_reseal(BODY[:cut]))


def test_trailing_body_bytes_with_valid_checksum_raise() -> None:
    with pytest.raises(StateError, match="trailing bytes"):
        SecAggClient.import_state(_reseal(BODY + b"\x00"))


def _field_offsets() -> tuple[int, int]:
    """Offsets (in BODY) of the config flag and the stage code of GOOD."""
    sid_len = BODY[8]
    config_at = 9 + sid_len
    cfg_len = 1 + 33 + 1 + 8  # flag, (clip, bits, dropout, max_abort, gamma), flag, (t, k)
    stage_at = config_at + cfg_len + 1 + 8  # expected_vector_length flag + u64
    return config_at, stage_at


def test_bad_flag_stage_code_and_inconsistent_stage_raise() -> None:
    config_at, stage_at = _field_offsets()
    assert BODY[config_at] == 1 and BODY[stage_at] == 3  # layout check: config present, COLLECT_MASKED
    with pytest.raises(StateError, match="presence flag=2"):
        SecAggClient.import_state(_reseal(BODY[:config_at] + b"\x02" + BODY[config_at + 1 :]))
    with pytest.raises(StateError, match="stage code=9"):
        SecAggClient.import_state(_reseal(BODY[:stage_at] + b"\x09" + BODY[stage_at + 1 :]))
    for code in (0, 1, 2, 4, 5):  # shares/setup present: inconsistent with these stages
        with pytest.raises(StateError, match="inconsistent client state|abort_reason"):
            SecAggClient.import_state(_reseal(BODY[:stage_at] + bytes([code]) + BODY[stage_at + 1 :]))


def test_bad_stored_config_raises_state_error() -> None:
    config_at, _ = _field_offsets()
    bad_clip = struct.pack(">d", -1.0)
    body = BODY[: config_at + 1] + bad_clip + BODY[config_at + 9 :]
    with pytest.raises(StateError, match="stored config is invalid"):
        SecAggClient.import_state(_reseal(body))


def test_state_error_is_a_secagg_error() -> None:
    assert issubclass(StateError, SecAggError)
