"""Unit tests for common.data: tabular loading, deterministic department splits and the Hutto corpora."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.data import (
    DEPARTMENT,
    LABEL,
    MAX_TEXT_CHARS,
    TEXT,
    load_hutto,
    load_table,
    split_department,
)
from common.errors import DataError

ROWS = {
    "review": ["good film", "bad film", "  padded text  ", "so-so"],
    "sentiment": ["pos", "neg", "pos", "neg"],
    "site": ["a", "a", "b", "b"],
}


def _write(frame: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:  # pragma: no cover - test helper misuse
        raise AssertionError(suffix)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".CSV"])
def test_load_table_formats(tmp_path: Path, suffix: str) -> None:
    path = _write(pd.DataFrame(ROWS), tmp_path / f"data{suffix}")
    frame = load_table(path, "review", "sentiment", "site")
    assert list(frame.columns) == [TEXT, LABEL, DEPARTMENT]
    assert frame[TEXT].tolist() == ["good film", "bad film", "padded text", "so-so"]
    assert frame[LABEL].tolist() == ["pos", "neg", "pos", "neg"]
    assert frame[DEPARTMENT].tolist() == ["a", "a", "b", "b"]


def test_load_table_without_department_uses_file_stem(tmp_path: Path) -> None:
    path = _write(pd.DataFrame(ROWS), tmp_path / "cardiology.csv")
    frame = load_table(path, "review", "sentiment", None)
    assert set(frame[DEPARTMENT]) == {"cardiology"}
    assert len(frame) == 4


def test_load_table_numeric_labels_become_strings(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": ["x", "y"], "label": [0, 1]}), tmp_path / "d.jsonl")
    frame = load_table(path, "text", "label", None)
    assert frame[LABEL].tolist() == ["0", "1"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.csv", "text", "label", None)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    d = tmp_path / "dir.csv"
    d.mkdir()
    with pytest.raises(DataError, match="not a file"):
        load_table(d, "text", "label", None)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match="unsupported format"):
        load_table(path, "text", "label", None)


def test_header_only_file_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_table(path, "text", "label", None)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError):
        load_table(path, "text", "label", None)


def test_empty_parquet_has_no_rows(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}),
                  tmp_path / "e.parquet")
    with pytest.raises(DataError, match="no rows"):
        load_table(path, "text", "label", None)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = _write(pd.DataFrame(ROWS), tmp_path / "d.csv")
    with pytest.raises(DataError, match="lacks column") as info:
        load_table(path, "text", "sentiment", "dept")
    msg = str(info.value)
    assert "'text'" in msg
    assert "'dept'" in msg
    assert "'sentiment'" not in msg.split("it has")[0]


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_text_cell(tmp_path: Path, text: str) -> None:
    path = _write(pd.DataFrame({"text": ["fine", text], "label": ["a", "b"]}), tmp_path / "d.csv")
    with pytest.raises(DataError, match="empty 'text'"):
        load_table(path, "text", "label", None)


def test_empty_label_cell(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": ["fine", "ok"], "label": ["a", ""]}), tmp_path / "d.csv")
    with pytest.raises(DataError, match="empty 'label'"):
        load_table(path, "text", "label", None)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("column", ["text", "label"])
def test_null_cell_is_rejected(tmp_path: Path, suffix: str, column: str) -> None:
    data = {"text": ["fine", "ok"], "label": ["a", "b"]}
    data[column][1] = None
    path = _write(pd.DataFrame(data), tmp_path / f"d{suffix}")
    with pytest.raises(DataError, match=f"'{column}'"):
        load_table(path, "text", "label", None)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_non_utf8_file(tmp_path: Path, suffix: str) -> None:
    sep = "," if suffix == ".csv" else "\t"
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(f"text{sep}label\n".encode() + b"caf\xe9" + f"{sep}pos\n".encode())
    with pytest.raises(DataError, match="UTF-8"):
        load_table(path, "text", "label", None)


def test_unparseable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError):
        load_table(path, "text", "label", None)


def test_text_too_long(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": ["short", "x" * (MAX_TEXT_CHARS + 1)], "label": ["a", "b"]}),
                  tmp_path / "d.csv")
    with pytest.raises(DataError, match=str(MAX_TEXT_CHARS)):
        load_table(path, "text", "label", None)


def test_text_at_limit_is_accepted(tmp_path: Path) -> None:
    path = _write(pd.DataFrame({"text": ["short", "x" * MAX_TEXT_CHARS], "label": ["a", "b"]}),
                  tmp_path / "d.csv")
    assert len(load_table(path, "text", "label", None)) == 2


# ---------------------------------------------------------------------------------------------------- splits


def _frame(n: int = 100, department: str = "d") -> pd.DataFrame:
    return pd.DataFrame({
        TEXT: [f"text {i}" for i in range(n)],
        LABEL: ["pos" if i % 3 else "neg" for i in range(n)],
        DEPARTMENT: department,
    })


LABELS = ("neg", "pos")


def test_split_is_deterministic() -> None:
    frame = _frame()
    a = split_department(frame, "d", LABELS, 0.2, seed=3)
    b = split_department(frame.copy(), "d", LABELS, 0.2, seed=3)
    assert a.train_texts == b.train_texts
    assert a.test_texts == b.test_texts
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)


def test_split_is_disjoint_and_covering() -> None:
    frame = _frame(101)
    split = split_department(frame, "d", LABELS, 0.2, seed=0)
    assert not set(split.train_texts) & set(split.test_texts)
    assert sorted(split.train_texts + split.test_texts) == sorted(frame[TEXT])
    assert len(split.train_texts) == len(split.train_labels)
    assert len(split.test_texts) == len(split.test_labels)


def test_split_labels_match_texts() -> None:
    frame = _frame(50)
    truth = dict(zip(frame[TEXT], frame[LABEL], strict=True))
    split = split_department(frame, "d", LABELS, 0.3, seed=1)
    for text, idx in zip(split.train_texts + split.test_texts,
                         [*split.train_labels.tolist(), *split.test_labels.tolist()], strict=True):
        assert LABELS[idx] == truth[text]
    assert split.train_labels.dtype == np.int64


@pytest.mark.parametrize(
    ("n", "fraction", "expected"), [(100, 0.2, 20), (101, 0.2, 20), (10, 0.5, 5), (50, 0.01, 1)]
)
def test_split_test_size(n: int, fraction: float, expected: int) -> None:
    split = split_department(_frame(n), "d", LABELS, fraction, seed=0)
    assert len(split.test_texts) == expected
    assert len(split.train_texts) == n - expected


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.8), (2, 0.75), (3, 0.9)])
def test_split_keeps_a_training_row(n: int, fraction: float) -> None:
    split = split_department(_frame(n), "d", LABELS, fraction, seed=0)
    assert len(split.train_texts) >= 1
    assert len(split.test_texts) >= 1


def test_split_only_uses_its_department() -> None:
    frame = pd.concat([_frame(20, "a"), _frame(30, "b").assign(**{TEXT: [f"b {i}" for i in range(30)]})])
    split = split_department(frame, "b", LABELS, 0.2, seed=0)
    assert len(split.train_texts) + len(split.test_texts) == 30
    assert all(t.startswith("b ") for t in split.train_texts + split.test_texts)


def test_split_different_seeds_differ() -> None:
    frame = _frame(200)
    a = split_department(frame, "d", LABELS, 0.2, seed=0)
    b = split_department(frame, "d", LABELS, 0.2, seed=1)
    assert set(a.test_texts) != set(b.test_texts)


def test_split_depends_on_department_name() -> None:
    a = split_department(_frame(200, "x"), "x", LABELS, 0.2, seed=0)
    b = split_department(_frame(200, "y"), "y", LABELS, 0.2, seed=0)
    assert set(a.test_texts) != set(b.test_texts)


def test_split_unknown_label() -> None:
    frame = _frame(10)
    frame.loc[3, LABEL] = "neutral"
    with pytest.raises(DataError, match="neutral"):
        split_department(frame, "d", LABELS, 0.2, seed=0)


@pytest.mark.parametrize("n", [0, 1])
def test_split_too_few_rows(n: int) -> None:
    frame = pd.concat([_frame(n, "small"), _frame(10, "big")])
    with pytest.raises(DataError, match="small"):
        split_department(frame, "small", LABELS, 0.2, seed=0)


# ---------------------------------------------------------------------------------------------------- Hutto


@pytest.fixture(scope="module")
def hutto() -> pd.DataFrame:
    return load_hutto()


def test_hutto_departments_and_counts(hutto: pd.DataFrame) -> None:
    counts = hutto.groupby(DEPARTMENT).size().to_dict()
    assert counts == {"amazon": 2985, "movies": 10072, "nyt": 2970, "tweets": 3432}


def test_hutto_labels_and_text(hutto: pd.DataFrame) -> None:
    assert list(hutto.columns) == [TEXT, LABEL, DEPARTMENT]
    assert set(hutto[LABEL]) == {"negative", "positive"}
    assert (hutto[TEXT].str.len() > 0).all()
    for department in ("amazon", "movies", "nyt", "tweets"):
        assert set(hutto.loc[hutto[DEPARTMENT] == department, LABEL]) == {"negative", "positive"}


def test_utf16_text_is_not_utf8_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nhello,positive\n", encoding="utf-16")
    with pytest.raises(DataError, match="is not a text file"):
        load_table(path, "text", "label", None)


def test_nul_in_a_text_cell_beyond_the_sniffed_head(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    rows = [f'{{"text": "note {i} {"x" * 100}", "label": "positive"}}' for i in range(1000)]
    rows.append('{"text": "bad \\u0000 cell", "label": "negative"}')
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="1 'text' value\\(s\\) contain NUL"):
        load_table(path, "text", "label", None)
