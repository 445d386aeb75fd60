"""State-machine tables: every (stage, message kind) pair, for client and server, in
unauthenticated and authenticated rounds (the latter add the consistency check).

A reference round per mode records one genuine message of every kind; party snapshots are
taken at every stage. Each snapshot is then fed each kind: exactly the tabulated transitions
succeed, every other pair raises :class:`StageError` and moves the party to ABORTED.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from fedpeft.deploy.certs import build_identities
from fedpeft.secagg import SecAggConfig, Stage
from fedpeft.secagg.client import SecAggClient
from fedpeft.secagg.errors import StageError
from fedpeft.secagg.messages import Kind
from fedpeft.secagg.server import SecAggServer
from fedpeft.secagg.stages import client_transitions, server_transitions

SID = b"stage-table-session"
IDS = [3, 4, 5, 6]
CFG = SecAggConfig(clip=1.0, expected_dropout=0.0)
ME = 4
Reference = tuple[dict[Stage, SecAggClient], dict[Stage, SecAggServer], dict[Kind, dict[int, bytes]]]


def _reference(authenticated: bool) -> Reference:
    trust, identities = build_identities(IDS) if authenticated else (None, {})
    server = SecAggServer(CFG, IDS, 8, SID, trust=trust)
    clients = {c: SecAggClient(c, SID, CFG, identity=identities.get(c)) for c in IDS}
    for c in IDS:
        clients[c].set_update(np.zeros(8, dtype=np.float32))
    msgs: dict[Kind, dict[int, bytes]] = {}
    client_snaps: dict[Stage, SecAggClient] = {}
    server_snaps: dict[Stage, SecAggServer] = {Stage.SETUP: copy.deepcopy(server)}
    requests = server.start()
    steps: list[tuple[Kind, Kind, Any]] = [
        (Kind.SETUP, Kind.ADVERTISE, server.on_advertise),
        (Kind.KEYS, Kind.SHARES, server.on_shares),
        (Kind.FORWARD_SHARES, Kind.MASKED, server.on_masked),
    ]
    if authenticated:
        steps.append((Kind.CONSISTENCY_REQUEST, Kind.CONSISTENCY_SIGNATURE, server.on_consistency))
    steps.append((Kind.UNMASK_REQUEST, Kind.UNMASK_SHARES, server.on_unmask))
    for req_kind, rep_kind, step in steps:
        msgs[req_kind] = dict(requests)
        client_snaps[clients[ME].stage] = copy.deepcopy(clients[ME])
        replies = {c: clients[c].handle(m) for c, m in requests.items()}
        msgs[rep_kind] = replies
        server_snaps[server.stage] = copy.deepcopy(server)
        out = step(replies)
        requests = out if isinstance(out, dict) else {}
    client_snaps[Stage.DONE] = copy.deepcopy(clients[ME])
    server_snaps[Stage.DONE] = copy.deepcopy(server)
    aborted_c = copy.deepcopy(client_snaps[Stage.SETUP])
    with pytest.raises(StageError):
        aborted_c.handle(msgs[Kind.KEYS][ME])
    client_snaps[Stage.ABORTED] = aborted_c
    aborted_s = copy.deepcopy(server_snaps[Stage.SETUP])
    aborted_s.start()
    with pytest.raises(StageError):
        aborted_s.on_masked(msgs[Kind.MASKED])
    server_snaps[Stage.ABORTED] = aborted_s
    return client_snaps, server_snaps, msgs


REFS = {False: _reference(False), True: _reference(True)}
for _mode in (False, True):  # a kind one mode never sends: borrow the other mode's message
    for _kind, _m in REFS[not _mode][2].items():
        REFS[_mode][2].setdefault(_kind, _m)
CASES = [(auth, stage) for auth in (False, True) for stage in REFS[auth][0]]
SERVER_CASES = [(auth, stage) for auth in (False, True) for stage in REFS[auth][1]]


def test_every_stage_is_reached_in_some_mode() -> None:
    assert {s for _, s in CASES} == set(Stage) - {Stage.UNMASK}  # UNMASK: a server stage
    assert {s for _, s in SERVER_CASES} == set(Stage)
    assert (True, Stage.CONSISTENCY_CHECK) in CASES and (False, Stage.CONSISTENCY_CHECK) not in CASES


@pytest.mark.parametrize("auth, stage", CASES)
@pytest.mark.parametrize("kind", list(Kind))
def test_client_transition_table(auth: bool, stage: Stage, kind: Kind) -> None:
    client_snaps, _, msgs = REFS[auth]
    table = client_transitions(auth)
    client = copy.deepcopy(client_snaps[stage])
    message = msgs[kind][ME]
    valid = stage in table and table[stage][0] == kind
    if valid:
        client.handle(message)
        assert client.stage is table[stage][1]
    else:
        with pytest.raises(StageError):
            client.handle(message)
        assert client.stage is Stage.ABORTED or stage in (Stage.DONE, Stage.ABORTED)


@pytest.mark.parametrize("auth, stage", SERVER_CASES)
@pytest.mark.parametrize("kind", list(Kind))
def test_server_transition_table(auth: bool, stage: Stage, kind: Kind) -> None:
    _, server_snaps, msgs = REFS[auth]
    table = server_transitions(auth)
    server = copy.deepcopy(server_snaps[stage])
    replies = msgs[kind]
    valid = stage in table and table[stage][0] == kind
    if valid:
        server.handle(replies)
        assert server.stage is table[stage][1]
    else:
        with pytest.raises(StageError):
            server.handle(replies)
        assert server.stage is Stage.ABORTED or stage in (Stage.SETUP, Stage.DONE, Stage.ABORTED)


@pytest.mark.parametrize("auth, stage", SERVER_CASES)
def test_server_named_methods_only_in_their_stage(auth: bool, stage: Stage) -> None:
    _, server_snaps, msgs = REFS[auth]
    methods = {
        Stage.SETUP: ("start", None),
        Stage.ADVERTISE_KEYS: ("on_advertise", Kind.ADVERTISE),
        Stage.SHARE_KEYS: ("on_shares", Kind.SHARES),
        Stage.COLLECT_MASKED: ("on_masked", Kind.MASKED),
        Stage.CONSISTENCY_CHECK: ("on_consistency", Kind.CONSISTENCY_SIGNATURE),
        Stage.UNMASK: ("on_unmask", Kind.UNMASK_SHARES),
    }
    for method_stage, (name, kind) in methods.items():
        server = copy.deepcopy(server_snaps[stage])
        args = () if kind is None else (msgs[kind],)
        if method_stage is stage:
            getattr(server, name)(*args)
        else:
            with pytest.raises(StageError):
                getattr(server, name)(*args)
