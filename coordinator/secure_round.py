"""One round under secure aggregation: the SecAgg+ server state machine driven over a Transport.

Stages (:mod:`fedpeft.secagg`): the ``train`` message carries the global adapter and the SecAgg
setup; each client trains, keeps its update on the device and answers with its advertised
keys. Three ``secagg`` exchanges follow (share keys, masked input, unmask). The coordinator
learns only the sum of the survivors' quantised updates, and from it their mean.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.coordinator.transport import Fault, Reply, Transport, classify_reply
from fedpeft.core.errors import FedPeftError
from fedpeft.core.protocol import (
    KIND_SECAGG,
    KIND_TRAIN,
    SECAGG_ADVERTISE_KEY,
    SECAGG_ID_KEY,
    SECAGG_MESSAGE_KEY,
    SECAGG_SESSION_KEY,
    SECAGG_SETUP_KEY,
    Content,
)
from fedpeft.core.vector import CLIP_STATS, split_clip_stats, unflatten, vector_length
from fedpeft.core.wire import TensorSpec
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.identity import TrustAnchor
from fedpeft.secagg.server import AggregateResult, SecAggServer

log = logging.getLogger(__name__)


@dataclass
class SecureRoundResult:
    mean_delta: dict[str, torch.Tensor] | None
    client_rows: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, str]] = field(default_factory=list)
    survivors: tuple[int, ...] = ()
    abort_reason: str = ""
    threshold: int = 0
    degree: int = 0
    bytes_up: int = 0
    #: Summed inside the masked vector (never per client): clients whose update had
    #: coordinates beyond secagg-clip, and how many such coordinates in all.
    clients_clipped: int = 0
    clipped: int = 0


def _ok_messages(chosen: list[int], replies: Mapping[int, Reply], key: str, stage: str,
                 result: SecureRoundResult) -> dict[int, bytes]:
    """The ``key`` bytes of each chosen node's ok reply; every other reply is a fault."""
    got: dict[int, bytes] = {}
    for node in chosen:
        content = classify_reply(node, replies.get(node), stage=stage)
        if isinstance(content, Fault):
            result.faults.append(content)
            continue
        blob = content.get(key)
        if not isinstance(blob, bytes):
            result.faults.append({"node": str(node), "stage": stage,
                                  "reason": f"reply lacks {key!r} bytes"})
            continue
        got[node] = blob
        result.bytes_up += len(blob)
    return got


def _stage(transport: Transport, outgoing: Mapping[int, bytes], stage: str, timeout: float,
           result: SecureRoundResult) -> dict[int, bytes]:
    """One ``secagg`` exchange: send each node its SecAgg+ message, collect the answers."""
    replies = transport.exchange(
        KIND_SECAGG, {n: {SECAGG_MESSAGE_KEY: m} for n, m in outgoing.items()}, timeout)
    return _ok_messages(sorted(outgoing), replies, SECAGG_MESSAGE_KEY, stage, result)


@dataclass(frozen=True)
class FieldRound:
    """A round whose clients send inputs already encoded in the field (user-level DP).

    ``length``: the field vector's length; ``gate(survivors, client_rows)`` runs once the
    masked inputs are in and before any unmask request leaves (it may raise a
    :class:`FedPeftError` to abort: nothing is then released); ``decode(aggregate)`` turns
    the unmasked modular sum into the survivors' mean update.
    """

    length: int
    gate: Callable[[tuple[int, ...], list[dict[str, Any]]], None]
    decode: Callable[[AggregateResult], dict[str, torch.Tensor]]


def secure_round(transport: Transport, chosen: list[int], train_message: Content,
                 config: SecAggConfig, spec: Mapping[str, TensorSpec], session_id: bytes,
                 timeout: float, extras: Mapping[int, Content] | None = None,
                 field_round: FieldRound | None = None,
                 trust: TrustAnchor | None = None) -> SecureRoundResult:
    """Run one SecAgg+ round; on abort, ``mean_delta`` is None and ``abort_reason`` says why.

    ``extras`` adds per-node fields to the train message (the client's ledger receipt);
    ``field_round`` runs a round of pre-encoded inputs (:class:`FieldRound`); ``trust`` (the
    federation CA, run knob ``secagg-ca``) makes the round authenticated: every advertisement
    must be signed by a node certified by that CA (the clients check this themselves too).
    """
    result = SecureRoundResult(mean_delta=None)
    extras = extras or {}
    length = (vector_length(spec) + CLIP_STATS if field_round is None
              else field_round.length)
    try:
        resolved = config.resolve(len(chosen), authenticated=trust is not None)
        result.threshold, result.degree = int(resolved.threshold or 0), int(resolved.degree or 0)
        server = SecAggServer(resolved, chosen, length, session_id, drop_invalid=True,
                              field_inputs=field_round is not None, trust=trust)
        setup = server.start()
        messages: dict[int, Content] = {
            node: {**train_message, **extras.get(node, {}), SECAGG_SETUP_KEY: setup[node],
                   SECAGG_ID_KEY: node, SECAGG_SESSION_KEY: session_id} for node in chosen}
        replies = transport.exchange(KIND_TRAIN, messages, timeout)
        adverts = _ok_messages(chosen, replies, SECAGG_ADVERTISE_KEY, KIND_TRAIN, result)
        for node in adverts:
            content = replies[node].content or {}
            result.client_rows.append({**{k: v for k, v in content.items()
                                          if k != SECAGG_ADVERTISE_KEY}, "node": node})
        outgoing = server.on_advertise(adverts)
        steps = [("share-keys", server.on_shares), ("masked-input", server.on_masked)]
        if trust is not None:  # authenticated: the survivors sign the survivor set first
            steps.append(("consistency", server.on_consistency))
        for stage, step in steps:
            outgoing = step(_stage(transport, outgoing, stage, timeout, result))
        if field_round is not None:
            # security: the release is accounted (or refused) before any unmask request leaves;
            # its contributors are the clients whose masked inputs are in the sum
            field_round.gate(tuple(sorted(server.masked_inputs)), result.client_rows)
        aggregate = server.on_unmask(_stage(transport, outgoing, "unmask", timeout, result))
    except FedPeftError as exc:
        result.abort_reason = f"secure aggregation aborted: {type(exc).__name__}: {exc}"
        log.warning("%s", result.abort_reason)
        return result
    result.survivors = aggregate.survivors
    try:
        if field_round is not None:
            result.mean_delta = field_round.decode(aggregate)
            return result
        update, result.clients_clipped, result.clipped = split_clip_stats(
            aggregate.float_mean(), len(aggregate.survivors), config.clip)
        result.mean_delta = unflatten(update, spec)
    except FedPeftError as exc:
        result.abort_reason = f"secure aggregation aborted: {type(exc).__name__}: {exc}"
        log.warning("%s", result.abort_reason)
    return result
