"""Start, watch and stop the Flower deployment processes (SuperLink, SuperNodes, ``flwr run``).

Everything here drives Flower's own entry points as subprocesses (``flower-superlink``,
``flower-supernode``, ``flwr``); no transport of our own. Command lines are built by pure
functions (``superlink_command``, ``supernode_command``, ...) so they are testable without
starting anything. Every process is started in its own session and stopped by its pid.

Defaults are the safe ones: TLS with the federation's CA, and SuperNode authentication
(``--enable-supernode-auth``; each key of the allow-list is registered with ``flwr supernode
register``). Plain HTTP only with ``insecure=True``.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fedpeft.config import DEFAULTS, Scalar, parse_run_config
from fedpeft.deploy.certs import (
    CertLayout,
    check_private_key_file,
    check_server_cert,
    read_allow_list,
)
from fedpeft.deploy.errors import CertificateError, DeployError
from fedpeft.errors import ConfigError
from fedpeft.flower_process import (  # noqa: F401 - re-exported for callers of this module
    flwr_bin,
    flwr_env,
    free_port,
    stop_process,
    toml_table,
    toml_value,
    wait_healthy,
)

CONNECTION = "fedpeft-deploy"
DEFAULT_PORT = 9092
INSECURE_WARNING = (
    "\n!!! fedpeft: INSECURE MODE: no TLS, no SuperNode authentication. Model updates travel "
    "in clear text and ANY process that can reach {where} can join the federation. Use only "
    "on a trusted loopback/lab network. !!!\n")


# -- small helpers -----------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> dict[str, Scalar]:
    """``KEY=VALUE`` strings (``--set``) -> run config overrides, keys checked."""
    out: dict[str, Scalar] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in DEFAULTS:
            raise ConfigError(f"--set {key!r} is not a run config key; known: {sorted(DEFAULTS)}")
        out[key] = raw
    return out


def full_run_config(overrides: Mapping[str, object], run_dir: Path) -> dict[str, Scalar]:
    """Defaults + overrides, validated and typed (fails before anything starts)."""
    flat = {**DEFAULTS, **overrides, "run-dir": str(run_dir.resolve())}
    return parse_run_config(flat).as_flat()


def check_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"superlink={address!r} must be HOST:PORT, e.g. 192.168.1.10:9092")
    return host.strip("[]"), int(port)


# -- pure command lines ------------------------------------------------------------------------
def superlink_command(layout: CertLayout | None, host: str, port: int,
                      node_auth: bool = True) -> list[str]:
    """``flower-superlink`` in deployment mode; TLS from ``layout`` (None = insecure)."""
    cmd = [flwr_bin("flower-superlink"), "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port), "--database", ":flwr-in-memory:"]
    if layout is None:
        if node_auth:
            raise ConfigError("node_auth=True needs TLS: Flower refuses --enable-supernode-auth "
                              "with --insecure")
        return cmd + ["--insecure"]
    cmd += ["--ssl-ca-certfile", str(layout.ca_cert), "--ssl-certfile", str(layout.server_cert),
            "--ssl-keyfile", str(layout.server_key)]
    return cmd + (["--enable-supernode-auth"] if node_auth else [])


def connection_toml(address: str, root_certificates: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection named :data:`CONNECTION`."""
    body = f'address = "{address}"\n'
    body += ("insecure = true\n" if root_certificates is None
             else f"root-certificates = {json.dumps(str(root_certificates.resolve()))}\n")
    return f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n{body}'


def node_config_toml(client_id: str, partition_id: int, num_partitions: int,
                     state_dir: Path) -> str:
    """Node config as a TOML file: ``flower-supernode --node-config FILE.toml`` reads it with
    tomli, which avoids the quoting rules of the inline ``key="value" ...`` form."""
    if not client_id:
        raise ConfigError("client-id is empty; give each client a stable id")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id} is outside [0, num-partitions="
                          f"{num_partitions})")
    return toml_table({"partition-id": partition_id, "num-partitions": num_partitions,
                       "client-id": client_id, "state-dir": str(state_dir.resolve())})


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
    """The long-lived ClientApp executor (``client.warm_app``) for one node."""
    # Run as a script with -P (no script dir on sys.path) so that the ClientApp's own modules
    # (client, fedpeft, ...) are imported from the installed FAB, as in ``flwr-clientapp``.
    return [sys.executable, "-P", str(Path(__file__).resolve().parents[2] / "client" / "warm_app.py"),
            "--runtime-api-address", f"127.0.0.1:{runtime_port}", "--insecure",
            "--parent-pid", str(parent_pid)]


# -- the SuperLink -----------------------------------------------------------------------------
@dataclass
class SuperLink:
    """A running ``flower-superlink`` plus the ``flwr`` CLI connection to it."""

    proc: subprocess.Popen[bytes]
    run_dir: Path
    address: str
    layout: CertLayout | None
    log_file: Path

    @property
    def flwr_home(self) -> Path:
        return self.run_dir / ".flwr"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this SuperLink's connection."""
        return subprocess.run([flwr_bin("flwr"), *args], env=flwr_env(self.flwr_home),
                              capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=str(self.run_dir))

    def register(self, pub_file: Path, name: str) -> str:
        out = self.flwr("supernode", "register", str(pub_file), CONNECTION, "--name", name,
                        "--format", "json")
        m = re.search(r'"node-id":\s*"?(\d+)', out.stdout)
        if out.returncode != 0 or m is None:
            raise DeployError(f"`flwr supernode register {pub_file}` failed (exit "
                              f"{out.returncode}): {out.stdout[-400:]} {out.stderr[-400:]}")
        return m.group(1)

    def nodes(self) -> list[dict[str, str]]:
        out = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            raise DeployError(f"cannot read `flwr supernode ls`: {out.stdout[-400:]} "
                              f"{out.stderr[-400:]}") from None
        return [dict(n) for n in doc.get("nodes", [])]

    def online(self) -> int:
        return sum(1 for n in self.nodes() if n.get("status") == "online")

    def wait_for_nodes(self, count: int, timeout: float) -> None:
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

    def run_status(self, run_id: str) -> str:
        out = self.flwr("ls", CONNECTION, "--run-id", run_id, "--format", "json")
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
        except ValueError:
            raise DeployError(f"cannot read the run status from `flwr ls`: "
                              f"{out.stdout[-400:]} {out.stderr[-400:]}") from None
        for run in doc.get("runs", []):
            if str(run.get("run-id")) == run_id:
                return str(run.get("status", "unknown"))
        raise DeployError(f"`flwr ls` does not list run {run_id}")

    def stop(self) -> None:
        stop_process(self.proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, ca: Path | None, log_file: Path,
                  timeout: float, verify: bool = True) -> None:
    ctx = ssl.create_default_context(cafile=str(ca)) if ca is not None else None
    if ctx is not None and not verify:  # only for the deliberately expired test certificate
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    wait_healthy(proc, url, log_file, timeout, context=ctx, error=DeployError)


def start_superlink(certs: Path | None, run_dir: Path, *, host: str = "127.0.0.1",
                    port: int = DEFAULT_PORT, register: bool = True,
                    startup_timeout: float = 90, check_cert: bool = True) -> SuperLink:
    """Start ``flower-superlink`` (TLS + node auth unless ``certs`` is None = insecure) and
    register every key of the allow-list. The caller stops it (:meth:`SuperLink.stop`).

    ``check_cert=False`` (tests only) serves even an expired server certificate; nothing can
    then be registered, since ``flwr`` itself refuses the connection.
    """
    from simulations.launcher import project_root

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
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    port = port or free_port(host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    address = f"{connect_host}:{port}"
    (flwr_home / "config.toml").write_text(
        connection_toml(address, layout.ca_cert if layout is not None else None))
    log_file = run_dir / "superlink.log"
    cmd = superlink_command(layout, host, port, node_auth=layout is not None)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=str(project_root()), env=flwr_env(flwr_home),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    link = SuperLink(proc=proc, run_dir=run_dir, address=address, layout=layout,
                     log_file=log_file)
    try:
        scheme = "http" if layout is None else "https"
        _wait_healthy(proc, f"{scheme}://{address}/health",
                      layout.ca_cert if layout is not None else None, log_file, startup_timeout,
                      verify=check_cert)
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
    run_id: str
    status: str
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def submit_run(link: SuperLink, config: Mapping[str, Scalar], *, stream: bool = True,
               timeout: float = 6 * 3600, out: IO[str] | None = None) -> RunResult:
    """``flwr run <project> fedpeft-deploy --stream --run-config FILE``; wait; final status."""
    from simulations.launcher import project_root

    run_dir = Path(str(config["run-dir"]))
    run_dir.mkdir(parents=True, exist_ok=True)
    rc_file = link.run_dir / "run_config.toml"
    rc_file.write_text(toml_table(config))
    cmd = [flwr_bin("flwr"), "run", str(project_root()), CONNECTION, "--stream",
           "--run-config", str(rc_file)]
    proc = subprocess.Popen(cmd, env=flwr_env(link.flwr_home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=str(link.run_dir),
                            start_new_session=True)
    run_id = ""
    deadline = time.monotonic() + timeout
    try:
        pipe = proc.stdout
        if pipe is None:
            raise DeployError("no output pipe from `flwr run`")
        with open(link.run_dir / "flwr-run.log", "ab") as log:
            for raw in pipe:
                log.write(raw)
                line = raw.decode(errors="replace")
                if not run_id:
                    m = re.search(r"Successfully started run (\d+)", line)
                    run_id = m.group(1) if m else ""
                if stream:
                    (out or sys.stdout).write(line)
                    (out or sys.stdout).flush()
                if time.monotonic() > deadline:
                    raise DeployError(f"`flwr run` still running after {timeout:.0f}s")
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop_process(proc)
    if not run_id:
        raise DeployError(f"`flwr run` did not start a run (exit {code}); see "
                          f"{link.run_dir / 'flwr-run.log'}")
    status = link.run_status(run_id)
    wait_until = time.monotonic() + 60
    while not status.startswith("finished") and time.monotonic() < wait_until:
        time.sleep(1)
        status = link.run_status(run_id)
    return RunResult(run_id=run_id, status=status, run_dir=run_dir)


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
        return self.supernode.poll()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.is_file() else ""

    def stop(self) -> None:
        stop_process(self.worker)
        stop_process(self.supernode)


def start_client(*, superlink: str, client_id: str, partition_id: int, num_partitions: int,
                 state_dir: Path, ca_cert: Path | None, node_key: Path | None,
                 warm: bool = True, max_wait_time: float | None = None,
                 to_files: bool = True) -> ClientNode:
    """Start one client: ``flower-supernode`` (+ the warm executor). ``ca_cert=None`` and
    ``node_key=None`` = insecure. Logs go to ``state_dir`` (or this terminal)."""
    check_host_port(superlink)
    if ca_cert is not None and not ca_cert.is_file():
        raise CertificateError(f"CA certificate {ca_cert} not found; copy ca.crt from the "
                               "coordinator's certificate directory")
    if node_key is not None:
        check_private_key_file(node_key)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = state_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    nc_file = state_dir / "node_config.toml"
    nc_file.write_text(node_config_toml(client_id, partition_id, num_partitions, state_dir))
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
