"""One handle on a running ``flower-superlink``, shared by the simulation launcher
(``fedpeft.simulations.launcher``) and the deployment runner (``fedpeft.deploy.runner``).

:class:`SuperLink` starts the SuperLink from a command line built by the pure
:func:`superlink_command` (insecure simulation mode, or TLS deployment mode), writes the
``$FLWR_HOME/config.toml`` connection the ``flwr`` CLI uses, waits until ``/health`` answers,
submits ``flwr run --stream`` (its output goes to ``flwr-run.log`` and optionally a terminal;
the run id is parsed from it), reads the final status with ``flwr ls --format json``, and
stops the process group. No Flower import: subprocesses only.

Pitfalls of flwr 1.42 handled here:

* ``flwr run`` against its managed local SuperLink runs ``uv sync`` for the app (fails offline,
  or pulls a CUDA torch): we start our own with ``--disable-runtime-dependency-installation``.
* ``flwr run`` exits 0 even when the run ended ``finished:failed``: the final status comes from
  ``flwr ls --format json``; the caller decides what anything but ``finished:completed`` means.
* ``flwr`` moves ``[tool.flwr.federations]`` into ``$FLWR_HOME/config.toml`` on first use:
  ``FLWR_HOME`` is ``<run_dir>/.flwr``, never the user's home; telemetry is off.
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
from typing import IO, Self

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.core.protocol import Scalar
from fedpeft.launch.process import (
    FlowerProcessError,
    flwr_bin,
    flwr_env,
    stop_process,
    toml_table,
    wait_healthy,
)

COMPLETED = "finished:completed"
DEFAULT_RUN_TIMEOUT = 6 * 3600.0
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")


def project_root(error: type[FedPeftError] = FlowerProcessError) -> Path:
    """The directory holding the Flower app's ``pyproject.toml`` (this source tree)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file():
        raise error(f"no pyproject.toml in {root}: run from a source checkout installed with "
                    "`pip install -e .`")
    return root


# -- pure pieces -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's TLS files: the CA (also the clients' root certificate), its own
    certificate and private key."""

    ca_cert: Path
    certfile: Path
    keyfile: Path


def superlink_command(host: str, port: int, *, simulation: bool = False,
                      tls: ServerTls | None = None, node_auth: bool = False) -> list[str]:
    """``flower-superlink`` on ``host:port`` with an in-memory database and no runtime
    dependency installation; ``--simulation`` for the simulation engine; TLS from ``tls``
    (None = ``--insecure``); ``node_auth`` (TLS only) adds ``--enable-supernode-auth``."""
    cmd = [flwr_bin("flower-superlink"), "--disable-runtime-dependency-installation",
           "--host", host, "--port", str(port), "--database", ":flwr-in-memory:"]
    if simulation:
        cmd.append("--simulation")
    if tls is None:
        if node_auth:
            raise ConfigError("node_auth=True needs TLS: Flower refuses --enable-supernode-auth "
                              "with --insecure")
        return cmd + ["--insecure"]
    cmd += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.certfile),
            "--ssl-keyfile", str(tls.keyfile)]
    return cmd + (["--enable-supernode-auth"] if node_auth else [])


def connection_toml(name: str, address: str, root_certificates: Path | None) -> str:
    """``$FLWR_HOME/config.toml`` with one default SuperLink connection ``name``
    (``insecure = true`` when ``root_certificates`` is None)."""
    body = f'address = "{address}"\n'
    body += ("insecure = true\n" if root_certificates is None
             else f"root-certificates = {json.dumps(str(root_certificates.resolve()))}\n")
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n{body}'


def flwr_run_command(app: Path, connection: str, run_config: Path,
                     federation_config: str | None = None) -> list[str]:
    """``flwr run APP CONNECTION --stream --run-config FILE [--federation-config ...]``."""
    cmd = [flwr_bin("flwr"), "run", str(app), connection, "--stream",
           "--run-config", str(run_config)]
    return cmd + (["--federation-config", federation_config] if federation_config else [])


def parse_run_id(line: str) -> str | None:
    """The run id in ``flwr run``'s "Successfully started run N" line, else None."""
    m = _RUN_STARTED.search(line)
    return m.group(1) if m else None


def status_from_ls(out: subprocess.CompletedProcess[str], run_id: str, *,
                   error: type[FedPeftError] = FlowerProcessError) -> str:
    """The status of ``run_id`` (e.g. ``finished:completed``) in ``flwr ls --format json``'s
    output; ``error`` when the output is unreadable or does not list the run."""
    try:
        doc = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        raise error(f"cannot read the run status from `flwr ls`: {out.stdout[-500:]} "
                    f"{out.stderr[-500:]}") from None
    for run in doc.get("runs", []):
        if str(run.get("run-id")) == run_id:
            return str(run.get("status", "unknown"))
    raise error(f"`flwr ls` does not list run {run_id}")


# -- the flwr CLI ------------------------------------------------------------------------------
def flwr_cli(flwr_home: Path, *args: str, extra_env: Mapping[str, str] | None = None,
             cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` with ``FLWR_HOME=flwr_home`` (output captured, exit not checked)."""
    env = {**flwr_env(flwr_home), **(extra_env or {})}
    return subprocess.run([flwr_bin("flwr"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False,
                          cwd=str(cwd) if cwd is not None else None)


def run_status(flwr_home: Path, connection: str, run_id: str, *,
               extra_env: Mapping[str, str] | None = None,
               error: type[FedPeftError] = FlowerProcessError) -> str:
    """Status of a run as the SuperLink of ``connection`` reports it (``flwr ls``)."""
    out = flwr_cli(flwr_home, "ls", connection, "--run-id", run_id, "--format", "json",
                   extra_env=extra_env)
    return status_from_ls(out, run_id, error=error)


@dataclass(frozen=True)
class FinishedRun:
    """A run submitted with ``flwr run``: its id and final status."""

    run_id: str
    status: str

    @property
    def completed(self) -> bool:
        """Whether the run ended ``finished:completed``."""
        return self.status == COMPLETED


# -- the handle --------------------------------------------------------------------------------
@dataclass
class SuperLink:
    """A running ``flower-superlink`` plus the ``flwr`` CLI connection to it.

    ``run_dir`` holds ``superlink.log``, ``run_config.toml``, ``flwr-run.log`` and ``FLWR_HOME``
    (``.flwr``); ``error`` is the error type every failure here raises.
    """

    proc: subprocess.Popen[bytes]
    run_dir: Path
    address: str
    log_file: Path
    connection: str
    extra_env: Mapping[str, str] = field(default_factory=dict)
    error: type[FedPeftError] = FlowerProcessError

    @classmethod
    def start(cls, command: Sequence[str], *, run_dir: Path, address: str, connection: str,
              root_certificates: Path | None = None, verify: bool = True,
              extra_env: Mapping[str, str] | None = None, startup_timeout: float = 90,
              error: type[FedPeftError] = FlowerProcessError) -> Self:
        """Write the ``connection`` to ``address`` into ``<run_dir>/.flwr/config.toml``, start
        ``command`` (from :func:`superlink_command`) and wait until ``/health`` answers
        (``https`` with ``root_certificates``; ``verify=False``, tests only, accepts any
        server certificate). The caller stops it (:meth:`stop`)."""
        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        flwr_home = run_dir / ".flwr"
        flwr_home.mkdir(exist_ok=True)
        (flwr_home / "config.toml").write_text(
            connection_toml(connection, address, root_certificates))
        log_file = run_dir / "superlink.log"
        env = {**flwr_env(flwr_home), **(extra_env or {})}
        with open(log_file, "ab") as log:
            proc = subprocess.Popen(list(command), cwd=str(project_root(error)), env=env,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        link = cls(proc=proc, run_dir=run_dir, address=address, log_file=log_file,
                   connection=connection, extra_env=dict(extra_env or {}), error=error)
        try:
            ctx = (ssl.create_default_context(cafile=str(root_certificates))
                   if root_certificates is not None else None)
            if ctx is not None and not verify:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            scheme = "http" if root_certificates is None else "https"
            wait_healthy(proc, f"{scheme}://{address}/health", log_file, startup_timeout,
                         context=ctx, error=error)
        except BaseException:
            link.stop()
            raise
        return link

    @property
    def flwr_home(self) -> Path:
        """The run-local ``FLWR_HOME`` holding the connection's ``config.toml``."""
        return self.run_dir / ".flwr"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this SuperLink's connection (in ``run_dir``)."""
        return flwr_cli(self.flwr_home, *args, extra_env=self.extra_env, cwd=self.run_dir,
                        timeout=timeout)

    def run_status(self, run_id: str) -> str:
        """Current status of ``run_id`` (``flwr ls --format json``)."""
        out = self.flwr("ls", self.connection, "--run-id", run_id, "--format", "json")
        return status_from_ls(out, run_id, error=self.error)

    def final_status(self, run_id: str, wait: float = 60) -> str:
        """Status of ``run_id`` once it starts with ``finished`` (or after ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        status = self.run_status(run_id)
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(1)
            status = self.run_status(run_id)
        return status

    def submit(self, config: Mapping[str, Scalar], *, federation_config: str | None = None,
               stream: bool = True, out: IO[str] | None = None,
               timeout: float = DEFAULT_RUN_TIMEOUT) -> str:
        """``flwr run`` this source tree's app with ``config`` (written to
        ``run_config.toml``); stream its output to ``flwr-run.log`` (and to ``out``, default
        stdout, if ``stream``) until it exits; return the run id."""
        rc_file = self.run_dir / "run_config.toml"
        rc_file.write_text(toml_table(config))
        log_path = self.run_dir / "flwr-run.log"
        cmd = flwr_run_command(project_root(self.error), self.connection, rc_file,
                               federation_config)
        proc = subprocess.Popen(cmd, env={**flwr_env(self.flwr_home), **self.extra_env},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=str(self.run_dir), start_new_session=True)
        run_id = ""
        deadline = time.monotonic() + timeout
        try:
            pipe = proc.stdout
            if pipe is None:
                raise self.error("no output pipe from `flwr run`")
            with open(log_path, "ab") as log:
                for raw in pipe:
                    log.write(raw)
                    line = raw.decode(errors="replace")
                    if not run_id:
                        run_id = parse_run_id(line) or ""
                    if stream:
                        sink = out or sys.stdout
                        sink.write(line)
                        sink.flush()
                    if time.monotonic() > deadline:
                        raise self.error(f"`flwr run` still running after {timeout:.0f}s")
            try:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise self.error(f"`flwr run` still running after {timeout:.0f}s") from None
        finally:
            stop_process(proc)
        if not run_id:
            raise self.error(f"`flwr run` did not start a run (exit {code}); see {log_path}")
        return run_id

    def run(self, config: Mapping[str, Scalar], *, federation_config: str | None = None,
            stream: bool = True, out: IO[str] | None = None,
            timeout: float = DEFAULT_RUN_TIMEOUT) -> FinishedRun:
        """:meth:`submit` the run, then read its :meth:`final_status`."""
        run_id = self.submit(config, federation_config=federation_config, stream=stream,
                             out=out, timeout=timeout)
        return FinishedRun(run_id=run_id, status=self.final_status(run_id))

    def stop(self) -> None:
        """Stop the SuperLink's process group (SIGTERM, then SIGKILL)."""
        stop_process(self.proc)
