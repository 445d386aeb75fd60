"""This node's SecAgg+ identity (authenticated rounds, :mod:`fedpeft.secagg.identity`).

Deployment: the SuperNode's node config names the node's own files, all three or none::

    secagg-node-key   nodes/secagg-<name>.key   (Ed25519, PKCS#8 PEM, mode 0600)
    secagg-node-cert  nodes/secagg-<name>.crt   (issued by the federation CA)
    secagg-ca         ca.crt                    (the CA this node pins, not the coordinator's word)

Simulation: run knob ``secagg-sim-identities`` (a ``fedpeft certs init`` directory) gives each
virtual client ``client-<partition-id>`` (or its node config ``client-id``) the files
``nodes/secagg-<client id>.{key,crt}``, checked against the run's ``secagg-ca``.

A client with an identity signs its advertised keys, verifies its neighbours' and refuses an
unauthenticated round; without one it cannot join an authenticated round.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from fedpeft.core.errors import ConfigError
from fedpeft.runconfig.config import RunConfig
from fedpeft.runconfig.secagg_identity import (
    read_node_identity,
    read_trust_anchor,
    secagg_node_paths,
)
from fedpeft.secagg.identity import NodeIdentity, TrustAnchor

#: Node-config keys of a deployment node's identity (the SuperNode's ``--node-config``).
NODE_KEY = "secagg-node-key"
NODE_CERT = "secagg-node-cert"
NODE_CA = "secagg-ca"
NODE_KEYS = (NODE_KEY, NODE_CERT, NODE_CA)


def client_id_of(node_config: Mapping[str, object]) -> str:
    """The client id a node config gives (``client-id``, else ``client-<partition-id>``), as
    :func:`fedpeft.client.app.identity_from_node_config` reads it."""
    partition_id = int(node_config.get("partition-id", 0))  # type: ignore[call-overload]
    return str(node_config.get("client-id", f"client-{partition_id}"))


def load_node_identity(node_config: Mapping[str, object], run: RunConfig) -> NodeIdentity | None:
    """This node's identity: from the node config's three keys (deployment), else the run's
    simulated identities for this client (``secagg-sim-identities``), else None.

    Raises :class:`ConfigError` for a partial or unreadable set of files, and
    :class:`~fedpeft.secagg.errors.AuthenticationError` for a certificate the CA did not
    issue, that has expired, is not for SecAgg, or does not match the key.
    """
    given = {k: str(node_config[k]) for k in NODE_KEYS if str(node_config.get(k, "") or "")}
    if given:
        missing = [k for k in NODE_KEYS if k not in given]
        if missing:
            raise ConfigError(f"node config sets {sorted(given)} but not {missing}: an "
                              f"authenticated SecAgg node needs all of {list(NODE_KEYS)} (its "
                              "nodes/secagg-<name>.key and .crt and the federation's ca.crt), "
                              "or none")
        trust = read_trust_anchor(Path(given[NODE_CA]), knob=f"node config {NODE_CA}")
        return read_node_identity(Path(given[NODE_KEY]), Path(given[NODE_CERT]), trust,
                                  key_knob=f"node config {NODE_KEY}",
                                  cert_knob=f"node config {NODE_CERT}")
    return sim_node_identity(run, client_id_of(node_config))


def sim_node_identity(run: RunConfig, client_id: str) -> NodeIdentity | None:
    """Virtual client ``client_id``'s identity from ``secagg-sim-identities`` (None unset)."""
    root = run.secagg_sim_identities
    if root is None:
        return None
    if run.secagg_ca is None:  # parse_run_config derives it from the directory
        raise ConfigError("secagg-sim-identities is set without a secagg-ca")
    key, cert = secagg_node_paths(root, client_id)
    if not key.is_file() or not cert.is_file():
        raise ConfigError(f"secagg-sim-identities={str(root)!r} has no identity for virtual "
                          f"client {client_id!r} ({key.name}, {cert.name}); add it with "
                          f"`fedpeft certs add-node {root} --name {client_id}`")
    trust = _sim_trust(Path(run.secagg_ca).resolve())
    return read_node_identity(key, cert, trust,
                              key_knob=f"secagg-sim-identities key of {client_id}",
                              cert_knob=f"secagg-sim-identities certificate of {client_id}")


@functools.lru_cache(maxsize=4)
def _sim_trust(ca_path: Path) -> TrustAnchor:
    """One trust anchor for all the virtual clients of a process: the CA is read once and
    each certificate verified once for all of them (the anchor rechecks validity on use)."""
    return read_trust_anchor(ca_path)
