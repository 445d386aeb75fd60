"""The pure pieces of the shared SuperLink handle (``fedpeft.launch.superlink``): command lines,
the ``flwr`` connection file, the run id and the final status parsed from ``flwr``'s output."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError, FedPeftError
from fedpeft.launch.superlink import (
    FinishedRun,
    ServerTls,
    connection_toml,
    flwr_run_command,
    parse_run_id,
    project_root,
    status_from_ls,
    superlink_command,
)


class _Boom(FedPeftError):
    pass


def _value(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_simulation_superlink_is_insecure_in_memory_without_dependency_installation() -> None:
    cmd = superlink_command("127.0.0.1", 9999, simulation=True)
    assert Path(cmd[0]).name == "flower-superlink"
    assert {"--simulation", "--insecure", "--disable-runtime-dependency-installation"} <= set(cmd)
    assert _value(cmd, "--host") == "127.0.0.1" and _value(cmd, "--port") == "9999"
    assert _value(cmd, "--database") == ":flwr-in-memory:"
    assert "--enable-supernode-auth" not in cmd and "--ssl-certfile" not in cmd


def test_deployment_superlink_tls_and_node_auth(tmp_path: Path) -> None:
    tls = ServerTls(tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key")
    cmd = superlink_command("0.0.0.0", 9092, tls=tls, node_auth=True)
    assert _value(cmd, "--ssl-ca-certfile") == str(tls.ca_cert)
    assert _value(cmd, "--ssl-certfile") == str(tls.certfile)
    assert _value(cmd, "--ssl-keyfile") == str(tls.keyfile)
    assert "--enable-supernode-auth" in cmd
    assert "--insecure" not in cmd and "--simulation" not in cmd
    assert "--enable-supernode-auth" not in superlink_command("h", 1, tls=tls)
    with pytest.raises(ConfigError, match="needs TLS"):
        superlink_command("h", 1, node_auth=True)


def test_connection_toml(tmp_path: Path) -> None:
    doc = tomllib.loads(connection_toml("fedpeft-sim", "127.0.0.1:5", None))
    assert doc == {"superlink": {"default": "fedpeft-sim",
                                 "fedpeft-sim": {"address": "127.0.0.1:5", "insecure": True}}}
    ca = tmp_path / 'we"ird' / "ca.crt"
    doc = tomllib.loads(connection_toml("x", "h:1", ca))
    assert doc["superlink"]["x"] == {"address": "h:1", "root-certificates": str(ca.resolve())}


def test_flwr_run_command(tmp_path: Path) -> None:
    cmd = flwr_run_command(tmp_path, "conn", tmp_path / "rc.toml")
    assert Path(cmd[0]).name == "flwr"
    assert cmd[1:] == ["run", str(tmp_path), "conn", "--stream", "--run-config",
                       str(tmp_path / "rc.toml")]
    cmd = flwr_run_command(tmp_path, "conn", tmp_path / "rc.toml", "num_supernodes=3")
    assert cmd[-2:] == ["--federation-config", "num_supernodes=3"]


def test_parse_run_id() -> None:
    assert parse_run_id("INFO :      Successfully started run 123456789\n") == "123456789"
    assert parse_run_id("Loading project configuration...") is None


def _ls(stdout: str, stderr: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(["flwr", "ls"], 0, stdout, stderr)


def test_status_from_ls() -> None:
    out = _ls('Loading ...\n{"success": true, "runs": [{"run-id": 7, "status": "running"}, '
              '{"run-id": "42", "status": "finished:failed"}]}')
    assert status_from_ls(out, "42") == "finished:failed"
    assert status_from_ls(out, "7") == "running"
    with pytest.raises(_Boom, match="does not list run 8"):
        status_from_ls(out, "8", error=_Boom)
    with pytest.raises(_Boom, match="cannot read the run status"):
        status_from_ls(_ls("no json here", "boom"), "1", error=_Boom)


def test_finished_run_completed_only_when_finished_completed() -> None:
    assert FinishedRun("1", "finished:completed").completed
    assert not FinishedRun("1", "finished:failed").completed


def test_project_root_is_the_source_tree() -> None:
    assert (project_root() / "pyproject.toml").is_file()
    assert (project_root() / "fedpeft" / "launch" / "superlink.py").is_file()


def test_warm_worker_runs_the_warm_app_module_file() -> None:
    from fedpeft.client import warm_app
    from fedpeft.deploy.runner import warm_worker_command

    cmd = warm_worker_command(5555, 42)
    assert cmd[:3] == [sys.executable, "-P", str(Path(warm_app.__file__).resolve())]
    assert _value(cmd, "--runtime-api-address") == "127.0.0.1:5555"
    assert _value(cmd, "--parent-pid") == "42" and "--insecure" in cmd
