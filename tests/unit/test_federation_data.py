from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.config import DataConfig
from fedpeft.data.errors import MissingDataError
from fedpeft.data.federation import client_corpus, federated_split


def test_chitchat_natural_split_holds_out_other_participants() -> None:
    data = DataConfig(max_examples_per_client=8, eval_examples=20)
    split = federated_split(data, 4, 0)
    users = [{split.train.examples[i].user for i in p} for p in split.partitions]
    assert all(len(u) == 1 for u in users) and len(set.union(*users)) == 4
    eval_users = {e.user for e in split.eval.examples}
    assert not eval_users & set.union(*users)  # held-out participants only
    assert len(split.eval) == 20 and all(len(p) == 8 for p in split.partitions)


def test_missing_data_path_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="missing.tsv"):
        federated_split(DataConfig(dataset="file", path=str(tmp_path / "missing.tsv")), 2, 0)


def test_client_with_zero_examples_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(40)))
    data = DataConfig(dataset="file", path=str(f), partitioner="dirichlet", dirichlet_alpha=0.01)
    with pytest.raises(DataError):
        for pid in range(30):  # 30 clients, 36 training examples, extreme skew
            client_corpus(data, pid, 30, 0)
    with pytest.raises(ConfigError, match="partition-id=5"):
        client_corpus(DataConfig(), 5, 3, 0)
