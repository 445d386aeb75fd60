"""One client's work for a round, framework-free: load -> train -> privatize -> mask -> send.

The Flower ``ClientApp`` (``client/app.py``) only converts messages to and from the flat
dictionaries used here (:mod:`fedpeft.core.protocol`), so the whole client is testable without
Flower. The frozen base model and its adapter are shared by every client in the process
(``fedpeft.peft_methods.get_adapted``); a runtime holds only its own data and identity. Under secure
aggregation the masking and the later SecAgg+ stages are :mod:`fedpeft.client.secagg_session`'s.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpeft.client.node_identity import sim_node_identity
from fedpeft.client.secagg_session import (
    SESSION_DONE,
    UNMASK_MARKERS,
    answer_stage,
    end_session,
    finish_user_session,
    open_user_session,
    round_clip,
    start_session,
)
from fedpeft.core.errors import ClientFault, ConfigError, FedPeftError, PayloadError
from fedpeft.core.protocol import (
    ADAPTER_KEY,
    CLIENT_ID_KEY,
    FINGERPRINT_KEY,
    KIND_SECAGG,
    KIND_TRAIN,
    LEDGER_HEAD_KEY,
    NUM_EXAMPLES_KEY,
    REASON_KEY,
    RECEIPT_KEY,
    ROUND_KEY,
    SECAGG_ADVERTISE_KEY,
    SECAGG_MESSAGE_KEY,
    SECAGG_SETUP_KEY,
    STATUS_BUDGET_EXHAUSTED,
    STATUS_ERROR,
    STATUS_KEY,
    STATUS_OK,
    UPDATE_BYTES_KEY,
    UPDATE_KEY,
    Content,
    Value,
    require_field,
)
from fedpeft.core.vector import unflatten, vector_length
from fedpeft.core.wire import decode
from fedpeft.core.wire import encode as encode_tensors
from fedpeft.data.federation import client_corpus
from fedpeft.data.tokenize import Encoded, encode
from fedpeft.peft_methods import get_adapted
from fedpeft.peft_methods.base import AdaptedModel
from fedpeft.privacy.accounting import (
    Budget,
    BudgetExhaustedError,
    EventMetadata,
    Ledger,
    PoissonSampledGaussianEvent,
    compute_epsilon,
)
from fedpeft.privacy.accounting.errors import AccountingError
from fedpeft.privacy.accounting.ledger import (
    LEDGER_SUFFIX,
    LedgerHead,
    ReleaseMetadata,
    composition_adjacency,
)
from fedpeft.privacy.auditing.gradient_canaries import (
    CANARY_SCORES_FILE,
    GRADIENT_CANARY_DOMAIN,
    CanaryHook,
    plan_gradient_canaries,
    tensor_sizes,
)
from fedpeft.privacy.auditing.user_canaries import plan_user_canaries
from fedpeft.privacy.csprng import DPRandomness
from fedpeft.privacy.dp_sgd import dp_local_train
from fedpeft.privacy.user_level import RoundPlan
from fedpeft.runconfig.config import (
    RunConfig,
    data_partitions,
    is_user_canary,
    user_round_plan,
)
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.identity import NodeIdentity
from fedpeft.training.config import TrainConfig
from fedpeft.training.trainer import Progress, TrainResult, for_round, local_train

log = logging.getLogger(__name__)

#: Key (in the node's state) of this round's reserved user-level release, until committed.
USER_RELEASE = "user-release"
#: File (in the client's state) holding what stays on the device under DP: timings, losses.
LOCAL_METRICS_FILE = "client-metrics.jsonl"

#: Every field a reply may carry when DP is on (docs/privacy.md, "What a client sends"). A
#: reply with any other field is not sent (fail closed): anything computed on private data
#: without noise (losses, timings, fault details) stays on the device.
DP_REPLY_FIELDS: dict[str, frozenset[str]] = {
    # trained, plain transport: the update in the clear (itself DP-SGD's output)
    "update": frozenset({
        "status", "client-id", "round", "num-examples", "steps", "update", "update-bytes",
        "dp-epsilon", "dp-epsilon-rdp", "dp-delta", "dp-sigma", "dp-q", "dp-steps",
        "dp-rounds-joined", "dp-clip", "dp-adjacency", "dp-budget", "dp-budget-left",
        LEDGER_HEAD_KEY}),
    # trained, secure aggregation: the update stays on the device until it is sent masked
    "secagg": frozenset({
        "status", "client-id", "round", "num-examples", "steps", "secagg",
        "dp-epsilon", "dp-epsilon-rdp", "dp-delta", "dp-sigma", "dp-q", "dp-steps",
        "dp-rounds-joined", "dp-clip", "dp-adjacency", "dp-budget", "dp-budget-left",
        LEDGER_HEAD_KEY}),
    # trained, user level (alone or with record level): no dataset size and nothing derived
    # from it (num-examples, dp-q, dp-sigma, record-level epsilons): at user level a device's
    # number of records is its user's data; the devices' own ledgers hold the record level
    "secagg-user": frozenset({
        "status", "client-id", "round", "steps", "secagg", "dp-level", "dp-user-epsilon-plan",
        LEDGER_HEAD_KEY}),
    "exhausted": frozenset({"status", "client-id", "reason", "dp-epsilon", "dp-budget",
                            "dp-adjacency", "dp-level"}),
    "error": frozenset({"status", "client-id", "reason"}),
    "secagg-step": frozenset({"status", "client-id", "message"}),
}
#: Errors whose message depends only on configuration, messages or files, never on the
#: private records: under DP these keep their message in a fault reply; any other error is
#: reported by its type only (details in the client's own log).
PUBLIC_ERRORS: tuple[type[Exception], ...] = (ConfigError, PayloadError, AccountingError)


@dataclass(frozen=True)
class ClientIdentity:
    """Who this client is: a stable id, its data partition and where it keeps state."""

    client_id: str
    partition_id: int
    num_partitions: int
    state_dir: str = ""
    epsilon_budget: float = 0.0  # > 0: this device's own budget, overriding the run's

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ConfigError("client_id is empty; give each client a stable id")
        if not 0 <= self.partition_id < self.num_partitions:
            raise ConfigError(f"partition-id={self.partition_id} is outside "
                              f"[0, num-partitions={self.num_partitions})")
        if self.epsilon_budget < 0:
            raise ConfigError(f"epsilon-budget={self.epsilon_budget} must be >= 0 (0: the run's)")


@dataclass(frozen=True)
class UserRound:
    """A user-level round opened before training: its SecAgg+ client and this device's plan."""

    client: SecAggClient
    advertise: bytes
    epsilon: float
    plan: RoundPlan
    #: this round's clip of the whole update (the coordinator's, checked; else dp-user-clip)
    clip: float


@dataclass(frozen=True)
class PrivateRound:
    """A record-level DP-SGD round reserved in the ledger, and its randomness."""

    sigma: float
    event: PoissonSampledGaussianEvent
    meta: EventMetadata
    budget: Budget | None
    randomness: DPRandomness


@dataclass(frozen=True)
class RoundJob:
    """One client's round between its checks and its training (:meth:`ClientRuntime.begin_round`):
    what to train from, on what, how, and what was reserved for it."""

    server_round: int
    content: Mapping[str, Value]
    global_state: dict[str, torch.Tensor]
    data: Encoded
    train: TrainConfig
    user: UserRound | None
    private: PrivateRound | None


class ClientRuntime:
    """A client's data and identity, plus the round pipeline.

    ``node_identity``: this node's certified SecAgg+ signing key (a deployment's, from its
    node config: :func:`fedpeft.client.node_identity.load_node_identity`); None = the
    simulation's for this client id (``secagg-sim-identities``), or none (unauthenticated
    rounds only).
    """

    def __init__(self, run: RunConfig, identity: ClientIdentity,
                 node_identity: NodeIdentity | None = None) -> None:
        self.run = run
        self.identity = identity
        self.node_identity = (node_identity if node_identity is not None
                              else sim_node_identity(run, identity.client_id))
        self._data: Encoded | None = None
        self._sigma: float | None = None
        #: The last round's on-device metrics (timings, losses): never sent under DP.
        self.last_local: dict[str, object] = {}

    @property
    def model(self) -> AdaptedModel:
        return get_adapted(self.run.model, self.run.adapter, self.run.seed)

    @property
    def user_canary(self) -> int | None:
        """This client's index among the user-level audit's canary clients (it holds no
        data and sends a canary direction or zero), or None for a client with data."""
        ident = self.identity
        if not is_user_canary(self.run, ident.partition_id, ident.num_partitions):
            return None
        return ident.partition_id - data_partitions(self.run, ident.num_partitions)

    def data(self) -> Encoded:
        if self._data is None:
            if self.user_canary is not None:  # no records: one empty row set
                empty = torch.zeros((0, 1), dtype=torch.long)
                self._data = Encoded(empty, empty.clone(), empty.clone())
                return self._data
            corpus = client_corpus(self.run.data, self.identity.partition_id,
                                   data_partitions(self.run, self.identity.num_partitions),
                                   self.run.seed)
            self._data = encode(corpus, self.model.base_info.tokenizer, self.run.model.max_length)
        return self._data

    # -- messages ----------------------------------------------------------------------------
    def handle(self, kind: str, content: Mapping[str, Value],
               state: dict[str, bytes] | None = None) -> Content:
        """Answer one coordinator message. ``state`` persists per node between messages (Flower's
        ``context.state``); it holds this client's secure-aggregation secrets and never leaves
        the device. Errors become an ``error`` status, never an exception to the framework."""
        state = {} if state is None else state
        try:
            if kind == KIND_TRAIN:
                reply = self._train_round(content, state)
            elif kind == KIND_SECAGG:
                reply = self._secagg_step(content, state)
            else:
                raise PayloadError(f"unknown message kind {kind!r}")
            return self.checked(reply)
        except Exception as exc:  # noqa: BLE001 - typed or not, it becomes a fault reply
            return self.fault_reply(kind, exc, state)

    def checked(self, reply: Content) -> Content:
        """``reply`` if it may leave the device (:func:`check_dp_reply` under DP), else raises."""
        if self.run.private:
            check_dp_reply(reply, user_level=self.run.user_dp.enabled)
        return reply

    def fault_reply(self, kind: str, exc: Exception, state: dict[str, bytes]) -> Content:
        """The ``error`` reply for ``exc`` raised while answering ``kind``; the SecAgg session
        (if any) is ended, so nothing of it is answered later."""
        end_session(state)
        if isinstance(exc, FedPeftError):
            log.warning("client %s: %s failed: %s", self.identity.client_id, kind, exc)
        else:
            # security: never let the framework send an untyped error's text (an OOM size
            # or a loss value can depend on the sampled records): type only under DP
            log.error("client %s: %s failed unexpectedly", self.identity.client_id, kind,
                      exc_info=exc)
        return {STATUS_KEY: STATUS_ERROR, REASON_KEY: self.public_reason(exc),
                CLIENT_ID_KEY: self.identity.client_id}

    def public_reason(self, exc: Exception) -> str:
        """The fault reason a reply may carry: the full message without DP; under DP only the
        error type for errors whose message could depend on private records (a loss value,
        the step at which training diverged), the details staying in this client's log."""
        if not self.run.private or isinstance(exc, PUBLIC_ERRORS):
            return f"{type(exc).__name__}: {exc}"
        return (f"{type(exc).__name__}: details stay on the device under differential privacy "
                f"(client {self.identity.client_id}'s log)")

    # -- the round pipeline: load -> train -> privatize -> mask -> send -------------------------
    def _train_round(self, content: Mapping[str, Value], state: dict[str, bytes]) -> Content:
        job = self.begin_round(content, state)
        if isinstance(job, dict):  # a budget refused the round: nothing trained
            return job
        result, final = self.train_alone(job)
        return self.finish_round(job, result, final, state)

    def begin_round(self, content: Mapping[str, Value],
                    state: dict[str, bytes]) -> RoundJob | Content:
        """Everything before training: check the message, open a user-level round (reserved in
        the device's user ledger), reserve the record-level event (DP-SGD), load the global
        adapter. Returns the job, or the reply of a round a budget refused."""
        fingerprint = str(require_field(content, FINGERPRINT_KEY, str))
        if fingerprint != self.run.fingerprint():
            raise ConfigError(f"coordinator's model/adapter fingerprint {fingerprint} differs "
                              f"from this client's {self.run.fingerprint()}: both must run the "
                              "same model and adapter config")
        server_round = int(require_field(content, ROUND_KEY, int))
        payload = require_field(content, ADAPTER_KEY, bytes)
        wants_secagg = SECAGG_SETUP_KEY in content
        if self.run.secagg is not None and not wants_secagg:
            # security: fail closed: a client configured for secure aggregation never sends
            # its update in the clear
            raise ConfigError("this client requires secure aggregation (secagg=true) but the "
                              "coordinator did not start it; refusing to send an update")
        if wants_secagg and self.run.secagg is None:
            raise ConfigError("the coordinator runs secure aggregation but this client has "
                              "secagg=false; use the same run config on both sides")
        model = self.model
        user: UserRound | None = None
        if self.run.user_dp.enabled:
            # user level: the round is checked and the release reserved before training
            opened = self._open_user_round(content, server_round, state)
            if isinstance(opened, dict):  # the device's user-level budget refused the round
                return opened
            user = opened
        global_state = decode(payload, model.spec())
        data = self.data()
        private: PrivateRound | None = None
        if self.run.dp.enabled:
            receipt = content.get(RECEIPT_KEY)
            if receipt is not None and not isinstance(receipt, str):
                raise PayloadError(f"message field {RECEIPT_KEY!r} is "
                                   f"{type(receipt).__name__}, expected str")
            reserved = self._reserve_private(data, server_round, receipt)
            if isinstance(reserved, dict):  # the budget refused this round: nothing trained
                return reserved
            private = reserved
        return RoundJob(server_round, content, global_state, data, self._train_config(
            server_round), user, private)

    def train_alone(self, job: RoundJob) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        """Train ``job`` on the shared model alone; returns the result and the trained tensors."""
        if self.user_canary is not None:
            return self._canary_update(job)
        model = self.model
        model.load_adapter_state(job.global_state)
        if job.private is not None:
            model.train()
            hook = self._canary_hook(model, job)
            result: TrainResult = dp_local_train(
                model, job.data, job.train, self.run.dp,
                noise_multiplier=job.private.sigma, randomness=job.private.randomness,
                progress=self._progress(job.server_round), canaries=hook)
            model.eval()
            if hook is not None:
                self._keep_canary_scores(job.server_round, hook)
        else:
            result = local_train(model, job.data, job.train,
                                 generator=self.shuffle_generator(job.server_round),
                                 progress=self._progress(job.server_round))
        return result, model.adapter_state()

    def finish_round(self, job: RoundJob, result: TrainResult,
                     trained: Mapping[str, torch.Tensor], state: dict[str, bytes]) -> Content:
        """Everything after training: commit the record-level event, add the user-level noise
        or start the SecAgg+ session (or encode the plain update), keep the local metrics."""
        # record-level DP happened inside training (DP-SGD); user level adds its noise now
        privacy = self._commit_private(job.private) if job.private is not None else {}
        delta = {k: v - job.global_state[k] for k, v in trained.items()}
        reply = self._metrics(result, job.server_round)
        reply.update(privacy)
        spec = self.model.spec()
        if job.user is not None:
            local = finish_user_session(job.user.client, delta, spec, job.user.plan, state,
                                        clip=job.user.clip)
            reply = {k: v for k, v in reply.items()
                     if k in DP_REPLY_FIELDS["secagg-user"]}  # security: no n at user level
            reply.update({SECAGG_ADVERTISE_KEY: job.user.advertise,
                          "dp-level": self.run.dp_level,
                          "dp-user-epsilon-plan": job.user.epsilon})
        else:
            masked, local = self._mask(delta, job.content, state)
            reply.update(masked)
        self._keep_local(job.server_round, result, local)
        return reply

    def _canary_update(self, job: RoundJob) -> tuple[TrainResult, dict[str, torch.Tensor]]:
        """A user-level canary client's round (Andrew et al. 2024): the global adapter plus
        the round's clip times its direction when its coin says in, else unchanged."""
        index = self.user_canary
        if index is None or job.user is None:
            raise ConfigError("only a user-level canary client sends a canary update")
        spec = self.model.spec()
        plan = plan_user_canaries(self.run.user_dp.canaries, vector_length(spec), self.run.seed)
        start = time.perf_counter()
        if not plan.included[index]:
            return (TrainResult(steps=0, examples=0, seconds=time.perf_counter() - start),
                    dict(job.global_state))
        # a hair inside the clip, so float rounding never makes the clip scale it
        step = unflatten((job.user.clip * (1 - 1e-6)) * plan.direction(index), spec)
        trained = {k: v + step[k].to(v.dtype) for k, v in job.global_state.items()}
        return TrainResult(steps=0, examples=0, seconds=time.perf_counter() - start), trained

    def _canary_hook(self, model: AdaptedModel, job: RoundJob) -> CanaryHook | None:
        """The white-box audit's gradient canaries this client owns (``audit-gradient-
        canaries``), or None when the run is not audited that way."""
        m = self.run.dp.gradient_canaries
        if not m:
            return None
        named = model.adapter_parameters()
        plan = plan_gradient_canaries(m, tensor_sizes(named),
                                      num_partitions=self.identity.num_partitions,
                                      seed=self.run.seed)
        rng = np.random.default_rng([GRADIENT_CANARY_DOMAIN, self.run.seed,
                                     self.identity.partition_id, job.server_round])
        return CanaryHook(plan, plan.owned_by(self.identity.partition_id), named,
                          self.run.dp.sample_rate(len(job.data)), rng)

    def _keep_canary_scores(self, server_round: int, hook: CanaryHook) -> None:
        """The canaries' scores stay on the device, beside its local metrics: they are
        computed on private data without noise of their own (``fedpeft audit`` reads them)."""
        path = self.state_dir() / CANARY_SCORES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        row = {"round": server_round, "partition": self.identity.partition_id,
               "steps": hook.steps, "scores": {str(i): s for i, s in hook.scores.items()}}
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def shuffle_generator(self, server_round: int) -> torch.Generator:
        """Shuffling for non-private training only: reproducible from the run seed.

        Never used under DP: DP-SGD's Poisson batches come from a CSPRNG keyed by the OS per
        client and round (:class:`fedpeft.privacy.csprng.DPRandomness`), so that the coordinator, who
        knows the seed, cannot rebuild them (amplification by subsampling needs that).
        """
        return torch.Generator().manual_seed(
            (self.run.seed * 1_000_003 + self.identity.partition_id) * 10_007 + server_round)

    def state_dir(self) -> Path:
        """This client's own state on the device: the node's state-dir, else (a simulated
        client) its own folder under the run directory."""
        if self.identity.state_dir:
            return Path(self.identity.state_dir)
        return Path(self.run.run_dir) / "client-state" / _safe(self.identity.client_id)

    def anchor_dir(self) -> Path:
        """Where this client anchors its ledger's length, apart from the ledger files."""
        return self.state_dir() / "ledger-anchors"

    def _keep_local(self, server_round: int, result: TrainResult,
                    extra: Mapping[str, Value]) -> None:
        """Record what stays on the device (timings, losses, SecAgg clamps) for its owner."""
        row: dict[str, object] = {"round": server_round, "client-id": self.identity.client_id,
                                  "train-seconds": result.seconds, "steps": result.steps,
                                  **extra}
        if result.losses:
            row.update({"train-loss": result.mean_loss, "train-loss-first": result.losses[0],
                        "train-loss-last": result.losses[-1]})
        self.last_local = row
        if not self.run.private:
            return
        path = self.state_dir() / LOCAL_METRICS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True, default=str) + "\n")

    def _progress(self, server_round: int) -> Progress | None:
        if not self.run.progress:
            return None
        return _progress_printer(f"client {self.identity.client_id} round {server_round}")

    def _train_config(self, server_round: int) -> TrainConfig:
        """Local training settings of this round (the lr schedule applied)."""
        return for_round(self.run.train, server_round, self.run.federation.num_rounds)

    # -- record-level DP -------------------------------------------------------------------------
    def ledger_path(self) -> Path:
        """This client's privacy ledger: ledger-dir, else the node's state-dir, else the run's."""
        base = (self.run.ledger_dir or self.identity.state_dir
                or str(Path(self.run.run_dir) / "ledgers"))
        return Path(base) / f"{_safe(self.identity.client_id)}.ledger.jsonl"

    def noise_multiplier(self, dataset_size: int) -> float:
        """Sigma for this client: given, or calibrated over the planned rounds (cached)."""
        if self._sigma is None:
            self._sigma = self.run.dp.resolve_noise_multiplier(dataset_size,
                                                               self.run.train.local_steps)
        return self._sigma

    def _reserve_private(self, data: Encoded, server_round: int,
                         receipt: str | None = None) -> PrivateRound | Content:
        """Verify the ledger, check the budget and reserve this round's DP-SGD event.

        The ledger is checked against its anchor (kept apart from the ledger files) and
        against the coordinator's receipt of its last head, so a deleted or restored ledger is
        refused before anything is spent. The event is reserved (fsynced) before any noise is
        drawn, so a crash mid-round counts the round as spent; :meth:`_commit_private` is
        idempotent, so a restart never counts it twice.
        """
        dp = self.run.dp
        n = len(data)
        sigma = self.noise_multiplier(n)
        event = PoissonSampledGaussianEvent(dp.sample_rate(n), sigma, self.run.train.local_steps)
        meta = EventMetadata(round_number=server_round, dataset_size=n, delta=dp.delta,
                             clip_norm=dp.max_grad_norm, run_id=self.run.fingerprint(),
                             adjacency=dp.adjacency, sampling="csprng")
        eps_max = self.identity.epsilon_budget or dp.epsilon_max
        budget = None if eps_max is None else Budget(eps_max, dp.delta)
        with self._record_ledger(budget) as ledger:
            if receipt:
                self._verify_receipt(ledger, receipt)
            try:
                if budget is not None:
                    ledger.reserve_within_budget(event, meta, budget, dp.accountant)
                else:
                    ledger.reserve(event, meta)
            except BudgetExhaustedError as exc:
                return {STATUS_KEY: STATUS_BUDGET_EXHAUSTED,
                        CLIENT_ID_KEY: self.identity.client_id,
                        REASON_KEY: str(exc), "dp-epsilon": exc.epsilon_before,
                        "dp-budget": float(exc.epsilon_max),
                        # what the refused decision was accounted under
                        "dp-adjacency": composition_adjacency(
                            [*(e.metadata for e in ledger.entries()), meta])}
        # security: fresh OS keys per client and round, drawn after the event is reserved
        return PrivateRound(sigma, event, meta, budget, DPRandomness.from_os())

    def _record_ledger(self, budget: Budget | None) -> Ledger:
        path = self.ledger_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Ledger(path, client_id=self.identity.client_id, budget=budget,
                      anchor_dir=self.anchor_dir())

    def _commit_private(self, private: PrivateRound) -> Content:
        """Commit the reserved DP-SGD event; the privacy fields of the reply."""
        dp = self.run.dp
        with self._record_ledger(private.budget) as ledger:
            ledger.commit(private.meta.event_id)
            spent = ledger.spent_events()
            adjacency = ledger.adjacency
            rounds = len({e.metadata.round_number for e in ledger.entries()})
            head = ledger.head().as_wire()
        eps = {name: compute_epsilon(spent, dp.delta, name, adjacency=adjacency).epsilon
               for name in ("prv", "rdp")}
        privacy: Content = {
            "dp-epsilon": eps["prv"], "dp-epsilon-rdp": eps["rdp"], "dp-delta": dp.delta,
            "dp-sigma": private.sigma, "dp-q": private.event.sample_rate,
            "dp-steps": private.event.steps, "dp-rounds-joined": rounds,
            "dp-clip": dp.max_grad_norm, "dp-adjacency": adjacency, LEDGER_HEAD_KEY: head,
        }
        if private.budget is not None:
            privacy["dp-budget"] = private.budget.epsilon_max
            privacy["dp-budget-left"] = max(0.0, private.budget.epsilon_max - eps["prv"])
        return privacy

    def _verify_receipt(self, ledger: Ledger, receipt: str) -> None:
        """Refuse a ledger that lacks the head the coordinator saw last (deleted or restored).

        The receipt is ``client-id \\n head``; one naming another client (the coordinator's
        node ids moved) is ignored. A receipt can only make this client refuse to train,
        never make it spend more or count less.
        """
        client_id, sep, head = receipt.partition("\n")
        if not sep or len(receipt) > 512:
            raise PayloadError(f"message field {RECEIPT_KEY!r} is malformed (expected "
                               "'client-id\\n<count>:<hash>')")
        if client_id != self.identity.client_id:
            log.warning("client %s: ignoring a ledger receipt for client %r",
                        self.identity.client_id, client_id[:64])
            return
        # security: the coordinator's copy of this ledger's head (its receipt of the last
        # round) must be in the ledger, else the ledger was deleted or restored: refuse
        ledger.verify_receipt(LedgerHead.parse(head))

    def _mask(self, delta: dict[str, torch.Tensor], content: Mapping[str, Value],
              state: dict[str, bytes]) -> tuple[Content, Content]:
        """Plain: the update as safetensors. Secure aggregation: start the SecAgg+ session
        (:func:`fedpeft.client.secagg_session.start_session`); the update stays in ``state``
        until it is sent masked.

        Returns (what is sent, what stays on the device).
        """
        if SECAGG_SETUP_KEY not in content:
            blob = encode_tensors(delta)
            return {UPDATE_KEY: blob, UPDATE_BYTES_KEY: len(blob)}, {}
        cfg = self.run.secagg
        if cfg is None:  # checked by the caller
            raise ConfigError("secure aggregation requested without secagg settings")
        return start_session(delta, self.model.spec(), cfg, content, state,
                             node_identity=self.node_identity)

    # -- user-level DP -------------------------------------------------------------------------
    def user_ledger_path(self) -> Path:
        """This device's own user-level ledger (beside its record-level one)."""
        return self.ledger_path().with_name(f"{_safe(self.identity.client_id)}.user"
                                            f"{LEDGER_SUFFIX}")

    def _user_ledger(self) -> Ledger:
        budget = Budget(self.run.user_dp.budget, self.run.user_dp.delta)
        path = self.user_ledger_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        return Ledger(path, client_id=self.identity.client_id, level="user", budget=budget,
                      anchor_dir=self.anchor_dir())

    def _open_user_round(self, content: Mapping[str, Value], server_round: int,
                         state: dict[str, bytes]) -> UserRound | Content:
        """Accept the SETUP, check the round against this device's own plan, and reserve the
        release in this device's user-level ledger within its budget, before training.

        The device cannot name the others in the sum; it counts the fewest the round accepts
        (the threshold - 1, less the colluders), so its ledger is an upper bound that holds
        even when the coordinator selects it more often than ``dp-user-participations``.
        """
        cfg = self.run.secagg
        if cfg is None or SECAGG_SETUP_KEY not in content:  # checked by the caller
            raise ConfigError("user-level DP needs the coordinator's secure aggregation setup")
        plan = user_round_plan(self.run, self.identity.num_partitions,
                               vector_length(self.model.spec()))
        clip = round_clip(content, self.run.user_dp, server_round)  # security: before SETUP
        client, advertise, epsilon = open_user_session(content, cfg, plan,
                                                       node_identity=self.node_identity)
        event = plan.worst_case_event()
        meta = ReleaseMetadata(round_number=server_round, users=(self.identity.client_id,),
                               delta=plan.config.delta, run_id=self.run.fingerprint(),
                               others=plan.min_contributors + plan.config.colluders)
        try:
            with self._user_ledger() as ledger:
                ledger.reserve_release_within_budget(event, meta)
        except BudgetExhaustedError as exc:
            return {STATUS_KEY: STATUS_BUDGET_EXHAUSTED, CLIENT_ID_KEY: self.identity.client_id,
                    REASON_KEY: str(exc), "dp-level": "user",
                    "dp-budget": float(exc.epsilon_max)}
        state[USER_RELEASE] = meta.event_id.encode()
        return UserRound(client, advertise, epsilon, plan, clip)

    def _commit_user_release(self, state: dict[str, bytes]) -> None:
        """After the unmask answer left: commit this round's release (idempotent)."""
        event_id = state.pop(USER_RELEASE, None)
        if event_id is None or not self.run.user_dp.enabled:
            return
        with self._user_ledger() as ledger:
            ledger.commit(event_id.decode())

    def _secagg_step(self, content: Mapping[str, Value], state: dict[str, bytes]) -> Content:
        if self.run.secagg is None:
            raise ConfigError("secure aggregation message, but this client has secagg=false")
        out = answer_stage(content, self.run.secagg, state, client_id=self.identity.client_id,
                           marker_dir=self.ledger_path().parent / UNMASK_MARKERS,
                           node_identity=self.node_identity)
        if state.pop(SESSION_DONE, None) is not None:
            self._commit_user_release(state)
        return {STATUS_KEY: STATUS_OK, CLIENT_ID_KEY: self.identity.client_id,
                SECAGG_MESSAGE_KEY: out}

    def _metrics(self, result: TrainResult, server_round: int) -> Content:
        out: Content = {
            STATUS_KEY: STATUS_OK,
            CLIENT_ID_KEY: self.identity.client_id,
            ROUND_KEY: server_round,
            NUM_EXAMPLES_KEY: result.examples,
            "steps": result.steps,
        }
        if not self.run.private:
            # Training losses and timings are computed on private data without noise (the
            # time depends on the realised Poisson batch sizes and token lengths): under DP
            # they stay on the device (``last_local``, client-metrics.jsonl).
            out["train-seconds"] = result.seconds
            if result.losses:
                out.update({"train-loss": result.mean_loss,
                            "train-loss-first": result.losses[0],
                            "train-loss-last": result.losses[-1]})
        return out


def _safe(client_id: str) -> str:
    """``client_id`` as a file name (letters, digits and ``-_.`` kept)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in client_id)


def check_dp_reply(reply: Mapping[str, Value], *, user_level: bool = False) -> None:
    """Refuse to send a reply under DP that carries a field outside :data:`DP_REPLY_FIELDS`
    (``user_level``: the stricter set of a user-level round).

    Raises :class:`ClientFault` (an internal error: the reply is not sent) naming the fields.
    """
    if SECAGG_ADVERTISE_KEY in reply:
        kind = "secagg-user" if user_level else "secagg"
    elif UPDATE_KEY in reply:
        kind = "update"
    elif SECAGG_MESSAGE_KEY in reply:
        kind = "secagg-step"
    elif reply.get(STATUS_KEY) == STATUS_BUDGET_EXHAUSTED:
        kind = "exhausted"
    else:
        kind = "error"
    extra = set(reply) - DP_REPLY_FIELDS[kind]
    if extra:
        # security: fail closed; a field not in the documented set never leaves the device
        raise ClientFault(f"reply of kind {kind!r} carries fields {sorted(extra)} outside the "
                          "documented set under DP (docs/privacy.md); not sent")


def _progress_printer(desc: str) -> Progress:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return lambda step, total, loss: None
    bar: list[tqdm] = []

    def update(step: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                            mininterval=1.0))
        bar[0].update(1)
        bar[0].set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step == total:
            bar[0].close()

    return update

