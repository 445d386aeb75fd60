"""A client's side of one SecAgg+ round: start the session, answer its stages, mark the unmask.

:class:`fedpeft.client.runtime.ClientRuntime` trains and privatises the update; under secure
aggregation it hands the update here. The session's secrets (the update among them) live in
the node's ``state`` between messages (Flower's ``context.state``) and never leave the device;
only SecAgg+ protocol messages do.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch

from fedpeft.core.errors import ConfigError, PayloadError
from fedpeft.core.protocol import (
    ROUND_CLIP_KEY,
    SECAGG_ADVERTISE_KEY,
    SECAGG_ID_KEY,
    SECAGG_MESSAGE_KEY,
    SECAGG_SESSION_KEY,
    SECAGG_SETUP_KEY,
    Content,
    Value,
    require_field,
)
from fedpeft.core.vector import flatten, with_clip_stats
from fedpeft.core.wire import TensorSpec
from fedpeft.privacy.accounting.ledger import fsync_dir
from fedpeft.privacy.adaptive_clip import check_round_clip
from fedpeft.privacy.user_level import RoundPlan, UserDPConfig, check_round, encode_update
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.identity import NodeIdentity
from fedpeft.secagg.messages import Kind
from fedpeft.secagg.stages import Stage

#: Key of the session's exported state in the node's ``state``.
SECAGG_STATE = "secagg"
#: Key set (to the session id) when a session ends DONE: its unmask answer was sent.
SESSION_DONE = "secagg-done"
FINAL_STAGES = (Stage.DONE, Stage.ABORTED)
#: Folder (beside the client's ledger) of the markers of answered unmask requests.
UNMASK_MARKERS = "secagg-unmasked"


def start_session(delta: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec],
                  cfg: SecAggConfig, content: Mapping[str, Value],
                  state: dict[str, bytes], *,
                  node_identity: NodeIdentity | None = None) -> tuple[Content, Content]:
    """Start this round's session with ``delta`` and answer the coordinator's setup.

    Returns (what is sent: the first SecAgg+ message, what stays on the device). Only the
    first protocol reply leaves; the update stays in ``state`` until it is sent masked. The
    count of update coordinates beyond ``secagg-clip`` is summed inside the masked vector
    (:func:`fedpeft.core.vector.with_clip_stats`), never sent per client. ``node_identity``
    signs the advertisement of an authenticated round (required there, refused otherwise).
    """
    vec = flatten(delta, spec)
    clipped = int(np.count_nonzero(np.abs(vec) > cfg.clip))
    vec = with_clip_stats(vec, clipped, cfg.clip)
    client = SecAggClient(int(require_field(content, SECAGG_ID_KEY, int)),
                          bytes(require_field(content, SECAGG_SESSION_KEY, bytes)),
                          cfg, expected_vector_length=int(vec.shape[0]),
                          identity=node_identity)
    client.set_update(cast("npt.NDArray[np.floating[npt.NBitBase]]", vec))
    advertise = client.handle(bytes(require_field(content, SECAGG_SETUP_KEY, bytes)))
    state[SECAGG_STATE] = client.export_state()
    return {SECAGG_ADVERTISE_KEY: advertise}, {"secagg-clipped": clipped}


def open_user_session(content: Mapping[str, Value], cfg: SecAggConfig, plan: RoundPlan, *,
                      node_identity: NodeIdentity | None = None,
                      ) -> tuple[SecAggClient, bytes, float]:
    """User-level DP, before training: accept the SETUP (SecAgg's floor checks), then check
    the round against this client's own plan (:func:`fedpeft.privacy.user_level.check_round`:
    the threshold must guarantee the planned noise shares; the plan must meet this client's
    budget). Returns (the session, the advertise reply, the plan's epsilon)."""
    session = bytes(require_field(content, SECAGG_SESSION_KEY, bytes))
    client = SecAggClient(int(require_field(content, SECAGG_ID_KEY, int)), session, cfg,
                          expected_vector_length=plan.ddg.padded, identity=node_identity)
    advertise = client.handle(bytes(require_field(content, SECAGG_SETUP_KEY, bytes)))
    # security: verify before adding (and later revealing) anything
    return client, advertise, check_round(plan, threshold=client.round_setup.threshold)


def round_clip(content: Mapping[str, Value], config: UserDPConfig, server_round: int) -> float:
    """This round's clip of the whole update: with adaptive clipping the coordinator's
    (:data:`ROUND_CLIP_KEY`), refused unless the update rule can reach it from
    ``dp-user-clip`` in ``server_round - 1`` rounds; else ``dp-user-clip`` (and a coordinator
    that sends a clip runs another config: refused)."""
    sent = content.get(ROUND_CLIP_KEY)
    if not config.adaptive:
        if sent is not None:
            raise ConfigError(f"the coordinator sent {ROUND_CLIP_KEY} (adaptive clipping) but "
                              "this client has dp-user-clip-quantile=0; use the same run "
                              "config on both sides")
        return config.clip
    if sent is None:
        raise ConfigError(f"this client clips adaptively (dp-user-clip-quantile="
                          f"{config.clip_quantile}) but the coordinator sent no "
                          f"{ROUND_CLIP_KEY}; use the same run config on both sides")
    return check_round_clip(sent, base_clip=config.clip, lr=config.clip_lr,
                            target_quantile=config.clip_quantile, server_round=server_round)


def finish_user_session(client: SecAggClient, delta: Mapping[str, torch.Tensor],
                        spec: Mapping[str, TensorSpec], plan: RoundPlan,
                        state: dict[str, bytes], *, clip: float | None = None) -> Content:
    """User-level DP, after training: clip, rotate, round and noise the update into field
    words (:func:`fedpeft.privacy.user_level.encode_update`), which stay in ``state`` until
    they are sent masked; ``clip`` is the round's (:func:`round_clip`). Returns what stays on
    the device."""
    vec = flatten(delta, spec).astype(np.float64)
    norm = float(np.linalg.norm(vec))
    bound = plan.config.clip if clip is None else clip
    client.set_field_input(encode_update(vec, plan, client.session_id, round_clip=bound))
    state[SECAGG_STATE] = client.export_state()
    return {"user-update-norm": norm, "user-clipped": norm > bound}


def answer_stage(content: Mapping[str, Value], cfg: SecAggConfig, state: dict[str, bytes], *,
                 client_id: str, marker_dir: Path,
                 node_identity: NodeIdentity | None = None) -> bytes:
    """Answer one SecAgg+ stage of the session in ``state``; return the message to send.

    Before an unmask request (or, in an authenticated round, a consistency request) is
    answered, a marker in ``marker_dir`` records it durably; a second one of the same session
    is refused (:func:`mark_unmask_answered`).
    The session leaves ``state`` once it is done or aborted. ``node_identity`` is the one the
    session started with (it is never in ``state``; an authenticated round needs it again).
    """
    blob = state.get(SECAGG_STATE)
    if blob is None:
        raise PayloadError("no secure-aggregation session in this client's state (it "
                           "restarted or missed the start of the round); it counts as dropped")
    client = SecAggClient.import_state(blob, cfg, identity=node_identity)
    if client.expects(Kind.CONSISTENCY_REQUEST):
        # security: sign at most one survivor set per session, durably (two signed sets could
        # let a lying coordinator certify two survivor views)
        mark_unmask_answered(marker_dir, f"{client_id}.consistency", client.session_id,
                             what="a consistency request")
    if client.expects(Kind.UNMASK_REQUEST):
        # security: answer at most one unmask request per session, durably, before the reply
        # leaves: a replayed request with another survivor set could reveal a peer's update
        mark_unmask_answered(marker_dir, client_id, client.session_id)
    out = client.handle(bytes(require_field(content, SECAGG_MESSAGE_KEY, bytes)))
    if client.stage in FINAL_STAGES:
        state.pop(SECAGG_STATE, None)
        if client.stage is Stage.DONE:
            state[SESSION_DONE] = client.session_id
    else:
        state[SECAGG_STATE] = client.export_state()
    return out


def end_session(state: dict[str, bytes]) -> None:
    """Forget the session in ``state`` (after a failure: the client counts as dropped)."""
    state.pop(SECAGG_STATE, None)


def mark_unmask_answered(marker_dir: Path, client_id: str, session_id: bytes, *,
                         what: str = "an unmask request") -> None:
    """Record, durably and at most once, that ``client_id`` answers the unmask request of
    ``session_id``; raise :class:`PayloadError` if it already did.

    The marker is an empty file created with ``O_CREAT | O_EXCL`` (so of two concurrent
    requests exactly one passes), fsynced together with its folder
    (:func:`fedpeft.privacy.accounting.ledger.fsync_dir`) before the answer leaves.
    """
    marker = marker_dir / f"{client_id}-{session_id.hex()}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        raise PayloadError(f"secure-aggregation session {session_id.hex()[:16]}... already "
                           f"answered {what}; refusing a second one") from None
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(marker.parent)
