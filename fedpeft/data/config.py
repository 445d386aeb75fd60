"""Which corpus a federation trains on and how it is split over clients (``[tool.flwr.app.config]``
keys ``dataset`` ... ``eval-examples``)."""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft.core.errors import ConfigError, UnknownNameError
from fedpeft.data.textfiles import FORMATS, HEADERS, FileSpec, column_spec

DATASETS = ("chitchat", "sst2", "agnews", "shakespeare", "file")
#: Which rows of the evaluation set count: all, or full sentences only
#: (:func:`fedpeft.data.federation.is_full_sentence`).
EVAL_SUBSETS = ("all", "sentences")


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, how it is split over clients, and how much each client uses."""

    dataset: str = "chitchat"
    path: str = ""
    eval_path: str = ""
    partitioner: str = "natural"
    dirichlet_alpha: float = 0.5
    max_examples_per_client: int = 64
    eval_examples: int = 128
    #: ``"sentences"``: evaluate on the full sentences of the evaluation set only
    eval_subset: str = "all"
    #: audit canaries planted in clients' data (0: none; fedpeft.data.canaries)
    canaries: int = 0
    #: how ``path`` is read (``dataset = "file"``; ``fedpeft.data.textfiles``): the format
    #: ("auto": from the suffix, else the content), the text, label and user columns (a
    #: 0-based index or a header name / JSON key; "" = inferred, no user column), the label
    #: names in order (comma-separated; "" = from the data) and whether row 1 is a header
    format: str = "auto"
    text_column: str = ""
    label_column: str = ""
    user_column: str = ""
    label_names: str = ""
    header: str = "auto"
    #: natural partitioning: users with fewer examples get no client
    min_user_examples: int = 1
    #: the evaluation file's own format, columns and header ("" = as the training file's)
    eval_format: str = ""
    eval_text_column: str = ""
    eval_label_column: str = ""
    eval_header: str = ""
    #: the task a file is read for (the run's ``task``, set by the run config for
    #: ``dataset = "file"``; not a knob); "" = the data set's own (:attr:`read_task`)
    file_task: str = ""
    #: the model whose chat template renders chat-style JSON lines (the run's ``model``)
    chat_model: str = ""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UnknownNameError(f"unknown dataset {self.dataset!r}; known: {DATASETS} "
                                   "('file' reads data-path)")
        if self.dataset == "file" and not self.path:
            raise ConfigError("dataset='file' needs data-path (a .tsv, .csv, .jsonl or plain "
                              "text file; `fedpeft data inspect FILE` shows how it is read)")
        if self.partitioner not in ("natural", "iid", "dirichlet"):
            raise UnknownNameError(f"unknown partitioner {self.partitioner!r}; known: "
                                   "natural, iid, dirichlet")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"dirichlet-alpha={self.dirichlet_alpha} must be > 0")
        if self.max_examples_per_client < 1:
            raise ConfigError(f"max-examples-per-client={self.max_examples_per_client} must be >= 1")
        if self.eval_subset not in EVAL_SUBSETS:
            raise UnknownNameError(f"unknown eval-subset {self.eval_subset!r}; known: "
                                   f"{EVAL_SUBSETS}")
        if self.eval_examples < 1:
            raise ConfigError(f"eval-examples={self.eval_examples} must be >= 1")
        if isinstance(self.canaries, bool) or not isinstance(self.canaries, int) or (
                self.canaries < 0):
            raise ConfigError(f"audit-canaries={self.canaries!r} must be an integer >= 0 "
                              "(0: no audit)")
        for knob, value, allowed in (("data-format", self.format, ("auto", *FORMATS)),
                                     ("data-header", self.header, HEADERS),
                                     ("eval-format", self.eval_format, ("", "auto", *FORMATS)),
                                     ("eval-header", self.eval_header, ("", *HEADERS))):
            if value not in allowed:
                raise UnknownNameError(f"unknown {knob} {value!r}; known: {allowed}")
        if self.file_task not in ("", "classification", "causal_lm"):
            raise ConfigError(f"task={self.file_task!r} must be 'classification' or 'causal_lm'")
        if self.min_user_examples < 1:
            raise ConfigError(f"data-min-user-examples={self.min_user_examples} must be >= 1")
        file_knobs = [k for k, v in (("data-text-column", self.text_column),
                                     ("data-label-column", self.label_column),
                                     ("data-user-column", self.user_column),
                                     ("data-label-names", self.label_names)) if v]
        if file_knobs and self.dataset != "file":
            raise ConfigError(f"{', '.join(file_knobs)} describe a file of your own: they need "
                              f"dataset='file' (dataset={self.dataset!r} has its own layout)")
        self.file_spec()
        self.eval_spec()

    @property
    def read_task(self) -> str:
        """The task the data is read for: the run's for a file, else the data set's own."""
        if self.file_task:
            return self.file_task
        return "causal_lm" if self.dataset in ("chitchat", "shakespeare") else "classification"

    def file_spec(self) -> FileSpec:
        """How the training file is read."""
        names = tuple(n.strip() for n in self.label_names.split(",")) if self.label_names else None
        return FileSpec(format=None if self.format == "auto" else self.format,
                        text_column=column_spec(self.text_column),
                        label_column=column_spec(self.label_column),
                        user_column=column_spec(self.user_column), label_names=names,
                        header=self.header)

    def eval_spec(self) -> FileSpec:
        """How the evaluation file is read: its own knobs, else the training file's (no
        users: the evaluation set is not partitioned)."""
        train = self.file_spec()
        fmt = self.eval_format or self.format
        return FileSpec(format=None if fmt == "auto" else fmt,
                        text_column=(column_spec(self.eval_text_column)
                                     if self.eval_text_column else train.text_column),
                        label_column=(column_spec(self.eval_label_column)
                                      if self.eval_label_column else train.label_column),
                        label_names=train.label_names, header=self.eval_header or self.header)
