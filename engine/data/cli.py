"""`workbench data inspect FILE` and `workbench data add FILE --name N`: the Data tab's functions for scripts and CI.

``inspect`` prints the detected format, the record count, each problem with its line, token-length
percentiles and the truncation count, and exits 1 on invalid data (2 on bad arguments).
``add`` registers a dataset in the workspace's registry exactly as the tab's Save does.
"""

from __future__ import annotations

import sys
from pathlib import Path

from engine.run.config import DataConfig

EXIT_INVALID, EXIT_USAGE = 1, 2
PERCENTILES = (50, 90, 99)


class UsageError(Exception):
    """A bad argument: exit code 2."""


def parse_columns(text: str | None) -> dict[str, str]:
    """``instruction=question,output=answer`` -> {canonical field: the file's column}."""
    from engine.data.registry import CANONICAL_FIELDS

    columns = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        canon, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not canon or not column:
            raise UsageError(f"--columns takes field=column pairs separated by commas, e.g. instruction=question; "
                             f"got '{item.strip()}'")
        if canon not in CANONICAL_FIELDS:
            raise UsageError(f"--columns: unknown field '{canon}' (one of {', '.join(CANONICAL_FIELDS)})")
        columns[canon] = column
    return columns


def _tokenizer_and_template(model: str, template: str):
    from engine.data.encode import load_tokenizer
    from engine.data.templates import TemplateError, get_template
    from engine.run.config import ModelConfig

    path = Path(model).expanduser()
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UsageError(f"--model {model}: no tokenizer here (a local Hugging Face model directory is needed)")
    tokenizer = load_tokenizer(ModelConfig(path=str(path)))
    try:
        return tokenizer, get_template(template, tokenizer)
    except TemplateError as err:
        raise UsageError(f"--template {template}: {err.message}") from None


def _table(lengths) -> list[str]:
    from engine.data.inspection import percentile

    head = f"  {'':10}" + "".join(f"{'p' + str(q):>8}" for q in PERCENTILES) + f"{'max':>8}"
    rows = [head]
    series = [("total", lengths.total)] if lengths.packed else \
        [("prompt", lengths.prompt), ("response", lengths.response), ("total", lengths.total)]
    for name, values in series:
        rows.append(f"  {name:10}" + "".join(f"{percentile(values, q):>8,}" for q in PERCENTILES) + f"{max(values):>8,}")
    return rows


def report_lines(report, lengths=None, model: str = "", template: str = "") -> list[str]:
    """The inspection report as the CLI prints it."""
    lines = [f"source: {report.source.label}"]
    if report.format:
        how = " (detected)" if report.detected else ""
        mapped = ", ".join(f"{k}={v}" for k, v in report.columns.items())
        lines.append(f"format: {report.format}{how}, kind {report.kind}" + (f", columns {mapped}" if mapped else ""))
    lines.append(f"records: {report.records:,} read, {report.valid:,} usable, {report.error_count:,} unusable")
    problems = report.errors + ([report.fatal] if report.fatal else [])
    if problems:
        lines.append("problems:")
        lines += [f"  {err}" for err in problems]
        if report.error_count > len(report.errors):
            lines.append(f"  ... and {report.error_count - len(report.errors):,} more unusable records")
    if not report.complete:
        lines.append(f"note: only the first {report.records:,} records were checked; the rest were not read")
    lines += [f"note: {n}" for n in report.notes]
    if lengths is not None and lengths.count:
        which = (f"a random sample of {lengths.count:,} of {lengths.population:,} usable records" if lengths.sampled
                 else f"all {lengths.count:,} usable records")
        lines.append(f"tokens ({model}, template {template}; {which}):")
        lines += _table(lengths)
        if lengths.packed:
            lines.append(f"cutoff_len {lengths.cutoff_len:,}: documents are packed into blocks of cutoff_len tokens; "
                         f"{lengths.truncated:,} longer ones continue in the next block, nothing is dropped")
        else:
            share = 100 * lengths.truncated / lengths.count
            lines.append(f"cutoff_len {lengths.cutoff_len:,}: {lengths.truncated:,} truncated ({share:.1f}%), "
                         f"{lengths.lost:,} lose their whole answer (dropped in training)")
    elif report.sample and not model:
        lines.append("tokens: pass --model PATH for token lengths and truncation")
    lines.append("result: " + ("OK" if report.ok else "INVALID"))
    return lines


def _exit_codes(run):
    """A subcommand whose UsageError exits 2 and whose DataError exits 1, each printed as one error line."""
    def wrapped(args) -> int:
        from engine.data.errors import DataError

        try:
            return run(args)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INVALID
    return wrapped


def _check_cutoff(value: int) -> None:
    """--cutoff-len within data.cutoff_len's own bounds (declared once, in DataConfig)."""
    from pydantic import ValidationError

    from engine.run.config import DataConfig

    try:
        DataConfig(cutoff_len=value)
    except ValidationError as err:
        raise UsageError(f"--cutoff-len {value}: {err.errors()[0]['msg'].lower()}") from None


@_exit_codes
def inspect(args) -> int:
    from engine.data.errors import DataError
    from engine.data.inspection import inspect_source, open_source, token_lengths

    columns = parse_columns(args.columns)
    _check_cutoff(args.cutoff_len)
    source = open_source(args.file, sample_by=args.sample_by)
    tok = _tokenizer_and_template(args.model, args.template) if args.model else None
    report = inspect_source(source, args.format, columns, max_errors=args.max_errors, sample=args.sample,
                            max_records=args.max_records)
    lengths = None
    if tok is not None and report.sample:
        try:
            lengths = token_lengths(report.sample, report.kind, *tok, args.cutoff_len, report.valid)
        except (DataError, ValueError) as err:
            raise UsageError(f"cannot tokenize with {args.model} and template {args.template}: {err}") from None
    print("\n".join(report_lines(report, lengths, args.model or "", args.template)))
    return 0 if report.ok else EXIT_INVALID


@_exit_codes
def add(args) -> int:
    from engine.run import launch
    from engine.data.inspection import add_dataset, open_source
    from engine.data.registry import workspace_registry

    registry = Path(args.registry) if args.registry else workspace_registry(launch.workspace_dir(args.workspace))
    spec, report = add_dataset(open_source(args.file, sample_by=args.sample_by), args.name, registry, args.format, parse_columns(args.columns),
                               args.kind, args.description or "", copy=args.copy, skip_invalid=args.skip_invalid)
    skipped = f", {report.error_count:,} unusable records left out" if report.error_count else ""
    print(f"registered '{spec.name}' in {registry}: {spec.format} format, {spec.kind} data, "
          f"{report.valid:,} records{skipped}, file {spec.path}")
    print(f"train on it: workbench train CONFIG data.registry={registry} data.datasets=[{spec.name}]")
    return 0


def add_parsers(sub) -> None:
    from engine.data.formats import FORMATS, KINDS
    from engine.data.readers import SAMPLE_BY

    formats = ["auto", *FORMATS]
    data = sub.add_parser("data", help="inspect a dataset (format, problems, token lengths) or register it")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("inspect", help="check every record, print token-length percentiles and truncation; "
                                        "exit 1 on invalid data")
    p.add_argument("file", help="a .json/.jsonl/.csv/.tsv/.parquet/.txt file, a save_to_disk directory, or a Hub name")
    p.add_argument("--format", default="auto", choices=formats, help="the records' format (default: detected)")
    p.add_argument("--columns", default=None, help="field=column pairs, e.g. instruction=question,output=answer")
    p.add_argument("--sample-by", default="line", choices=SAMPLE_BY,
                   help="a .txt file: one row per line (default), paragraph (blank-line separated) or document")
    p.add_argument("--model", default=None, help="a local model directory: tokenize with its tokenizer")
    p.add_argument("--template", default="auto", help="chat template (auto or a registry name)")
    cutoff = DataConfig.model_fields["cutoff_len"]
    p.add_argument("--cutoff-len", type=int, default=cutoff.default, help=f"{cutoff.description} (default %(default)s)")
    p.add_argument("--max-errors", type=int, default=20, help="problems to print (the rest are counted)")
    p.add_argument("--sample", type=int, default=2000, help="records tokenized for the statistics (a random sample)")
    p.add_argument("--max-records", type=int, default=None, help="check only the first N records")
    p.set_defaults(func=inspect)

    p = dsub.add_parser("add", help="validate a dataset and register it in the workspace's dataset registry")
    p.add_argument("file", help="a data file, a save_to_disk directory, or a Hub name")
    p.add_argument("--name", required=True, help="the dataset's name in the registry")
    p.add_argument("--format", default="auto", choices=formats)
    p.add_argument("--kind", default=None, choices=KINDS, help="checked against the format (default: the format's)")
    p.add_argument("--columns", default=None, help="field=column pairs, e.g. instruction=question,output=answer")
    p.add_argument("--sample-by", default="line", choices=SAMPLE_BY,
                   help="a .txt file: one row per line (default), paragraph (blank-line separated) or document")
    p.add_argument("--description", default=None)
    p.add_argument("--workspace", default=None, help="its registry is WORKSPACE/datasets/dataset_info.yaml "
                                                     "(default ./workspace or $WORKBENCH_WORKSPACE)")
    p.add_argument("--registry", default=None, help="register in this registry file instead")
    p.add_argument("--copy", action="store_true", help="copy the file beside the registry")
    p.add_argument("--skip-invalid", action="store_true", help="save a copy without the unusable records")
    p.set_defaults(func=add)
