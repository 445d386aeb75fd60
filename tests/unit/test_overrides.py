"""``--set KEY=VALUE`` parsing shared by ``fedpeft simulate`` and ``fedpeft coordinator``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError
from fedpeft.runconfig.config import DEFAULTS, parse_run_config
from fedpeft.runconfig.overrides import parse_overrides


def test_values_stay_strings_typed_later() -> None:
    out = parse_overrides(["num-rounds=5", " lr = 0.01 ", "dp=false", "data-path=a=b"])
    assert out == {"num-rounds": "5", "lr": "0.01", "dp": "false", "data-path": "a=b"}
    run = parse_run_config({**DEFAULTS, **out}).as_flat()
    assert run["num-rounds"] == 5 and run["lr"] == 0.01 and run["dp"] is False


def test_later_item_wins_and_empty_value_is_kept() -> None:
    assert parse_overrides(["seed=1", "seed=2", "lora-targets="]) == {"seed": "2",
                                                                     "lora-targets": ""}
    assert parse_overrides([]) == {}


def test_item_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match="--set 'rounds' must look like key=value"):
        parse_overrides(["rounds"])


def test_unknown_key_is_refused_with_the_known_keys() -> None:
    with pytest.raises(ConfigError, match="--set 'rounds' is not a run config key; known: "):
        parse_overrides(["rounds=3"])


@pytest.mark.parametrize("command", [["simulate", "--in-process"],
                                     ["coordinator", "--insecure"]])
def test_simulate_and_coordinator_refuse_the_same_way(command: list[str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from fedpeft.cli.main import main

    argv = [*command, "--run-dir", str(tmp_path / "run"), "--set", "rounds=3"]
    assert main(argv) == 2  # refused before anything starts
    assert "fedpeft: error: --set 'rounds' is not a run config key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
