"""Audit canaries in the federated split: reproducible, half in, and no dataset size that
depends on the secret bits (a canary replaces its filler)."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.core.errors import ConfigError
from fedpeft.data.canaries import make_canaries
from fedpeft.data.config import DataConfig
from fedpeft.data.federation import federated_split


def test_canaries_are_reproducible_and_about_half_are_in() -> None:
    a = make_canaries(400, task="classification", num_labels=2, num_partitions=7, seed=3)
    b = make_canaries(400, task="classification", num_labels=2, num_partitions=7, seed=3)
    c = make_canaries(400, task="classification", num_labels=2, num_partitions=7, seed=4)
    assert a == b and a.included != c.included
    # P[|Binomial(400, 1/2) - 200| > 50] < 1e-6
    assert abs(sum(a.included) - 200) <= 50
    assert {ex.label for ex in a.canaries} == {0, 1} and set(a.owners) <= set(range(7))
    assert len({ex.text for ex in a.canaries + a.fillers}) == 800  # all distinct
    lm = make_canaries(5, task="causal_lm", num_labels=None, num_partitions=2, seed=0)
    assert all(ex.label is None for ex in lm.canaries)


def test_a_clients_slots_do_not_depend_on_the_bits() -> None:
    cs = make_canaries(300, task="causal_lm", num_labels=None, num_partitions=5, seed=1)
    for pid in range(5):
        mine = [i for i, o in enumerate(cs.owners) if o == pid]
        # one slot per canary it owns: the canary when in, else its filler (never neither)
        assert cs.planted(pid) == tuple(cs.canaries[i] if cs.included[i] else cs.fillers[i]
                                        for i in mine)


def test_the_split_plants_the_slots_after_the_cap() -> None:
    data = DataConfig(dataset="chitchat", max_examples_per_client=8, canaries=60)
    plain = federated_split(DataConfig(dataset="chitchat", max_examples_per_client=8), 6, 0)
    split = federated_split(data, 6, 0)
    assert split.canaries is not None and plain.canaries is None
    for pid in range(6):
        extra = split.canaries.owners.count(pid)
        assert len(split.partitions[pid]) == len(plain.partitions[pid]) + extra
        texts = {split.train.examples[i].text for i in split.partitions[pid]}
        for ex in split.canaries.planted(pid):
            assert ex.text in texts
    assert split.eval == plain.eval  # evaluation untouched
    np.testing.assert_equal(len(split.train), len(plain.train) + 60)


def test_bad_canary_settings_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="audit-canaries"):
        DataConfig(canaries=-1)
    with pytest.raises(ConfigError, match="label names"):
        make_canaries(3, task="classification", num_labels=None, num_partitions=2, seed=0)
