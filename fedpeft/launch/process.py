"""Helpers for running Flower's own executables (SuperLink, SuperNode, flwr) as processes.

Shared by the simulation launcher and the deployment runner; no Flower import, only
subprocess handling: a free loopback port, the executables of this environment, a run-local
``FLWR_HOME`` with telemetry off, TOML values for run configs, and stopping by process group.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from fedpeft.core.errors import FedPeftError
from fedpeft.core.protocol import Scalar


class FlowerProcessError(FedPeftError):
    """A Flower executable is missing or misbehaved."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flwr_bin(name: str) -> str:
    """A Flower executable from this environment (next to the interpreter first)."""
    exe = Path(sys.executable).parent / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        raise FlowerProcessError(f"`{name}` not found next to {sys.executable} or on PATH; install "
                          "flwr into this environment")
    return found


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: FLWR_HOME run-local, this venv first, no telemetry."""
    env = os.environ.copy()
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 20.0) -> None:
    """SIGTERM the process group of ``proc`` (started with a new session), then SIGKILL."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def toml_value(v: Scalar) -> str:
    """One run config value as a TOML literal."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    return repr(v)


def toml_table(values: Mapping[str, Scalar]) -> str:
    """``key = value`` lines (a TOML table body) for a flat run config."""
    return "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items())


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log_file: Path, timeout: float, *,
                 context: ssl.SSLContext | None = None,
                 error: type[FedPeftError] = FlowerProcessError) -> None:
    """Poll a SuperLink's ``/health`` URL until it answers 200; raise ``error`` if it exits or
    does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"flower-superlink exited with code {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise error(f"flower-superlink did not answer {url} within {timeout:.0f}s; see {log_file}")
