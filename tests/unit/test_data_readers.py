"""read_records: every file type, line numbers, and each bad input's message."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import DataError, read_records


def write(tmp_path, name, text, binary=False):
    path = tmp_path / name
    path.write_bytes(text) if binary else path.write_text(text, encoding="utf-8")
    return path


def test_json_array_yields_the_line_each_record_starts_on(tmp_path):
    path = write(tmp_path, "a.json", '[\n  {"a": 1},\n\n  {"a": 2,\n   "b": [1, 2]}, {"a": 3}\n]\n')
    assert list(read_records(path)) == [(2, {"a": 1}), (4, {"a": 2, "b": [1, 2]}), (5, {"a": 3})]


def test_json_single_object_and_lists(tmp_path):
    assert list(read_records(write(tmp_path, "o.json", '\n{"text": "x"}'))) == [(2, {"text": "x"})]
    assert list(read_records(write(tmp_path, "l.json", '[[{"human": "h", "assistant": "a"}]]'))) == \
        [(1, [{"human": "h", "assistant": "a"}])]


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, "bad.json", '[\n  {"a": 1},\n  {"a": 2,}\n]')
    with pytest.raises(DataError) as err:
        list(read_records(path))
    assert err.value.line == 3
    assert str(err.value) == f"{path}, line 3: invalid JSON (Expecting property name enclosed in double quotes at column 11)"


def test_json_missing_comma_between_records(tmp_path):
    path = write(tmp_path, "bad.json", '[\n {"a": 1}\n {"a": 2}\n]')
    with pytest.raises(DataError, match=r"line 3: invalid JSON \(Expecting ',' delimiter at column 2\)"):
        list(read_records(path))


def test_json_lines_saved_as_json_gets_a_hint(tmp_path):
    path = write(tmp_path, "x.json", '{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(extra data after the first JSON value; .*rename the file to .jsonl"):
        list(read_records(path))


def test_jsonl_skips_blank_lines_and_counts_from_one(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n\n  \n{"a": 2}\n')
    assert list(read_records(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_jsonl_broken_line_is_named(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3\n{"a": 4}\n')
    records = read_records(path)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(DataError) as err:
        list(records)
    assert str(err.value) == f"{path}, line 3: invalid JSON (Expecting ',' delimiter at column 8)"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n42\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, found int 42"):
        list(read_records(path))


def test_jsonl_is_streamed_and_limit_stops_early(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n{"a": 2}\n{"a": 3\n')  # line 3 is broken but never read
    assert list(read_records(path, limit=2)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_csv_record_numbers_are_file_lines(tmp_path):
    path = write(tmp_path, "a.csv", 'instruction,output\nhi,hello\n"multi\nline",ok\n\nlast,one\n')
    assert list(read_records(path)) == [
        (2, {"instruction": "hi", "output": "hello"}),
        (3, {"instruction": "multi\nline", "output": "ok"}),
        (6, {"instruction": "last", "output": "one"}),
    ]


def test_csv_row_with_wrong_number_of_values(tmp_path):
    path = write(tmp_path, "a.csv", "a,b\n1,2\n1,2,3\n")
    with pytest.raises(DataError, match=r"a.csv, line 3: the row has 3 values but the header has 2 columns"):
        list(read_records(path))


def test_csv_header_only_is_empty(tmp_path):
    with pytest.raises(DataError, match=r"file is empty \(a header but no rows\)"):
        list(read_records(write(tmp_path, "a.csv", "a,b\n")))


def test_parquet_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one", "two", "three"]}), path)
    assert list(read_records(path)) == [(1, {"text": "one"}), (2, {"text": "two"}), (3, {"text": "three"})]
    assert str(DataError("field 'text' is empty", path, 2)) == f"{path}, row 2: field 'text' is empty"


def test_txt_documents_split_on_blank_lines(tmp_path):
    path = write(tmp_path, "a.txt", "First doc\nstill first\n\n\nSecond doc\n\nThird\n")
    assert list(read_records(path, sample_by="paragraph")) == [(1, {"text": "First doc\nstill first"}), (5, {"text": "Second doc"}),
                                        (7, {"text": "Third"})]


def test_txt_rows_by_line_paragraph_or_document(tmp_path):
    """As datasets' text loader: one row per line by default; paragraph and document on request."""
    path = write(tmp_path, "a.txt", "First doc\nstill first\n\n\nSecond doc\n\nThird\n")
    assert list(read_records(path)) == [(1, {"text": "First doc"}), (2, {"text": "still first"}),
                                        (5, {"text": "Second doc"}), (7, {"text": "Third"})]
    assert list(read_records(path, sample_by="document")) == [
        (1, {"text": "First doc\nstill first\n\n\nSecond doc\n\nThird"})]
    bad = write(tmp_path, "b.txt", b"good\nbad \xff\nlast\n", binary=True)
    assert collect(bad)[0] == [(1, {"text": "good"}), (3, {"text": "last"})]
    with pytest.raises(DataError, match="sample_by must be one of line, paragraph, document, not 'word'"):
        list(read_records(path, sample_by="word"))


@pytest.mark.parametrize("name", ["e.json", "e.jsonl", "e.csv", "e.txt"])
def test_empty_file(tmp_path, name):
    path = write(tmp_path, name, "  \n\n")
    with pytest.raises(DataError) as err:
        list(read_records(path))
    assert str(err.value) == f"{path}: file is empty"


def test_empty_json_array(tmp_path):
    with pytest.raises(DataError, match=r"file is empty \(an empty JSON array\)"):
        list(read_records(write(tmp_path, "e.json", "[ ]")))


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = write(tmp_path, "a.jsonl", b'{"a": "ok"}\n{"a": "caf\xe9"}\n', binary=True)
    with pytest.raises(DataError) as err:
        list(read_records(path))
    assert str(err.value) == f"{path}, line 2: the file is not valid UTF-8 (byte 0xe9 at column 11); save it as UTF-8"


def test_non_utf8_json_names_the_line(tmp_path):
    path = write(tmp_path, "a.json", b'[\n{"a": "ok"},\n{"a": "caf\xe9"}\n]', binary=True)
    with pytest.raises(DataError, match=r"a.json, line 3: the file is not valid UTF-8 \(byte 0xe9\)"):
        list(read_records(path))


def test_utf8_bom_is_ignored(tmp_path):
    path = write(tmp_path, "a.jsonl", '\ufeff{"a": "你好"}\n'.encode("utf-8"), binary=True)
    assert list(read_records(path)) == [(1, {"a": "你好"})]


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'"):
        list(read_records(write(tmp_path, "a.xlsx", "x")))
    with pytest.raises(DataError, match=r"nope.json: file not found"):
        list(read_records(tmp_path / "nope.json"))


def collect(path, **kw):
    """(records, problems) of a file read with on_error."""
    problems = []
    return list(read_records(path, on_error=problems.append, **kw)), [str(p) for p in problems]


def test_on_error_skips_a_broken_jsonl_line_and_goes_on(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"a": 1}\n{"a": 2\n42\n{"a": 4}\n')
    records, problems = collect(path)
    assert records == [(1, {"a": 1}), (4, {"a": 4})]
    assert problems == [f"{path}, line 2: invalid JSON (Expecting ',' delimiter at column 8)",
                        f"{path}, line 3: expected a JSON object, found int 42"]


def test_on_error_keeps_line_numbers_after_a_non_utf8_line(tmp_path):
    path = write(tmp_path, "a.csv", b'q,a\nok,1\ncaf\xe9,2\nlast,3\nx,y,z\n', binary=True)
    records, problems = collect(path)
    assert records == [(2, {"q": "ok", "a": "1"}), (4, {"q": "last", "a": "3"})]
    assert problems == [f"{path}, line 3: the file is not valid UTF-8 (byte 0xe9 at column 4); save it as UTF-8",
                        f"{path}, line 5: the row has 3 values but the header has 2 columns"]


def test_on_error_leaves_out_the_text_document_with_a_bad_line(tmp_path):
    path = write(tmp_path, "a.txt", b"good doc\n\nbad \xff doc\nsecond line\n\nlast\n", binary=True)
    records, problems = collect(path, sample_by="paragraph")
    assert records == [(1, {"text": "good doc"}), (6, {"text": "last"})]
    assert problems == [f"{path}, line 3: the file is not valid UTF-8 (byte 0xff at column 5); save it as UTF-8"]


def test_on_error_does_not_hide_a_json_syntax_error_or_an_empty_file(tmp_path):
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        collect(write(tmp_path, "bad.json", '[{"a": 1},\n {"a": 2,}]'))
    with pytest.raises(DataError, match="file is empty"):
        collect(write(tmp_path, "e.jsonl", "\n"))


def test_save_to_disk_directories(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(2500)]  # more than one Arrow batch
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    assert [r for _, r in read_records(tmp_path / "one")] == rows
    assert next(read_records(tmp_path / "one", limit=1)) == (1, rows[0])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:3]),
                          "test": datasets.Dataset.from_list(rows[3:4])}).save_to_disk(tmp_path / "dict")
    assert list(read_records(tmp_path / "dict")) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(tmp_path / "notrain")
    with pytest.raises(DataError, match=r"notrain: this DatasetDict has no train split \(splits: test\)"):
        list(read_records(tmp_path / "notrain"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a directory must be a datasets save_to_disk directory"):
        list(read_records(tmp_path / "plain"))
    assert str(DataError("field 'output' is empty", tmp_path / "one", 7)) == f"{tmp_path / 'one'}, row 7: field 'output' is empty"
