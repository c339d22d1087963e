"""Load datasets as canonical examples (cached by ``datasets``), and build tokenized SFT splits.

Each data file becomes one ``datasets.Dataset`` built by ``Dataset.from_generator``. The
generator's arguments include the file's path, modification time and size, so a second load
of an unchanged file comes from the ``datasets`` cache without reading the file again, and an
edited file is read afresh. Messages are stored as Arrow lists of {role, content} structs, so
rows come back with ``row["messages"]`` as a list of dicts.
"""

from __future__ import annotations

import json

import datasets
import pyarrow.compute as pc

from .encode import encode_sft
from .errors import DataError
from .formats import iter_examples
from .registry import DatasetSpec, resolve_dataset

# Bump when the canonical layout or the encoding changes: both caches are keyed by function name.
LOADER_VERSION = 1
ENCODE_VERSION = 1

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
FEATURES = {
    "sft": datasets.Features({"messages": _MESSAGES}),
    "preference": datasets.Features({"prompt": _MESSAGES, "chosen": datasets.Value("string"),
                                     "rejected": datasets.Value("string")}),
    "kto": datasets.Features({"prompt": _MESSAGES, "completion": datasets.Value("string"),
                              "label": datasets.Value("bool")}),
    "pretrain": datasets.Features({"text": datasets.Value("string")}),
}


def _generate(path: str, mtime: float, size: int, fmt: str, columns: str, max_samples: int | None, version: int):
    """Canonical examples of one file (``mtime``, ``size`` and ``version`` only key the cache)."""
    for _, example in iter_examples(path, fmt, json.loads(columns), max_samples):
        yield example


def _data_error(err: BaseException) -> DataError | None:
    """The DataError that ``datasets`` wrapped in its own generation error, if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, DataError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def load_dataset_spec(spec: DatasetSpec, max_samples: int | None = None) -> datasets.Dataset:
    """The canonical examples of one dataset."""
    stat = spec.path.stat()
    kwargs = dict(path=str(spec.path.resolve()), mtime=stat.st_mtime, size=stat.st_size, fmt=spec.format,
                  columns=json.dumps(spec.columns, sort_keys=True), max_samples=max_samples, version=LOADER_VERSION)
    try:
        return datasets.Dataset.from_generator(_generate, features=FEATURES[spec.kind], gen_kwargs=kwargs)
    except Exception as err:
        found = _data_error(err)
        if found is None:
            raise
        raise found from None


def load_examples(data_cfg, kind: str) -> datasets.Dataset:
    """Canonical examples from every dataset of ``data_cfg`` (each capped at ``max_samples``), for a stage of ``kind``."""
    if kind not in FEATURES:
        raise ValueError(f"kind must be one of {', '.join(FEATURES)}, not {kind!r}")
    if not data_cfg.datasets:
        raise DataError("no dataset selected", field="data.datasets")
    specs = [resolve_dataset(name, data_cfg.registry) for name in data_cfg.datasets]
    wrong = [s for s in specs if s.kind != kind]
    if wrong:
        listed = ", ".join(f"'{s.name}' holds {s.kind} data ({s.format} format)" for s in wrong)
        raise DataError(f"this stage needs {kind} data, but dataset {listed}", field="data.datasets")
    parts = [load_dataset_spec(s, data_cfg.max_samples) for s in specs]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def example_messages(row: dict) -> list[dict]:
    """The messages of a loaded row as a list of {role, content} dicts."""
    messages = row["messages"]
    return json.loads(messages) if isinstance(messages, str) else list(messages)


def _encode_batch(batch, indices, template, tokenizer, cutoff_len, multiturn_loss, version):
    out = {"input_ids": [], "labels": [], "_source": [], "_tokens": [], "_trained": []}
    for index, messages in zip(indices, batch["messages"]):
        for enc in encode_sft({"messages": messages}, template, tokenizer, cutoff_len, multiturn_loss):
            out["input_ids"].append(enc["input_ids"])
            out["labels"].append(enc["labels"])
            out["_source"].append(index)
            out["_tokens"].append(len(enc["input_ids"]))
            out["_trained"].append(sum(label != -100 for label in enc["labels"]))
    return out


_ENCODED = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")), "labels": datasets.List(datasets.Value("int32")),
    "_source": datasets.Value("int64"), "_tokens": datasets.Value("int64"), "_trained": datasets.Value("int64"),
})


def _encode(ds: datasets.Dataset, data_cfg, tokenizer, template) -> tuple[datasets.Dataset, dict]:
    encoded = ds.map(
        _encode_batch, batched=True, with_indices=True, num_proc=1, remove_columns=ds.column_names, features=_ENCODED,
        fn_kwargs=dict(template=template, tokenizer=tokenizer, cutoff_len=data_cfg.cutoff_len,
                       multiturn_loss=data_cfg.multiturn_loss, version=ENCODE_VERSION),
        desc="Tokenizing",
    )
    table = encoded.data
    kept = pc.count_distinct(table.column("_source")).as_py() if len(encoded) else 0
    stats = {"examples": len(ds), "encoded": len(encoded), "dropped_too_long": len(ds) - kept,
             "tokens": pc.sum(table.column("_tokens")).as_py() or 0,
             "trained_tokens": pc.sum(table.column("_trained")).as_py() or 0}
    return encoded.remove_columns(["_source", "_tokens", "_trained"]), stats


def build_sft_dataset(data_cfg, tokenizer, template, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """(train, eval or None, stats) of tokenized SFT examples with only input_ids and labels.

    The validation split (``data_cfg.val_size``, seeded) is taken from the conversations before
    encoding, so the turns of one conversation never land on both sides. ``stats`` counts over
    both splits: examples (conversations read), encoded (training examples produced),
    dropped_too_long (conversations that produced nothing), tokens (input tokens) and
    trained_tokens (tokens with a label), plus train and eval sizes.
    """
    examples = load_examples(data_cfg, "sft")
    name = ", ".join(data_cfg.datasets)
    raw_eval = None
    if data_cfg.val_size > 0:
        n_eval = max(1, round(len(examples) * data_cfg.val_size))
        if len(examples) - n_eval < 1:
            raise DataError(f"dataset {name} has {len(examples)} examples, too few to hold out "
                            f"val_size={data_cfg.val_size}", field="data.val_size")
        split = examples.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        examples, raw_eval = split["train"], split["test"]
    train, stats = _encode(examples, data_cfg, tokenizer, template)
    evaluation = None
    if raw_eval is not None:
        evaluation, eval_stats = _encode(raw_eval, data_cfg, tokenizer, template)
        stats = {k: stats[k] + eval_stats[k] for k in stats}
    if len(train) == 0:
        raise DataError(f"dataset {name} is empty after filtering ({stats['dropped_too_long']} examples longer than "
                        f"cutoff_len={data_cfg.cutoff_len})", field="data.cutoff_len")
    stats["train"] = len(train)
    stats["eval"] = len(evaluation) if evaluation is not None else 0
    return train, evaluation, stats
