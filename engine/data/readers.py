"""Streaming readers: one data file in, ``(line, record)`` pairs out.

``read_records`` understands .json, .jsonl, .csv/.tsv, .parquet and .txt files, and
``datasets`` ``save_to_disk`` directories (Arrow shards, read batch by batch from a memory
map; a DatasetDict gives its ``train`` split). Every problem becomes a :class:`DataError`
that names the file and the line (the row for parquet and Arrow): JSON syntax errors carry
the line and column of ``json.JSONDecodeError``, invalid UTF-8 names the line it sits on,
and an empty file says so. JSON Lines, CSV and text files are read line by line, never
whole; a .json file is one document, so it is read at once, but records still come out one
at a time with the line each one starts on.

By default the first problem raises. With ``on_error``, a problem confined to one record
(a broken JSON Lines line, a line that is not valid UTF-8, a CSV row with the wrong number
of values, an array item that is not an object) is handed to ``on_error`` and reading goes
on with the next record; problems with the whole file (empty, a JSON syntax error in a
.json document, a bad header) still raise.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from .errors import DataError

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".txt")
SampleBy = Literal["line", "paragraph", "document"]
SAMPLE_BY: tuple[str, ...] = ("line", "paragraph", "document")  # how a .txt file is cut into rows
_WS = re.compile(r"[ \t\n\r]*")
OnError = Callable[[DataError], None]


def _raise(err: DataError) -> None:
    raise err


def read_records(path: str | Path, limit: int | None = None, on_error: OnError | None = None,
                 sample_by: SampleBy = "line") -> Iterator[tuple[int, Any]]:
    """Yield ``(line, record)`` for each record of ``path``, at most ``limit`` of them.

    ``line`` is the 1-based line a record starts on (the 1-based row for parquet and Arrow).
    A record is a dict, except that JSON and JSON Lines files may hold lists (``turns``
    format). ``on_error`` receives each one-record problem instead of raising it (see above).
    ``sample_by`` cuts a .txt file into rows by line, paragraph or document (other files ignore it).
    """
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by must be one of {', '.join(SAMPLE_BY)}, not {sample_by!r}", path, field="sample_by")
    path = Path(path)
    if path.is_dir():
        reader = _read_arrow_dir
    else:
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DataError(f"unsupported file type '{suffix or path.name}' (use {', '.join(SUFFIXES)}, "
                            "or a datasets save_to_disk directory)", path)
        if not path.is_file():
            raise DataError("file not found", path)
        reader = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".tsv": _read_csv,
                  ".parquet": _read_parquet, ".txt": _read_txt}[suffix]
    if limit is not None and limit <= 0:
        return
    items = reader(path, on_error or _raise, sample_by) if reader is _read_txt else reader(path, on_error or _raise)
    for count, item in enumerate(items, 1):
        yield item
        if limit is not None and count >= limit:
            return


def is_data_path(path: Path) -> bool:
    """A file of a readable type, or a ``datasets`` save_to_disk directory."""
    if path.is_dir():
        return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    return path.is_file() and path.suffix.lower() in SUFFIXES


def _decoded_lines(path: Path, on_error: OnError) -> Iterator[tuple[int, str | None]]:
    """(line number, text) for each line of a UTF-8 file, read lazily, newline kept; text is None
    for a line that is not valid UTF-8 (after ``on_error`` was told), so line numbers stay right."""
    with open(path, "rb") as f:
        encoding = _wide_encoding(f.read(4))
        if encoding:
            raise DataError(f"not UTF-8: the file is {encoding}; save it as UTF-8", path)
        f.seek(0)
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                on_error(DataError(f"the file is not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                   f"{err.start + 1}); save it as UTF-8", path, number))
                yield number, None
                continue
            if number == 1:
                text = text.removeprefix("\ufeff")
            yield number, text


def _wide_encoding(head: bytes) -> str | None:
    """UTF-16 or UTF-32, told by a byte-order mark or by the NUL bytes between ASCII characters."""
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32 (it starts with a UTF-32 byte-order mark)"),
                      (b"\x00\x00\xfe\xff", "UTF-32 (it starts with a UTF-32 byte-order mark)"),
                      (b"\xff\xfe", "UTF-16 (it starts with a UTF-16 byte-order mark)"),
                      (b"\xfe\xff", "UTF-16 (it starts with a UTF-16 byte-order mark)")):
        if head.startswith(bom):
            return name
    if len(head) >= 2 and b"\x00" in head[:2]:
        return "UTF-16 (a NUL byte next to each ASCII character)"
    return None


def _not_a_record(record: Any, path: Path, line: int) -> DataError | None:
    if isinstance(record, (dict, list)):
        return None
    return DataError(f"expected a JSON object, found {type(record).__name__} {json.dumps(record)[:40]}", path, line)


def _read_jsonl(path: Path, on_error: OnError) -> Iterator[tuple[int, Any]]:
    seen = False
    for number, text in _decoded_lines(path, on_error):
        if text is None:
            seen = True
            continue
        if not text.strip():
            continue
        seen = True
        try:
            record = json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as err:
            on_error(DataError(f"invalid JSON ({err.msg} at column {err.colno})", path, number))
            continue
        problem = _not_a_record(record, path, number)
        if problem:
            on_error(problem)
            continue
        yield number, record
    if not seen:
        raise DataError("file is empty", path)


def _read_json(path: Path, on_error: OnError) -> Iterator[tuple[int, Any]]:
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
        line = lines.at(pos)[0]
        problem = _not_a_record(record, path, line)
        if problem:
            raise problem
        yield line, record
        return
    pos = _WS.match(text, pos + 1).end()
    if pos < len(text) and text[pos] == "]":
        raise DataError("file is empty (an empty JSON array)", path)
    while True:
        if pos >= len(text):
            fail("unexpected end of file, the array is not closed with ']'", len(text) - 1)
        record, end = value(pos)
        line = lines.at(pos)[0]
        problem = _not_a_record(record, path, line)
        if problem:
            on_error(problem)
        else:
            yield line, record
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


def _read_csv(path: Path, on_error: OnError) -> Iterator[tuple[int, dict]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    undecodable: list[int] = []

    def lines():
        for number, text in _decoded_lines(path, on_error):
            if text is None:
                undecodable.append(number)
            yield "\n" if text is None else text

    source = lines()
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
            on_error(DataError(f"invalid CSV ({err})", path, start))
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        seen = True
        if len(row) != len(header):
            on_error(DataError(f"the row has {len(row)} values but the header has {len(header)} columns", path, start))
            continue
        yield start, dict(zip(header, row))
    if not seen and undecodable:
        raise DataError(f"not UTF-8: none of its rows reads as UTF-8 (the first at line {undecodable[0]}; Latin-1 or "
                        "Windows-1252 text?); save it as UTF-8", path)
    if not seen and header_looks_like_data(header):
        raise DataError(headerless(header) + "; the file has no other row", path, 1)
    if not seen:
        raise DataError(f"file is empty (a header but no rows); if its line ({', '.join(header)[:120]}) is data, a CSV "
                        "needs a first line naming its columns, e.g. instruction,output", path)


def header_looks_like_data(columns: list[str]) -> bool:
    """A CSV 'header' that is really the first row: numbers, or sentences rather than names."""
    def datum(name: str) -> bool:
        try:
            float(name)
            return True
        except ValueError:
            return len(name.split()) >= 4 or name[-1:] in "?.!。？！"
    return any(datum(c) for c in columns)


def headerless(columns: list[str]) -> str:
    return (f"the first line ({', '.join(columns)[:120]}) looks like data, not a header: a CSV needs a first line "
            "naming its columns, e.g. instruction,output (or map its columns)")


def _read_parquet(path: Path, on_error: OnError) -> Iterator[tuple[int, dict]]:
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


def _split_dir(path: Path) -> Path:
    """The directory holding ``state.json``: ``path`` itself, or the train split of a DatasetDict."""
    if (path / "state.json").is_file():
        return path
    if not (path / "dataset_dict.json").is_file():
        raise DataError("a directory must be a datasets save_to_disk directory (with state.json or "
                        "dataset_dict.json); point to a data file instead", path)
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"dataset_dict.json cannot be read ({err})", path) from None
    if "train" not in splits:
        raise DataError(f"this DatasetDict has no train split (splits: {', '.join(splits)}); point to one split's "
                        "directory", path)
    return path / "train"


def _read_arrow_dir(path: Path, on_error: OnError) -> Iterator[tuple[int, dict]]:
    """Rows of a save_to_disk directory, shard by shard, batch by batch (memory-mapped)."""
    import pyarrow as pa

    split = _split_dir(path)
    try:
        state = json.loads((split / "state.json").read_text(encoding="utf-8"))
        shards = [split / f["filename"] for f in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"state.json cannot be read ({err})", split) from None
    number = 0
    for shard in shards:
        try:
            with pa.memory_map(str(shard)) as source:
                for batch in pa.ipc.open_stream(source):
                    for record in batch.to_pylist():
                        number += 1
                        yield number, record
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"Arrow shard {shard.name} cannot be read ({err})", path, number + 1) from None
    if number == 0:
        raise DataError("file is empty (0 rows)", path)


def _read_txt(path: Path, on_error: OnError, sample_by: SampleBy = "line") -> Iterator[tuple[int, dict]]:
    """Plain text, as ``datasets``' text loader reads it: one row per non-blank line (``line``), per run of
    lines between blank lines (``paragraph``), or the whole file as one row (``document``). A row with a
    line that is not valid UTF-8 is left out (``on_error`` was told about that line)."""
    start, lines, seen, bad = 0, [], False, False
    for number, text in _decoded_lines(path, on_error):
        if text is None:
            seen = bad = True
            if sample_by == "line":
                bad = False
            continue
        text = text.rstrip("\r\n")
        if text.strip() or (sample_by == "document" and lines):
            if not lines:
                start = number
            lines.append(text)
            if sample_by != "line":
                continue
        if lines and not bad:
            seen = True
            yield start, {"text": "\n".join(lines).rstrip("\n")}
        lines, bad = [], False
    if lines and not bad:
        seen = True
        yield start, {"text": "\n".join(lines).rstrip("\n")}
    if not seen:
        raise DataError("file is empty", path)
