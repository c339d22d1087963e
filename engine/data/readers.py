"""Streaming readers: one data file in, ``(line, record)`` pairs out.

``read_records`` understands .json, .jsonl, .csv/.tsv, .parquet and .txt. Every problem
becomes a :class:`DataError` that names the file and the line (the row for parquet):
JSON syntax errors carry the line and column of ``json.JSONDecodeError``, invalid UTF-8
names the line it sits on, and an empty file says so. JSON Lines, CSV and text files are
read line by line, never whole; a .json file is one document, so it is read at once, but
records still come out one at a time with the line each one starts on.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
_WS = re.compile(r"[ \t\n\r]*")


def read_records(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` for each record of ``path``, at most ``limit`` of them.

    ``line`` is the 1-based line a record starts on (the 1-based row for parquet). A record
    is a dict, except that JSON and JSON Lines files may hold lists (``turns`` format).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type '{suffix or path.name}' (use {', '.join(SUFFIXES)})", path)
    if not path.is_file():
        raise DataError("file not found", path)
    reader = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv,
              ".parquet": _read_parquet, ".txt": _read_txt}[suffix]
    if limit is not None and limit <= 0:
        return
    for count, item in enumerate(reader(path), 1):
        yield item
        if limit is not None and count >= limit:
            return


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file, read lazily, newline kept."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"the file is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                                "save it as UTF-8", path, number) from None
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text


def _check_record(record: Any, path: Path, line: int) -> Any:
    if not isinstance(record, (dict, list)):
        raise DataError(f"expected a JSON object, found {type(record).__name__} {json.dumps(record)[:40]}", path, line)
    return record


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    seen = False
    for number, text in _decoded_lines(path):
        if not text.strip():
            continue
        seen = True
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", path, number) from None
        yield number, _check_record(record, path, number)
    if not seen:
        raise DataError("file is empty", path)


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"the file is not valid UTF-8 (byte 0x{data[err.start]:02x}); save it as UTF-8", path, line) from None
    if not text.strip():
        raise DataError("file is empty", path)

    lines = _LineCounter(text)

    def fail(message: str, pos: int):
        line, column = lines.at(pos)
        raise DataError(f"invalid JSON ({message} at column {column})", path, line)

    decoder = json.JSONDecoder()

    def value(pos: int) -> tuple[Any, int]:
        try:
            return decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg} at column {err.colno})", path, err.lineno) from None

    pos = _WS.match(text, 0).end()
    if text[pos] != "[":  # a single object
        record, end = value(pos)
        rest = _WS.match(text, end).end()
        if rest < len(text):
            hint = "; one object per line is JSON Lines: rename the file to .jsonl" if text[rest] in "{[" else ""
            fail(f"extra data after the first JSON value{hint}", rest)
        yield lines.at(pos)[0], _check_record(record, path, lines.at(pos)[0])
        return
    pos = _WS.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        raise DataError("file is empty (an empty JSON array)", path)
    while True:
        if pos >= len(text):
            fail("unexpected end of file, the array is not closed with ']'", len(text) - 1)
        record, end = value(pos)
        line = lines.at(pos)[0]
        yield line, _check_record(record, path, line)
        pos = _WS.match(text, end).end()
        if pos >= len(text):
            fail("unexpected end of file, the array is not closed with ']'", len(text) - 1)
        if text[pos] == ",":
            pos = _WS.match(text, pos + 1).end()
        elif text[pos] == "]":
            rest = _WS.match(text, pos + 1).end()
            if rest < len(text):
                fail("extra data after the closing ']'", rest)
            return
        else:
            fail("Expecting ',' delimiter", pos)


class _LineCounter:
    """1-based (line, column) of character offsets, for offsets that mostly increase."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> tuple[int, int]:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line, pos - self.text.rfind("\n", 0, pos)


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    source = (text for _, text in _decoded_lines(path))
    reader = csv.reader(source, delimiter=delimiter)
    header: list[str] = []
    try:
        while not any(h.strip() for h in header):  # the first non-blank line is the header
            header = next(reader)
    except StopIteration:
        raise DataError("file is empty", path) from None
    except csv.Error as err:
        raise DataError(f"invalid CSV ({err})", path, reader.line_num) from None
    header = [h.strip() for h in header]
    for i, name in enumerate(header):
        if not name:
            raise DataError(f"column {i + 1} of the header has no name", path, reader.line_num)
        if name in header[:i]:
            raise DataError(f"column name '{name}' appears twice in the header", path, reader.line_num)
    seen = False
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"invalid CSV ({err})", path, start) from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise DataError(f"the row has {len(row)} values but the header has {len(header)} columns", path, start)
        seen = True
        yield start, dict(zip(header, row))
    if not seen:
        raise DataError("file is empty (a header but no rows)", path)


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataError(f"not a readable parquet file ({err})", path) from None
    if pf.metadata.num_rows == 0:
        raise DataError("file is empty (0 rows)", path)
    number = 0
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _read_txt(path: Path) -> Iterator[tuple[int, dict]]:
    """Plain text: documents are separated by one or more blank lines."""
    start, lines, seen = 0, [], False
    for number, text in _decoded_lines(path):
        text = text.rstrip("\r\n")
        if text.strip():
            if not lines:
                start = number
            lines.append(text)
        elif lines:
            seen = True
            yield start, {"text": "\n".join(lines)}
            lines = []
    if lines:
        seen = True
        yield start, {"text": "\n".join(lines)}
    if not seen:
        raise DataError("file is empty", path)
