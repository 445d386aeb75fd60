"""The review's attacks by a lying coordinator or a faulty client (issue 19): refused, corrected
and attributed, or detected; never a wrong sum accepted, never a secret revealed early."""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.runconfig.secagg_identity import utc_now
from fedpeft.secagg import SecAggConfig, Stage, run_in_memory
from fedpeft.secagg import messages as msg
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.config import check_round_parameters, plan_graph
from fedpeft.secagg.errors import (
    AbortError,
    AuthenticationError,
    ProtocolError,
    RefusedError,
    ShamirError,
    StageError,
    StateError,
)
from fedpeft.secagg.identity import NodeIdentity, TrustAnchor, advertisement_message
from fedpeft.secagg.quantize import decode_signed, plan_quantization, quantize
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.shamir import PRIME, SHARE_BYTES, robust_reconstruct, split

SID = b"active-adversary-session"
N = 10
IDS = list(range(101, 101 + N))
CFG = SecAggConfig(clip=1e-2)  # planner: complete graph, threshold 6 of 10 at n = 10
L = 64
SEEDS = {c: bytes([c % 256]) * 32 for c in IDS}


def _ups(scale: float = 1e-3) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(3)
    return {c: (rng.standard_normal(L) * scale).astype(np.float32) for c in IDS}


def _expected(ups: dict[int, np.ndarray], survivors: tuple[int, ...]) -> np.ndarray:
    plan = plan_quantization(CFG.clip, N, CFG.bits)
    return sum(decode_signed(quantize(ups[c], plan, SEEDS[c]), CFG.bits) for c in survivors)


def _lying_setup(n: int, threshold: int, degree: int) -> tuple[bytes, list[int]]:
    ids = list(range(1, n + 1))
    setup = msg.Setup(32, threshold, degree, 1.0, 8, bytes(32), tuple(ids))
    return msg.encode_setup(SID, ids[0], setup), ids


# ---- downgrade: clients re-plan and refuse lower parameters --------------------------------

def test_planning_client_refuses_the_reviews_downgrade_k2_t2_at_n30() -> None:
    data, ids = _lying_setup(30, 2, 2)
    for pin in (SecAggConfig(clip=1.0), None):
        client = SecAggClient(ids[0], SID, pin)
        client.set_update(np.zeros(8, dtype=np.float32))
        with pytest.raises(RefusedError, match="security floor"):
            client.handle(data)
        assert client.stage is Stage.ABORTED


def test_planning_client_refuses_a_sparser_graph_than_its_own_plan() -> None:
    """A degree that meets the floor but is below the client's own plan (which a lying
    coordinator would pick to make blocks smaller) is refused; its own plan is accepted."""
    own = plan_graph(30)
    k = own.degree - 4
    t = k // 2 + 2 + own.colluders  # meets the floor at this degree
    check_round_parameters(30, k, t, 0.05)
    data, ids = _lying_setup(30, t, k)
    client = SecAggClient(ids[0], SID, SecAggConfig(clip=1.0))
    with pytest.raises(RefusedError, match="below this client's own plan"):
        client.handle(data)
    for t_ok, k_ok in ((own.threshold, own.degree), (own.degree + 1, own.degree + 2)):
        accepting = SecAggClient(ids[0], SID, SecAggConfig(clip=1.0))
        accepting.handle(_lying_setup(30, t_ok, k_ok)[0])
        assert accepting.stage is Stage.ADVERTISE_KEYS


def test_floor_counts_the_clients_own_colluder_fraction() -> None:
    check_round_parameters(100, 28, 18, 0.05)  # 2 * 18 > 28 + 1 + 5
    with pytest.raises(RefusedError, match="5 colluders"):
        check_round_parameters(100, 28, 17, 0.05)
    with pytest.raises(RefusedError, match="degree >= 14"):
        check_round_parameters(100, 12, 12, 0.0)  # block isolation needs a small degree


# ---- wrong Shamir shares: corrected from the others and attributed -------------------------

def _corrupt_b_shares(liars: set[int]):  # type: ignore[no-untyped-def]
    def tamper(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is not Stage.UNMASK or direction != "reply" or cid not in liars:
            return data
        b, sk = msg.decode_unmask_shares(data, SID, cid)
        wrong = {owner: secrets.randbelow(PRIME).to_bytes(SHARE_BYTES, "big") for owner in b}
        return msg.encode_unmask_shares(SID, cid, wrong, sk)
    return tamper


@pytest.mark.parametrize("liars", [{101}, {101, 105}])
def test_wrong_shares_are_corrected_and_their_senders_named(liars: set[int]) -> None:
    ups = _ups()
    run = run_in_memory(CFG, ups, session_id=SID, rounding_seeds=SEEDS,
                        tamper=_corrupt_b_shares(liars), drop_invalid=True)
    assert set(run.server.faults) == liars
    assert all("wrong share" in why for why in run.server.faults.values())
    # their inputs stay in the sum (they did send a masked input); the sum is exact
    assert run.result.survivors == tuple(IDS)
    np.testing.assert_array_equal(run.result.int_sum, _expected(ups, run.result.survivors))


def test_wrong_share_fails_closed_by_default_naming_its_sender() -> None:
    with pytest.raises(ProtocolError, match="client 103 sent a wrong share"):
        run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS,
                      tamper=_corrupt_b_shares({103}))


def test_too_many_wrong_shares_abort_never_a_wrong_sum() -> None:
    liars = set(IDS[:3])  # 10 holders, threshold 6: two errors are decodable, three are not
    with pytest.raises(AbortError):
        run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS,
                      tamper=_corrupt_b_shares(liars), drop_invalid=True)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(t=st.integers(1, 8), extra=st.integers(0, 8), data=st.data())
def test_berlekamp_welch_recovers_and_names_up_to_half_the_redundancy(
        t: int, extra: int, data: st.DataObject) -> None:
    m = t + extra
    secret = secrets.token_bytes(32)
    shares = split(secret, t, list(range(1, m + 1)))
    wrong = data.draw(st.sets(st.integers(1, m), max_size=extra // 2))
    for x in wrong:
        honest = int.from_bytes(shares[x], "big")
        shares[x] = ((honest + data.draw(st.integers(1, PRIME - 1))) % PRIME).to_bytes(SHARE_BYTES, "big")
    got, named = robust_reconstruct(shares, t)
    assert got == secret and named == wrong


def test_robust_reconstruct_names_malformed_shares_and_refuses_too_few() -> None:
    shares = split(b"\x07" * 32, 3, [1, 2, 3, 4])
    shares[2] = b"\xff" * SHARE_BYTES  # not a field element
    assert robust_reconstruct(shares, 3) == (b"\x07" * 32, frozenset({2}))
    with pytest.raises(ShamirError):
        robust_reconstruct({1: shares[1], 3: shares[3]}, 3)


# ---- substituted or garbled masked inputs: the range check -----------------------------------

@pytest.mark.parametrize("trial", range(8))
def test_substituted_masked_vector_is_detected(trial: int) -> None:
    """A uniform substitute passes the check with probability <= 2^-64 per trial (L = 64)."""
    victim = IDS[trial % N]

    def substitute(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is Stage.COLLECT_MASKED and direction == "reply" and cid == victim:
            words = np.frombuffer(secrets.token_bytes(4 * L), dtype="<u4").astype(np.uint32)
            return msg.encode_masked(SID, cid, words, CFG.bits)
        return data

    with pytest.raises(AbortError, match="substituted or corrupted"):
        run_in_memory(CFG, _ups(), session_id=SID, rounding_seeds=SEEDS, tamper=substitute,
                      dropouts={Stage.UNMASK: {IDS[(trial + 1) % N]}} if trial % 2 else None)


def test_range_check_never_rejects_honest_inputs_at_the_clip() -> None:
    """Every client at +clip or -clip in every coordinate: the extreme honest sums pass."""
    for sign in (1.0, -1.0):
        ups = {c: np.full(L, sign * CFG.clip * 4, dtype=np.float32) for c in IDS}
        run = run_in_memory(CFG, ups, session_id=SID, rounding_seeds=SEEDS)
        plan = plan_quantization(CFG.clip, N, CFG.bits)
        np.testing.assert_array_equal(run.result.int_sum, np.full(L, sign * N * plan.max_level))


# ---- authenticated rounds: certified node keys, signed advertisements -----------------------

@pytest.fixture(scope="module")
def pki() -> tuple[TrustAnchor, dict[int, NodeIdentity], Any]:
    """A federation CA and one enrolled identity per client id (as ``fedpeft certs`` makes)."""
    from fedpeft.deploy.certs import build_identities

    trust, identities = build_identities(IDS)
    return trust, identities, None


def test_authenticated_round_gives_the_exact_sum_with_dropouts(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    ups = _ups()
    run = run_in_memory(CFG, ups, session_id=SID, rounding_seeds=SEEDS, identities=identities,
                        trust=trust, dropouts={Stage.SHARE_KEYS: {IDS[2]}})
    assert IDS[2] not in run.result.survivors
    np.testing.assert_array_equal(run.result.int_sum, _expected(ups, run.result.survivors))


def _substitute_keys(victim: int, peer: int, *, resign: NodeIdentity | None = None):  # type: ignore[no-untyped-def]
    """The review's key substitution: the coordinator gives ``victim`` its own keys for ``peer``
    (keeping ``peer``'s certificate and signature, or re-signing with another identity)."""
    attacker = SecAggClient(peer, SID, CFG)

    def tamper(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is not Stage.SHARE_KEYS or direction != "request" or cid != victim:  # KEYS
            return data
        own = attacker._own_keys()
        out = []
        for p in msg.decode_keys(data, SID, cid):
            if p.client_id == peer:
                cert, sig = p.certificate, p.signature
                if resign is not None:
                    cert = resign.certificate
                    sig = resign.sign(advertisement_message(SID, peer, own[:32], own[32:64], own[64:]))
                p = msg.PeerKeys(peer, own[:32], own[32:64], own[64:], cert, sig)
            out.append(p)
        return msg.encode_keys(SID, cid, out)
    return tamper


def test_substituted_peer_keys_are_refused_before_anything_is_shared(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    from fedpeft.deploy.certs import build_ca, build_secagg_node_cert

    with pytest.raises(AuthenticationError, match="not signed by its certified key"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=identities, trust=trust,
                      tamper=_substitute_keys(IDS[0], IDS[1]))
    # re-signed by the coordinator with a key from its own CA: not the federation's
    rogue_key, rogue_ca = build_ca("rogue CA")
    key, cert = build_secagg_node_cert(rogue_key, rogue_ca, f"node-{IDS[1]}")
    rogue = NodeIdentity(key, cert.public_bytes(serialization.Encoding.DER), TrustAnchor(rogue_ca, utc_now))
    with pytest.raises(AuthenticationError, match="not issued by the federation CA"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=identities, trust=trust,
                      tamper=_substitute_keys(IDS[0], IDS[1], resign=rogue))
    # re-signed with another genuine node's key (a colluder): the signer is already a peer
    with pytest.raises(ProtocolError, match="sybil"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=identities, trust=trust,
                      tamper=_substitute_keys(IDS[0], IDS[1], resign=identities[IDS[2]]))
    # without authentication the same substitution goes unnoticed by the victim (the review)
    victim = SecAggClient(IDS[0], SID, CFG)
    victim.set_update(_ups()[IDS[0]], SEEDS[IDS[0]])
    server = SecAggServer(CFG, IDS, L, SID)
    others = {c: SecAggClient(c, SID, CFG) for c in IDS[1:]}
    setup = server.start()
    replies = {IDS[0]: victim.handle(setup[IDS[0]])} | {c: others[c].handle(setup[c]) for c in IDS[1:]}
    keys = server.on_advertise(replies)
    keys[IDS[0]] = _substitute_keys(IDS[0], IDS[1])(Stage.SHARE_KEYS, "request", IDS[0], keys[IDS[0]])
    victim.handle(keys[IDS[0]])
    assert victim.stage is Stage.SHARE_KEYS  # it shared its secrets with the coordinator's keys


def test_one_node_cannot_advertise_as_two_clients(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    sybil = dict(identities) | {IDS[3]: identities[IDS[4]]}
    with pytest.raises(ProtocolError, match="already in use"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=sybil, trust=trust)


def test_no_downgrade_either_way(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    with pytest.raises(RefusedError, match="joins only authenticated rounds"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=identities)  # server without CA
    with pytest.raises(RefusedError, match="no SecAgg node identity"):
        run_in_memory(CFG, _ups(), session_id=SID, trust=trust)  # clients without identities


def test_authenticated_state_is_imported_only_with_the_identity(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    server = SecAggServer(CFG, IDS, L, SID, trust=trust)
    client = SecAggClient(IDS[0], SID, CFG, identity=identities[IDS[0]])
    client.handle(server.start()[IDS[0]])
    state = client.export_state()
    with pytest.raises(StateError, match="no SecAgg node identity"):
        SecAggClient.import_state(state, CFG)
    restored = SecAggClient.import_state(state, CFG, identity=identities[IDS[0]])
    assert restored.export_state() == state and restored.identity is identities[IDS[0]]
    unauthenticated = SecAggClient(IDS[0], SID, CFG)
    unauthenticated.handle(SecAggServer(CFG, IDS, L, SID).start()[IDS[0]])
    with pytest.raises(StateError, match="joins only authenticated rounds"):
        SecAggClient.import_state(unauthenticated.export_state(), CFG, identity=identities[IDS[0]])


# ---- the consistency check: one survivor set, signed by a quorum -----------------------------

def _authenticated_round_to_consistency(pki):  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    server = SecAggServer(CFG, IDS, L, SID, trust=trust)
    clients = {c: SecAggClient(c, SID, CFG, identity=identities[c]) for c in IDS}
    ups = _ups()
    for c in IDS:
        clients[c].set_update(ups[c], SEEDS[c])
    requests = server.start()
    for step in (server.on_advertise, server.on_shares, server.on_masked):
        requests = step({c: clients[c].handle(m) for c, m in requests.items()})
    assert server.stage is Stage.CONSISTENCY_CHECK
    return server, clients, requests


def test_a_coordinator_telling_two_survivor_stories_gets_no_share(pki) -> None:  # type: ignore[no-untyped-def]
    """The review's lie about dropouts, against the consistency check: half the clients are
    told the victim dropped, half that it survived. Each story gets at most 5 signatures of
    n = 10, below the quorum of 6, so no client reveals anything (honest clients sign once)."""
    from fedpeft.secagg.config import consistency_quorum

    server, clients, _ = _authenticated_round_to_consistency(pki)
    victim, group_a = IDS[0], set(IDS[:5])
    full = sorted(IDS)
    story = {c: [i for i in full if i != victim] if c in group_a else full for c in IDS}
    sigs = {c: msg.decode_consistency_signature(
        clients[c].handle(msg.encode_consistency_request(SID, c, story[c])), SID, c)
        for c in IDS if c != victim}
    assert consistency_quorum(N, CFG.corrupt_fraction) == 6
    certs = {c: clients[c].identity.certificate for c in IDS}  # type: ignore[union-attr]
    attestations = [msg.Attestation(c, certs[c], sigs[c]) for c in sorted(sigs)]
    for c in sorted(sigs):
        surv = [i for i in story[c] if i != c]
        drop = [i for i in full if i not in story[c] and i != c]
        with pytest.raises(RefusedError, match="only [45] valid signatures"):
            clients[c].handle(msg.encode_unmask_request(SID, c, surv, drop, attestations))
        assert clients[c].stage is Stage.ABORTED  # and never answers again


def test_a_bad_consistency_signature_is_dropped_and_the_sum_stays_exact(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki

    def forge(stage: Stage, direction: str, cid: int, data: bytes) -> bytes:
        if stage is Stage.CONSISTENCY_CHECK and direction == "reply" and cid == IDS[4]:
            return msg.encode_consistency_signature(SID, cid, bytes(64))
        return data

    ups = _ups()
    run = run_in_memory(CFG, ups, session_id=SID, rounding_seeds=SEEDS, identities=identities,
                        trust=trust, tamper=forge, drop_invalid=True)
    assert set(run.server.faults) == {IDS[4]}
    assert run.result.survivors == tuple(IDS)  # its masked input is in the sum; it just is not asked
    np.testing.assert_array_equal(run.result.int_sum, _expected(ups, run.result.survivors))


def test_no_quorum_of_masked_inputs_aborts_before_any_share(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    with pytest.raises(AbortError, match="quorum of 6"):
        run_in_memory(CFG, _ups(), session_id=SID, identities=identities, trust=trust,
                      dropouts={Stage.COLLECT_MASKED: set(IDS[:5])})


def test_consistency_stage_state_round_trips_and_signs_once(pki) -> None:  # type: ignore[no-untyped-def]
    _, identities, _ = pki
    server, clients, requests = _authenticated_round_to_consistency(pki)
    me = IDS[1]
    clients[me].handle(requests[me])
    state = clients[me].export_state()
    restored = SecAggClient.import_state(state, CFG, identity=identities[me])
    assert restored.stage is Stage.CONSISTENCY_CHECK and restored.export_state() == state
    with pytest.raises(StageError):  # a second survivor set is never signed
        restored.handle(requests[me])


def test_consistency_check_lowers_the_floor_to_more_than_c_colluders() -> None:
    """With one signed survivor set the server gets a secret's other share kind only from
    colluders, so ``t > c`` (and ``2t > k + 1`` kept) suffices: the plan at n = 1,000 tolerates
    the same 50 colluders with k = 86 instead of 164."""
    from fedpeft.secagg.config import min_safe_threshold

    assert min_safe_threshold(28, 5, consistency=True) == 15  # 2t > k + 1 dominates
    assert min_safe_threshold(86, 50, consistency=True) == 51  # t > c dominates
    for n in (100, 1000):
        plain, checked = plan_graph(n, 0.2, 0.01), plan_graph(n, 0.2, 0.01, consistency=True)
        assert checked.colluders == plain.colluders
        assert checked.threshold > checked.colluders and 2 * checked.threshold > checked.degree + 1
        assert checked.degree < plain.degree
    with pytest.raises(RefusedError, match="threshold > 5 colluders"):
        check_round_parameters(100, 34, 5, 0.05, consistency=True)
    check_round_parameters(100, 34, 18, 0.05, consistency=True)
    with pytest.raises(RefusedError):  # the same parameters without the check: below the floor
        check_round_parameters(100, 34, 18, 0.05)


def test_a_remembered_certificate_still_expires(pki) -> None:  # type: ignore[no-untyped-def]
    trust, identities, _ = pki
    der = identities[IDS[0]].certificate
    assert trust.verify(der).name == f"node-{IDS[0]}"  # verified once, remembered
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4000)
    with pytest.raises(AuthenticationError, match="not valid now"):
        trust.verify(der, now=later)
