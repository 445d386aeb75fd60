"""Files of authenticated SecAgg+ (:mod:`fedpeft.secagg.identity`): where they live, and reading them.

:mod:`fedpeft.secagg` is pure (no file I/O, no clock); the roles read the federation CA
(``secagg-ca``) and a node's Ed25519 key and certificate through these functions, which name the
knob of a file that cannot be read. A certificate directory of ``fedpeft certs init`` holds
each node's identity as ``nodes/secagg-<name>.key`` (PKCS#8 PEM, mode 0600) and
``nodes/secagg-<name>.crt`` (PEM), beside ``ca.crt`` (:func:`secagg_node_paths`).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from fedpeft.core.errors import ConfigError
from fedpeft.secagg.identity import NodeIdentity, TrustAnchor

#: Folder of a certificate directory holding the nodes' files.
NODES_DIR = "nodes"
#: Prefix of a node's SecAgg identity files (``nodes/secagg-<name>.key`` / ``.crt``).
SECAGG_PREFIX = "secagg-"
CA_CERT = "ca.crt"


def utc_now() -> dt.datetime:
    """The clock certificates are checked against (secagg reads none itself)."""
    return dt.datetime.now(dt.UTC)


def secagg_node_paths(root: Path, name: str) -> tuple[Path, Path]:
    """``(key, certificate)`` of node ``name``'s SecAgg identity in certificate dir ``root``."""
    base = Path(root) / NODES_DIR / f"{SECAGG_PREFIX}{name}"
    return base.with_name(base.name + ".key"), base.with_name(base.name + ".crt")


def _read(path: Path, knob: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{knob}={str(path)!r} cannot be read ({exc.strerror or exc}); "
                          "give the file `fedpeft certs init` wrote") from None


def read_trust_anchor(path: Path, knob: str = "secagg-ca") -> TrustAnchor:
    """The federation CA certificate at ``path`` (``ca.crt``), checking node certificates
    against the current time. A missing file is a :class:`ConfigError` naming ``knob``; a file
    that is not a certificate an :class:`~fedpeft.secagg.errors.AuthenticationError`."""
    return TrustAnchor.from_pem(_read(path, knob), utc_now)


def read_node_identity(key_path: Path, cert_path: Path, trust: TrustAnchor, *,
                       key_knob: str = "secagg-node-key",
                       cert_knob: str = "secagg-node-cert") -> NodeIdentity:
    """This node's SecAgg identity: its Ed25519 key and certificate, checked against ``trust``
    now (:class:`~fedpeft.secagg.errors.AuthenticationError` for a certificate from another CA,
    expired, not for SecAgg, or not matching the key)."""
    return NodeIdentity.from_pem(_read(key_path, key_knob), _read(cert_path, cert_knob), trust)
