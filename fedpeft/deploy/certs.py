"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Layout of a certificate directory (``fedpeft certs init DIR``)::

    ca.crt  ca.key                 the federation's own CA (EC P-384, self-signed)
    server.crt  server.key         the SuperLink's TLS certificate, signed by the CA, with the
                                   given host names / IPs as subjectAltNames
    nodes/<name>.key  <name>.pub   one SuperNode authentication key pair per client
                                   (EC P-384, OpenSSH format: what ``flower-supernode
                                   --auth-supernode-private-key`` and ``flwr supernode
                                   register`` load)
    nodes/secagg-<name>.key        the node's authenticated SecAgg+ identity: an Ed25519 key
    nodes/secagg-<name>.crt        (PKCS#8 PEM) and its certificate, issued by the CA with the
                                   SecAgg extended key usage (``fedpeft.secagg.identity``);
                                   the node signs its advertised keys with it
    supernodes.allow               allow-list: one OpenSSH public key per line
                                   (``ecdsa-sha2-nistp384 AAAA... <name>``); the coordinator
                                   registers each with the SuperLink

``ca.key`` stays with the operator, off the coordinator: whoever holds it can certify SecAgg
nodes, so a coordinator holding it could invent sybil clients. ``certs init`` and ``add-node``
run where it is; the coordinator needs ``ca.crt``, ``server.*`` and the allow-list; each client
``ca.crt``, ``nodes/<name>.key`` and its ``nodes/secagg-<name>.{key,crt}``.

Key and certificate building (``build_*``) is pure: it returns bytes. :func:`write_files` is the
only function that touches the file system; private keys are created with mode 0600 and no
existing file is ever replaced unless ``force`` is given.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.core.errors import ConfigError
from fedpeft.deploy.errors import CertificateError, CertificateExistsError
from fedpeft.runconfig.secagg_identity import SECAGG_PREFIX, secagg_node_paths, utc_now
from fedpeft.secagg.identity import SECAGG_NODE_USAGE, NodeIdentity, TrustAnchor

T = TypeVar("T")

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODES_DIR = "nodes"
ALLOW_LIST = "supernodes.allow"
NODE_CURVE = ec.SECP384R1  # Flower accepts any NIST curve; P-384 is its documented choice
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                     r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


@dataclass(frozen=True)
class CertFile:
    """One file to write: its content and whether it is secret (mode 0600)."""

    data: bytes
    private: bool


@dataclass(frozen=True)
class CertLayout:
    """Where each piece lives inside a certificate directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.root / SERVER_KEY

    @property
    def allow_list(self) -> Path:
        return self.root / ALLOW_LIST

    def node_key(self, name: str) -> Path:
        return self.root / NODES_DIR / f"{check_node_name(name)}.key"

    def node_pub(self, name: str) -> Path:
        return self.root / NODES_DIR / f"{check_node_name(name)}.pub"

    def secagg_node_key(self, name: str) -> Path:
        """The node's SecAgg+ signing key (Ed25519, PKCS#8 PEM, mode 0600)."""
        return secagg_node_paths(self.root, check_node_name(name))[0]

    def secagg_node_cert(self, name: str) -> Path:
        """The node's SecAgg+ certificate (PEM), issued by the CA."""
        return secagg_node_paths(self.root, check_node_name(name))[1]


@dataclass(frozen=True)
class SecAggNodeFiles:
    """A node's authenticated SecAgg+ identity files and the CA certificate it pins (the
    node config keys ``secagg-node-key``, ``secagg-node-cert``, ``secagg-ca``)."""

    key: Path
    cert: Path
    ca: Path


# -- pure building blocks ----------------------------------------------------------------------
def check_node_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ConfigError(f"node name {name!r} must be 1-64 characters of letters, digits, "
                          "'.', '_' or '-', starting with a letter or digit")
    if name.startswith(SECAGG_PREFIX):  # nodes/secagg-x.key is node x's SecAgg key
        raise ConfigError(f"node name {name!r} must not start with {SECAGG_PREFIX!r} (that "
                          "prefix names the nodes' SecAgg identity files)")
    return name


def host_to_san(host: str) -> x509.GeneralName:
    """``127.0.0.1`` / ``::1`` -> an IPAddress SAN; ``edge.example.org`` -> a DNSName SAN."""
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _DNS_RE.match(host):
        raise ConfigError(f"host={host!r} is neither an IP address nor a DNS name; give the "
                          "names the clients use to reach the SuperLink (e.g. --host "
                          "coordinator.lan --host 192.168.1.10)")
    return x509.DNSName(host.lower())


def _validity(valid_days: int, now: dt.datetime, expired: bool) -> tuple[dt.datetime, dt.datetime]:
    if valid_days < 1:
        raise ConfigError(f"valid_days={valid_days} must be >= 1")
    if expired:  # already past its notAfter: for tests of the rejection path
        return now - dt.timedelta(days=valid_days + 1), now - dt.timedelta(days=1)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def build_ca(common_name: str = "fedpeft federation CA", *, valid_days: int = 3650,
             now: dt.datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA certificate (basicConstraints CA, pathlen 0) and its EC P-384 key."""
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(valid_days, _now(now), expired=False)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA384()))
    return key, cert


def build_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                      hosts: Sequence[str] = DEFAULT_HOSTS, *, valid_days: int = 365,
                      expired: bool = False, now: dt.datetime | None = None,
                      ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS certificate (EC P-256) for ``hosts``, signed by the CA.

    ``expired=True`` makes a certificate whose validity ended yesterday (to test rejection).
    """
    if not hosts:
        raise ConfigError("hosts is empty; give at least one host name or IP for the SuperLink")
    sans = [host_to_san(h) for h in hosts]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf_cert(ca_key, ca_cert, hosts[0].strip(), key.public_key(), valid_days, now, expired,
                      usage=ExtendedKeyUsageOID.SERVER_AUTH, key_agreement=True,
                      extra=[x509.SubjectAlternativeName(sans)])
    return key, cert


def build_secagg_node_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                           name: str, *, valid_days: int = 365, expired: bool = False,
                           now: dt.datetime | None = None,
                           ) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    """Node ``name``'s authenticated SecAgg+ identity: a fresh Ed25519 key and its
    certificate, signed by the CA, with the extended key usage
    :data:`fedpeft.secagg.identity.SECAGG_NODE_USAGE` (digital signatures only; not a CA).

    ``expired=True`` makes a certificate whose validity ended yesterday (to test rejection).
    """
    check_node_name(name)
    key = Ed25519PrivateKey.generate()
    cert = _leaf_cert(ca_key, ca_cert, name, key.public_key(), valid_days, now, expired,
                      usage=SECAGG_NODE_USAGE, key_agreement=False)
    return key, cert


def _leaf_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
               public_key: ec.EllipticCurvePublicKey | Ed25519PublicKey, valid_days: int,
               now: dt.datetime | None, expired: bool, *, usage: x509.ObjectIdentifier,
               key_agreement: bool, extra: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    """A certificate signed by the CA for ``public_key``: not a CA, digital signatures (and key
    agreement if asked), one extended key usage, the CA's key identifier."""
    start, end = _validity(valid_days, _now(now), expired)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedpeft")])
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(ca_cert.subject).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end))
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return (builder
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=key_agreement, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))


def build_identities(ids: Sequence[T], *, valid_days: int = 365) -> tuple[TrustAnchor, dict[T, NodeIdentity]]:
    """A fresh CA and an in-memory SecAgg identity ``node-<id>`` for each of ``ids`` (tests,
    benchmarks and simulations that need no files; the CA key is dropped)."""
    ca_key, ca_cert = build_ca()
    trust = TrustAnchor(ca_cert, utc_now)
    out: dict[T, NodeIdentity] = {}
    for i in ids:
        key, cert = build_secagg_node_cert(ca_key, ca_cert, f"node-{i}", valid_days=valid_days)
        out[i] = NodeIdentity(key, cert.public_bytes(serialization.Encoding.DER), trust)
    return trust, out


def build_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode authentication key (EC P-384)."""
    return ec.generate_private_key(NODE_CURVE())


def pem_private_key(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def openssh_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """OpenSSH private key format (what ``load_ssh_private_key`` in flower-supernode reads)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def openssh_public_key(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey,
                       comment: str = "") -> bytes:
    """``ecdsa-sha2-nistp384 AAAA... comment`` (what ``flwr supernode register`` reads)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    line = pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + (b" " + comment.encode() if comment else b"")


def node_names(count: int, names: Sequence[str] = ()) -> list[str]:
    """``names`` if given (their number must match ``count``), else node-1 .. node-N."""
    if count < 0:
        raise ConfigError(f"nodes={count} must be >= 0")
    if names:
        if len(names) != count:
            raise ConfigError(f"{len(names)} node names given for nodes={count}; give one "
                              "name per node or none")
        if len(set(names)) != len(names):
            raise ConfigError(f"node names {list(names)} contain duplicates")
        return [check_node_name(n) for n in names]
    return [f"node-{i}" for i in range(1, count + 1)]


def build_node_files(layout: CertLayout, names: Sequence[str],
                     ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *,
                     valid_days: int = 365, now: dt.datetime | None = None,
                     ) -> dict[Path, CertFile]:
    """Each node's SuperNode key pair and its SecAgg+ identity (key and certificate, issued
    by the CA), plus the allow-list lines (not yet merged)."""
    files: dict[Path, CertFile] = {}
    for name in names:
        key = build_node_key()
        files[layout.node_key(name)] = CertFile(openssh_private_key(key), private=True)
        files[layout.node_pub(name)] = CertFile(openssh_public_key(key, name) + b"\n",
                                                private=False)
    for name in names:
        sk, cert = build_secagg_node_cert(ca_key, ca_cert, name, valid_days=valid_days, now=now)
        files[layout.secagg_node_key(name)] = CertFile(pem_private_key(sk), private=True)
        files[layout.secagg_node_cert(name)] = CertFile(pem_cert(cert), private=False)
    return files


def build_cert_dir(root: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, nodes: int = 2,
                   names: Sequence[str] = (), valid_days: int = 365, expired: bool = False,
                   now: dt.datetime | None = None) -> dict[Path, CertFile]:
    """Every file of a fresh certificate directory, as bytes (nothing is written)."""
    layout = CertLayout(root)
    node_list = node_names(nodes, names)
    ca_key, ca_cert = build_ca(now=now, valid_days=max(3650, valid_days))
    srv_key, srv_cert = build_server_cert(ca_key, ca_cert, hosts, valid_days=valid_days,
                                          expired=expired, now=now)
    files = {
        layout.ca_key: CertFile(pem_private_key(ca_key), private=True),
        layout.ca_cert: CertFile(pem_cert(ca_cert), private=False),
        layout.server_key: CertFile(pem_private_key(srv_key), private=True),
        layout.server_cert: CertFile(pem_cert(srv_cert), private=False),
    }
    node_files = build_node_files(layout, node_list, ca_key, ca_cert, valid_days=valid_days,
                                  now=now)
    files.update(node_files)
    allow = b"".join(node_files[layout.node_pub(n)].data for n in node_list)
    files[layout.allow_list] = CertFile(allow, private=False)
    return files


# -- file I/O ----------------------------------------------------------------------------------
def write_files(files: Mapping[Path, CertFile], *, force: bool = False) -> list[Path]:
    """Write ``files``; private ones with mode 0600 from creation. Returns the paths written.

    Without ``force`` nothing is written if any target exists (the error names it).
    """
    if not force:
        for path in files:
            if path.exists():
                raise CertificateExistsError(
                    f"{path} already exists; refusing to overwrite a key or certificate "
                    "(pass --force / force=True to replace the whole set)")
    for path, item in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if item.private else 0o644
        if force and path.exists():
            path.unlink()  # a fresh inode: the mode of an old file never carries over
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.fchmod(fd, mode)  # umask may have cleared bits; never widens beyond `mode`
            with os.fdopen(fd, "wb") as fh:
                fh.write(item.data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return list(files)


def init_cert_dir(root: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, nodes: int = 2,
                  names: Sequence[str] = (), valid_days: int = 365, expired: bool = False,
                  force: bool = False) -> CertLayout:
    """``fedpeft certs init``: build and write a complete certificate directory."""
    files = build_cert_dir(root, hosts=hosts, nodes=nodes, names=names,
                           valid_days=valid_days, expired=expired)
    write_files(files, force=force)
    return CertLayout(root)


def load_ca(layout: CertLayout) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate from ``layout`` (to issue node certificates)."""
    if not layout.ca_cert.is_file():
        raise CertificateError(f"{layout.ca_cert} not found: run `fedpeft certs init "
                               f"{layout.root}` first")
    if not layout.ca_key.is_file():
        raise CertificateError(
            f"{layout.ca_key} not found: issuing a node's SecAgg certificate needs the CA's "
            "private key. It is kept by the operator, off the coordinator (a coordinator "
            "holding it could certify sybil clients); run `fedpeft certs add-node` on the "
            "machine that holds ca.key, then hand the new node its files")
    try:
        ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise CertificateError(f"cannot read the CA {layout.ca_cert} / {layout.ca_key}: "
                               f"{exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{layout.ca_key} holds a {type(ca_key).__name__}, not the EC "
                               "key `fedpeft certs init` writes")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise CertificateError(f"{layout.ca_key} is not the key of {layout.ca_cert}; the two "
                               "come from different `certs init` runs")
    return ca_key, ca_cert


def add_nodes(root: Path, names: Sequence[str], *, force: bool = False,
              valid_days: int = 365) -> list[Path]:
    """``fedpeft certs add-node``: new node key pairs, appended to the allow-list, and each
    node's SecAgg+ identity, issued by the directory's CA (needs ``ca.key``)."""
    layout = CertLayout(root)
    ca_key, ca_cert = load_ca(layout)
    node_files = build_node_files(layout, node_names(len(names), names), ca_key, ca_cert,
                                  valid_days=valid_days)
    written = write_files(node_files, force=force)
    with open(layout.allow_list, "ab") as fh:
        for name in names:
            fh.write(node_files[layout.node_pub(name)].data)
    return written


def secagg_node_files(layout: CertLayout, name: str,
                      ca_cert: Path | None = None) -> SecAggNodeFiles | None:
    """Node ``name``'s SecAgg+ identity in ``layout`` (with ``ca_cert``, default the
    directory's ``ca.crt``), or None where the directory has none (made before authenticated
    SecAgg+, or only the node's SuperNode key was handed out)."""
    key, cert = layout.secagg_node_key(name), layout.secagg_node_cert(name)
    if not key.is_file() or not cert.is_file():
        return None
    return SecAggNodeFiles(key=key, cert=cert, ca=ca_cert if ca_cert is not None
                           else layout.ca_cert)


def secagg_files_beside(node_key: Path, ca_cert: Path) -> SecAggNodeFiles | None:
    """The SecAgg+ identity next to a SuperNode key ``<folder>/<name>.key``: the files
    ``<folder>/secagg-<name>.key`` and ``.crt`` (as in a certificate directory's ``nodes/``),
    pinned to ``ca_cert``; None where they are absent."""
    name = node_key.stem
    if node_key.suffix != ".key" or name.startswith(SECAGG_PREFIX):
        return None
    key = node_key.with_name(f"{SECAGG_PREFIX}{name}.key")
    cert = node_key.with_name(f"{SECAGG_PREFIX}{name}.crt")
    if not key.is_file() or not cert.is_file():
        return None
    return SecAggNodeFiles(key=key, cert=cert, ca=ca_cert)


@dataclass(frozen=True)
class AllowedKey:
    """One line of the allow-list: an OpenSSH EC public key and its comment (node name)."""

    name: str
    line: str


def parse_allow_list(text: str, source: str = "allow-list") -> list[AllowedKey]:
    """Parse and check an allow-list (blank lines and ``#`` comments skipped)."""
    out: list[AllowedKey] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            pub = serialization.load_ssh_public_key(" ".join(parts[:2]).encode())
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise CertificateError(f"{source}:{lineno} is not an OpenSSH public key ({exc}); "
                                   "regenerate it with `fedpeft certs add-node`") from None
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CertificateError(f"{source}:{lineno} holds a {type(pub).__name__}; Flower "
                                   "SuperNode authentication needs an EC (NIST curve) key")
        name = parts[2] if len(parts) > 2 else f"line-{lineno}"
        out.append(AllowedKey(name=name, line=" ".join(parts[:2]) + f" {name}"))
    return out


def read_allow_list(path: Path) -> list[AllowedKey]:
    if not path.is_file():
        raise CertificateError(f"allow-list {path} not found; create it with `fedpeft certs "
                               "init` or list one OpenSSH public key per line")
    return parse_allow_list(path.read_text(), str(path))


def check_private_key_file(path: Path) -> None:
    """Refuse a private key readable by group or others (like ssh does)."""
    if not path.is_file():
        raise CertificateError(f"private key {path} not found")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertificateError(f"private key {path} has mode {mode:o}; it must be readable "
                               f"by its owner only: chmod 600 {path}")


def check_server_cert(layout: CertLayout, now: dt.datetime | None = None) -> x509.Certificate:
    """Refuse to serve with a server certificate that is expired, not yet valid, or not
    signed by the directory's CA (clients would reject it anyway, less clearly)."""
    now = _now(now)
    try:
        cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
        ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertificateError(f"cannot read {layout.server_cert} / {layout.ca_cert}: {exc}; "
                               f"recreate them with `fedpeft certs init {layout.root} "
                               "--force`") from None
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        start = cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M")
        end = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M")
        raise CertificateError(
            f"server certificate {layout.server_cert} is valid from {start} to {end} UTC, not "
            "now; clients would refuse the TLS handshake. Renew it with `fedpeft certs init "
            f"{layout.root} --force` (and hand out the new ca.crt)")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateError(f"server certificate {layout.server_cert} is not signed by "
                               f"{layout.ca_cert}; the two come from different `certs init` "
                               "runs") from None
    return cert
