"""Issue 13, item 5 for data files: one clear sentence for a CSV in another encoding or without a header."""

from __future__ import annotations

import pytest

from engine.data.errors import DataError
from engine.data.inspection import inspect_source, open_source
from engine.data.readers import read_records


def _fatal(path) -> str:
    report = inspect_source(open_source(str(path)))
    assert report.fatal is not None
    return str(report.fatal)


def test_latin1_csv_says_not_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("instruction,output\ncafé au lait,très bon\nrésumé,voilà\n".encode("latin-1"))
    message = _fatal(path)  # before: "file is empty (a header but no rows)"
    assert message.startswith(f"{path}: not UTF-8: none of its rows reads as UTF-8 (the first at line 2")


@pytest.mark.parametrize("encoding, says", [
    ("utf-16", "not UTF-8: the file is UTF-16 (it starts with a UTF-16 byte-order mark)"),
    ("utf-16-le", "not UTF-8: the file is UTF-16 (a NUL byte next to each ASCII character)"),
    ("utf-32", "not UTF-8: the file is UTF-32"),
])
def test_utf16_and_utf32_files_say_not_utf8(tmp_path, encoding, says):
    for name in ("wide.csv", "wide.jsonl"):
        path = tmp_path / name
        text = "Q,A\nhi,there\n" if name.endswith(".csv") else '{"instruction": "hi", "output": "there"}\n'
        path.write_bytes(text.encode(encoding))
        with pytest.raises(DataError) as err:  # before: "cannot tell the format from the keys ( A 0 ,  Q 0 )"
            list(read_records(path))
        assert says in str(err.value)


def test_csv_without_a_header_gets_the_sentence_even_with_one_line(tmp_path):
    path = tmp_path / "one.csv"
    path.write_text("What is two plus two?,four\n")
    assert "looks like data, not a header: a CSV needs a first line naming its columns" in _fatal(path)
    path.write_text("Name a color,red\n")  # nothing marks this line as data: both readings are named
    message = _fatal(path)
    assert "a header but no rows" in message and "if its line (Name a color, red) is data" in message
