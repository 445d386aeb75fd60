"""Named protocol stages and the (stage -> accepted message kind) tables of both parties."""

from __future__ import annotations

import enum

from fedpeft.secagg.messages import Kind


class Stage(enum.Enum):
    """Protocol stages (Bonawitz et al. rounds 0-4). ``DONE`` and ``ABORTED`` are final."""

    SETUP = "setup"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "collect_masked"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


#: Client: stage -> (kind it accepts, stage after replying).
CLIENT_TRANSITIONS: dict[Stage, tuple[Kind, Stage]] = {
    Stage.SETUP: (Kind.SETUP, Stage.ADVERTISE_KEYS),
    Stage.ADVERTISE_KEYS: (Kind.KEYS, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (Kind.FORWARD_SHARES, Stage.COLLECT_MASKED),
    Stage.COLLECT_MASKED: (Kind.UNMASK_REQUEST, Stage.DONE),
}

#: Server: stage -> (kind of the client replies it consumes, stage after consuming them).
#: ``start()`` moves SETUP -> ADVERTISE_KEYS without consuming replies.
SERVER_TRANSITIONS: dict[Stage, tuple[Kind, Stage]] = {
    Stage.ADVERTISE_KEYS: (Kind.ADVERTISE, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (Kind.SHARES, Stage.COLLECT_MASKED),
    Stage.COLLECT_MASKED: (Kind.MASKED, Stage.UNMASK),
    Stage.UNMASK: (Kind.UNMASK_SHARES, Stage.DONE),
}
