"""A real deployment on loopback: SuperLink with TLS + SuperNode auth, authenticated
SuperNodes with the warm ClientApp executor, and the nodes that must be refused.

Every process is started in its own session and stopped by pid in ``finally`` blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedpeft.deploy.certs import CertLayout, init_cert_dir
from fedpeft.deploy.errors import CertificateError
from fedpeft.deploy.runner import (
    ClientNode,
    SuperLink,
    full_run_config,
    start_client,
    start_superlink,
    submit_run,
)

pytestmark = pytest.mark.integration

REFUSAL_TIMEOUT = 60.0  # a refused node must have exited by then


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertLayout:
    return init_cert_dir(tmp_path_factory.mktemp("certs"), nodes=2, names=["alice", "bob"])


@pytest.fixture(scope="module")
def link(certs: CertLayout, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperLink]:
    sl = start_superlink(certs.root, tmp_path_factory.mktemp("coordinator"), port=0)
    try:
        yield sl
    finally:
        sl.stop()
    assert sl.proc.poll() is not None


def _refused(node: ClientNode) -> tuple[int, str]:
    try:
        code = node.supernode.wait(timeout=REFUSAL_TIMEOUT)
    finally:
        node.stop()
    if node.worker is not None:
        assert node.worker.poll() is not None
    return code, node.log_text()


def test_registered_keys_are_listed(link: SuperLink) -> None:
    nodes = link.nodes()
    assert len(nodes) == 2 and {n["status"] for n in nodes} == {"registered"}


def test_node_with_unlisted_key_is_refused(link: SuperLink, certs: CertLayout,
                                           tmp_path: Path) -> None:
    other = init_cert_dir(tmp_path / "other-keys", nodes=1, names=["mallory"])
    node = start_client(superlink=link.address, client_id="mallory", partition_id=0,
                        num_partitions=2, state_dir=tmp_path / "s", ca_cert=certs.ca_cert,
                        node_key=other.node_key("mallory"), max_wait_time=20)
    code, log = _refused(node)
    assert code != 0
    assert "Failed to activate SuperNode" in log
    assert link.online() == 0 and len(link.nodes()) == 2


def test_node_trusting_another_ca_is_refused(link: SuperLink, certs: CertLayout,
                                             tmp_path: Path) -> None:
    other = init_cert_dir(tmp_path / "other-ca", nodes=0)
    node = start_client(superlink=link.address, client_id="alice", partition_id=0,
                        num_partitions=2, state_dir=tmp_path / "s", ca_cert=other.ca_cert,
                        node_key=certs.node_key("alice"), max_wait_time=20)
    code, log = _refused(node)
    assert code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in log and "unable to get local issuer" in log
    assert link.online() == 0


def test_expired_server_certificate(tmp_path: Path) -> None:
    exp = init_cert_dir(tmp_path / "expired", nodes=1, expired=True)
    with pytest.raises(CertificateError, match="renew|Renew"):
        start_superlink(exp.root, tmp_path / "refused", port=0)  # refused before starting
    sl = start_superlink(exp.root, tmp_path / "coord", port=0, check_cert=False, register=False)
    try:
        node = start_client(superlink=sl.address, client_id="a", partition_id=0,
                            num_partitions=1, state_dir=tmp_path / "s", ca_cert=exp.ca_cert,
                            node_key=exp.node_key("node-1"), max_wait_time=20, warm=False)
        code, log = _refused(node)
        assert code != 0
        assert "certificate has expired" in log
    finally:
        sl.stop()


def test_tls_auth_federation_completes(link: SuperLink, certs: CertLayout, tmp_path: Path,
                                       tiny: Callable[..., dict[str, object]]) -> None:
    nodes: list[ClientNode] = []
    try:
        for i, name in enumerate(["alice", "bob"]):
            nodes.append(start_client(superlink=link.address, client_id=name, partition_id=i,
                                      num_partitions=2, state_dir=tmp_path / name,
                                      ca_cert=certs.ca_cert, node_key=certs.node_key(name)))
        link.wait_for_nodes(2, timeout=90)
        config = full_run_config(tiny(**{"num-rounds": 1}), tmp_path / "run")
        t0 = time.monotonic()
        result = submit_run(link, config, stream=False, timeout=240)
        assert result.ok, (result.status, (link.run_dir / "flwr-run.log").read_text()[-3000:])
        assert time.monotonic() - t0 < 240
        adapter = tmp_path / "run" / "checkpoints" / "round-0001" / "adapter"
        assert adapter.is_dir() and any(adapter.iterdir())
        for node in nodes:  # the warm executor served the round and is still alive
            assert node.worker is not None and node.worker.poll() is None
            assert node.supernode.poll() is None
            assert "task 1 done" in (node.state_dir / "clientapp.log").read_text()
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert node.supernode.poll() is not None
        assert node.worker is not None and node.worker.poll() is not None


@pytest.mark.slow
def test_authenticated_secagg_deployment_completes(tmp_path_factory: pytest.TempPathFactory,
                                                   tmp_path: Path,
                                                   tiny: Callable[..., dict[str, object]]) -> None:
    """Three real SuperNodes with their SecAgg identities (node config) against a coordinator
    pinning the CA (secagg-ca): the round runs authenticated, consistency check included."""
    from fedpeft.deploy.certs import secagg_node_files

    names = ["alice", "bob", "carol"]
    certs = init_cert_dir(tmp_path_factory.mktemp("certs3"), nodes=3, names=names)
    sl = start_superlink(certs.root, tmp_path_factory.mktemp("coordinator3"), port=0)
    nodes: list[ClientNode] = []
    try:
        for i, name in enumerate(names):
            nodes.append(start_client(superlink=sl.address, client_id=name, partition_id=i,
                                      num_partitions=3, state_dir=tmp_path / name,
                                      ca_cert=certs.ca_cert, node_key=certs.node_key(name),
                                      secagg=secagg_node_files(certs, name)))
        sl.wait_for_nodes(3, timeout=90)
        config = full_run_config(tiny(**{"num-rounds": 1, "secagg": True, "weighting": "uniform",
                                         "secagg-dropout": 0.02, "secagg-ca": str(certs.ca_cert)}),
                                 tmp_path / "run")
        result = submit_run(sl, config, stream=False, timeout=300)
        assert result.ok, (result.status, (sl.run_dir / "flwr-run.log").read_text()[-3000:])
        rows = (tmp_path / "run" / "metrics.jsonl").read_text()
        assert '"survivors": 3' in rows
        for node in nodes:  # each node's session answered the consistency check once
            markers = list((node.state_dir).rglob("*.consistency-*"))
            assert len(markers) == 1, [p.name for p in node.state_dir.rglob("*")][:20]
    finally:
        for node in nodes:
            node.stop()
        sl.stop()
