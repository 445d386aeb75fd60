"""Run a simulated federation on Flower's simulation engine (Ray backend), offline.

Pitfalls of flwr 1.42 handled here:

* ``flwr run`` against its managed local SuperLink runs ``uv sync`` for the app (fails offline,
  or pulls a CUDA torch). We start our own SuperLink with
  ``--disable-runtime-dependency-installation`` on a free loopback port instead.
* ``flwr run`` exits 0 even when the run ended ``finished:failed``: we read the final status
  with ``flwr ls --format json`` and fail unless it is ``finished:completed``.
* ``flwr`` moves ``[tool.flwr.federations]`` into ``$FLWR_HOME/config.toml`` on first use:
  ``FLWR_HOME`` is set inside the run directory, never the user's home.
* Telemetry is off (``FLWR_TELEMETRY_ENABLED=0``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import DEFAULTS, Scalar, parse_run_config
from fedpeft.errors import ConfigError, FedPeftError
from fedpeft.flower_process import (
    flwr_bin,
    flwr_env,
    free_port,
    stop_process,
    toml_table,
    wait_healthy,
)

CONNECTION = "fedpeft-sim"


class SimulationError(FedPeftError):
    """The simulation could not start, or its run did not complete."""


@dataclass(frozen=True)
class SimulationResult:
    run_id: str
    status: str
    run_dir: Path
    returncode: int


def project_root() -> Path:
    """The directory holding the Flower app's ``pyproject.toml`` (this source tree)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(f"no pyproject.toml in {root}: run the simulation from a source "
                              "checkout installed with `pip install -e .`")
    return root


def _env(flwr_home: Path) -> dict[str, str]:
    env = flwr_env(flwr_home)
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    return env


def run_status(flwr_home: Path, run_id: str) -> str:
    """Final status of a run as the SuperLink reports it (e.g. ``finished:completed``)."""
    out = subprocess.run([flwr_bin("flwr"), "ls", CONNECTION, "--run-id", run_id, "--format", "json"],
                         env=_env(flwr_home), capture_output=True, text=True, timeout=120,
                         check=False)
    try:
        doc = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        raise SimulationError(f"cannot read the run status from `flwr ls`: {out.stdout[-500:]} "
                              f"{out.stderr[-500:]}") from None
    runs = doc.get("runs", [])
    for run in runs:
        if str(run.get("run-id")) == run_id:
            return str(run.get("status", "unknown"))
    raise SimulationError(f"`flwr ls` does not list run {run_id}")


def simulate(config: dict[str, Scalar], num_clients: int, run_dir: Path, *,
             num_cpus_per_client: int = 2, timeout: float = 6 * 3600,
             stream: bool = True) -> SimulationResult:
    """Run one simulated federation of ``num_clients`` virtual clients and wait for it."""
    if num_clients < 1:
        raise ConfigError(f"clients={num_clients} must be >= 1")
    run_dir = run_dir.resolve()
    flat = {**DEFAULTS, **config, "run-dir": str(run_dir)}
    run = parse_run_config(flat)  # fail fast, before anything starts
    if run.federation.min_clients > num_clients:
        raise ConfigError(f"min-clients={run.federation.min_clients} exceeds clients={num_clients}")
    run_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = run_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    run_config_file = run_dir / "run_config.toml"
    run_config_file.write_text(toml_table(flat))
    log_file = run_dir / "superlink.log"
    env = _env(flwr_home)
    with open(log_file, "ab") as log:
        superlink = subprocess.Popen(
            [flwr_bin("flower-superlink"), "--insecure", "--simulation",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
             "--port", str(port), "--database", ":flwr-in-memory:"],
            cwd=str(project_root()), env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        wait_healthy(superlink, f"http://127.0.0.1:{port}/health", log_file, 90,
                     error=SimulationError)
        cmd = [flwr_bin("flwr"), "run", str(project_root()), CONNECTION, "--stream",
               "--run-config", str(run_config_file),
               "--federation-config",
               f"num_supernodes={num_clients} client_resources_num_cpus={num_cpus_per_client}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                cwd=str(run_dir))
        run_id = ""
        assert_stdout = proc.stdout
        if assert_stdout is None:
            raise SimulationError("no output pipe from `flwr run`")
        with open(run_dir / "flwr-run.log", "ab") as out_log:
            for raw in assert_stdout:
                out_log.write(raw)
                line = raw.decode(errors="replace")
                if not run_id:
                    m = re.search(r"Successfully started run (\d+)", line)
                    if m:
                        run_id = m.group(1)
                if stream:
                    sys.stdout.write(line)
                    sys.stdout.flush()
        code = proc.wait(timeout=timeout)
        if not run_id:
            raise SimulationError(f"`flwr run` did not start a run (exit {code}); see "
                                  f"{run_dir / 'flwr-run.log'}")
        status = _final_status(flwr_home, run_id)
        return SimulationResult(run_id=run_id, status=status, run_dir=run_dir,
                                returncode=0 if status == "finished:completed" else 1)
    finally:
        stop_process(superlink)


def _final_status(flwr_home: Path, run_id: str, wait: float = 60) -> str:
    deadline = time.monotonic() + wait
    status = run_status(flwr_home, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1)
        status = run_status(flwr_home, run_id)
    return status
