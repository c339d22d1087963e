"""The dataset registry: a YAML table that maps names to files, formats and columns.

    identity:
      file: identity.json          # relative to the registry file
      format: alpaca               # one of formats.FORMATS, or auto (detected from the first record)
      columns: {instruction: question}   # optional: canonical field -> the file's column
      kind: sft                    # sft | preference | kto | pretrain (derived from format if left out)
      description: one line for the UI

Every problem in the registry is reported at once, each with its line, so a broken entry
gives the UI a message instead of an empty dropdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import DataError
from .formats import FORMATS, KIND_OF_FORMAT, KINDS, detect_format
from .readers import SUFFIXES, read_records

ROOT = Path(__file__).resolve().parents[2]
ENTRY_KEYS = ("file", "format", "columns", "kind", "description")
CANONICAL_FIELDS = ("instruction", "input", "output", "system", "history", "conversations", "messages",
                    "conversation", "prompt", "chosen", "rejected", "completion", "label", "text")


@dataclass
class DatasetSpec:
    name: str
    path: Path
    format: str
    kind: str
    columns: dict = field(default_factory=dict)
    description: str = ""


class RegistryError(DataError):
    """One or more problems in a registry file; ``problems`` holds each as a DataError and
    ``specs`` the entries that are fine (so the UI can still offer them next to the message)."""

    def __init__(self, problems: list[DataError], file: str | Path, specs: dict | None = None):
        self.problems, self.specs = problems, specs or {}
        if len(problems) == 1:
            p = problems[0]
            super().__init__(p.message, file, p.line, p.field)
        else:
            joined = "; ".join(f"line {p.line}: {p.message}" if p.line else p.message for p in problems)
            super().__init__(f"{len(problems)} problems: {joined}", file)

    def __reduce__(self):
        return (RegistryError, (self.problems, self.file, self.specs))


def find_path(path: str | Path) -> Path:
    """``path`` as given, or relative to the project root when it does not exist from here."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path


def detect_file(path: Path) -> str:
    """The format of a data file, detected from its first record."""
    for line, record in read_records(path, limit=1):
        try:
            return detect_format(record)
        except DataError as err:
            raise err.located(path, line) from None
    raise DataError("file is empty", path)


def load_registry(path: str | Path) -> dict[str, DatasetSpec]:
    path = find_path(path)
    if not path.is_file():
        raise DataError("dataset registry not found", path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
    except UnicodeDecodeError:
        raise DataError("the registry is not valid UTF-8", path) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise DataError(f"invalid YAML ({getattr(err, 'problem', None) or err})", path,
                        mark.line + 1 if mark else None) from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise DataError("the registry must map dataset names to entries (file, format, kind, description)",
                        path, root.start_mark.line + 1)
    specs: dict[str, DatasetSpec] = {}
    problems: list[DataError] = []
    for key, value in root.value:
        name, line = str(key.value), key.start_mark.line + 1
        if name in specs:
            problems.append(DataError(f"dataset '{name}' is registered twice", path, line, name))
            continue
        try:
            specs[name] = _entry(name, value, path)
        except DataError as err:
            problems.append(err if err.line else err.located(path, line))
    if problems:
        raise RegistryError(problems, path, specs)
    return specs


def _scalar(node, name: str, key: str, path: Path) -> str:
    if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
        raise DataError(f"entry '{name}': '{key}' must be a non-empty string", path, node.start_mark.line + 1, key)
    return str(node.value)


def _entry(name: str, node, path: Path) -> DatasetSpec:
    where = node.start_mark.line + 1
    if not isinstance(node, yaml.MappingNode):
        raise DataError(f"entry '{name}' must be a mapping with file, format, kind and description", path, where, name)
    fields = {}
    for key, value in node.value:
        if key.value not in ENTRY_KEYS:
            raise DataError(f"entry '{name}': unknown key '{key.value}' (allowed: {', '.join(ENTRY_KEYS)})",
                            path, key.start_mark.line + 1, key.value)
        fields[key.value] = value
    if "file" not in fields:
        raise DataError(f"entry '{name}': key 'file' is missing", path, where, "file")
    file = path.parent / _scalar(fields["file"], name, "file", path)
    line = fields["file"].start_mark.line + 1
    if not file.is_file():
        raise DataError(f"entry '{name}': file '{file}' does not exist", path, line, "file")
    if file.suffix.lower() not in SUFFIXES:
        raise DataError(f"entry '{name}': file '{file}' has an unsupported type (use {', '.join(SUFFIXES)})",
                        path, line, "file")
    fmt = _scalar(fields["format"], name, "format", path) if "format" in fields else "auto"
    if fmt not in FORMATS and fmt != "auto":
        raise DataError(f"entry '{name}': unknown format '{fmt}' (one of auto, {', '.join(FORMATS)})",
                        path, fields["format"].start_mark.line + 1, "format")
    if fmt == "auto":
        try:
            fmt = detect_file(file)
        except DataError as err:
            raise DataError(f"entry '{name}': cannot detect the format of '{file}' ({err}); set format",
                            path, fields["format"].start_mark.line + 1, "format") from None
    kind = KIND_OF_FORMAT[fmt]
    if "kind" in fields:
        given = _scalar(fields["kind"], name, "kind", path)
        if given not in KINDS or given != kind:
            why = f"one of {', '.join(KINDS)}" if given not in KINDS else f"format '{fmt}' holds {kind} data"
            raise DataError(f"entry '{name}': kind '{given}' does not fit ({why})", path,
                            fields["kind"].start_mark.line + 1, "kind")
    columns = {}
    if "columns" in fields:
        cnode = fields["columns"]
        if not isinstance(cnode, yaml.MappingNode):
            raise DataError(f"entry '{name}': 'columns' must map canonical fields to the file's columns",
                            path, cnode.start_mark.line + 1, "columns")
        for ck, cv in cnode.value:
            if ck.value not in CANONICAL_FIELDS:
                raise DataError(f"entry '{name}': unknown canonical field '{ck.value}' in columns "
                                f"(one of {', '.join(CANONICAL_FIELDS)})", path, ck.start_mark.line + 1, "columns")
            columns[str(ck.value)] = _scalar(cv, name, f"columns.{ck.value}", path)
    description = _scalar(fields["description"], name, "description", path) if "description" in fields else ""
    return DatasetSpec(name, file, fmt, kind, columns, description)


def resolve_dataset(name_or_path: str, registry_path: str | Path) -> DatasetSpec:
    """A registered dataset by name, or a data file by path (format detected, kind from the format)."""
    registry, problem = {}, None
    try:
        registry = load_registry(registry_path)
    except DataError as err:
        registry, problem = getattr(err, "specs", {}), err
    if name_or_path in registry:
        return registry[name_or_path]
    path = find_path(name_or_path)
    if path.is_file():
        fmt = detect_file(path)
        return DatasetSpec(name_or_path, path, fmt, KIND_OF_FORMAT[fmt], {}, f"file {path.name}")
    if problem is not None:
        raise problem
    known = ", ".join(registry) or "none"
    raise DataError(f"unknown dataset '{name_or_path}': not a registered name (known: {known}) and not a data file",
                    find_path(registry_path))
