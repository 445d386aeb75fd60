"""Certificate and SuperNode key building: SANs, signatures, file modes, no overwrite."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpeft.core.errors import ConfigError
from fedpeft.deploy.certs import (
    CertLayout,
    add_nodes,
    build_ca,
    build_server_cert,
    check_private_key_file,
    host_to_san,
    init_cert_dir,
    parse_allow_list,
    read_allow_list,
)
from fedpeft.deploy.commands import add_deploy_parsers
from fedpeft.deploy.errors import CertificateError, CertificateExistsError
from fedpeft.deploy.runner import node_config_toml, superlink_command, supernode_command


def _verify(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    pub = issuer.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_server_cert_sans_and_ca_signature() -> None:
    ca_key, ca = build_ca()
    _, cert = build_server_cert(ca_key, ca, ["coordinator.lan", "192.168.1.10", "::1"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coordinator.lan"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("192.168.1.10"), ipaddress.ip_address("::1")}
    _verify(cert, ca)
    _verify(ca, ca)
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_signature_from_another_ca_does_not_verify() -> None:
    ca_key, ca = build_ca()
    _, other = build_ca()
    _, cert = build_server_cert(ca_key, ca)
    from cryptography.exceptions import InvalidSignature
    with pytest.raises(InvalidSignature):
        _verify(cert, other)


def test_validity_and_expired_option() -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key, ca = build_ca(now=now)
    _, ok = build_server_cert(ca_key, ca, valid_days=30, now=now)
    assert ok.not_valid_before_utc <= now < ok.not_valid_after_utc
    assert abs(ok.not_valid_after_utc - now - dt.timedelta(days=30)) < dt.timedelta(seconds=1)
    _, old = build_server_cert(ca_key, ca, valid_days=30, expired=True, now=now)
    assert old.not_valid_after_utc < now
    with pytest.raises(ConfigError, match="valid_days=0"):
        build_server_cert(ca_key, ca, valid_days=0)


@pytest.mark.parametrize("bad", ["", "bad host", "-x.org", "a_b.org"])
def test_bad_host_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigError, match="host="):
        host_to_san(bad)


def test_init_writes_modes_and_flower_formats(tmp_path: Path) -> None:
    layout = init_cert_dir(tmp_path / "c", nodes=2)
    for key in (layout.ca_key, layout.server_key, layout.node_key("node-1"),
                layout.node_key("node-2")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for pub in (layout.ca_cert, layout.server_cert, layout.node_pub("node-1"), layout.allow_list):
        assert stat.S_IMODE(pub.stat().st_mode) & 0o077 != 0o077
    # the formats flower-supernode / `flwr supernode register` load
    priv = serialization.load_ssh_private_key(layout.node_key("node-1").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    assert priv.curve.name == "secp384r1"
    pub = serialization.load_ssh_public_key(layout.node_pub("node-1").read_bytes().split(b" node")[0])
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == priv.public_key().public_numbers()
    allowed = read_allow_list(layout.allow_list)
    assert [a.name for a in allowed] == ["node-1", "node-2"]
    srv = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    _verify(srv, ca)
    check_private_key_file(layout.server_key)


def test_no_overwrite_without_force(tmp_path: Path) -> None:
    layout = init_cert_dir(tmp_path, nodes=1)
    before = layout.ca_key.read_bytes()
    with pytest.raises(CertificateExistsError, match="ca.key"):
        init_cert_dir(tmp_path, nodes=1)
    assert layout.ca_key.read_bytes() == before
    layout.ca_key.chmod(0o644)  # forced rewrite must not inherit an old, wider mode
    init_cert_dir(tmp_path, nodes=1, force=True)
    assert layout.ca_key.read_bytes() != before
    assert stat.S_IMODE(layout.ca_key.stat().st_mode) == 0o600


def test_add_node_appends_to_allow_list_and_refuses_existing(tmp_path: Path) -> None:
    init_cert_dir(tmp_path, nodes=1)
    add_nodes(tmp_path, ["carol"])
    assert [a.name for a in read_allow_list(CertLayout(tmp_path).allow_list)] == ["node-1", "carol"]
    with pytest.raises(CertificateExistsError, match="carol.key"):
        add_nodes(tmp_path, ["carol"])


def test_allow_list_rejects_non_ec_and_garbage() -> None:
    with pytest.raises(CertificateError, match="allow:1"):
        parse_allow_list("not a key\n", "allow")
    ed = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x")
    with pytest.raises(CertificateError, match="EC"):
        parse_allow_list(ed, "allow")


def test_loose_private_key_mode_is_refused(tmp_path: Path) -> None:
    layout = init_cert_dir(tmp_path, nodes=1)
    layout.node_key("node-1").chmod(0o644)
    with pytest.raises(CertificateError, match="chmod 600"):
        check_private_key_file(layout.node_key("node-1"))


def test_command_lines_secure_by_default(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path)
    cmd = superlink_command(layout, "127.0.0.1", 9092)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(layout.server_cert)
    assert "--simulation" not in cmd
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_command(None, "127.0.0.1", 9092, node_auth=True)
    assert "--insecure" in superlink_command(None, "127.0.0.1", 9092, node_auth=False)
    sn = supernode_command(superlink="h:1", ca_cert=layout.ca_cert, node_key=tmp_path / "k",
                           node_config=tmp_path / "nc.toml", runtime_port=5)
    assert sn[sn.index("--isolation") + 1] == "process"
    assert sn[sn.index("--auth-supernode-private-key") + 1] == str(tmp_path / "k")
    with pytest.raises(ConfigError, match="needs TLS"):
        supernode_command(superlink="h:1", ca_cert=None, node_key=tmp_path / "k",
                          node_config=tmp_path / "nc.toml", runtime_port=5)


def test_node_config_toml_is_parsed_by_flower(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    state = tmp_path / 'we"ird dir'
    f = tmp_path / "nc.toml"
    f.write_text(node_config_toml('ali"ce', 1, 3, state))
    assert parse_config_args([str(f)]) == {"partition-id": 1, "num-partitions": 3,
                                           "client-id": 'ali"ce', "state-dir": str(state.resolve())}
    with pytest.raises(ConfigError, match="partition-id=3"):
        node_config_toml("a", 3, 3, state)


def test_cli_certs_init(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_deploy_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", "init", str(tmp_path), "--host", "edge.lan", "--nodes", "3"])
    assert args.func(args) == 0
    assert len(read_allow_list(CertLayout(tmp_path).allow_list)) == 3
    with pytest.raises(CertificateExistsError):
        args.func(args)


def test_check_server_cert_refuses_expired_and_foreign(tmp_path: Path) -> None:
    from fedpeft.deploy.certs import check_server_cert

    good = init_cert_dir(tmp_path / "good", nodes=0)
    check_server_cert(good)
    expired = init_cert_dir(tmp_path / "expired", nodes=0, expired=True)
    with pytest.raises(CertificateError, match="Renew"):
        check_server_cert(expired)
    other = init_cert_dir(tmp_path / "other", nodes=0)
    good.ca_cert.write_bytes(other.ca_cert.read_bytes())
    with pytest.raises(CertificateError, match="not signed by"):
        check_server_cert(good)
