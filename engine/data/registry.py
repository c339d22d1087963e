"""The dataset registry: a YAML table that maps names to files, formats and columns.

    identity:
      file: identity.json          # relative to the registry file
      format: alpaca               # one of formats.FORMATS, or auto (detected from the first record)
      columns: {instruction: question}   # optional: canonical field -> the file's column
      kind: sft                    # sft | preference | kto | pretrain (derived from format if left out)
      sample_by: line              # .txt only: one row per line (default), paragraph or document
      description: one line for the UI

``file`` may also be a ``datasets`` save_to_disk directory. The one reserved top-level key,
``include``, layers a registry over others (a path or a list of paths, relative to this
file): their datasets come first and this file adds its own. A workspace's registry
(``<workspace>/datasets/dataset_info.yaml``, written by the web UI's Data tab and by
``workbench data add``) includes the project's ``data/dataset_info.yaml`` this way, so one
``data.registry`` path names both the demo datasets and the user's own.

Every problem in the registry (and in the ones it includes) is reported at once, each with
its file and line, so a broken entry gives the UI a message instead of an empty dropdown.
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.run import paths
from engine.run.config import DEFAULT_REGISTRY

from .errors import DataError
from .formats import FORMAT_FIELDS, FORMATS, KIND_OF_FORMAT, KINDS, detect_format
from .readers import SAMPLE_BY, SUFFIXES, is_data_path, read_records

ROOT = Path(__file__).resolve().parents[2]
PROJECT_REGISTRY = ROOT / DEFAULT_REGISTRY
INCLUDE = "include"
ENTRY_KEYS = ("file", "format", "columns", "kind", "sample_by", "description")
CANONICAL_FIELDS = tuple(dict.fromkeys(f for fields in FORMAT_FIELDS.values() for f in fields))
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class DatasetSpec:
    name: str
    path: Path
    format: str
    kind: str
    columns: dict = field(default_factory=dict)
    description: str = ""
    registry: Path | None = field(default=None, compare=False)  # the file that registers it (None: a bare path)
    sample_by: str = "line"  # how a .txt file is cut into rows (readers.SAMPLE_BY)


class RegistryError(DataError):
    """One or more problems in a registry file; ``problems`` holds each as a DataError and
    ``specs`` the entries that are fine (so the UI can still offer them next to the message)."""

    def __init__(self, problems: list[DataError], file: str | Path, specs: dict | None = None):
        self.problems, self.specs = problems, specs or {}
        if len(problems) == 1:
            p = problems[0]
            super().__init__(p.message, p.file or file, p.line, p.field)
        else:
            joined = "; ".join(str(p) if p.file and p.file != str(file) else
                               f"line {p.line}: {p.message}" if p.line else p.message for p in problems)
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


def workspace_registry(workspace: str | Path) -> Path:
    """Where a workspace's own datasets are registered (the file may not exist yet)."""
    return Path(workspace) / "datasets" / "dataset_info.yaml"


def load_registry(path: str | Path, _including: tuple[Path, ...] = ()) -> dict[str, DatasetSpec]:
    """Every dataset of a registry file and of the registries it includes, by name."""
    path = find_path(path)
    if (policy := paths.active()) is not None and not policy.allows(path):
        raise DataError(str(policy.refusal(str(path))), field="registry")
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
        if key.value == INCLUDE:
            _include(value, path, _including + (path.resolve(),), specs, problems)
    for key, value in root.value:
        name, line = str(key.value), key.start_mark.line + 1
        if name == INCLUDE:
            continue
        if name in specs:
            other = specs[name].registry
            where = f" (also in {other})" if other and other != path else ""
            problems.append(DataError(f"dataset '{name}' is registered twice{where}", path, line, name))
            continue
        try:
            specs[name] = _entry(name, value, path)
        except DataError as err:
            problems.append(err if err.line else err.located(path, line))
    if problems:
        raise RegistryError(problems, path, specs)
    return specs


def _include(node, path: Path, including: tuple[Path, ...], specs: dict, problems: list) -> None:
    """Load the registries an ``include`` key names into ``specs`` (their problems into ``problems``)."""
    line = node.start_mark.line + 1
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for item in items:
        if not isinstance(item, yaml.ScalarNode) or not str(item.value).strip():
            problems.append(DataError(f"'{INCLUDE}' must be a registry path or a list of them", path, line, INCLUDE))
            continue
        target = (path.parent / Path(item.value).expanduser()).resolve()
        if (policy := paths.active()) is not None and not policy.allows(target):
            problems.append(DataError(f"'{INCLUDE}': {policy.refusal(str(target))}", path, item.start_mark.line + 1,
                                      INCLUDE))
            continue
        if target in including:
            problems.append(DataError(f"'{INCLUDE}' of {target} makes a cycle (it includes this file)", path,
                                      item.start_mark.line + 1, INCLUDE))
            continue
        try:
            found = load_registry(target, including)
        except RegistryError as err:
            found = err.specs
            problems.extend(err.problems)
        except DataError as err:
            problems.append(DataError(f"'{INCLUDE}': {err}", path, item.start_mark.line + 1, INCLUDE))
            continue
        for name, spec in found.items():
            specs.setdefault(name, spec)


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
    file = path.parent / Path(_scalar(fields["file"], name, "file", path)).expanduser()
    line = fields["file"].start_mark.line + 1
    if (policy := paths.active()) is not None and not policy.allows(file):
        raise DataError(f"entry '{name}': {policy.refusal(str(file))}", path, line, "file")
    if not file.exists():
        raise DataError(f"entry '{name}': file '{file}' does not exist", path, line, "file")
    if not is_data_path(file):
        raise DataError(f"entry '{name}': file '{file}' has an unsupported type (use {', '.join(SUFFIXES)}, or "
                        "a datasets save_to_disk directory)", path, line, "file")
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
    sample_by = "line"
    if "sample_by" in fields:
        sample_by = _scalar(fields["sample_by"], name, "sample_by", path)
        line = fields["sample_by"].start_mark.line + 1
        if sample_by not in SAMPLE_BY:
            raise DataError(f"entry '{name}': sample_by '{sample_by}' is not one of {', '.join(SAMPLE_BY)}",
                            path, line, "sample_by")
        if file.suffix.lower() != ".txt":
            raise DataError(f"entry '{name}': sample_by applies to .txt files only, and '{file.name}' is not one",
                            path, line, "sample_by")
    return DatasetSpec(name, file, fmt, kind, columns, description, path, sample_by)


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
    if (policy := paths.active()) is not None and not policy.allows(path):
        raise DataError(str(policy.refusal(name_or_path)), field="datasets")
    if is_data_path(path):
        fmt = detect_file(path)
        return DatasetSpec(name_or_path, path, fmt, KIND_OF_FORMAT[fmt], {}, f"file {path.name}")
    if problem is not None:
        raise problem
    known = ", ".join(registry) or "none"
    raise DataError(f"unknown dataset '{name_or_path}': not a registered name (known: {known}) and not a data file",
                    find_path(registry_path))


def check_name(name: str, registry: Path) -> None:
    """Refuse a dataset name that is malformed or already taken in ``registry`` (or what it includes)."""
    if not NAME.fullmatch(name or "") or name == INCLUDE:
        raise DataError(f"'{name}' cannot name a dataset: use 1-64 letters, digits, '_', '-' or '.', starting with a "
                        f"letter or digit (and not '{INCLUDE}')", field="name")
    # A registry not written yet will include the project's (append_entry creates it so): names are unique
    # across every registry that one path reads, checked in every case.
    source = registry if registry.is_file() else PROJECT_REGISTRY
    try:
        specs = load_registry(source)
    except RegistryError as err:
        specs = err.specs
    except DataError:
        specs = {}
    if name in specs:
        where = specs[name].registry or source
        raise DataError(f"a dataset named '{name}' is already registered in {where}; choose another name",
                        field="name")


@contextmanager
def locked(registry: Path):
    """Hold an exclusive lock on a registry while it is checked and written (two Saves at once)."""
    registry.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(registry.parent, os.O_RDONLY)  # the folder, which exists before the registry does
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


def append_entry(registry: Path, name: str, file: Path, fmt: str, kind: str, columns: dict | None = None,
                 description: str = "", sample_by: str = "line") -> DatasetSpec:
    """Add one entry to ``registry`` (created, including the project's registry, if it does not exist).

    ``file`` is written relative to the registry when it lies beside or below it, absolute
    otherwise. The caller holds ``locked(registry)`` and has checked the name. Returns the
    entry as the registry now reads it.
    """
    if not registry.is_file():
        registry.write_text("# Datasets added in the web UI's Data tab or with `workbench data add`.\n"
                            f"# '{INCLUDE}' layers this registry over the project's demo datasets.\n"
                            + yaml.safe_dump({INCLUDE: [str(PROJECT_REGISTRY)]}, sort_keys=False),
                            encoding="utf-8")
    file = file.resolve()
    where = file.relative_to(registry.parent.resolve()) if file.is_relative_to(registry.parent.resolve()) else file
    entry = {"file": str(where), "format": fmt, "kind": kind}
    if columns:
        entry["columns"] = dict(columns)
    if file.suffix.lower() == ".txt":
        entry["sample_by"] = sample_by
    if description:
        entry["description"] = description
    block = yaml.safe_dump({name: entry}, sort_keys=False, allow_unicode=True, width=1000)
    ends_open = not registry.read_bytes().endswith(b"\n")
    with open(registry, "a", encoding="utf-8") as f:  # appended: the entries already there are never rewritten
        f.write(("\n" if ends_open else "") + "\n" + block)
    try:
        return load_registry(registry)[name]
    except RegistryError as err:
        if name in err.specs:  # another entry's problem; this one is fine
            return err.specs[name]
        raise
