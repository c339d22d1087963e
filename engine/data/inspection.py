"""Look at a dataset before training on it: source, format, validation, previews, token lengths, registration.

One module for the web UI's Data tab and ``workbench data inspect|add`` (they call the same
functions):

* :func:`open_source` turns what a user typed into a :class:`Source`: a data file, a
  ``datasets`` save_to_disk directory, or a Hugging Face Hub name. The web UI passes its
  allowed roots, and a path outside them is refused.
* :func:`inspect_source` streams every record once: it detects the format (or takes the one
  given), applies the column mapping, and validates each record with ``formats.normalize``,
  the engine's own conversion. Unusable records are counted, never silently dropped: the
  first ``max_errors`` problems are kept (file, line, field) with a count of the rest. The
  first valid examples are kept for the preview, and a uniform random sample of the valid
  ones for the statistics, so a multi-GB file is never held in memory.
* :func:`token_lengths` tokenizes that sample with ``encode_sft`` (the trainer's encoder) and
  counts what ``cutoff_len`` truncates and which examples lose their whole answer.
* :func:`encode_example` is the label-mask preview: ``encode_sft`` + ``label_spans``, the same
  code path the trainer's dataset goes through.
* :func:`add_dataset` validates and registers a dataset in a registry (a workspace's, see
  ``registry.workspace_registry``), copying an uploaded file next to it and writing a copy
  without the unusable records when the user chose to skip them.

Imports no torch, transformers or gradio; ``datasets`` only for a Hub name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .encode import IGNORE_INDEX, encode_answers, encode_pretrain, encode_sft
from .errors import DataError
from .formats import FORMAT_FIELDS, KIND_OF_FORMAT, detect_format, normalize, raw_records
from .readers import SAMPLE_BY, SUFFIXES, header_looks_like_data, headerless, is_data_path
from .registry import DatasetSpec, append_entry, check_name, find_path, locked

MAX_ERRORS = 20
PREVIEW = 5
SAMPLE = 2000
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
NO_LIMIT = 10**9  # cutoff for measuring an example's full length


@dataclass(frozen=True)
class Source:
    """Where records come from: a local file or save_to_disk directory, or a Hub dataset name."""

    path: Path | None = None
    hub: str | None = None
    sample_by: str = "line"  # how a .txt file is cut into rows (readers.SAMPLE_BY)

    @property
    def text_file(self) -> bool:
        return self.path is not None and self.path.suffix.lower() == ".txt"

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else f"hub:{self.hub}"

    @property
    def columnar(self) -> bool:
        """Records with a fixed set of columns (a CSV header, a parquet or Arrow schema)."""
        return self.path is not None and (self.path.is_dir() or self.path.suffix.lower() in (".csv", ".tsv", ".parquet"))

    def records(self, fmt: str, limit: int | None = None, on_error=None):
        """(line, record) pairs as ``normalize`` takes them for format ``fmt``."""
        if self.path is not None:
            return raw_records(self.path, fmt, limit, on_error, self.sample_by)
        return _hub_records(self.hub, limit)


def open_source(text: str, allowed_roots: list[Path] | None = None, sample_by: str = "line") -> Source:
    """The source a user named; with ``allowed_roots``, a local path must lie inside one of them.
    ``sample_by`` cuts a .txt file into rows (line, paragraph or document)."""
    if sample_by not in SAMPLE_BY:
        raise DataError(f"sample_by must be one of {', '.join(SAMPLE_BY)}, not {sample_by!r}", field="sample_by")
    text = (text or "").strip()
    if not text:
        raise DataError("enter a data file, a datasets save_to_disk directory or a Hub dataset name", field="path")
    path = find_path(Path(text).expanduser())
    if path.exists():
        real = path.resolve()
        if allowed_roots is not None:  # the page's path policy (engine.run.paths)
            from engine.run.paths import PathPolicy

            policy = PathPolicy(tuple(allowed_roots))
            if not policy.allows(real):
                raise DataError(str(policy.refusal(text)), field="path")
        if not is_data_path(real):
            kinds = ", ".join(SUFFIXES)
            what = "directory is not a datasets save_to_disk directory" if real.is_dir() else "file type is not supported"
            raise DataError(f"this {what} (use {kinds}, or a directory written by Dataset.save_to_disk)", real)
        return Source(path=real, sample_by=sample_by)
    if HUB_NAME.fullmatch(text) and Path(text).suffix.lower() not in SUFFIXES:
        return Source(hub=text)
    raise DataError(f"'{text}' is not a file or directory here, nor a Hub dataset name (owner/name)", field="path")


def _hub_records(name: str, limit: int | None):
    """Rows of a Hub dataset's train split, streamed; a clear message when the Hub cannot be reached."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise DataError(f"cannot load '{name}' from the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE or "
                        "HF_DATASETS_OFFLINE); where the network allows, save it with Dataset.save_to_disk and point "
                        "to that directory")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:  # a quick probe: without it, datasets retries for half a minute before it gives up
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise DataError(f"cannot load '{name}' from the Hugging Face Hub: {host} is unreachable ({err}); where the "
                        "network allows, save it with Dataset.save_to_disk and point to that directory") from None
    import datasets

    try:
        rows = datasets.load_dataset(name, split="train", streaming=True)
        for number, row in enumerate(rows, 1):
            yield number, row
            if limit is not None and number >= limit:
                return
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise DataError(f"cannot load '{name}' from the Hugging Face Hub ({str(err).splitlines()[0]})") from None


def columns_of(source: Source, limit: int = 100) -> list[str]:
    """The file's own column names (keys of its first records, in order), for column mapping."""
    seen: dict[str, None] = {}
    try:
        for _, record in source.records("auto", limit, on_error=lambda err: None):
            if isinstance(record, dict):
                seen.update(dict.fromkeys(map(str, record)))
            if source.columnar:
                break
    except DataError:
        pass  # inspect_source reports it
    return list(seen)


@dataclass
class Report:
    """What :func:`inspect_source` found. ``ok``: readable, at least one record, none unusable."""

    source: Source
    format: str = ""  # the format records were checked against ("" when it could not be told)
    detected: bool = False  # the format was detected, not given
    kind: str = ""
    columns: dict = field(default_factory=dict)
    records: int = 0  # records read, usable or not
    valid: int = 0
    errors: list[DataError] = field(default_factory=list)  # the first max_errors problems
    error_count: int = 0  # unusable records
    fatal: DataError | None = None  # a problem that stopped reading: nothing after it was checked
    complete: bool = True  # False when max_records ended the check early: the rest was not read
    other_formats: Counter = field(default_factory=Counter)  # formats of unusable records that fit another one
    unused: Counter = field(default_factory=Counter)  # the file's columns the format does not read: records holding each
    examples: list[tuple[int, dict]] = field(default_factory=list)  # the first valid examples
    sample: list[dict] = field(default_factory=list)  # valid examples for statistics (uniform when sampled)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.fatal is None and self.error_count == 0 and self.valid > 0

    @property
    def sampled(self) -> bool:
        return len(self.sample) < self.valid


def detect_source(source: Source, columns: dict | None = None) -> str:
    """The format of the first readable record, its columns renamed by ``columns``."""
    unreadable: list[DataError] = []
    for line, record in source.records("auto", 1, on_error=unreadable.append):
        if columns and isinstance(record, dict):
            record = dict(record, **{canon: record[col] for canon, col in columns.items() if col in record})
        try:
            return detect_format(record)
        except DataError as err:
            message = err.message
            cols = [str(c) for c in record] if isinstance(record, dict) else []
            if source.path is not None and source.path.suffix.lower() in (".csv", ".tsv"):
                if header_looks_like_data(cols):
                    message, line = headerless(cols), 1
                else:
                    message += " (if the first line is data: a CSV needs a first line naming its columns)"
            raise DataError(message, source.path or source.label, line) from None
    if unreadable:  # no record could be read: the first reason is the file's problem
        raise unreadable[0]
    raise DataError("file is empty", source.label)


def inspect_source(source: Source, fmt: str = "auto", columns: dict | None = None, *, max_records: int | None = None,
                   max_errors: int = MAX_ERRORS, preview: int = PREVIEW, sample: int = SAMPLE, seed: int = 0) -> Report:
    """Stream every record of ``source`` once (at most ``max_records``): format, validation, preview, sample."""
    columns = {k: v for k, v in (columns or {}).items() if v}
    report = Report(source, columns=columns)
    where = source.path or source.label

    def full() -> bool:
        if max_records is not None and report.records >= max_records:
            report.complete = False
        return not report.complete

    def problem(err: DataError) -> None:
        if full():
            raise _Enough
        report.records += 1
        report.error_count += 1
        if len(report.errors) < max_errors:
            report.errors.append(err)

    try:
        if fmt == "auto":
            fmt = detect_source(source, columns)
            report.detected = True
        if fmt not in KIND_OF_FORMAT:
            raise DataError(f"unknown format '{fmt}' (one of {', '.join(KIND_OF_FORMAT)})", field="format")
        report.format, report.kind = fmt, KIND_OF_FORMAT[fmt]
        used = {columns.get(f, f) for f in FORMAT_FIELDS[fmt]}
        rng = random.Random(seed)
        for line, record in source.records(fmt, on_error=problem):
            if full():
                break
            try:
                example = normalize(record, fmt, columns)
            except DataError as err:
                problem(_mixed(err, record, fmt, columns, report).located(where, line))
                continue
            report.records += 1
            report.valid += 1
            if isinstance(record, dict):
                report.unused.update(k for k in record if k not in used and record[k] not in (None, "", [], {}))
            if len(report.examples) < preview:
                report.examples.append((line, example))
            if len(report.sample) < sample:  # reservoir sampling: every valid example equally likely
                report.sample.append(example)
            elif sample:
                slot = rng.randrange(report.valid)
                if slot < sample:
                    report.sample[slot] = example
    except _Enough:
        pass
    except DataError as err:
        report.fatal = err if err.file or source.hub else err.located(where)
    if source.text_file and report.fatal is None:
        report.notes.insert(0, f"sample_by: {source.sample_by}: {'' if report.complete else 'at least '}{report.records:,} rows (one per "
                               f"{'non-blank line' if source.sample_by == 'line' else source.sample_by})")
    if report.fatal is None and report.valid == 0 and report.error_count:
        report.notes.append("no record is usable")
    if report.unused:
        listed = ", ".join(f"'{c}' ({n:,} records)" for c, n in report.unused.most_common(10))
        report.notes.append(f"column{'s' if len(report.unused) > 1 else ''} not used by the {fmt} format, so not trained "
                            f"on: {listed}; map {'them' if len(report.unused) > 1 else 'it'} to a field, or choose "
                            "another format")
    if report.other_formats:
        found = ", ".join(f"{n:,} record{'s are' if n > 1 else ' is'} {f}" for f, n in report.other_formats.most_common())
        report.notes.append(f"mixed schemas: the file is {fmt} ({report.valid:,} usable records), but {found}; "
                            "split the file, or fix those records")
    return report


class _Enough(Exception):
    """max_records were read: stop the reader from inside its on_error callback."""


def _mixed(err: DataError, record: Any, fmt: str, columns: dict, report: Report) -> DataError:
    """Name the other format a record fits, when it does not fit the file's (mixed schemas)."""
    if columns:
        return err
    try:
        other = detect_format(record)
    except DataError:
        return err
    if other == fmt:
        return err
    report.other_formats[other] += 1
    return DataError(f"this record is {other} format, but the file is {fmt}: mixed schemas in one file ({err.message})",
                     err.file, err.line, err.field)


# ------------------------------------------------------------------ tokens


def answers(example: dict, kind: str) -> list[tuple[str, str]]:
    """(part, answer) of a preference pair ("chosen", "rejected") or a KTO example ("desirable" or "undesirable")."""
    if kind == "preference":
        return [("chosen", example["chosen"]), ("rejected", example["rejected"])]
    return [("desirable" if example["label"] else "undesirable", example["completion"])]


def encode_example(example: dict, kind: str, tokenizer, template, cutoff_len: int,
                   multiturn_loss: str = "all") -> list[tuple[str, dict]]:
    """(part, {input_ids, labels}) as the stage's encoder makes them, labels -100 where nothing is trained.

    sft: ``encode_sft`` (several parts with multiturn_loss=split); preference and kto: ``encode_answers``,
    one part per answer (the prompt, then that answer); pretrain: the first block ``encode_pretrain`` packs
    the document into. A part with no input_ids: nothing trainable fits in ``cutoff_len``.
    """
    if kind == "pretrain":
        return [("", block) for block in encode_pretrain([example["text"]], tokenizer, cutoff_len)[:1]]
    if kind == "sft":
        encoded = encode_sft(example, template, tokenizer, cutoff_len, multiturn_loss)
        return [("", enc) for enc in encoded] or [("", {"input_ids": [], "labels": []})]
    parts = answers(example, kind)
    encoded = encode_answers(example["prompt"], [a for _, a in parts], template, tokenizer, cutoff_len)
    if encoded is None:
        return [(part, {"input_ids": [], "labels": []}) for part, _ in parts]
    prompt_ids, answer_ids = encoded
    return [(part, {"input_ids": prompt_ids + ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids})
            for (part, _), ids in zip(parts, answer_ids)]


@dataclass
class Lengths:
    """Token lengths of a sample of examples and what ``cutoff_len`` does to them."""

    prompt: list[int]
    response: list[int]
    cutoff_len: int
    truncated: int  # examples longer than cutoff_len: cut (pretraining: split across blocks)
    lost: int  # examples of which no answer token is left: the trainer drops them
    population: int  # valid examples the sample was drawn from
    packed: bool = False  # pretraining: documents are packed into blocks, nothing is dropped

    @property
    def total(self) -> list[int]:
        return [p + r for p, r in zip(self.prompt, self.response)]

    @property
    def count(self) -> int:
        return len(self.prompt)

    @property
    def sampled(self) -> bool:
        return self.count < self.population


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def token_lengths(examples: list[dict], kind: str, tokenizer, template, cutoff_len: int,
                  population: int | None = None) -> Lengths:
    """Prompt and response tokens per example, by the stage's encoder (for preference data, the longer answer)."""
    prompt, response, truncated, lost = [], [], 0, 0
    for example in examples:
        if kind == "pretrain":
            p, r = 0, len(tokenizer(example["text"], add_special_tokens=False)["input_ids"]) + 1  # + eos
            gone = False
        elif kind == "sft":
            enc = encode_sft(example, template, tokenizer, NO_LIMIT)[0]
            r = sum(label != IGNORE_INDEX for label in enc["labels"])
            p = len(enc["labels"]) - r
            gone = p + r > cutoff_len and not encode_sft(example, template, tokenizer, cutoff_len)
        else:
            prompt_ids, answer_ids = encode_answers(example["prompt"], [a for _, a in answers(example, kind)],
                                                    template, tokenizer, NO_LIMIT)
            p, r = len(prompt_ids), max(map(len, answer_ids))
            gone = p >= cutoff_len  # encode_answers keeps the prompt whole: no answer token fits
        prompt.append(p)
        response.append(r)
        truncated += p + r > cutoff_len
        lost += gone
    return Lengths(prompt, response, cutoff_len, truncated, lost, population or len(examples), kind == "pretrain")


# ------------------------------------------------------------------ registering


def add_dataset(source: Source, name: str, registry: Path, fmt: str = "auto", columns: dict | None = None,
                kind: str | None = None, description: str = "", copy: bool = False,
                skip_invalid: bool = False) -> tuple[DatasetSpec, Report]:
    """Validate ``source`` and register it as ``name`` in ``registry``; returns the entry and the report.

    The file is registered where it is, unless ``copy`` (an upload: copied beside the registry
    so the entry outlives the upload folder), or it is a Hub dataset (its rows are written to a
    JSON Lines file beside the registry). Unusable records refuse the dataset unless
    ``skip_invalid``: then the usable records are written to ``<name>.jsonl`` beside the
    registry, and the description says how many were left out.
    """
    registry = Path(registry)
    with locked(registry):
        check_name(name, registry)
        report = inspect_source(source, fmt, columns, max_errors=3, preview=0, sample=0)
        if report.fatal is not None:
            raise report.fatal
        if report.valid == 0:
            raise DataError(f"none of the {report.records:,} records can be used (first: {_brief(report.errors[0])})"
                            if report.errors else "the dataset has no records", source.path or source.label)
        if report.error_count and not skip_invalid:
            raise DataError(f"{report.error_count:,} of {report.records:,} records cannot be used (first: "
                            f"{_brief(report.errors[0])}); fix them, or skip them (a copy without them is saved)",
                            source.path or source.label)
        if kind and kind != report.kind:
            raise DataError(f"kind '{kind}' does not fit format '{report.format}', which holds {report.kind} data",
                            field="kind")
        folder = registry.parent
        if report.error_count or source.hub:
            file = _write_usable(source, report, folder / f"{name}.jsonl")
        elif copy:
            file = folder / (name if source.path.is_dir() else name + source.path.suffix.lower())
            _refuse_existing(file)
            (shutil.copytree if source.path.is_dir() else shutil.copyfile)(source.path, file)
        else:
            file = source.path
        origin = source.hub or (source.path.name if source.path else "")
        description = description.strip() or f"{report.valid:,} records from {origin}"
        if report.error_count:
            description += f" ({report.error_count:,} unusable records left out)"
        spec = append_entry(registry, name, file, report.format, report.kind, report.columns, description,
                            source.sample_by)
    return spec, report


def _brief(err: DataError) -> str:
    """A record's problem without the file name (the sentence around it names the file)."""
    return str(err).removeprefix(f"{err.file}, ") if err.file else str(err)


def _refuse_existing(file: Path) -> None:
    if file.exists():
        raise DataError(f"{file} already exists; choose another name, or remove it first", field="name")


def _write_usable(source: Source, report: Report, file: Path) -> Path:
    """The usable records as they are in the source (one JSON object or list per line)."""
    _refuse_existing(file)
    tmp = file.with_name(file.name + ".part")
    with open(tmp, "w", encoding="utf-8") as out:
        for _, record in source.records(report.format, on_error=lambda err: None):
            try:
                normalize(record, report.format, report.columns)
            except DataError:
                continue
            out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, file)
    return file
