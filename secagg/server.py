"""Server side of SecAgg+ (Bell et al., CCS 2020) as a pure state machine over ``bytes``.

Flow (a client missing from a ``replies`` mapping has dropped at that stage)::

    server = SecAggServer(config, participants, vector_length, session_id)
    out = server.start()                 # SETUP -> ADVERTISE_KEYS   (round 0 requests)
    out = server.on_advertise(replies)   # -> SHARE_KEYS              (neighbour keys)
    out = server.on_shares(replies)      # -> COLLECT_MASKED          (forwarded shares)
    out = server.on_masked(replies)      # -> UNMASK                  (unmask requests)
    result = server.on_unmask(replies)   # -> DONE                    (AggregateResult)

An authenticated round (``trust=``) adds the consistency check between the last two:
``on_masked`` -> CONSISTENCY_CHECK (survivor set to sign), ``on_consistency`` -> UNMASK.

Every error raises a typed :class:`SecAggError`, sets ``stage = ABORTED`` and records
``abort_reason``; an aborted server answers nothing more. The server learns only the sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import numpy as np
import numpy.typing as npt

from fedpeft.secagg import messages as msg
from fedpeft.secagg.config import MAX_CLIENT_ID, SecAggConfig, consistency_quorum
from fedpeft.secagg.errors import (
    AbortError,
    MalformedMessageError,
    ProtocolError,
    SecAggConfigError,
    SecAggError,
    ShamirError,
    StageError,
)
from fedpeft.secagg.graph import neighbour_graph
from fedpeft.secagg.identity import (
    TrustAnchor,
    consistency_message,
    verify_advertisement,
    verify_signature,
)
from fedpeft.secagg.kdf import pairwise_mask_seed, public_from_private, self_mask_commitment
from fedpeft.secagg.prg import SEED_BYTES, expand_mask
from fedpeft.secagg.quantize import QuantizationPlan, decode_signed, dequantize
from fedpeft.secagg.shamir import reconstruct, robust_reconstruct
from fedpeft.secagg.stages import Stage, server_transitions

_T = TypeVar("_T")


@dataclass(frozen=True)
class AggregateResult:
    """Unmasked aggregate of one round."""

    modular_sum: npt.NDArray[np.uint32]  # sum of quantised inputs mod 2^b
    int_sum: npt.NDArray[np.int64]  # the same, decoded as a signed integer (never wrapped)
    survivors: tuple[int, ...]  # clients whose inputs are in the sum
    dropped: tuple[int, ...]  # participants whose inputs are not
    plan: QuantizationPlan

    def float_sum(self) -> npt.NDArray[np.float64]:
        """Sum of the survivors' (clipped) updates, dequantised."""
        return dequantize(self.int_sum, self.plan)

    def float_mean(self) -> npt.NDArray[np.float64]:
        """Mean over the survivors."""
        return self.float_sum() / len(self.survivors)


class SecAggServer:
    """Coordinator of one SecAgg+ round (honest-but-curious model; see docs/secagg.md).

    ``drop_invalid``: if True, a client whose reply is malformed or violates the protocol is
    treated as dropped (reason in ``faults``) instead of aborting the round, and wrong Shamir
    shares are corrected (their senders named in ``faults``). ``field_inputs``: the clients send
    pre-encoded field words (:meth:`SecAggClient.set_field_input`), so the unmasked sum is not
    range-checked here (the field's decoder checks it); otherwise a sum beyond what the
    survivors' clipped inputs can produce aborts the round. ``trust`` (the federation CA) makes
    the round authenticated: SETUP says so, every advertisement must carry a node certificate
    of that CA and a valid signature (else the client is invalid), and one certified node may
    advertise under one client id only (sybils). The clients verify again themselves: the
    server's checks only drop bad clients early.
    """

    def __init__(
        self,
        config: SecAggConfig,
        participants: Sequence[int],
        vector_length: int,
        session_id: bytes,
        *,
        graph_seed: bytes | None = None,
        drop_invalid: bool = False,
        field_inputs: bool = False,
        trust: TrustAnchor | None = None,
    ) -> None:
        ids = list(participants)
        if any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_CLIENT_ID for c in ids):
            raise SecAggConfigError("participants must be unsigned 64-bit integer client ids")
        if len(set(ids)) != len(ids):
            raise SecAggConfigError(f"participants contain duplicates (n={len(ids)}, "
                                    f"distinct={len(set(ids))})")
        if len(ids) > msg.MAX_PARTICIPANTS:
            raise SecAggConfigError(f"n={len(ids)} participants exceeds {msg.MAX_PARTICIPANTS}")
        if not 1 <= vector_length <= msg.MAX_VECTOR_LENGTH:
            raise SecAggConfigError(f"vector_length={vector_length} must be in [1, 2^32 - 1]")
        if not msg.MIN_SESSION_BYTES <= len(session_id) <= msg.MAX_SESSION_BYTES:
            raise SecAggConfigError(
                f"session_id length={len(session_id)} must be in [{msg.MIN_SESSION_BYTES}, "
                f"{msg.MAX_SESSION_BYTES}] bytes; use a unique id per round"
            )
        if graph_seed is not None and len(graph_seed) != SEED_BYTES:
            raise SecAggConfigError(f"graph_seed length={len(graph_seed)} must be {SEED_BYTES}")
        self.participants: tuple[int, ...] = tuple(sorted(ids))
        # security: fails closed on modulus/threshold
        self.config = config.resolve(len(ids), authenticated=trust is not None)
        self.threshold = int(self.config.threshold or 0)
        self.degree = min(int(self.config.degree or 0), len(ids) - 1)
        self.plan = self.config.quantization(len(ids))
        self.vector_length = vector_length
        self.session_id = bytes(session_id)
        self.graph_seed = graph_seed if graph_seed is not None else os.urandom(SEED_BYTES)
        self.drop_invalid = drop_invalid
        self.trust = trust
        #: largest |level| of one client's coordinate: the unmasked sum is checked against
        #: ``survivors * input_bound``; None for field inputs, whose decoder checks them.
        self.input_bound: int | None = None if field_inputs else self.plan.max_level
        self.neighbours = neighbour_graph(self.participants, self.degree, self.graph_seed)
        self._x = {cid: i + 1 for i, cid in enumerate(self.participants)}
        self.stage = Stage.SETUP
        self.abort_reason: str | None = None
        self.excluded: dict[int, str] = {}  # removed by the server (too few neighbours)
        self.faults: dict[int, str] = {}  # invalid replies (drop_invalid=True)
        self._keys: dict[int, msg.PeerKeys] = {}
        self._keys_sent: dict[int, frozenset[int]] = {}
        self._cts: dict[int, dict[int, bytes]] = {}
        self._forwarded: dict[int, frozenset[int]] = {}
        self._u3: frozenset[int] = frozenset()
        self._acc: npt.NDArray[np.uint32] | None = None
        self._requests: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._holder_at: dict[int, int] = {}  # Shamir x -> the asked client (unmask stage)
        self._signers: dict[int, bytes] = {}  # certified node key of each advertiser

    # ---- helpers ------------------------------------------------------------------------

    def _fail(self, exc: SecAggError) -> NoReturn:
        self.stage = Stage.ABORTED
        self.abort_reason = str(exc)
        raise exc

    def _enter(self, stage: Stage) -> None:
        if self.stage is not stage:
            exc = StageError(f"server call for stage={stage.name} while in stage={self.stage.name}")
            if self.stage in (Stage.DONE, Stage.ABORTED):
                raise exc  # final: keep the recorded reason
            self._fail(exc)

    def _collect(
        self, replies: Mapping[int, bytes], allowed: frozenset[int], decode: Callable[[bytes, int], _T]
    ) -> dict[int, _T]:
        kind = server_transitions(self.trust is not None)[self.stage][0]
        if not isinstance(replies, Mapping):
            self._fail(ProtocolError(f"replies type={type(replies).__name__} must map client id -> bytes"))
        bad_ids = [k for k in replies if isinstance(k, bool) or not isinstance(k, int)]
        if bad_ids:  # security: fail closed, never guess which client a key means
            self._fail(ProtocolError(f"{kind.name} replies keyed by {bad_ids[0]!r} "
                                     f"({type(bad_ids[0]).__name__}); keys must be int client ids"))
        out: dict[int, _T] = {}
        for cid in sorted(replies):
            if cid not in allowed:  # security: unknown or no-longer-active sender
                self._fail(ProtocolError(
                    f"{kind.name} reply from client {cid}, which was not asked in stage {self.stage.name}"
                ))
            data = replies[cid]
            try:
                if not isinstance(data, (bytes, bytearray, memoryview)):
                    raise MalformedMessageError(f"reply of client {cid} has type {type(data).__name__}")
                raw = data.tobytes() if isinstance(data, memoryview) else bytes(data)  # any layout
                header = msg.peek_header(raw)
                if header.kind != kind:
                    raise StageError(f"client {cid} sent {header.kind.name} in stage {self.stage.name}; "
                                     f"expected {kind.name}")
                out[cid] = decode(raw, cid)
            except (MalformedMessageError, ProtocolError) as exc:
                if not self.drop_invalid:
                    self._fail(exc)
                self.faults[cid] = str(exc)
        return out

    def _prune(self, candidates: set[int], links: Callable[[int, set[int]], set[int]], why: str) -> set[int]:
        """Drop clients with fewer than ``threshold`` links among the active set (fixed point)."""
        active = set(candidates)
        changed = True
        while changed:
            changed = False
            for cid in sorted(active):
                if len(links(cid, active)) < self.threshold:
                    active.discard(cid)
                    self.excluded[cid] = why
                    changed = True
        if len(active) < self.threshold:
            self._fail(AbortError(
                f"only {len(active)} clients can continue after {self.stage.name}, threshold="
                f"{self.threshold}; too many dropouts, nothing was revealed"
            ))
        return active

    # ---- stages -------------------------------------------------------------------------

    def start(self) -> dict[int, bytes]:
        """SETUP -> ADVERTISE_KEYS: round parameters to every participant."""
        self._enter(Stage.SETUP)
        setup = msg.Setup(self.plan.bits, self.threshold, self.degree, self.plan.clip,
                          self.vector_length, self.graph_seed, self.participants,
                          self.trust is not None)
        self.stage = Stage.ADVERTISE_KEYS
        return {cid: msg.encode_setup(self.session_id, cid, setup) for cid in self.participants}

    def on_advertise(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Collect public keys; send each client its advertising neighbours' keys."""
        self._enter(Stage.ADVERTISE_KEYS)
        signers = self._signers

        def decode(data: bytes, cid: int) -> msg.PeerKeys:
            keys = msg.decode_advertise(data, self.session_id, cid)
            signer = verify_advertisement(keys, self.session_id, self.trust)
            if signer is not None:
                signers[cid] = signer
            return keys

        got = self._collect(replies, frozenset(self.participants), decode)
        seen: set[bytes] = set()
        for cid, keys in got.items():
            # security: duplicated keys mean replay or sybils; reject rather than guess
            if (keys.enc_pk in seen or keys.mask_pk in seen or keys.enc_pk == keys.mask_pk
                    or (cid in signers and signers[cid] in seen)):
                self._fail(ProtocolError(f"client {cid} advertises a public key already in use"))
            seen.update((keys.enc_pk, keys.mask_pk, *([signers[cid]] if cid in signers else [])))
            self._keys[cid] = keys
        active = self._prune(set(self._keys), lambda c, a: set(self.neighbours[c] & a) | {c},
                             "fewer than threshold neighbours advertised keys")
        out: dict[int, bytes] = {}
        for cid in sorted(active):
            peers = sorted(self.neighbours[cid] & active)
            self._keys_sent[cid] = frozenset(peers)
            out[cid] = msg.encode_keys(self.session_id, cid, [self._keys[p] for p in peers])
        self.stage = Stage.SHARE_KEYS
        return out

    def on_shares(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Collect encrypted shares; forward to each client the shares addressed to it."""
        self._enter(Stage.SHARE_KEYS)

        def decode(data: bytes, cid: int) -> dict[int, bytes]:
            cts = msg.decode_shares(data, self.session_id, cid)
            if set(cts) != self._keys_sent[cid]:  # security: exactly one share per listed peer
                raise ProtocolError(
                    f"client {cid} sent shares for {len(cts)} peers; expected exactly its "
                    f"{len(self._keys_sent[cid])} listed neighbours"
                )
            return cts

        self._cts = self._collect(replies, frozenset(self._keys_sent), decode)
        u2 = set(self._cts)

        def holders(cid: int, active: set[int]) -> set[int]:
            return {s for s in self.neighbours[cid] & active if cid in self._cts[s]}

        forwarded = {cid: frozenset(holders(cid, u2)) for cid in u2}
        ready = {c for c in u2 if len(forwarded[c]) + 1 >= self.threshold}
        for cid in sorted(u2 - ready):
            self.excluded[cid] = "fewer than threshold neighbours shared keys"
        if len(u2) < self.threshold or len(ready) < self.threshold:
            self._fail(AbortError(
                f"only {len(u2)} clients shared keys ({len(ready)} with enough peers), threshold="
                f"{self.threshold}; nothing was revealed"
            ))
        self._forwarded = {c: forwarded[c] for c in ready}
        out = {c: msg.encode_forward(self.session_id, c, {s: self._cts[s][c] for s in self._forwarded[c]})
               for c in sorted(ready)}
        self.stage = Stage.COLLECT_MASKED
        return out

    def on_masked(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Sum masked inputs mod 2^b; ask survivors for the shares that remove the masks."""
        self._enter(Stage.COLLECT_MASKED)
        acc = np.zeros(self.vector_length, dtype=np.uint32)

        def decode(data: bytes, cid: int) -> None:
            # words < 2^bits by construction of the packing (bits bits each)
            words = msg.decode_masked(data, self.session_id, cid, self.vector_length, self.plan.bits)
            np.add(acc, words, out=acc, casting="unsafe")  # wraps mod 2^32

        got = self._collect(replies, frozenset(self._forwarded), decode)
        self._u3 = frozenset(got)
        u3 = self._u3
        quorum = consistency_quorum(len(self.participants), self.config.corrupt_fraction)
        if self.trust is not None and len(u3) < quorum:
            self._fail(AbortError(f"only {len(u3)} masked inputs of n={len(self.participants)}; "
                                  f"an authenticated round needs a quorum of {quorum}; nothing "
                                  "was revealed"))
        if len(u3) < self.threshold:
            self._fail(AbortError(f"only {len(u3)} masked inputs < threshold={self.threshold}; "
                                  "nothing was revealed"))
        self._check_recoverable(u3)
        self._acc = acc
        if self.trust is not None:  # the consistency check first: the survivors sign u3
            self.stage = Stage.CONSISTENCY_CHECK
            return {j: msg.encode_consistency_request(self.session_id, j, sorted(u3)) for j in sorted(u3)}
        return self._unmask_requests(u3, ())

    def on_consistency(self, replies: Mapping[int, bytes]) -> dict[int, bytes]:
        """Authenticated rounds: collect the survivors' signatures on the survivor set; ask
        the signers for shares, sending every client all the signatures (it reveals nothing
        unless a quorum of them is valid, :meth:`SecAggClient._check_attestations`)."""
        self._enter(Stage.CONSISTENCY_CHECK)
        survivors = sorted(self._u3)

        def decode(data: bytes, cid: int) -> msg.Attestation:
            sig = msg.decode_consistency_signature(data, self.session_id, cid)
            verify_signature(self._signers[cid], consistency_message(self.session_id, cid, survivors),
                             sig, f"survivor {cid}")
            return msg.Attestation(cid, self._keys[cid].certificate, sig)

        got = self._collect(replies, self._u3, decode)
        quorum = consistency_quorum(len(self.participants), self.config.corrupt_fraction)
        if len(got) < quorum:
            self._fail(AbortError(f"only {len(got)} valid signatures on the survivor set; the "
                                  f"quorum is {quorum}; nothing was revealed"))
        u4 = frozenset(got)
        self._check_recoverable(u4)
        return self._unmask_requests(u4, tuple(got[c] for c in sorted(got)))

    def _check_recoverable(self, responders: frozenset[int]) -> None:
        """security: before any share is asked for, every needed secret must have at least
        ``threshold`` holders among ``responders`` (the clients that will be asked)."""
        u3 = self._u3
        holders: dict[int, int] = {j: 1 for j in responders}  # a survivor holds its own seed share
        for j in responders:
            for i in self._forwarded[j]:
                holders[i] = holders.get(i, 0) + 1
        needed = set(u3) | {i for j in u3 for i in self._forwarded[j] - u3}
        short = sorted(i for i in needed if holders.get(i, 0) < self.threshold)
        if short:
            self._fail(AbortError(
                f"clients {short[:5]} have fewer than threshold={self.threshold} surviving share "
                "holders; aborting before any share is revealed"
            ))

    def _unmask_requests(self, responders: frozenset[int],
                         attestations: tuple[msg.Attestation, ...]) -> dict[int, bytes]:
        u3 = self._u3
        out: dict[int, bytes] = {}
        for j in sorted(responders):
            surv, drop = self._forwarded[j] & u3, self._forwarded[j] - u3
            self._requests[j] = (surv, drop)
            self._holder_at[self._x[j]] = j
            out[j] = msg.encode_unmask_request(self.session_id, j, sorted(surv), sorted(drop),
                                               attestations)
        self.stage = Stage.UNMASK
        return out

    def on_unmask(self, replies: Mapping[int, bytes]) -> AggregateResult:
        """Reconstruct self-mask seeds of survivors and mask keys of dropped clients; unmask."""
        self._enter(Stage.UNMASK)

        def decode(data: bytes, cid: int) -> tuple[dict[int, bytes], dict[int, bytes]]:
            b, sk = msg.decode_unmask_shares(data, self.session_id, cid)
            surv, drop = self._requests[cid]
            if set(b) != surv | {cid} or set(sk) != drop:  # security: exactly the requested shares
                raise ProtocolError(f"client {cid} returned shares for other clients than requested")
            return b, sk

        got = self._collect(replies, frozenset(self._requests), decode)
        b_shares: dict[int, dict[int, bytes]] = {}
        sk_shares: dict[int, dict[int, bytes]] = {}
        for j, (b, sk) in got.items():
            for owner, share in b.items():
                b_shares.setdefault(owner, {})[self._x[j]] = share
            for owner, share in sk.items():
                sk_shares.setdefault(owner, {})[self._x[j]] = share
        acc = _need(self._acc)
        dropped_needed = sorted({i for j in self._u3 for i in self._forwarded[j] - self._u3})
        try:
            for i in sorted(self._u3):
                seed = self._recover(i, b_shares.get(i, {}), "self-mask seed", self._seed_check(i))
                acc -= expand_mask(seed, self.vector_length)
            for d in dropped_needed:
                sk_d = self._recover(d, sk_shares.get(d, {}), "mask key", self._key_check(d))
                for i in sorted(self._u3):
                    if d in self._forwarded[i]:
                        seed = pairwise_mask_seed(sk_d, self._keys[i].mask_pk, self.session_id, i, d)
                        mask = expand_mask(seed, self.vector_length)
                        if i < d:  # undo the sign client i used
                            acc -= mask
                        else:
                            acc += mask
        except ShamirError as exc:
            self._fail(AbortError(f"cannot reconstruct secrets: {exc}"))
        except SecAggError as exc:
            self._fail(exc)
        acc &= np.uint32(self.plan.modulus - 1)
        self._acc = None
        survivors = tuple(sorted(self._u3))
        int_sum = decode_signed(acc, self.plan.bits)
        if self.input_bound is not None:
            reach = len(survivors) * self.input_bound
            worst = int(np.max(np.abs(int_sum))) if int_sum.size else 0
            if worst > reach:  # security: a sum no honest survivors can produce is never used
                self._fail(AbortError(
                    f"the unmasked sum has a coordinate of {worst} levels, beyond the {reach} "
                    f"that {len(survivors)} clipped inputs can reach: a masked input was "
                    "substituted or corrupted; the round is discarded"
                ))
        self.stage = Stage.DONE
        return AggregateResult(
            modular_sum=acc,
            int_sum=int_sum,
            survivors=survivors,
            dropped=tuple(c for c in self.participants if c not in self._u3),
            plan=self.plan,
        )

    @property
    def masked_inputs(self) -> frozenset[int]:
        """The clients whose masked inputs the sum holds (known after :meth:`on_masked`)."""
        return self._u3

    def _seed_check(self, owner: int) -> Callable[[bytes], bool]:
        def check(seed: bytes) -> bool:
            return self_mask_commitment(self.session_id, owner, seed) == self._keys[owner].commitment
        return check

    def _key_check(self, owner: int) -> Callable[[bytes], bool]:
        def check(sk: bytes) -> bool:
            return public_from_private(sk) == self._keys[owner].mask_pk
        return check

    def _recover(self, owner: int, shares: dict[int, bytes], what: str,
                 check: Callable[[bytes], bool]) -> bytes:
        """The secret ``what`` of ``owner`` from its holders' shares, checked by ``check``
        (the commitment or the advertised public key). Shares of holders already caught
        sending a wrong share are left out; if the fast path (the first ``threshold`` shares)
        fails the check, Berlekamp-Welch decoding corrects up to ``(m - t) // 2`` wrong shares
        and names their senders: with ``drop_invalid`` they go to ``faults`` (their inputs
        stay in the sum; their later shares are ignored) and the round goes on, else it
        aborts naming them. Raises ``AbortError`` if no checked secret can be found."""
        by_x = self._holder_at
        usable = {x: y for x, y in shares.items() if by_x.get(x) not in self.faults}
        try:
            secret = reconstruct(usable, self.threshold)
            if check(secret):
                return secret
        except ShamirError:
            pass  # a malformed share among the first t: decode below
        try:
            secret, wrong = robust_reconstruct(usable, self.threshold)
        except ShamirError as exc:
            raise AbortError(f"cannot reconstruct the {what} of client {owner}: {exc}") from exc
        if not check(secret):  # security: never unmask with an unchecked secret
            raise AbortError(f"the decoded {what} of client {owner} does not match what it "
                             "advertised: its shares are inconsistent (a dishonest dealer)")
        senders = sorted(by_x[x] for x in wrong)
        for cid in senders:  # security: attributed, never silently absorbed
            reason = f"sent a wrong share of the {what} of client {owner}"
            if not self.drop_invalid:
                raise ProtocolError(f"client {cid} {reason}; the round fails closed "
                                    "(drop_invalid=True would correct it and go on)")
            self.faults[cid] = reason
        return secret

    def handle(self, replies: Mapping[int, bytes]) -> dict[int, bytes] | AggregateResult:
        """Dispatch ``replies`` to the method of the current stage (for generic drivers)."""
        dispatch: dict[Stage, Callable[[Mapping[int, bytes]], dict[int, bytes] | AggregateResult]] = {
            Stage.ADVERTISE_KEYS: self.on_advertise,
            Stage.SHARE_KEYS: self.on_shares,
            Stage.COLLECT_MASKED: self.on_masked,
            Stage.CONSISTENCY_CHECK: self.on_consistency,
            Stage.UNMASK: self.on_unmask,
        }
        if self.stage not in dispatch:
            raise StageError(f"server in stage={self.stage.name} accepts no replies; call start() "
                             "first or read the result")
        return dispatch[self.stage](replies)


def _need(value: _T | None) -> _T:
    if value is None:
        raise StageError("server state missing for this stage")
    return value
