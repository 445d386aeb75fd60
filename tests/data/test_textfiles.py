"""Unit tests for load_text_classification on small files written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.core.errors import ConfigError, DataError
from fedpeft.data.errors import MissingDataError
from fedpeft.data.textfiles import AGNEWS_LABELS, load_text_classification, tsv_is_csv_quoted


def _write(tmp_path: Path, name: str, content: str) -> Path:
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    return p


def test_sst2_style_header_tsv(tmp_path: Path) -> None:
    p = _write(tmp_path, "sst.tsv", 'sentence\tlabel\nit \'s "great 1\t1\nbad movie \t0\n')
    c = load_text_classification(p)
    assert c.task == "classification" and c.name == "sst"
    assert c.texts == ('it \'s "great 1', "bad movie")  # unbalanced quote kept, text stripped
    assert c.labels == (1, 0) and c.label_names == ("0", "1")


def test_agnews_style_no_header_string_labels_canonical_order(tmp_path: Path) -> None:
    rows = ["w\tWorld", "s\tSports", "t\tSci/Tech", "b\tBusiness", "w2\tWorld"]
    c = load_text_classification(_write(tmp_path, "ag.tsv", "\n".join(rows) + "\n"))
    assert len(c) == 5  # the first row is data, not a header
    assert c.label_names == AGNEWS_LABELS
    assert c.labels == (0, 1, 3, 2, 0)


def test_string_labels_sorted_and_explicit_label_names(tmp_path: Path) -> None:
    p = _write(tmp_path, "x.tsv", "a\tpos\nb\tneg\nc\tpos\n")
    c = load_text_classification(p)
    assert c.label_names == ("neg", "pos") and c.labels == (1, 0, 1)
    c2 = load_text_classification(p, label_names=("pos", "neg", "neutral"))
    assert c2.label_names == ("pos", "neg", "neutral") and c2.labels == (0, 1, 0)
    with pytest.raises(DataError, match="'neg'.*label_names"):
        load_text_classification(p, label_names=("pos",))


def test_int_labels_with_names(tmp_path: Path) -> None:
    p = _write(tmp_path, "s.tsv", "sentence\tlabel\nx\t1\ny\t0\n")
    c = load_text_classification(p, label_names=("negative", "positive"))
    assert c.labels == (1, 0) and c.label_names == ("negative", "positive")
    with pytest.raises(DataError, match="'1'"):
        load_text_classification(p, label_names=("only",))


def test_header_detected_by_int_labels_and_forced(tmp_path: Path) -> None:
    p = _write(tmp_path, "h.tsv", "review\tstars\ngood\t5\nbad\t1\n")
    c = load_text_classification(p)  # "stars" not an int while the labels below are
    assert c.texts == ("good", "bad")
    assert load_text_classification(p, text_column="review", label_column="stars").labels == (5, 1)
    # forcing has_header=False makes the header a data row, whose label is then a string
    c2 = load_text_classification(p, has_header=False)
    assert len(c2) == 3 and c2.label_names == ("1", "5", "stars")


def test_columns_by_index_and_reordered(tmp_path: Path) -> None:
    p = _write(tmp_path, "r.tsv", "0\tthe text\textra\n1\tother\textra\n")
    c = load_text_classification(p, text_column=1, label_column=0, has_header=False)
    assert c.texts == ("the text", "other") and c.labels == (0, 1)
    h = _write(tmp_path, "rh.tsv", "id\tlabel\ttext\n7\t1\thello\n")
    assert load_text_classification(h).texts == ("hello",)  # default names found in header


def test_unknown_column_lists_available(tmp_path: Path) -> None:
    p = _write(tmp_path, "u.tsv", "sentence\tlabel\nx\t1\n")
    with pytest.raises(DataError, match=r"'txt'.*available columns: \['sentence', 'label'\]"):
        load_text_classification(p, text_column="txt")
    nohdr = _write(tmp_path, "n.tsv", "x\tWorld\n")
    with pytest.raises(DataError, match="no header"):
        load_text_classification(nohdr, text_column="text", has_header=False)
    with pytest.raises(DataError, match="out of range"):
        load_text_classification(p, label_column=5)


@pytest.mark.parametrize(
    ("content", "line", "what"),
    [
        ("sentence\tlabel\nok\t1\nmissing label\n", 3, "column"),
        ("sentence\tlabel\nok\t1\n   \t0\n", 3, "empty text"),
        ("sentence\tlabel\nok\t1\nfine\t0\nno label\t \n", 4, "empty label"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, content: str, line: int, what: str) -> None:
    p = _write(tmp_path, "bad.tsv", content)
    with pytest.raises(DataError) as err:
        load_text_classification(p)
    msg = str(err.value)
    assert "bad.tsv" in msg and f"line {line}" in msg and what in msg


@pytest.mark.parametrize("content", ["", "\n\n", "sentence\tlabel\n"])
def test_empty_file_has_no_examples(tmp_path: Path, content: str) -> None:
    with pytest.raises(DataError, match="has no examples"):
        load_text_classification(_write(tmp_path, "e.tsv", content))


def test_missing_file_and_bad_format(tmp_path: Path) -> None:
    with pytest.raises(MissingDataError, match="nothere.tsv"):
        load_text_classification(tmp_path / "nothere.tsv")
    p = _write(tmp_path, "data.txt", "a\t1\n")
    assert load_text_classification(p).labels == (1,)  # no known suffix: the content says TSV
    assert load_text_classification(p, format="tsv").labels == (1,)
    words = _write(tmp_path, "words.txt", "just a line of text\nand another\n")
    with pytest.raises(DataError, match="plain text.*data-format"):
        load_text_classification(words)
    with pytest.raises(ConfigError, match="format='xml'"):
        load_text_classification(p, format="xml")
    with pytest.raises(ConfigError, match="tsv_quoting"):
        load_text_classification(p, format="tsv", tsv_quoting="weird")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="label_names"):
        load_text_classification(p, format="tsv", label_names="ab")


def test_csv_quoting(tmp_path: Path) -> None:
    p = _write(tmp_path, "q.csv", 'text,label\n"hello, ""world""",1\nplain,0\n"multi\nline",1\n')
    c = load_text_classification(p)
    assert c.texts == ('hello, "world"', "plain", "multi\nline") and c.labels == (1, 0, 1)
    bad = _write(tmp_path, "bad.csv", 'text,label\n"ab"c,1\n')
    with pytest.raises(DataError, match="bad.csv: line 2"):
        load_text_classification(bad)


def test_tsv_csv_style_quoting_detected(tmp_path: Path) -> None:
    # AG News style: fields with quotes are wrapped and inner quotes doubled
    p = _write(tmp_path, "ag.tsv", '"He said ""hi"" today."\tWorld\nplain\tSports\n')
    assert tsv_is_csv_quoted(p.read_text())
    c = load_text_classification(p, label_names=AGNEWS_LABELS)
    assert c.texts == ('He said "hi" today.', "plain")
    raw = load_text_classification(p, label_names=AGNEWS_LABELS, tsv_quoting="none")
    assert raw.texts[0] == '"He said ""hi"" today."'


def test_tsv_raw_quotes_stay_raw(tmp_path: Path) -> None:
    # GLUE style: an unbalanced leading quote must not swallow the following lines
    content = 'sentence\tlabel\n" a quote opens\t1\nnext row\t0\n"quoted" then text\t1\n'
    assert not tsv_is_csv_quoted(content)
    c = load_text_classification(_write(tmp_path, "g.tsv", content))
    assert c.texts == ('" a quote opens', "next row", '"quoted" then text')
    assert not tsv_is_csv_quoted("no quotes at all\t1\n")


def test_jsonl(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    p = _write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    c = load_text_classification(p)
    assert c.texts == ("a", "b") and c.label_names == ("x", "y") and c.labels == (0, 1)
    p2 = _write(tmp_path, "d2.json", json.dumps({"body": "z", "y": 3}) + "\n")
    assert load_text_classification(p2, text_column="body", label_column="y").labels == (3,)
    with pytest.raises(DataError,
                       match=r"line 1 has no data-text-column None; available columns: \['body', 'y'\]"):
        load_text_classification(p2)
    bad = _write(tmp_path, "bad.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl: line 2 is not valid JSON"):
        load_text_classification(bad)
    arr = _write(tmp_path, "arr.jsonl", "[1, 2]\n")
    with pytest.raises(DataError, match="not a JSON object"):
        load_text_classification(arr)
    with pytest.raises(DataError, match="key names"):
        load_text_classification(p, text_column=0)
    nolabel = _write(tmp_path, "nl.jsonl", '{"text": "a", "label": null}\n')
    with pytest.raises(DataError, match="line 1 has an empty label"):
        load_text_classification(nolabel)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "latin.tsv"
    p.write_bytes("caf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="UTF-8"):
        load_text_classification(p)
