"""Load datasets as canonical examples (cached by ``datasets``), and build the tokenized splits of each stage:
SFT examples, packed pretraining blocks, preference pairs, KTO examples and RL prompts.

Each data file becomes one ``datasets.Dataset`` built by ``Dataset.from_generator``. The
generator's arguments include the file's path, modification time and size, so a second load
of an unchanged file comes from the ``datasets`` cache without reading the file again, and an
edited file is read afresh. Messages are stored as Arrow lists of {role, content} structs, so
rows come back with ``row["messages"]`` as a list of dicts; in SFT data each message also holds its
tool calls and the row its tool schemas, as JSON text ('' when none): ``sft_example`` turns a row back
into the canonical example.
"""

from __future__ import annotations

import json

import datasets
import pyarrow.compute as pc

from .encode import encode_answers, encode_pretrain, encode_sft
from .errors import DataError
from .formats import KIND_OF_FORMAT, iter_examples
from .registry import DatasetSpec, resolve_dataset

# Bump when the canonical layout or the encoding changes: both caches are keyed by function name.
LOADER_VERSION = 2
ENCODE_VERSION = 2

_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_SFT_MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string"),
                               "tool_calls": datasets.Value("string")})
TOOL_FEATURES = datasets.Features({"messages": _SFT_MESSAGES, "tools": datasets.Value("string")})
FEATURES = {
    "sft": datasets.Features({"messages": _MESSAGES}),  # without tools; TOOL_FEATURES where any example uses them
    "preference": datasets.Features({"prompt": _MESSAGES, "chosen": datasets.Value("string"),
                                     "rejected": datasets.Value("string")}),
    "kto": datasets.Features({"prompt": _MESSAGES, "completion": datasets.Value("string"),
                              "label": datasets.Value("bool")}),
    "pretrain": datasets.Features({"text": datasets.Value("string")}),
}


def _generate(path: str, mtime: float, size: int, fmt: str, columns: str, max_samples: int | None, version: int,
              sample_by: str = "line"):
    """Canonical examples of one file (``mtime``, ``size`` and ``version`` only key the cache)."""
    sft = KIND_OF_FORMAT[fmt] == "sft"
    for _, example in iter_examples(path, fmt, json.loads(columns), max_samples, sample_by):
        yield _sft_row(example) if sft else example


def _json_or_empty(value) -> str:
    return json.dumps(value, ensure_ascii=False) if value else ""


def _sft_row(example: dict) -> dict:
    """A canonical SFT example as a row of FEATURES["sft"] (tool calls and schemas as JSON text)."""
    return {"messages": [{"role": m["role"], "content": m["content"], "tool_calls": _json_or_empty(m.get("tool_calls"))}
                         for m in example["messages"]], "tools": _json_or_empty(example.get("tools"))}


def sft_example(row: dict) -> dict:
    """The canonical example of a loaded SFT row: {"messages"} and, for tool use, "tools" and the messages'
    "tool_calls"."""
    example = {"messages": example_messages(row)}
    if row.get("tools"):
        example["tools"] = json.loads(row["tools"])
    return example


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
                  columns=json.dumps(spec.columns, sort_keys=True), max_samples=max_samples, version=LOADER_VERSION,
                  sample_by=spec.sample_by)
    try:
        ds = datasets.Dataset.from_generator(_generate, features=TOOL_FEATURES if spec.kind == "sft" else
                                             FEATURES[spec.kind], gen_kwargs=kwargs)
    except Exception as err:
        found = _data_error(err)
        if found is None:
            raise
        raise found from None
    return ds if spec.kind != "sft" or _uses_tools(ds) else _with_features(ds, FEATURES["sft"])


def _uses_tools(ds: datasets.Dataset) -> bool:
    if not len(ds):
        return False
    table = ds.data.table
    calls = pc.struct_field(pc.list_flatten(table.column("messages")), "tool_calls")
    return any((pc.max(pc.utf8_length(col)).as_py() or 0) > 0 for col in (table.column("tools"), calls))


def _rows(batch, tools: bool):
    if tools:
        return {"messages": [[dict(m, tool_calls=m.get("tool_calls") or "") for m in ms] for ms in batch["messages"]],
                "tools": batch.get("tools") or [""] * len(batch["messages"])}
    return {"messages": [[{"role": m["role"], "content": m["content"]} for m in ms] for ms in batch["messages"]]}


def _with_features(ds: datasets.Dataset, features: datasets.Features) -> datasets.Dataset:
    """SFT rows in the other layout (with or without the tool columns); the tool fields are '' where absent."""
    return ds.map(_rows, batched=True, features=features, remove_columns=ds.column_names,
                  fn_kwargs=dict(tools="tools" in features), desc="Converting")


def mix(parts: list[datasets.Dataset], data_cfg, seed: int = 0) -> tuple[datasets.Dataset, list[int]]:
    """(the datasets as one, rows taken from each): ``data_cfg.mix`` concat puts them one after another; interleave
    draws rows by ``mix_probabilities`` (empty: in turn) until ``mix_stopping`` (datasets.interleave_datasets)."""
    if len(parts) == 1 or getattr(data_cfg, "mix", "concat") == "concat":  # eval data has no mix: concat
        return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), [len(p) for p in parts]
    tagged = [p.add_column("_mix", [i] * len(p)) for i, p in enumerate(parts)]
    mixed = datasets.interleave_datasets(tagged, probabilities=data_cfg.mix_probabilities or None, seed=seed,
                                         stopping_strategy=data_cfg.mix_stopping).flatten_indices()
    taken = pc.value_counts(mixed.data.column("_mix")).to_pylist() if len(mixed) else []
    counts = {row["values"]: row["counts"] for row in taken}
    return mixed.remove_columns("_mix"), [counts.get(i, 0) for i in range(len(parts))]


def mix_counts(sizes: list[int], data_cfg, seed: int = 0) -> list[int]:
    """The rows a run takes from datasets of ``sizes`` rows: the same draw as ``mix`` (it depends only on the
    sizes, probabilities, stopping strategy and seed), made on row numbers instead of the rows."""
    return mix([datasets.Dataset.from_dict({"i": list(range(n))}) for n in sizes], data_cfg, seed)[1]


def load_examples(data_cfg, kind: str, seed: int = 0, counts: dict | None = None) -> datasets.Dataset:
    """Canonical examples from every dataset of ``data_cfg`` (each capped at ``max_samples``, then mixed by
    ``data_cfg.mix``), for a stage of ``kind``. ``counts``, when given, receives the rows taken per dataset."""
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
    if any(p.features == TOOL_FEATURES for p in parts):
        parts = [p if p.features == TOOL_FEATURES else _with_features(p, TOOL_FEATURES) for p in parts]
    mixed, taken = mix(parts, data_cfg, seed)
    if counts is not None:
        counts.update(zip(data_cfg.datasets, taken))
    return mixed


def _per_dataset(stats: dict, rows: dict) -> dict:
    """``stats`` with the rows taken from each dataset, when there are several (the Data tab and train.log show it)."""
    return {**stats, "rows_per_dataset": rows} if len(rows) > 1 else stats


def example_messages(row: dict) -> list[dict]:
    """The messages of a loaded row as a list of {role, content} dicts (with "tool_calls" where a message has them)."""
    messages = row["messages"]
    messages = json.loads(messages) if isinstance(messages, str) else list(messages)
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        m = {"role": m["role"], "content": m["content"]}
        if calls:
            m["tool_calls"] = json.loads(calls) if isinstance(calls, str) else calls
        out.append(m)
    return out


def split_examples(examples: datasets.Dataset, data_cfg, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, held-out or None): ``data_cfg.val_size`` of the examples, drawn with ``seed``, before any encoding."""
    if data_cfg.val_size <= 0:
        return examples, None
    n_eval = max(1, round(len(examples) * data_cfg.val_size))
    if len(examples) - n_eval < 1:
        raise DataError(f"dataset {', '.join(data_cfg.datasets)} has {len(examples)} examples, too few to hold out "
                        f"val_size={data_cfg.val_size}", field="data.val_size")
    split = examples.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


def _encode_batch(batch, indices, template, tokenizer, cutoff_len, multiturn_loss, version):
    out = {"input_ids": [], "labels": [], "_source": [], "_tokens": [], "_trained": []}
    for index, messages, tools in zip(indices, batch["messages"], batch.get("tools") or [""] * len(indices)):
        example = sft_example({"messages": messages, "tools": tools})
        for enc in encode_sft(example, template, tokenizer, cutoff_len, multiturn_loss):
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
    rows: dict = {}
    examples, raw_eval = split_examples(load_examples(data_cfg, "sft", seed, rows), data_cfg, seed)
    name = ", ".join(data_cfg.datasets)
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
    return train, evaluation, _per_dataset(stats, rows)


# ---------------------------------------------------------------- the other stages

PACK_BATCH = 10_000  # documents packed together; blocks never span two such batches
_BLOCKS = datasets.Features({"input_ids": datasets.List(datasets.Value("int32")),
                             "labels": datasets.List(datasets.Value("int32")),
                             "position_ids": datasets.List(datasets.Value("int32"))})


def _pack_batch(batch, tokenizer, cutoff_len, version):
    blocks = encode_pretrain(batch["text"], tokenizer, cutoff_len)
    return {key: [b[key] for b in blocks] for key in _BLOCKS}


def _pack(ds: datasets.Dataset, data_cfg, tokenizer) -> datasets.Dataset:
    return ds.map(_pack_batch, batched=True, batch_size=PACK_BATCH, remove_columns=ds.column_names, features=_BLOCKS,
                  fn_kwargs=dict(tokenizer=tokenizer, cutoff_len=data_cfg.cutoff_len, version=ENCODE_VERSION),
                  desc="Packing")


def build_pretrain_dataset(data_cfg, tokenizer, seed: int) -> tuple[datasets.Dataset, datasets.Dataset | None, dict]:
    """(train, eval or None, stats) of packed pretraining blocks (``encode_pretrain``: input_ids, labels, position_ids).

    The validation split holds out whole documents before packing. ``stats``: documents read, blocks,
    tokens (all real: nothing is padding), trained_tokens, and train and eval sizes in blocks.
    """
    rows: dict = {}
    docs, raw_eval = split_examples(load_examples(data_cfg, "pretrain", seed, rows), data_cfg, seed)
    train = _pack(docs, data_cfg, tokenizer)
    evaluation = _pack(raw_eval, data_cfg, tokenizer) if raw_eval is not None else None
    if len(train) == 0:
        raise DataError(f"dataset {', '.join(data_cfg.datasets)} has no text", field="data.datasets")
    parts = [train] + ([evaluation] if evaluation is not None else [])
    tokens = sum(pc.sum(pc.list_value_length(p.data.column("input_ids"))).as_py() or 0 for p in parts)
    pieces = sum(pc.sum(pc.equal(pc.list_flatten(p.data.column("position_ids")), 0)).as_py() or 0 for p in parts)
    stats = {"examples": len(docs) + (len(raw_eval) if raw_eval is not None else 0), "blocks": sum(map(len, parts)),
             "tokens": tokens, "trained_tokens": tokens - pieces,
             "train": len(train), "eval": len(evaluation) if evaluation is not None else 0}
    return train, evaluation, _per_dataset(stats, rows)


_PAIRS = datasets.Features({"prompt_ids": datasets.List(datasets.Value("int32")),
                            "chosen_ids": datasets.List(datasets.Value("int32")),
                            "rejected_ids": datasets.List(datasets.Value("int32"))})
_UNPAIRED = datasets.Features({"prompt_ids": datasets.List(datasets.Value("int32")),
                               "completion_ids": datasets.List(datasets.Value("int32")),
                               "label": datasets.Value("bool")})


def _answers_batch(batch, template, tokenizer, cutoff_len, version):
    paired = "chosen" in batch
    out = {k: [] for k in (_PAIRS if paired else _UNPAIRED)}
    for i, prompt in enumerate(batch["prompt"]):
        answers = [batch["chosen"][i], batch["rejected"][i]] if paired else [batch["completion"][i]]
        enc = encode_answers(prompt, answers, template, tokenizer, cutoff_len)
        if enc is None:
            continue
        out["prompt_ids"].append(enc[0])
        if paired:
            out["chosen_ids"].append(enc[1][0])
            out["rejected_ids"].append(enc[1][1])
        else:
            out["completion_ids"].append(enc[1][0])
            out["label"].append(batch["label"][i])
    return out


def _encode_answers(ds: datasets.Dataset, data_cfg, tokenizer, template) -> datasets.Dataset:
    features = _PAIRS if "chosen" in ds.column_names else _UNPAIRED
    return ds.map(_answers_batch, batched=True, remove_columns=ds.column_names, features=features,
                  fn_kwargs=dict(template=template, tokenizer=tokenizer, cutoff_len=data_cfg.cutoff_len,
                                 version=ENCODE_VERSION), desc="Tokenizing")


def build_answer_dataset(data_cfg, tokenizer, template, seed: int, kind: str):
    """(train, eval or None, stats) of tokenized preference pairs (kind ``preference``: prompt_ids, chosen_ids,
    rejected_ids) or KTO examples (kind ``kto``: prompt_ids, completion_ids, label), encoded by ``encode_answers``
    with the run's template, so prompts and answers have exactly the tokens SFT gives them.

    ``stats``: examples read, encoded, dropped_too_long (prompt alone fills cutoff_len), tokens (prompt plus
    every answer), and train and eval sizes.
    """
    rows: dict = {}
    examples, raw_eval = split_examples(load_examples(data_cfg, kind, seed, rows), data_cfg, seed)
    train = _encode_answers(examples, data_cfg, tokenizer, template)
    evaluation = _encode_answers(raw_eval, data_cfg, tokenizer, template) if raw_eval is not None else None
    read = len(examples) + (len(raw_eval) if raw_eval is not None else 0)
    parts = [train] + ([evaluation] if evaluation is not None else [])
    encoded = sum(map(len, parts))
    if len(train) == 0:
        raise DataError(f"dataset {', '.join(data_cfg.datasets)} is empty after filtering ({read - encoded} prompts "
                        f"fill cutoff_len={data_cfg.cutoff_len})", field="data.cutoff_len")
    answer_columns = [c for c in parts[0].column_names if c.endswith("_ids")]
    stats = {"examples": read, "encoded": encoded, "dropped_too_long": read - encoded,
             "tokens": sum(pc.sum(pc.list_value_length(p.data.column(c))).as_py() or 0
                           for p in parts for c in answer_columns),
             "train": len(train), "eval": len(evaluation) if evaluation is not None else 0}
    return train, evaluation, _per_dataset(stats, rows)


def _prompt_rows(batch, template, tokenizer, room, version):
    out = {"prompt": []}
    for prompt in batch["prompt"]:
        if len(tokenizer.encode(template.render_generation_prompt(prompt), add_special_tokens=False)) <= room:
            out["prompt"].append(prompt)
    return out


def build_prompt_dataset(data_cfg, tokenizer, template, seed: int, max_new_tokens: int):
    """(train, eval or None, stats) of RL prompts: the ``prompt`` conversations of preference data (their answers
    are not used). A prompt whose generation prompt (rendered with the run's template) leaves fewer than
    ``max_new_tokens`` of ``cutoff_len`` for the completion is dropped and counted."""
    rows: dict = {}
    examples, raw_eval = split_examples(load_examples(data_cfg, "preference", seed, rows), data_cfg, seed)
    room = data_cfg.cutoff_len - max_new_tokens

    def keep(ds):
        return ds.map(_prompt_rows, batched=True, remove_columns=ds.column_names,
                      features=datasets.Features({"prompt": _MESSAGES}),
                      fn_kwargs=dict(template=template, tokenizer=tokenizer, room=room, version=ENCODE_VERSION),
                      desc="Selecting prompts")

    train = keep(examples)
    evaluation = keep(raw_eval) if raw_eval is not None else None
    read = len(examples) + (len(raw_eval) if raw_eval is not None else 0)
    encoded = len(train) + (len(evaluation) if evaluation is not None else 0)
    if len(train) == 0:
        raise DataError(f"dataset {', '.join(data_cfg.datasets)} has no prompt shorter than cutoff_len - max_new_tokens "
                        f"= {room} tokens", field="data.cutoff_len")
    stats = {"examples": read, "encoded": encoded, "dropped_too_long": read - encoded,
             "train": len(train), "eval": len(evaluation) if evaluation is not None else 0}
    return train, evaluation, _per_dataset(stats, rows)
