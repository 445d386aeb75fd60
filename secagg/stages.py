"""Named protocol stages and the (stage -> accepted message kind) tables of both parties.

Two tables per party: unauthenticated rounds (Bonawitz et al. rounds 0-4 without the
consistency check) and authenticated rounds, which add the ConsistencyCheck round (Bonawitz
et al. CCS 2017, sec. 4, round 3): the survivors sign the survivor set, and a client reveals
shares only for a set a quorum signed. Until SETUP says which, a client accepts only SETUP.
"""

from __future__ import annotations

import enum

from fedpeft.secagg.messages import Kind


class Stage(enum.Enum):
    """Protocol stages (Bonawitz et al. rounds 0-4). ``DONE`` and ``ABORTED`` are final."""

    SETUP = "setup"
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    COLLECT_MASKED = "collect_masked"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


#: Client, unauthenticated rounds: stage -> (kind it accepts, stage after replying).
CLIENT_TRANSITIONS: dict[Stage, tuple[Kind, Stage]] = {
    Stage.SETUP: (Kind.SETUP, Stage.ADVERTISE_KEYS),
    Stage.ADVERTISE_KEYS: (Kind.KEYS, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (Kind.FORWARD_SHARES, Stage.COLLECT_MASKED),
    Stage.COLLECT_MASKED: (Kind.UNMASK_REQUEST, Stage.DONE),
}

#: Client, authenticated rounds: the consistency check comes before the unmask request.
CLIENT_TRANSITIONS_AUTHENTICATED: dict[Stage, tuple[Kind, Stage]] = {
    **CLIENT_TRANSITIONS,
    Stage.COLLECT_MASKED: (Kind.CONSISTENCY_REQUEST, Stage.CONSISTENCY_CHECK),
    Stage.CONSISTENCY_CHECK: (Kind.UNMASK_REQUEST, Stage.DONE),
}

#: Server, unauthenticated rounds: stage -> (kind of the client replies it consumes, stage
#: after consuming them). ``start()`` moves SETUP -> ADVERTISE_KEYS without consuming replies.
SERVER_TRANSITIONS: dict[Stage, tuple[Kind, Stage]] = {
    Stage.ADVERTISE_KEYS: (Kind.ADVERTISE, Stage.SHARE_KEYS),
    Stage.SHARE_KEYS: (Kind.SHARES, Stage.COLLECT_MASKED),
    Stage.COLLECT_MASKED: (Kind.MASKED, Stage.UNMASK),
    Stage.UNMASK: (Kind.UNMASK_SHARES, Stage.DONE),
}

#: Server, authenticated rounds.
SERVER_TRANSITIONS_AUTHENTICATED: dict[Stage, tuple[Kind, Stage]] = {
    **SERVER_TRANSITIONS,
    Stage.COLLECT_MASKED: (Kind.MASKED, Stage.CONSISTENCY_CHECK),
    Stage.CONSISTENCY_CHECK: (Kind.CONSISTENCY_SIGNATURE, Stage.UNMASK),
}


def client_transitions(authenticated: bool) -> dict[Stage, tuple[Kind, Stage]]:
    """The client's table for a round of that kind."""
    return CLIENT_TRANSITIONS_AUTHENTICATED if authenticated else CLIENT_TRANSITIONS


def server_transitions(authenticated: bool) -> dict[Stage, tuple[Kind, Stage]]:
    """The server's table for a round of that kind."""
    return SERVER_TRANSITIONS_AUTHENTICATED if authenticated else SERVER_TRANSITIONS
