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


def test_full_sentences_are_told_from_phrases() -> None:
    from fedpeft.data.federation import is_full_sentence

    assert is_full_sentence("sadly , as blood work proves , that was a long , long time ago . ")
    assert is_full_sentence("what a film ! i would watch it again and again !")
    assert not is_full_sentence("well-conceived ")  # a phrase
    assert not is_full_sentence("the expressive power of the camera and the light in it")
    assert not is_full_sentence("too short .")  # punctuated, under 8 words
    assert not is_full_sentence("   ")


def test_eval_subset_keeps_only_full_sentences_of_the_eval_file(tmp_path: Path) -> None:
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"text {i}\t{i % 2}\n" for i in range(40)))
    ev = tmp_path / "eval.tsv"
    sentences = [f"this is sentence number {i} of the held out evaluation set ." for i in range(5)]
    phrases = [f"phrase {i}" for i in range(7)]
    ev.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n"
                                                for i, t in enumerate(sentences + phrases)))
    base = {"dataset": "file", "path": str(train), "eval_path": str(ev), "partitioner": "iid"}
    everything = federated_split(DataConfig(**base), 2, 0).eval  # type: ignore[arg-type]
    assert len(everything) == 12
    only = federated_split(DataConfig(**base, eval_subset="sentences"), 2, 0).eval  # type: ignore[arg-type]
    assert sorted(e.text for e in only.examples) == sorted(sentences)
    ev.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in phrases))
    with pytest.raises(DataError, match="no full sentence.*eval-subset='all'"):
        federated_split(DataConfig(**base, eval_subset="sentences", eval_examples=7), 2, 0)  # type: ignore[arg-type]
    from fedpeft.core.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="unknown eval-subset 'long'"):
        DataConfig(eval_subset="long")


def test_eval_subset_applies_to_held_out_users() -> None:
    data = DataConfig(max_examples_per_client=8, eval_examples=20, eval_subset="sentences")
    from fedpeft.data.federation import is_full_sentence

    split = federated_split(data, 4, 0)
    assert 0 < len(split.eval) <= 20
    assert all(is_full_sentence(e.text) for e in split.eval.examples)
