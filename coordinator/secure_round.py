"""One round under secure aggregation: the SecAgg+ server state machine driven over a Transport.

Stages (``privacy/secagg``): the ``train`` message carries the global adapter and the SecAgg
setup; each client trains, keeps its update on the device and answers with its advertised
keys. Three ``secagg`` exchanges follow (share keys, masked input, unmask). The coordinator
learns only the sum of the survivors' quantised updates, and from it their mean.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from coordinator.transport import Content, Reply, Transport
from fedpeft.errors import FedPeftError
from fedpeft.vector import CLIP_STATS, split_clip_stats, unflatten, vector_length
from fedpeft.wire import TensorSpec
from privacy.secagg.config import SecAggConfig
from privacy.secagg.server import SecAggServer

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
    got: dict[int, bytes] = {}
    for node in chosen:
        reply = replies.get(node)
        if reply is None:
            result.faults.append({"node": str(node), "stage": stage,
                                  "reason": "no reply before the round timeout"})
            continue
        content = reply.content
        if not reply.ok or content is None:
            result.faults.append({"node": str(node), "stage": stage,
                                  "reason": reply.error or "empty reply"})
            continue
        if content.get("status") != "ok":
            result.faults.append({"node": str(node), "stage": stage,
                                  "client": str(content.get("client-id", node)),
                                  "status": str(content.get("status")),
                                  "reason": str(content.get("reason", content.get("status")))})
            continue
        blob = content.get(key)
        if not isinstance(blob, bytes):
            result.faults.append({"node": str(node), "stage": stage,
                                  "reason": f"reply lacks {key!r} bytes"})
            continue
        got[node] = blob
        result.bytes_up += len(blob)
    return got


def secure_round(transport: Transport, chosen: list[int], train_message: Content,
                 config: SecAggConfig, spec: Mapping[str, TensorSpec], session_id: bytes,
                 timeout: float, extras: Mapping[int, Content] | None = None
                 ) -> SecureRoundResult:
    """Run one SecAgg+ round; on abort, ``mean_delta`` is None and ``abort_reason`` says why.

    ``extras`` adds per-node fields to the train message (the client's ledger receipt).
    """
    result = SecureRoundResult(mean_delta=None)
    extras = extras or {}
    try:
        resolved = config.resolve(len(chosen))
        result.threshold, result.degree = int(resolved.threshold or 0), int(resolved.degree or 0)
        server = SecAggServer(resolved, chosen, vector_length(spec) + CLIP_STATS, session_id,
                              drop_invalid=True)
        setup = server.start()
        messages = {node: {**train_message, **extras.get(node, {}),
                           "secagg-setup": setup[node], "secagg-id": node,
                           "secagg-session": session_id} for node in chosen}
        replies = transport.exchange("train", messages, timeout)
        adverts = _ok_messages(chosen, replies, "secagg", "train", result)
        for node, blob in adverts.items():
            content = replies[node].content or {}
            result.client_rows.append({**{k: v for k, v in content.items() if k != "secagg"},
                                       "node": node})
        outgoing = server.on_advertise(adverts)
        for stage, step in (("share-keys", server.on_shares), ("masked-input", server.on_masked)):
            replies = transport.exchange("secagg", {n: {"message": m} for n, m in outgoing.items()},
                                         timeout)
            outgoing = step(_ok_messages(sorted(outgoing), replies, "message", stage, result))
        replies = transport.exchange("secagg", {n: {"message": m} for n, m in outgoing.items()},
                                     timeout)
        aggregate = server.on_unmask(_ok_messages(sorted(outgoing), replies, "message", "unmask",
                                                  result))
    except FedPeftError as exc:
        result.abort_reason = f"secure aggregation aborted: {type(exc).__name__}: {exc}"
        log.warning("%s", result.abort_reason)
        return result
    result.survivors = aggregate.survivors
    try:
        update, result.clients_clipped, result.clipped = split_clip_stats(
            aggregate.float_mean(), len(aggregate.survivors), config.clip)
        result.mean_delta = unflatten(update, spec)
    except FedPeftError as exc:
        result.abort_reason = f"secure aggregation aborted: {type(exc).__name__}: {exc}"
        log.warning("%s", result.abort_reason)
    return result
