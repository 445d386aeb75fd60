"""In-memory driver: runs one round between a :class:`SecAggServer` and local clients.

Used by tests and the benchmark. ``dropouts[stage]`` lists clients that vanish in that stage:
they receive the stage's request but their reply never reaches the server (and they send
nothing afterwards). ``tamper`` may rewrite any message in flight (for adversarial tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.identity import NodeIdentity, TrustAnchor
from fedpeft.secagg.server import AggregateResult, SecAggServer
from fedpeft.secagg.stages import Stage

#: Stages in which a client can drop, in protocol order (the reply of that stage is lost);
#: authenticated rounds add CONSISTENCY_CHECK before UNMASK.
DROP_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.COLLECT_MASKED, Stage.UNMASK)

#: ``tamper(stage, "request" | "reply", client_id, message) -> message`` rewrites one message in flight.
Tamper = Callable[[Stage, str, int, bytes], bytes]


@dataclass
class InMemoryRun:
    """Result and timings of one in-memory round."""

    result: AggregateResult
    server: SecAggServer
    clients: dict[int, SecAggClient]
    server_seconds: dict[str, float] = field(default_factory=dict)
    client_seconds: dict[int, float] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=dict)
    download_bytes: dict[int, int] = field(default_factory=dict)


def run_in_memory(
    config: SecAggConfig,
    updates: Mapping[int, npt.NDArray[Any]],
    *,
    session_id: bytes = b"fedpeft-secagg-test-session",
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    rounding_seeds: Mapping[int, bytes] | None = None,
    graph_seed: bytes | None = None,
    tamper: Tamper | None = None,
    drop_invalid: bool = False,
    field_inputs: bool = False,
    identities: Mapping[int, NodeIdentity] | None = None,
    trust: TrustAnchor | None = None,
) -> InMemoryRun:
    """Run SETUP .. UNMASK for ``updates`` (client id -> float vector) and return the result.

    ``field_inputs``: the updates are ``uint32`` field words, given to each client after SETUP
    (:meth:`SecAggClient.set_field_input`) instead of quantised floats. ``identities`` (client
    id -> node identity) and ``trust`` (the server's CA) run an authenticated round.
    """
    ids = sorted(updates)
    length = int(next(iter(updates.values())).shape[0]) if updates else 0
    server = SecAggServer(config, ids, length, session_id, graph_seed=graph_seed, drop_invalid=drop_invalid,
                          field_inputs=field_inputs, trust=trust)
    clients = {cid: SecAggClient(cid, session_id, config, expected_vector_length=length,
                                 identity=None if identities is None else identities.get(cid))
               for cid in ids}
    for cid in ids:
        if not field_inputs:
            clients[cid].set_update(updates[cid],
                                    None if rounding_seeds is None else rounding_seeds[cid])
    gone: set[int] = set()
    drops = {stage: set(v) for stage, v in (dropouts or {}).items()}
    run_server_s: dict[str, float] = {}
    client_s = {cid: 0.0 for cid in ids}
    up = {cid: 0 for cid in ids}
    down = {cid: 0 for cid in ids}

    t0 = time.perf_counter()
    requests = server.start()
    run_server_s["start"] = time.perf_counter() - t0
    result: AggregateResult | None = None
    stages = DROP_STAGES if trust is None else (*DROP_STAGES[:3], Stage.CONSISTENCY_CHECK, Stage.UNMASK)
    for stage in stages:
        gone |= drops.get(stage, set())
        replies: dict[int, bytes] = {}
        for cid, request in requests.items():
            if tamper is not None:
                request = tamper(stage, "request", cid, request)
            down[cid] += len(request)
            if cid in gone:
                continue
            t0 = time.perf_counter()
            reply = clients[cid].handle(request)
            if field_inputs and stage is Stage.ADVERTISE_KEYS:
                clients[cid].set_field_input(updates[cid].astype(np.uint32))
            client_s[cid] += time.perf_counter() - t0
            if tamper is not None:
                reply = tamper(stage, "reply", cid, reply)
            up[cid] += len(reply)
            replies[cid] = reply
        t0 = time.perf_counter()
        if stage is Stage.UNMASK:
            result = server.on_unmask(replies)
        else:
            step = {Stage.ADVERTISE_KEYS: server.on_advertise, Stage.SHARE_KEYS: server.on_shares,
                    Stage.COLLECT_MASKED: server.on_masked,
                    Stage.CONSISTENCY_CHECK: server.on_consistency}[stage]
            requests = step(replies)
        run_server_s[stage.value] = time.perf_counter() - t0
    if result is None:  # pragma: no cover - on_unmask either returns or raises
        raise RuntimeError("unreachable")
    return InMemoryRun(result, server, clients, run_server_s, client_s, up, down)
