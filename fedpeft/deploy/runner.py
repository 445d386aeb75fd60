"""Start, watch and stop the Flower deployment processes (SuperLink, SuperNodes, ``flwr run``).

Everything here drives Flower's own entry points as subprocesses (``flower-superlink``,
``flower-supernode``, ``flwr``); no transport of our own. Command lines are built by pure
functions (``superlink_command``, ``supernode_command``, ...) so they are testable without
starting anything. Every process is started in its own session and stopped by its pid.

The SuperLink lifecycle and the ``flwr run`` submit / stream / final-status loop are the
shared handle :class:`fedpeft.launch.superlink.SuperLink` (also used by the simulation
launcher); :class:`SuperLink` here adds what only a deployment has: TLS material from a
``fedpeft certs`` directory and the SuperNodes (registration, listing, waiting). The warm
ClientApp executor is :mod:`fedpeft.client.warm_app`.

Defaults are the safe ones: TLS with the federation's CA, and SuperNode authentication
(``--enable-supernode-auth``; each key of the allow-list is registered with ``flwr supernode
register``). Plain HTTP only with ``insecure=True``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedpeft.client.node_identity import NODE_CA, NODE_CERT, NODE_KEY
from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.core.protocol import Scalar
from fedpeft.deploy.certs import (
    CertLayout,
    SecAggNodeFiles,
    check_private_key_file,
    check_server_cert,
    read_allow_list,
)
from fedpeft.deploy.errors import CertificateError, DeployError
from fedpeft.launch import superlink as _superlink
from fedpeft.launch.process import (  # noqa: F401 - re-exported for callers of this module
    flwr_bin,
    flwr_env,
    free_port,
    stop_process,
    toml_table,
    toml_value,
    wait_healthy,
)
from fedpeft.launch.superlink import DEFAULT_RUN_TIMEOUT, ServerTls
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.runconfig.secagg_identity import read_node_identity, read_trust_anchor

CONNECTION = "fedpeft-deploy"
"""Name of the ``flwr`` CLI connection to the coordinator's SuperLink."""
DEFAULT_PORT = 9092
"""The SuperLink's default Fleet API port (``fedpeft coordinator --port``)."""
INSECURE_WARNING = (
    "\n!!! fedpeft: INSECURE MODE: no TLS, no SuperNode authentication. Model updates travel "
    "in clear text and ANY process that can reach {where} can join the federation. Use only "
    "on a trusted loopback/lab network. !!!\n")
"""Printed by ``--insecure`` commands (``{where}``: the address that is exposed)."""


# -- small helpers -----------------------------------------------------------------------------
def full_run_config(overrides: Mapping[str, object], run_dir: Path) -> dict[str, Scalar]:
    """Defaults + overrides, validated and typed (fails before anything starts)."""
    flat = {**DEFAULTS, **overrides, "run-dir": str(run_dir.resolve())}
    return parse_run_config(flat).as_flat()


def check_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts may be bracketed) -> ``(host, port)``, or :class:`ConfigError`."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"superlink={address!r} must be HOST:PORT, e.g. 192.168.1.10:9092")
    return host.strip("[]"), int(port)


# -- pure command lines ------------------------------------------------------------------------
def superlink_command(layout: CertLayout | None, host: str, port: int,
                      node_auth: bool = True) -> list[str]:
    """``flower-superlink`` in deployment mode; TLS from ``layout`` (None = insecure)."""
    tls = (None if layout is None else
           ServerTls(ca_cert=layout.ca_cert, certfile=layout.server_cert,
                     keyfile=layout.server_key))
    return _superlink.superlink_command(host, port, tls=tls, node_auth=node_auth)


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection named :data:`CONNECTION`."""
    return _superlink.connection_toml(CONNECTION, address, root_certificates)


def node_config_toml(client_id: str, partition_id: int, num_partitions: int,
                     state_dir: Path, secagg: SecAggNodeFiles | None = None) -> str:
    """Node config as a TOML file: ``flower-supernode --node-config FILE.toml`` reads it with
    tomli, which avoids the quoting rules of the inline ``key="value" ...`` form.

    ``secagg`` (the node's SecAgg+ identity files, :func:`fedpeft.deploy.certs.secagg_node_files`)
    adds ``secagg-node-key``, ``secagg-node-cert`` and ``secagg-ca``
    (:func:`fedpeft.client.node_identity.load_node_identity` reads them): the node then joins
    only authenticated rounds."""
    if not client_id:
        raise ConfigError("client-id is empty; give each client a stable id")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside [0, num-partitions="
                          f"{num_partitions})")
    table: dict[str, Scalar] = {"partition-id": partition_id, "num-partitions": num_partitions,
                                "client-id": client_id, "state-dir": str(state_dir.resolve())}
    if secagg is not None:
        table.update({NODE_KEY: str(secagg.key.resolve()), NODE_CERT: str(secagg.cert.resolve()),
                      NODE_CA: str(secagg.ca.resolve())})
    return toml_table(table)


def check_secagg_files(secagg: SecAggNodeFiles) -> None:
    """Refuse to start a node whose SecAgg+ identity would be refused mid-round: a loose key
    mode, a certificate not issued by its CA, expired, not for SecAgg, or not the key's."""
    check_private_key_file(secagg.key)
    try:
        read_node_identity(secagg.key, secagg.cert, read_trust_anchor(secagg.ca))
    except FedPeftError as exc:
        raise CertificateError(f"SecAgg identity {secagg.cert} (key {secagg.key}, CA "
                               f"{secagg.ca}) is refused: {exc}") from None


def supernode_command(*, superlink: str, ca_cert: Path | None, node_key: Path | None,
                      node_config: Path, runtime_port: int, warm: bool = True,
                      max_wait_time: float | None = None) -> list[str]:
    """``flower-supernode``: TLS root certificates + auth key (both None = insecure)."""
    cmd = [flwr_bin("flower-supernode"), "--superlink", superlink,
           "--node-config", str(node_config), "--host", "127.0.0.1", "--port", str(runtime_port),
           "--isolation", "process" if warm else "subprocess"]
    if ca_cert is None:
        if node_key is not None:
            raise ConfigError("node_key needs TLS: Flower refuses SuperNode authentication on "
                              "an insecure connection")
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca_cert)]
        if node_key is not None:
            cmd += ["--auth-supernode-private-key", str(node_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd


def warm_worker_command(runtime_port: int, parent_pid: int) -> list[str]:
    """The long-lived ClientApp executor (:mod:`fedpeft.client.warm_app`) for one node."""
    # Imported here, not at module level: the executor imports Flower, which nothing else in
    # fedpeft.deploy needs. Run as a script with -P (no script dir on sys.path) so that the
    # ClientApp's modules come from the installed fedpeft namespace (the FAB carries no code,
    # docs/deployment.md), as in ``flwr-clientapp``.
    from fedpeft.client import warm_app

    return [sys.executable, "-P", str(Path(warm_app.__file__).resolve()),
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            "--parent-pid", str(parent_pid)]


# -- the SuperLink -----------------------------------------------------------------------------
@dataclass
class SuperLink(_superlink.SuperLink):
    """The coordinator's running ``flower-superlink`` (the shared handle, raising
    :class:`DeployError`), plus its TLS ``layout`` and the SuperNodes registered with it."""

    layout: CertLayout | None = None

    def register(self, pub_file: Path, name: str) -> str:
        """``flwr supernode register PUB_FILE`` (a node's public key); returns its node id."""
        out = self.flwr("supernode", "register", str(pub_file), self.connection, "--name", name,
                        "--format", "json")
        m = re.search(r'"node-id":\s*"?(\d+)', out.stdout)
        if out.returncode != 0 or m is None:
            raise DeployError(f"`flwr supernode register {pub_file}` failed (exit "
                              f"{out.returncode}): {out.stdout[-400:]} {out.stderr[-400:]}")
        return m.group(1)

    def nodes(self) -> list[dict[str, str]]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``)."""
        out = self.flwr("supernode", "ls", self.connection, "--format", "json")
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            raise DeployError(f"cannot read `flwr supernode ls`: {out.stdout[-400:]} "
                              f"{out.stderr[-400:]}") from None
        return [dict(n) for n in doc.get("nodes", [])]

    def online(self) -> int:
        """How many SuperNodes are online now."""
        return sum(1 for n in self.nodes() if n.get("status") == "online")

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        """Until ``count`` SuperNodes are online; :class:`DeployError` after ``timeout`` s
        or if the SuperLink exits."""
        deadline = time.monotonic() + timeout
        seen = self.online()
        while seen < count:
            if self.proc.poll() is not None:
                raise DeployError(f"flower-superlink exited ({self.proc.returncode}); see "
                                  f"{self.log_file}")
            if time.monotonic() > deadline:
                raise DeployError(f"only {seen} of {count} SuperNodes came online within "
                                  f"{timeout:.0f}s; check the clients' logs (a node whose key "
                                  "is not in the allow-list, or whose CA differs, is refused)")
            time.sleep(2)
            seen = self.online()


def start_superlink(certs: Path | None, run_dir: Path, *, host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, register: bool = True,
                    startup_timeout: float = 90, check_cert: bool = True) -> SuperLink:
    """Start ``flower-superlink`` (TLS + node auth unless ``certs`` is None = insecure) and
    register every key of the allow-list. The caller stops it (:meth:`SuperLink.stop`).
    ``port=0`` picks a free port.

    ``check_cert=False`` (tests only) serves even an expired server certificate; nothing can
    then be registered, since ``flwr`` itself refuses the connection.
    """
    run_dir = run_dir.resolve()
    layout = CertLayout(certs.resolve()) if certs is not None else None
    if layout is not None:
        for path in (layout.ca_cert, layout.server_cert, layout.server_key):
            if not path.is_file():
                raise CertificateError(f"{path} not found; create the certificates with "
                                       f"`fedpeft certs init {certs}`")
        check_private_key_file(layout.server_key)
        if check_cert:
            check_server_cert(layout)
        elif register:
            raise ConfigError("check_cert=False serves a certificate clients refuse: "
                              "registering nodes through it cannot work; pass register=False")
    allowed = read_allow_list(layout.allow_list) if layout is not None and register else []
    port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    link = SuperLink.start(
        superlink_command(layout, host, port, node_auth=layout is not None),
        run_dir=run_dir, address=f"{connect_host}:{port}", connection=CONNECTION,
        root_certificates=layout.ca_cert if layout is not None else None, verify=check_cert,
        startup_timeout=startup_timeout, error=DeployError)
    link.layout = layout
    try:
        if allowed:
            keys_dir = run_dir / "allowed-keys"
            keys_dir.mkdir(exist_ok=True)
            for i, key in enumerate(allowed):
                pub = keys_dir / f"{i:03d}-{key.name}.pub"
                pub.write_text(key.line + "\n")
                link.register(pub, key.name)
    except BaseException:
        link.stop()
        raise
    return link


@dataclass(frozen=True)
class RunResult:
    """A deployment run: its id, final status and output directory (the config's run-dir)."""

    run_id: str
    status: str
    run_dir: Path

    @property
    def ok(self) -> bool:
        """Whether the run ended ``finished:completed``."""
        return self.status == _superlink.COMPLETED


def submit_run(link: SuperLink, config: Mapping[str, Scalar], *, stream: bool = True,
               timeout: float = DEFAULT_RUN_TIMEOUT, out: IO[str] | None = None) -> RunResult:
    """``flwr run <project> fedpeft-deploy --stream --run-config FILE``; wait; final status."""
    run_dir = Path(str(config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    done = link.run(config, stream=stream, out=out, timeout=timeout)
    return RunResult(run_id=done.run_id, status=done.status, run_dir=run_dir)


# -- a client (SuperNode + warm ClientApp executor) --------------------------------------------
@dataclass
class ClientNode:
    """A running ``flower-supernode`` and, in warm mode, its long-lived ClientApp executor."""

    supernode: subprocess.Popen[bytes]
    worker: subprocess.Popen[bytes] | None
    state_dir: Path
    log_file: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def poll(self) -> int | None:
        """The SuperNode's exit code, or None while it runs."""
        return self.supernode.poll()

    def log_text(self) -> str:
        """The SuperNode's log so far (empty when it logs to the terminal)."""
        return self.log_file.read_text(errors="replace") if self.log_file.is_file() else ""

    def stop(self) -> None:
        """Stop the warm executor, then the SuperNode (each by its process group)."""
        stop_process(self.worker)
        stop_process(self.supernode)


def start_client(*, superlink: str, client_id: str, partition_id: int, num_partitions: int,
                 state_dir: Path, ca_cert: Path | None, node_key: Path | None,
                 warm: bool = True, max_wait_time: float | None = None,
                 to_files: bool = True, secagg: SecAggNodeFiles | None = None) -> ClientNode:
    """Start one client: ``flower-supernode`` (+ the warm executor). ``ca_cert=None`` and
    ``node_key=None`` = insecure. Logs go to ``state_dir`` (or this terminal). ``secagg``:
    the node's SecAgg+ identity (checked now; written to its node config), so that it joins
    only rounds authenticated by that CA (the coordinator's run config ``secagg-ca``)."""
    check_host_port(superlink)
    if ca_cert is not None and not ca_cert.is_file():
        raise CertificateError(f"CA certificate {ca_cert} not found; copy ca.crt from the "
                               "coordinator's certificate directory")
    if node_key is not None:
        check_private_key_file(node_key)
    if secagg is not None:
        check_secagg_files(secagg)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    nc_file = state_dir / "node_config.toml"
    nc_file.write_text(node_config_toml(client_id, partition_id, num_partitions, state_dir,
                                        secagg))
    runtime_port = free_port()
    cmd = supernode_command(superlink=superlink, ca_cert=ca_cert, node_key=node_key,
                            node_config=nc_file, runtime_port=runtime_port, warm=warm,
                            max_wait_time=max_wait_time)
    log_file = state_dir / "supernode.log"
    env = flwr_env(flwr_home)
    sink: IO[bytes] | None = open(log_file, "ab") if to_files else None  # noqa: SIM115
    try:
        supernode = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(state_dir))
        worker = None
        if warm:
            wsink: IO[bytes] | None = open(state_dir / "clientapp.log", "ab") if to_files else None  # noqa: SIM115
            try:
                worker = subprocess.Popen(warm_worker_command(runtime_port, supernode.pid),
                                          env=env, stdout=wsink, stderr=subprocess.STDOUT,
                                          start_new_session=True, cwd=str(state_dir))
            finally:
                if wsink is not None:
                    wsink.close()
    finally:
        if sink is not None:
            sink.close()
    return ClientNode(supernode=supernode, worker=worker, state_dir=state_dir,
                      log_file=log_file)
