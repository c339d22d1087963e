"""DataError: one typed error for every problem with a data file, a registry or a template.

Its message is one sentence that names the file, the line (or the row of a parquet file)
and the field, so the web UI and ``status.json`` can show it as is, e.g.
``data/foo.jsonl, line 17: field 'output' is missing (alpaca format needs instruction and output)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


class DataError(ValueError):
    """A data file, registry entry or record that cannot be used."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        super().__init__(self.message)

    def located(self, file: str | Path | None = None, line: int | None = None) -> DataError:
        """A copy of this error with the file and line filled in where they were unknown."""
        return DataError(self.message, self.file or (str(file) if file is not None else None),
                         self.line if self.line is not None else line, self.field)

    def __str__(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.line is not None:
            file = self.file or ""
            unit = "row" if file.endswith(".parquet") or os.path.isdir(file) else "line"  # a dir: save_to_disk
            where.append(f"{unit} {self.line}")
        message = self.message
        if self.file and self.field and not re.search(rf"(?<![\w.]){re.escape(self.field)}(?![\w])", message):
            message = f"field '{self.field}': {message}"
        return f"{', '.join(where)}: {message}" if where else message

    def __reduce__(self):  # keep file/line/field when the error crosses a process boundary
        return (DataError, (self.message, self.file, self.line, self.field))
