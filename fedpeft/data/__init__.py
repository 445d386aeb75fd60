"""fedpeft.data: framework-free text corpora (local files only) and client partitioners."""

from __future__ import annotations

from fedpeft.data.chitchat import chitchat_participants, chitchat_stats, load_chitchat
from fedpeft.data.errors import MissingDataError
from fedpeft.data.examples import Corpus, TextExample
from fedpeft.data.partition import (
    PARTITIONERS,
    PartitionConfig,
    get_partitioner,
    holdout_clients,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_natural,
    split_examples,
    train_test_split_by_client,
)
from fedpeft.data.paths import data_available, shared_data_path
from fedpeft.data.shakespeare import load_tinyshakespeare
from fedpeft.data.textfiles import load_text_classification

__all__ = [
    "PARTITIONERS",
    "Corpus",
    "MissingDataError",
    "PartitionConfig",
    "TextExample",
    "chitchat_participants",
    "chitchat_stats",
    "data_available",
    "get_partitioner",
    "holdout_clients",
    "load_chitchat",
    "load_text_classification",
    "load_tinyshakespeare",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_natural",
    "shared_data_path",
    "split_examples",
    "train_test_split_by_client",
]
