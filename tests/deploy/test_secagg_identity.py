"""Authenticated SecAgg+ identities: issuance (``fedpeft certs``), the ``secagg-ca`` and
``secagg-sim-identities`` knobs, a node's identity from its node config, and the wiring of
identities and the coordinator's trust anchor through one SecAgg+ round (no model)."""

from __future__ import annotations

import argparse
import datetime as dt
import stat
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.client.node_identity import load_node_identity
from fedpeft.client.secagg_session import answer_stage, start_session
from fedpeft.coordinator.secure_round import SecureRoundResult, secure_round
from fedpeft.coordinator.transport import Reply
from fedpeft.core.errors import ConfigError
from fedpeft.core.protocol import KIND_TRAIN, STATUS_KEY, STATUS_OK, Content
from fedpeft.core.wire import TensorSpec
from fedpeft.deploy.certs import (
    CertLayout,
    add_nodes,
    build_ca,
    build_secagg_node_cert,
    build_server_cert,
    init_cert_dir,
    pem_cert,
    pem_private_key,
    secagg_files_beside,
    secagg_node_files,
)
from fedpeft.deploy.commands import _coordinator_config, add_deploy_parsers
from fedpeft.deploy.errors import CertificateError
from fedpeft.deploy.runner import check_secagg_files, node_config_toml
from fedpeft.runconfig.config import parse_run_config
from fedpeft.runconfig.secagg_identity import read_node_identity, read_trust_anchor, utc_now
from fedpeft.secagg.config import SecAggConfig
from fedpeft.secagg.errors import AuthenticationError
from fedpeft.secagg.identity import SECAGG_NODE_USAGE, NodeIdentity, TrustAnchor

DER = serialization.Encoding.DER
SIM_NAMES = ["client-0", "client-1", "client-2", "client-3"]


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory: pytest.TempPathFactory) -> CertLayout:
    """One certificate directory for the whole module (the slow part is key generation)."""
    return init_cert_dir(tmp_path_factory.mktemp("sim") / "certs", nodes=len(SIM_NAMES),
                         names=SIM_NAMES)


# -- issuance ----------------------------------------------------------------------------------
def test_node_cert_round_trip_and_extensions() -> None:
    ca_key, ca = build_ca()
    key, cert = build_secagg_node_cert(ca_key, ca, "alice")
    peer = TrustAnchor(ca, utc_now).verify(cert.public_bytes(DER))
    assert peer.name == "alice" and peer.public_key == key.public_key().public_bytes_raw()
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    assert cert.issuer == ca.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not (ku.value.key_cert_sign or ku.value.key_agreement or ku.value.key_encipherment)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        SECAGG_NODE_USAGE]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(
        ca_key.public_key()).digest
    # the key file format NodeIdentity reads: PKCS#8 PEM
    ident = NodeIdentity.from_pem(pem_private_key(key), pem_cert(cert), TrustAnchor(ca, utc_now))
    assert ident.name == "alice"


def _ec_node_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> x509.Certificate:
    """A certificate with the SecAgg usage but an EC key (not a SecAgg node key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "ec")]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([SECAGG_NODE_USAGE]), critical=False)
            .sign(ca_key, hashes.SHA384()))


def test_foreign_expired_tls_and_ec_certificates_are_refused() -> None:
    ca_key, ca = build_ca()
    other_key, other = build_ca()
    trust = TrustAnchor(ca, utc_now)
    _, foreign = build_secagg_node_cert(other_key, other, "mallory")
    with pytest.raises(AuthenticationError, match="not issued by the federation CA"):
        trust.verify(foreign.public_bytes(DER))
    _, old = build_secagg_node_cert(ca_key, ca, "alice", valid_days=30, expired=True)
    with pytest.raises(AuthenticationError, match="not valid now"):
        trust.verify(old.public_bytes(DER))
    _, tls = build_server_cert(ca_key, ca)  # same CA, but a TLS server certificate
    with pytest.raises(AuthenticationError, match="not for SecAgg"):
        trust.verify(tls.public_bytes(DER))
    with pytest.raises(AuthenticationError, match="not an Ed25519 key"):
        trust.verify(_ec_node_cert(ca_key, ca).public_bytes(DER))


def test_mismatched_key_and_certificate_are_refused() -> None:
    ca_key, ca = build_ca()
    _, alice = build_secagg_node_cert(ca_key, ca, "alice")
    bob_key, _ = build_secagg_node_cert(ca_key, ca, "bob")
    with pytest.raises(AuthenticationError, match="does not match"):
        NodeIdentity.from_pem(pem_private_key(bob_key), pem_cert(alice), TrustAnchor(ca, utc_now))


def test_init_issues_secagg_identities(sim_dir: CertLayout) -> None:
    for name in SIM_NAMES:
        key, cert = sim_dir.secagg_node_key(name), sim_dir.secagg_node_cert(name)
        assert key.parent == cert.parent == sim_dir.root / "nodes"
        assert key.name == f"secagg-{name}.key" and cert.name == f"secagg-{name}.crt"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(cert.stat().st_mode) & 0o077 != 0o077
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
        ident = read_node_identity(key, cert, read_trust_anchor(sim_dir.ca_cert))
        assert ident.name == name
    files = secagg_node_files(sim_dir, "client-1")
    assert files is not None and files.ca == sim_dir.ca_cert
    assert secagg_files_beside(sim_dir.node_key("client-1"), sim_dir.ca_cert) == files
    assert secagg_node_files(sim_dir, "nobody") is None
    with pytest.raises(ConfigError, match="must not start with 'secagg-'"):
        sim_dir.node_key("secagg-x")


def test_add_node_issues_identity_and_needs_the_ca_key(tmp_path: Path) -> None:
    layout = init_cert_dir(tmp_path / "c", nodes=1)
    add_nodes(layout.root, ["carol"])
    ident = read_node_identity(layout.secagg_node_key("carol"), layout.secagg_node_cert("carol"),
                               read_trust_anchor(layout.ca_cert))
    assert ident.name == "carol"
    assert stat.S_IMODE(layout.secagg_node_key("carol").stat().st_mode) == 0o600
    # the coordinator's copy: no ca.key
    layout.ca_key.rename(tmp_path / "offline-ca.key")
    with pytest.raises(CertificateError, match=r"ca\.key not found.*operator, off the coordinator"):
        add_nodes(layout.root, ["dave"])
    assert not layout.node_key("dave").exists() and not layout.secagg_node_key("dave").exists()
    # a ca.key of another directory cannot issue for this ca.crt
    other = init_cert_dir(tmp_path / "other", nodes=0)
    layout.ca_key.write_bytes(other.ca_key.read_bytes())
    with pytest.raises(CertificateError, match="not the key of"):
        add_nodes(layout.root, ["dave"])


def test_cli_add_node_has_days(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_deploy_parsers(parser.add_subparsers(dest="command", required=True))
    init = parser.parse_args(["certs", "init", str(tmp_path), "--nodes", "0"])
    assert init.func(init) == 0
    args = parser.parse_args(["certs", "add-node", str(tmp_path), "--name", "erin",
                              "--days", "10"])
    assert args.func(args) == 0
    cert = x509.load_pem_x509_certificate(CertLayout(tmp_path).secagg_node_cert("erin").read_bytes())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc < dt.timedelta(days=11)


# -- deployment node config --------------------------------------------------------------------
def test_node_config_carries_the_identity_and_is_checked(sim_dir: CertLayout,
                                                         tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    files = secagg_node_files(sim_dir, "client-0")
    assert files is not None
    f = tmp_path / "nc.toml"
    f.write_text(node_config_toml("client-0", 0, 2, tmp_path, files))
    nc = parse_config_args([str(f)])
    assert nc["secagg-node-key"] == str(files.key.resolve())
    assert nc["secagg-node-cert"] == str(files.cert.resolve())
    assert nc["secagg-ca"] == str(sim_dir.ca_cert.resolve())
    run = parse_run_config({})
    ident = load_node_identity(nc, run)
    assert ident is not None and ident.name == "client-0"
    assert "secagg" not in node_config_toml("client-0", 0, 2, tmp_path)  # no files: no keys
    check_secagg_files(files)
    other = init_cert_dir(tmp_path / "other", nodes=0)
    with pytest.raises(CertificateError, match="not issued by the federation CA"):
        check_secagg_files(type(files)(key=files.key, cert=files.cert, ca=other.ca_cert))


def test_load_node_identity_needs_all_three_keys(sim_dir: CertLayout, tmp_path: Path) -> None:
    run = parse_run_config({})
    assert load_node_identity({"partition-id": 0}, run) is None
    with pytest.raises(ConfigError, match=r"not \['secagg-node-cert', 'secagg-ca'\]"):
        load_node_identity({"secagg-node-key": str(sim_dir.secagg_node_key("client-0"))}, run)
    with pytest.raises(ConfigError, match="node config secagg-ca="):
        load_node_identity({"secagg-node-key": str(sim_dir.secagg_node_key("client-0")),
                            "secagg-node-cert": str(sim_dir.secagg_node_cert("client-0")),
                            "secagg-ca": str(tmp_path / "missing.crt")}, run)
    with pytest.raises(AuthenticationError, match="does not match"):
        load_node_identity({"secagg-node-key": str(sim_dir.secagg_node_key("client-1")),
                            "secagg-node-cert": str(sim_dir.secagg_node_cert("client-0")),
                            "secagg-ca": str(sim_dir.ca_cert)}, run)


# -- run-config knobs ----------------------------------------------------------------------------
def test_secagg_ca_knob(sim_dir: CertLayout, tmp_path: Path) -> None:
    assert parse_run_config({}).secagg_ca is None
    run = parse_run_config({"secagg-ca": str(sim_dir.ca_cert)})
    assert run.secagg_ca == sim_dir.ca_cert and run.secagg_sim_identities is None
    with pytest.raises(ConfigError, match=r"secagg-ca='.*missing\.crt' is not a file"):
        parse_run_config({"secagg-ca": str(tmp_path / "missing.crt")})
    with pytest.raises(ConfigError, match="secagg=false"):
        parse_run_config({"secagg-ca": str(sim_dir.ca_cert), "secagg": False})
    # a deployment client parses the coordinator's paths without checking them
    run = parse_run_config({"secagg-ca": "/on/the/coordinator/ca.crt"}, local_files=False)
    assert run.secagg_ca == Path("/on/the/coordinator/ca.crt")


def test_secagg_sim_identities_knob(sim_dir: CertLayout, tmp_path: Path) -> None:
    run = parse_run_config({"secagg-sim-identities": str(sim_dir.root)})
    assert run.secagg_sim_identities == sim_dir.root and run.secagg_ca == sim_dir.ca_cert
    other = init_cert_dir(tmp_path / "other", nodes=0)
    pinned = parse_run_config({"secagg-sim-identities": str(sim_dir.root),
                               "secagg-ca": str(other.ca_cert)})
    assert pinned.secagg_ca == other.ca_cert
    with pytest.raises(ConfigError, match="is not a directory"):
        parse_run_config({"secagg-sim-identities": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no ca.crt"):
        parse_run_config({"secagg-sim-identities": str(tmp_path / "empty")})
    with pytest.raises(ConfigError, match="secagg-sim-identities authenticates"):
        parse_run_config({"secagg-sim-identities": str(sim_dir.root), "secagg": False})
    # each virtual client: client-<partition-id>, or its client-id
    for node_config, name in (({"partition-id": 2}, "client-2"), ({"client-id": "client-3"},
                                                                  "client-3")):
        ident = load_node_identity(node_config, run)
        assert ident is not None and ident.name == name
    with pytest.raises(ConfigError, match="add-node .* --name client-9"):
        load_node_identity({"partition-id": 9}, run)
    with pytest.raises(AuthenticationError, match="not issued by the federation CA"):
        load_node_identity({"partition-id": 0}, pinned)


def test_client_runtime_takes_its_simulated_identity(sim_dir: CertLayout) -> None:
    from fedpeft.client.runtime import ClientIdentity, ClientRuntime

    run = parse_run_config({"secagg-sim-identities": str(sim_dir.root)})
    rt = ClientRuntime(run, ClientIdentity("client-1", 1, 4))
    assert rt.node_identity is not None and rt.node_identity.name == "client-1"
    assert ClientRuntime(parse_run_config({}), ClientIdentity("client-1", 1, 4)).node_identity is None


def test_coordinator_pins_secagg_ca(sim_dir: CertLayout, tmp_path: Path) -> None:
    from fedpeft.coordinator.server import Coordinator

    transport = _SessionTransport({}, SecAggConfig(clip=1.0), {}, {}, tmp_path)
    run = parse_run_config({"secagg-ca": str(sim_dir.ca_cert)})
    trust = Coordinator(run, transport, tmp_path / "a").trust
    assert trust is not None and trust.ca == read_trust_anchor(sim_dir.ca_cert).ca
    assert Coordinator(parse_run_config({}), transport, tmp_path / "b").trust is None


def test_coordinator_cli_authenticates_with_its_tls_ca(sim_dir: CertLayout,
                                                     tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_deploy_parsers(parser.add_subparsers(dest="command", required=True))

    def config(*extra: str, certs: Path = sim_dir.root) -> object:
        args = parser.parse_args(["coordinator", "--certs", str(certs), *extra])
        return _coordinator_config(args, tmp_path / "run", certs)["secagg-ca"]

    assert config() == str(sim_dir.ca_cert.resolve())  # the TLS CA authenticates SecAgg too
    assert config("--set", "secagg-ca=") == ""  # explicitly unauthenticated
    assert config("--set", "secagg=false") == ""
    assert config(certs=tmp_path / "no-such-dir") == ""  # start_superlink names what is missing


# -- one SecAgg+ round through the client session and the coordinator (no model) ---------------
class _SessionTransport:
    """Node i answers with :func:`start_session` / :func:`answer_stage` and its identity."""

    def __init__(self, identities: Mapping[int, NodeIdentity | None], cfg: SecAggConfig,
                 deltas: Mapping[int, dict[str, torch.Tensor]],
                 spec: Mapping[str, TensorSpec], tmp: Path) -> None:
        self.identities, self.cfg, self.deltas, self.spec, self.tmp = identities, cfg, deltas, spec, tmp
        self.states: dict[int, dict[str, bytes]] = {i: {} for i in identities}

    def node_ids(self) -> list[int]:
        return list(self.identities)

    def exchange(self, kind: str, messages: Mapping[int, Content],
                 timeout: float) -> dict[int, Reply]:
        out: dict[int, Reply] = {}
        for node, content in messages.items():
            try:
                if kind == KIND_TRAIN:
                    sent, _ = start_session(self.deltas[node], self.spec, self.cfg, content,
                                            self.states[node],
                                            node_identity=self.identities[node])
                else:
                    sent = {"message": answer_stage(
                        content, self.cfg, self.states[node], client_id=f"c{node}",
                        marker_dir=self.tmp / "markers",
                        node_identity=self.identities[node])}
            except Exception as exc:  # noqa: BLE001 - a refusing client is a fault
                out[node] = Reply(node, error=f"{type(exc).__name__}: {exc}")
                continue
            out[node] = Reply(node, content={STATUS_KEY: STATUS_OK, **sent})
        return out


def _round(sim_dir: CertLayout, tmp_path: Path, trust: TrustAnchor | None,
           identities: Mapping[int, NodeIdentity | None]) -> SecureRoundResult:
    spec = {"w": TensorSpec((3,), torch.float32)}
    deltas = {i: {"w": torch.full((3,), 0.1 * (i + 1))} for i in identities}
    cfg = SecAggConfig(clip=1.0, max_abort_prob=1.0)  # 4 clients: any abort risk is fine
    transport = _SessionTransport(identities, cfg, deltas, spec, tmp_path)
    return secure_round(transport, sorted(identities), {}, cfg, spec, b"s" * 24, 10.0,
                        trust=trust)


def test_authenticated_round_through_the_wiring(sim_dir: CertLayout, tmp_path: Path) -> None:
    run = parse_run_config({"secagg-sim-identities": str(sim_dir.root)})
    identities = {i: load_node_identity({"partition-id": i}, run) for i in range(4)}
    assert run.secagg_ca is not None
    trust = read_trust_anchor(run.secagg_ca)
    result = _round(sim_dir, tmp_path, trust, identities)
    assert result.abort_reason == "", result.abort_reason
    assert result.mean_delta is not None
    mean = result.mean_delta["w"].numpy()
    assert np.allclose(mean, 0.25, atol=1e-3)
    # a node certified by another CA (a sybil) is dropped by the coordinator's trust anchor
    other = init_cert_dir(tmp_path / "other", nodes=1, names=["client-3"])
    sybil = load_node_identity({"partition-id": 3},
                               parse_run_config({"secagg-sim-identities": str(other.root)}))
    mixed = _round(sim_dir, tmp_path / "d", trust, {**identities, 3: sybil})
    assert mixed.survivors == (0, 1, 2), mixed.faults
    # clients with identities refuse a coordinator that does not authenticate the round
    refused = _round(sim_dir, tmp_path / "b", None, identities)
    assert refused.mean_delta is None
    assert all("joins only authenticated rounds" in f["reason"] for f in refused.faults)
    # an authenticated round refuses clients without an identity
    bare = _round(sim_dir, tmp_path / "c", trust, dict.fromkeys(range(4)))
    assert bare.mean_delta is None
    assert all("no SecAgg node identity" in f["reason"] for f in bare.faults)
