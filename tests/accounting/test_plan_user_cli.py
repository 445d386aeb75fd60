"""``fedpeft privacy plan-user``: user-level provisioning from the command line."""

from __future__ import annotations

import argparse
import json

import pytest

from fedpeft.privacy.accounting.cli import add_privacy_parser
from fedpeft.privacy.ddg_mechanism import DDGMechanismError, release_epsilon

ARGS = ["privacy", "plan-user", "--target-epsilon", "8", "--delta", "1e-6", "--rounds", "20",
        "--sample-rate", "0.1", "--clip", "1", "--clients-per-round", "100",
        "--min-contributors", "80", "--dimension", "10000", "--bits", "18"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft")
    add_privacy_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_plan_user_json_names_the_level_and_meets_the_target(
        capsys: pytest.CaptureFixture[str]) -> None:
    from fractions import Fraction

    from fedpeft.privacy.ddg_mechanism import DDGPlan

    args = _parser().parse_args([*ARGS, "--json"])
    assert args.func(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["level"] == "user" and doc["epsilon"] <= 8.0
    assert doc["padded_dimension"] == 10240 and doc["bits"] == 18  # 5 blocks of 2048
    # the printed plan, rebuilt, spends what it says (the variance printed as a float is the
    # planned Fraction's value, a multiple of 1/1024)
    plan = DDGPlan(1.0, doc["granularity"], Fraction(doc["local_variance"]), 18, 10_000)
    assert release_epsilon(plan, sample_rate=0.1, min_contributors=80, rounds=20,
                           delta=1e-6) == pytest.approx(doc["epsilon"])


def test_plan_user_text_and_infeasible(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(ARGS)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("level: user") and "each client adds noise" in out
    bad = _parser().parse_args([*ARGS[:-2], "--bits", "8", "--min-contributors", "2",
                                "--clients-per-round", "1000"])
    with pytest.raises(DDGMechanismError, match="raise bits"):
        bad.func(bad)
