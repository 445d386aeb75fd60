"""Client side of SecAgg+ as a pure state machine: ``handle(bytes) -> bytes`` per stage.

Stages (see :mod:`fedpeft.secagg.stages`): SETUP -> ADVERTISE_KEYS -> SHARE_KEYS ->
COLLECT_MASKED -> DONE. Any violation raises a typed error and moves to ABORTED; an aborted
client never answers again (so it can never reveal both share kinds of a peer).

Between messages the client can be exported to bytes and imported again
(:meth:`SecAggClient.export_state` / :meth:`SecAggClient.import_state`); the format and its
codec are :mod:`fedpeft.secagg.state`, the protocol checks on import are here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import numpy as np
import numpy.typing as npt

from fedpeft.secagg import messages as msg
from fedpeft.secagg.config import (
    DEFAULT_CORRUPT_FRACTION,
    MAX_CLIENT_ID,
    MIN_CLIENTS,
    SecAggConfig,
    check_against_own_plan,
    check_round_parameters,
    consistency_quorum,
)
from fedpeft.secagg.errors import (
    AbortError,
    AuthenticationError,
    MalformedMessageError,
    ProtocolError,
    RefusedError,
    SecAggConfigError,
    SecAggError,
    StageError,
    StateError,
    UpdateError,
)
from fedpeft.secagg.graph import neighbour_graph
from fedpeft.secagg.identity import (
    NodeIdentity,
    advertisement_message,
    consistency_message,
    verify_advertisement,
    verify_signature,
)
from fedpeft.secagg.kdf import (
    decrypt_shares,
    encrypt_shares,
    generate_keypair,
    key_view_digest,
    pairwise_mask_seed,
    public_from_private,
    self_mask_commitment,
    share_key,
)
from fedpeft.secagg.prg import SEED_BYTES, expand_mask
from fedpeft.secagg.quantize import QuantizationPlan, check_update, plan_quantization, quantize
from fedpeft.secagg.shamir import split
from fedpeft.secagg.stages import Stage, client_transitions
from fedpeft.secagg.state import ClientState, decode_state, encode_state

_T = TypeVar("_T")


class SecAggClient:
    """One client of one SecAgg+ round.

    ``config`` (optional) pins the parameters the client accepts; a config without threshold
    and degree is re-planned by the client, which refuses a lower threshold or degree. Without
    it the client accepts the server's parameters subject to the security floor
    (:func:`~fedpeft.secagg.config.check_round_parameters`, ``n >= 3``).
    ``expected_vector_length`` (optional) pins the update length. ``identity`` (this node's
    certified signing key, :mod:`fedpeft.secagg.identity`): the client joins only
    authenticated rounds, signs its advertisement and verifies every neighbour's certificate
    and signature before sharing anything; without it, it refuses authenticated rounds.
    """

    def __init__(
        self,
        client_id: int,
        session_id: bytes,
        config: SecAggConfig | None = None,
        *,
        expected_vector_length: int | None = None,
        identity: NodeIdentity | None = None,
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
        self.identity = identity
        self.stage = Stage.SETUP
        self.abort_reason: str | None = None
        #: float update (quantised at the masked-input stage) or uint32 field words (sent as is)
        self._update: npt.NDArray[Any] | None = None
        self._rounding_seed: bytes | None = None
        self._setup: msg.Setup | None = None
        self._plan: QuantizationPlan | None = None
        self._graph_neighbours: frozenset[int] = frozenset()
        self._peers: dict[int, msg.PeerKeys] = {}
        self._u2: frozenset[int] = frozenset()  # neighbours whose shares reached me
        self._held_b: dict[int, bytes] = {}
        self._held_sk: dict[int, bytes] = {}
        self._own_b_share = b""
        self._signed_survivors: frozenset[int] = frozenset()  # the set this client signed
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

    def set_field_input(self, words: npt.NDArray[np.uint32]) -> None:
        """Provide an input already encoded in the field (``uint32`` words ``< 2^bits``), masked
        and sent as it is: no clipping, no quantisation (the distributed discrete Gaussian,
        :mod:`fedpeft.privacy.ddg_mechanism`, encodes its own). Call after SETUP, before the
        masked-input stage."""
        if self.stage not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS):
            raise StageError(f"set_field_input in stage={self.stage.name}: call it after SETUP "
                             "and before the masked-input stage")
        s = _need(self._setup)
        if (not isinstance(words, np.ndarray) or words.dtype != np.uint32 or words.ndim != 1
                or words.shape[0] != s.vector_length):
            raise UpdateError(f"field input must be a 1-D uint32 array of length "
                              f"{s.vector_length}; got {getattr(words, 'dtype', type(words))} "
                              f"of shape {getattr(words, 'shape', None)}")
        if s.bits < 32 and bool(np.any(words >> np.uint32(s.bits))):
            raise UpdateError(f"field input has words >= 2^bits={s.bits}")
        self._update = np.array(words, copy=True)
        self._rounding_seed = None

    @property
    def round_setup(self) -> msg.Setup:
        """The round parameters this client accepted at SETUP (participants, threshold, bits)."""
        return _need(self._setup)

    def handle(self, message: bytes) -> bytes:
        """Consume one server message for the current stage and return the reply.

        ``message`` may be any bytes-like object (a memoryview of any layout is copied).
        """
        table = self._transitions()
        if self.stage not in table:
            raise StageError(f"client {self.client_id} is in final stage={self.stage.name}; "
                             f"reason={self.abort_reason}")
        kind, next_stage = table[self.stage]
        if isinstance(message, memoryview):
            message = message.tobytes()
        elif isinstance(message, (bytes, bytearray)):
            message = bytes(message)
        else:
            self._fail(MalformedMessageError(f"message type={type(message).__name__} must be bytes"))
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
        authenticated = self._setup is not None and self._setup.authenticated
        handler: dict[Stage, Callable[[bytes], bytes]] = {
            Stage.SETUP: self._on_setup,
            Stage.ADVERTISE_KEYS: self._on_keys,
            Stage.SHARE_KEYS: self._on_forward,
            Stage.COLLECT_MASKED: (self._on_consistency_request if authenticated
                                   else self._on_unmask_request),
            Stage.CONSISTENCY_CHECK: self._on_unmask_request,
        }
        try:
            reply = handler[self.stage](message)
        except SecAggError as exc:
            self._fail(exc)
        self.stage = next_stage
        return reply

    def _transitions(self) -> dict[Stage, tuple[msg.Kind, Stage]]:
        return client_transitions(self._setup is not None and self._setup.authenticated)

    def expects(self, kind: msg.Kind) -> bool:
        """Whether the next message this client accepts is of ``kind`` (the Flower integration
        marks an unmask request durably before it is answered)."""
        entry = self._transitions().get(self.stage)
        return entry is not None and entry[0] is kind

    @property
    def quantization(self) -> QuantizationPlan:
        """Quantisation plan (after SETUP)."""
        if self._plan is None:
            raise StageError("quantization plan is known only after the SETUP message")
        return self._plan

    # ---- state export / import (Flower context.state) -----------------------------------

    def export_state(self) -> bytes:
        """Serialise the complete client state (strict, versioned binary format; no pickle).

        The format is :mod:`fedpeft.secagg.state` (:func:`~fedpeft.secagg.state.encode_state`).

        security: the result holds the client's X25519 private keys, self-mask seed, held
        Shamir shares and plaintext update. It must stay on the device (e.g. Flower's node-local
        ``context.state``), never be sent to the server, and never be imported twice or rolled
        back to an older export: a stale state could answer a second unmask request and reveal
        both share kinds of a peer (see docs/secagg.md, "Client state between messages").
        """
        return encode_state(ClientState(
            client_id=self.client_id, session_id=self.session_id, config=self.config,
            expected_vector_length=self.expected_vector_length, stage=self.stage,
            abort_reason=self.abort_reason, update=self._update, rounding_seed=self._rounding_seed,
            setup=self._setup, graph_neighbours=self._graph_neighbours, peers=self._peers, u2=self._u2,
            held_b=self._held_b, held_sk=self._held_sk, own_b_share=self._own_b_share,
            signed_survivors=self._signed_survivors, enc_sk=self._enc_sk, mask_sk=self._mask_sk,
            self_seed=self._self_seed,
        ))

    @classmethod
    def import_state(cls, data: bytes, config: SecAggConfig | None = None,
                     identity: NodeIdentity | None = None) -> SecAggClient:
        """Rebuild a client from :meth:`export_state` output; it continues the round unchanged.

        Raises :class:`StateError` for truncated, garbled, trailing, unknown-version or
        inconsistent input; nothing is half-restored. ``config`` re-applies the local pin: it
        must equal the pin stored in the state (if any), and an already accepted SETUP must
        satisfy it. ``identity`` is re-supplied (it never enters the state): required for an
        authenticated round's state, refused for an unauthenticated one.
        """
        st = decode_state(data)  # format checks; the protocol checks follow
        client_id, setup = st.client_id, st.setup
        # security: a pinned config can be re-applied or kept, never silently replaced
        if st.config is not None and config is not None and config != st.config:
            raise StateError(f"config={config} differs from the pinned config={st.config} the state "
                             "was created with; import with the same config (or None)")
        pin = config if config is not None else st.config
        plan: QuantizationPlan | None = None
        if setup is not None:
            try:
                # security: same floor checks as at SETUP
                _validate_setup(setup, client_id, st.expected_vector_length, pin)
                _check_authentication(setup, identity)
                if pin is not None:
                    _check_pinned_config(setup, pin)
                plan = plan_quantization(setup.clip, len(setup.participants), setup.bits)
                derived = neighbour_graph(setup.participants, setup.degree, setup.graph_seed)[client_id]
            except SecAggError as exc:
                raise StateError(f"stored SETUP of client {client_id} is rejected: {exc}") from exc
            if derived != st.graph_neighbours:
                raise StateError("stored graph neighbours differ from the graph of the stored SETUP")
        st.check_invariants()
        try:
            enc_pk, mask_pk = public_from_private(st.enc_sk), public_from_private(st.mask_sk)
        except ValueError as exc:  # pragma: no cover - any 32 bytes are a valid X25519 scalar
            raise StateError(f"stored private key is invalid: {exc}") from exc

        client = cls.__new__(cls)  # all fields validated above: no half-restored client
        client.client_id = client_id
        client.session_id = st.session_id
        client.config = pin
        client.identity = identity
        client.expected_vector_length = st.expected_vector_length
        client.stage = st.stage
        client.abort_reason = st.abort_reason
        client._update = st.update
        client._rounding_seed = st.rounding_seed
        client._setup = setup
        client._plan = plan
        client._graph_neighbours = st.graph_neighbours
        client._peers = st.peers
        client._u2 = st.u2
        client._held_b = st.held_b
        client._held_sk = st.held_sk
        client._own_b_share = st.own_b_share
        client._signed_survivors = st.signed_survivors
        client._enc_sk, client._enc_pk = st.enc_sk, enc_pk  # security: secrets restored on-device only
        client._mask_sk, client._mask_pk = st.mask_sk, mask_pk
        client._self_seed = st.self_seed
        return client

    # ---- stages -------------------------------------------------------------------------

    def _fail(self, exc: SecAggError) -> NoReturn:
        self.stage = Stage.ABORTED
        self.abort_reason = str(exc)
        raise exc

    def _on_setup(self, data: bytes) -> bytes:
        s = msg.decode_setup(data, self.session_id, self.client_id)
        n = len(s.participants)
        _validate_setup(s, self.client_id, self.expected_vector_length, self.config)
        _check_authentication(s, self.identity)
        if self.config is not None:
            _check_pinned_config(s, self.config)
        if self._update is not None and self._update.shape[0] != s.vector_length:
            raise UpdateError(f"update length={self._update.shape[0]} != round "
                              f"vector_length={s.vector_length}")
        try:
            self._plan = plan_quantization(s.clip, n, s.bits)
            graph = neighbour_graph(s.participants, s.degree, s.graph_seed)
        except SecAggConfigError as exc:
            raise ProtocolError(f"invalid round parameters from server: {exc}") from exc
        self._setup = s
        self._graph_neighbours = graph[self.client_id]
        enc_pk, mask_pk, commit = self._enc_pk, self._mask_pk, self._own_keys()[64:]
        if not s.authenticated:
            return msg.encode_advertise(self.session_id, self.client_id, enc_pk, mask_pk, commit)
        identity = _need(self.identity)
        # security: the keys are bound to this session and id by the certified node key
        signature = identity.sign(advertisement_message(self.session_id, self.client_id, enc_pk,
                                                        mask_pk, commit))
        return msg.encode_advertise(self.session_id, self.client_id, enc_pk, mask_pk, commit,
                                    identity.certificate, signature)

    def _on_keys(self, data: bytes) -> bytes:
        s = _need(self._setup)
        peers = msg.decode_keys(data, self.session_id, self.client_id)
        ids = {p.client_id for p in peers}
        if not ids <= self._graph_neighbours:  # security: share only with graph neighbours
            raise ProtocolError(f"server listed non-neighbours {sorted(ids - self._graph_neighbours)[:5]}")
        if len(peers) + 1 < s.threshold:
            raise AbortError(f"only {len(peers)} neighbours advertised keys; need threshold - 1 = "
                             f"{s.threshold - 1}")
        mine = self.identity if s.authenticated else None
        trust = None if mine is None else mine.trust
        signers = set() if mine is None else {mine.public_key}
        for p in peers:  # security: verify every neighbour's certified key before sharing
            signer = verify_advertisement(p, self.session_id, trust)
            if signer is not None:
                if signer in signers:  # one device as two peers (or as me): a sybil
                    raise ProtocolError(f"peer {p.client_id} is signed by a node key already "
                                        "listed (a sybil or a replayed advertisement)")
                signers.add(signer)
        peers = [msg.PeerKeys(p.client_id, p.enc_pk, p.mask_pk, p.commitment) for p in peers]
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
            cts[cid] = encrypt_shares(key, self.session_id, self.client_id, cid, b_shares[x], sk_shares[x],
                                      view)
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
        if update.dtype == np.uint32:  # field words (checked by set_field_input)
            acc = np.array(update, dtype=np.uint32, copy=True)
        else:
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
        return msg.encode_masked(self.session_id, self.client_id, acc, plan.bits)

    def _gamma(self) -> float:
        return DEFAULT_CORRUPT_FRACTION if self.config is None else self.config.corrupt_fraction

    def _on_consistency_request(self, data: bytes) -> bytes:
        """Authenticated rounds: sign the survivor set, once per session (the consistency
        check, Bonawitz et al. CCS 2017 round 3)."""
        s = _need(self._setup)
        identity = _need(self.identity)
        survivors = msg.decode_consistency_request(data, self.session_id, self.client_id)
        n = len(s.participants)
        quorum = consistency_quorum(n, self._gamma())
        if not set(survivors) <= set(s.participants) or self.client_id not in survivors:
            raise ProtocolError("the survivor set names non-participants or leaves out this "
                                "client, which sent its masked input")
        if len(survivors) < quorum:  # security: a sum over a minority is never unmasked
            raise RefusedError(f"only {len(survivors)} survivors of n={n}; an authenticated "
                               f"round needs a quorum of {quorum}")
        self._signed_survivors = frozenset(survivors)
        # security: an honest client signs exactly one survivor set per session
        return msg.encode_consistency_signature(
            self.session_id, self.client_id,
            identity.sign(consistency_message(self.session_id, self.client_id, survivors)))

    def _check_attestations(self, attestations: tuple[msg.Attestation, ...]) -> None:
        """Authenticated rounds: at least a quorum of valid signatures, by distinct certified
        survivors, on exactly the survivor set this client signed."""
        s = _need(self._setup)
        trust = _need(self.identity).trust
        quorum = consistency_quorum(len(s.participants), self._gamma())
        signed = sorted(self._signed_survivors)
        keys: set[bytes] = set()
        for a in attestations:
            if a.signer not in self._signed_survivors:
                continue
            try:
                peer = trust.verify(a.certificate)
                verify_signature(peer.public_key, consistency_message(self.session_id, a.signer, signed),
                                 a.signature, f"survivor {a.signer}")
            except (AuthenticationError, MalformedMessageError):
                continue  # an invalid attestation counts for nothing
            keys.add(peer.public_key)  # security: one device counts once, whatever its ids
            if len(keys) >= quorum:
                return
        raise RefusedError(f"only {len(keys)} valid signatures on the survivor set this client "
                           f"signed; revealing shares needs {quorum} (the coordinator may be "
                           "telling clients different survivor sets)")

    def _on_unmask_request(self, data: bytes) -> bytes:
        s = _need(self._setup)
        survivors, dropped, attestations = msg.decode_unmask_request(data, self.session_id,
                                                                     self.client_id)
        sv, dr = set(survivors), set(dropped)
        if sv & dr:  # security: never reveal both the self-mask and the key share of one client
            raise RefusedError(f"clients {sorted(sv & dr)[:5]} listed as both survivor and dropped")
        if sv | dr != set(self._u2):  # security: the partition must be exactly my share holders
            raise RefusedError(
                f"survivors+dropped must equal the {len(self._u2)} peers whose shares I hold"
            )
        if len(sv) + 1 < s.threshold:  # security: refuse to unmask a sum over too few clients
            raise RefusedError(f"only {len(sv)} surviving peers; need threshold - 1 = {s.threshold - 1}")
        if s.authenticated:
            # security: the partition follows the survivor set a quorum signed, nothing else
            if sv != set(self._u2) & self._signed_survivors:
                raise RefusedError("the unmask request's survivors differ from the survivor set "
                                   "this client signed")
            self._check_attestations(attestations)
        elif attestations:
            raise ProtocolError("signatures in an unauthenticated round's unmask request")
        b = {i: self._held_b[i] for i in sv}
        b[self.client_id] = self._own_b_share  # I survived: my own self-mask share may be revealed
        sk = {i: self._held_sk[i] for i in dr}
        self._held_b.clear()
        self._held_sk.clear()
        self._signed_survivors = frozenset()
        return msg.encode_unmask_shares(self.session_id, self.client_id, b, sk)


def _validate_setup(s: msg.Setup, client_id: int, expected_vector_length: int | None,
                    pin: SecAggConfig | None) -> None:
    """Round-parameter checks every client applies to SETUP (also re-run on state import)."""
    n = len(s.participants)
    if s.vector_length < 1:
        raise ProtocolError(f"vector_length={s.vector_length} must be >= 1")
    if client_id not in s.participants:
        raise ProtocolError(f"client {client_id} is not in the participant list")
    if n < MIN_CLIENTS:
        raise RefusedError(f"n={n} participants < {MIN_CLIENTS}: the sum would reveal inputs")
    # security: the client enforces the threshold and degree floors (and its own plan) whatever
    # the server says.
    gamma = DEFAULT_CORRUPT_FRACTION if pin is None else pin.corrupt_fraction
    check_round_parameters(n, s.degree, s.threshold, gamma, consistency=s.authenticated)
    if expected_vector_length is not None and s.vector_length != expected_vector_length:
        raise ProtocolError(f"vector_length={s.vector_length} != expected {expected_vector_length}")


def _check_authentication(s: msg.Setup, identity: NodeIdentity | None) -> None:
    """A node with an identity joins only authenticated rounds; one without cannot sign."""
    if identity is not None and not s.authenticated:  # security: no downgrade to unsigned keys
        raise RefusedError("this node has a SecAgg identity and joins only authenticated rounds, "
                           "but the coordinator's SETUP is unauthenticated; set secagg-ca on the "
                           "coordinator")
    if identity is None and s.authenticated:
        raise RefusedError("the round is authenticated but this client has no SecAgg node "
                           "identity; give it secagg-node-key, secagg-node-cert and secagg-ca")


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
    check_against_own_plan(n, s.degree, s.threshold, c, consistency=s.authenticated)


def _need(value: _T | None) -> _T:
    if value is None:
        raise StageError("protocol state missing for this stage")
    return value
