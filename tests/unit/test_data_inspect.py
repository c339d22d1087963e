"""engine.data.inspection: sources, detection, mapping, validation messages, lengths, the label preview, add."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data import DataError, load_registry, resolve_dataset
from engine.data.encode import encode_sft
from engine.data.inspection import (Source, add_dataset, columns_of, encode_example, inspect_source, open_source,
                                    percentile, token_lengths)
from engine.data.registry import workspace_registry
from engine.data.templates import get_template

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "dataset_info.yaml"


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def inspect(path, *args, **kw):
    return inspect_source(open_source(str(path)), *args, **kw)


def conv(*turns):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


FILES = [  # (file name, content, format, kind)
    ("alpaca.json", [{"instruction": "Q", "input": "", "output": "A"}] * 2, "alpaca", "sft"),
    ("sharegpt.json", [{"conversations": conv("Q", "A"), "system": "S"}], "sharegpt", "sft"),
    ("fastchat.jsonl", [{"id": "1", "conversations": conv("Q", "A")}], "fastchat", "sft"),
    ("messages.jsonl", [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}],
     "messages", "sft"),
    ("turns.jsonl", [[{"human": "Q", "assistant": "A"}, {"human": "Q2", "assistant": "A2"}]], "turns", "sft"),
    ("firefly.jsonl", [{"conversation": [{"human": "Q", "assistant": "A"}]}], "firefly", "sft"),
    ("pref.json", [{"prompt": "Q", "chosen": "good", "rejected": "bad"}], "preference", "preference"),
    ("kto.jsonl", [{"prompt": "Q", "completion": "A", "label": True}], "kto", "kto"),
    ("text.jsonl", [{"text": "doc"}], "text", "pretrain"),
]


@pytest.mark.parametrize("name,rows,fmt,kind", FILES, ids=[f[2] for f in FILES])
def test_each_format_is_detected(tmp_path, name, rows, fmt, kind):
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        jsonl(path, rows)
    report = inspect(path)
    assert (report.format, report.kind, report.detected, report.ok) == (fmt, kind, True, True)
    assert (report.records, report.valid) == (len(rows), len(rows))


def test_csv_txt_parquet_and_save_to_disk_sources(tmp_path):
    import datasets

    (tmp_path / "a.csv").write_text("instruction,output\nQ,A\nQ2,A2\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("one doc\n\nanother\n", encoding="utf-8")
    pq.write_table(pa.table({"prompt": ["Q"], "completion": ["A"], "label": [False]}), tmp_path / "a.parquet")
    datasets.Dataset.from_list([{"conversations": conv("Q", "A")}] * 3).save_to_disk(tmp_path / "saved")
    found = {p: (r.format, r.valid) for p in ("a.csv", "a.txt", "a.parquet", "saved") for r in [inspect(tmp_path / p)]}
    assert found == {"a.csv": ("alpaca", 2), "a.txt": ("text", 2), "a.parquet": ("kto", 1), "saved": ("sharegpt", 3)}


def test_column_mapping_with_the_files_own_names(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("id,question,answer\n1,What is 2+2?,4\n2,Capital of France?,Paris\n", encoding="utf-8")
    source = open_source(str(path))
    assert columns_of(source) == ["id", "question", "answer"]
    report = inspect_source(source, "alpaca", {"instruction": "question", "output": "answer", "input": ""})
    assert report.ok and report.columns == {"instruction": "question", "output": "answer"}
    assert report.examples[1] == (3, {"messages": [{"role": "user", "content": "Capital of France?"},
                                                   {"role": "assistant", "content": "Paris"}]})
    detected = inspect_source(source, "auto", {"instruction": "question", "output": "answer"})
    assert (detected.format, detected.valid) == ("alpaca", 2)  # detected through the mapping
    wrong = inspect_source(source, "alpaca", {"instruction": "question", "output": "reply"})
    assert wrong.error_count == 2 and str(wrong.errors[0]) == (
        f"{path}, line 2: field 'reply' is missing, mapped from 'output' (alpaca format needs instruction and output)")


def problems(report) -> list[str]:
    return [str(e) for e in report.errors] + ([str(report.fatal)] if report.fatal else [])


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n", encoding="utf-8")
    report = inspect(tmp_path / "e.jsonl")
    assert problems(report) == [f"{tmp_path / 'e.jsonl'}: file is empty"] and not report.ok


def test_non_utf8_file_names_the_encoding_problem_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    report = inspect(path)
    assert problems(report) == [f"{path}, line 2: the file is not valid UTF-8 (byte 0xe9 at column 14); save it as UTF-8"]
    assert (report.records, report.valid, report.error_count) == (2, 1, 1)


def test_json_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]', encoding="utf-8")
    report = inspect(path)
    assert problems(report) == [f"{path}, line 3: invalid JSON (Expecting property name enclosed in double quotes "
                                "at column 16)"]
    assert report.valid == 1 and not report.ok


def test_one_broken_jsonl_line_among_good_ones_is_counted_and_skippable(tmp_path):
    rows = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(50)]
    rows[29] = rows[29][:-1]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    report = inspect(path)
    assert (report.records, report.valid, report.error_count) == (50, 49, 1)
    assert problems(report) == [f"{path}, line 30: invalid JSON (Expecting ',' delimiter at column 39)"]


def test_mixed_schemas_are_named(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [{"instruction": "Q", "output": "A"}] * 3 + [{"conversations": conv("Q", "A")}]
                 + [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}] * 2)
    report = inspect(path)
    assert report.error_count == 3
    assert problems(report)[0] == (f"{path}, line 4: this record is sharegpt format, but the file is alpaca: mixed "
                                   "schemas in one file (field 'instruction' is missing (alpaca format needs "
                                   "instruction and output))")
    assert report.notes[-1] == ("mixed schemas: the file is alpaca (3 usable records), but 2 records are messages, "
                                "1 record is sharegpt; split the file, or fix those records")


def test_csv_without_a_header(tmp_path):
    path = tmp_path / "nohead.csv"
    path.write_text("What is 2+2?,4\nCapital of France?,Paris\n", encoding="utf-8")
    assert problems(inspect(path)) == [
        f"{path}, line 1: the first line (What is 2+2?, 4) looks like data, not a header: a CSV needs a first line "
        "naming its columns, e.g. instruction,output (or map its columns)"]


def test_preference_pairs_with_the_same_or_an_empty_answer(tmp_path):
    path = jsonl(tmp_path / "pref.jsonl", [{"prompt": "Q", "chosen": "same", "rejected": "same"},
                                           {"prompt": "Q", "chosen": "good", "rejected": ""},
                                           {"prompt": "Q", "chosen": "good", "rejected": "bad"}])
    assert problems(inspect(path)) == [
        f"{path}, line 1: fields 'chosen' and 'rejected' are the same answer (a preference pair needs two different answers)",
        f"{path}, line 2: field 'rejected' is empty"]


def test_first_errors_are_kept_and_the_rest_counted(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output": "A"}] + [{"instruction": "Q", "output": ""}] * 30)
    report = inspect(path, max_errors=5)
    assert (len(report.errors), report.error_count, report.valid) == (5, 30, 1)
    assert [e.line for e in report.errors] == [2, 3, 4, 5, 6]


def test_paths_outside_the_allowed_roots_and_unknown_sources(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir(), outside.mkdir()
    jsonl(outside / "d.jsonl", [{"text": "x"}])
    (inside / "link.jsonl").symlink_to(outside / "d.jsonl")
    assert open_source(str(inside / "link.jsonl")).path == outside / "d.jsonl"  # no roots: anything goes
    for text in (str(outside / "d.jsonl"), str(inside / "link.jsonl"), str(inside / ".." / "out" / "d.jsonl")):
        with pytest.raises(DataError) as err:
            open_source(text, allowed_roots=[inside])
        assert str(err.value) == (f"'{text}' is outside the folders this page may read ({inside}); upload the file "
                                  "instead, or add its folder to data_roots in webui/defaults.yaml")
    with pytest.raises(DataError, match="is not a file or directory here, nor a Hub dataset name"):
        open_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="this file type is not supported"):
        (inside / "a.xlsx").write_text("x")
        open_source(str(inside / "a.xlsx"), allowed_roots=[inside])


def test_a_hub_name_without_network_gets_a_clear_message():
    source = open_source("tatsu-lab/alpaca")
    assert source == Source(hub="tatsu-lab/alpaca")
    report = inspect_source(source)  # the tests run with HF_HUB_OFFLINE=1 (conftest)
    assert str(report.fatal).startswith("cannot load 'tatsu-lab/alpaca' from the Hugging Face Hub: offline mode is on")
    assert "save_to_disk" in str(report.fatal)


def test_statistics_sample_big_files_and_say_so(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(500)])
    report = inspect(path, sample=50)
    assert (len(report.sample), report.valid, report.sampled) == (50, 500, True)
    assert len({ex["text"] for ex in report.sample}) == 50 and any(int(ex["text"][4:]) >= 50 for ex in report.sample)
    capped = inspect(path, max_records=100)
    assert (capped.records, capped.complete) == (100, False)


def test_token_lengths_and_truncation(tokenizer, tmp_path):
    template = get_template("chatml", tokenizer)
    examples = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]},
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 80}]},
                {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}]
    lengths = token_lengths(examples, "sft", tokenizer, template, cutoff_len=40)
    for ex, p, r in zip(examples, lengths.prompt, lengths.response):
        full = encode_sft(ex, template, tokenizer, 10**6)[0]
        assert p + r == len(full["input_ids"]) and r == sum(x != -100 for x in full["labels"])
    assert lengths.response[1] > 40 and lengths.prompt[2] > 40
    assert (lengths.truncated, lengths.lost, lengths.sampled) == (2, 1, False)
    assert percentile([5, 1, 3, 2, 4], 50) == 3 and percentile([5, 1, 3, 2, 4], 99) == 5
    pref = token_lengths([{"prompt": [{"role": "user", "content": "Q"}], "chosen": "a b c d e f", "rejected": "no"}],
                         "preference", tokenizer, template, cutoff_len=1024)
    short = token_lengths([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "no"}]}],
                          "sft", tokenizer, template, 1024)
    assert pref.prompt == short.prompt and pref.response[0] > short.response[0]  # the longer answer counts
    docs = token_lengths([{"text": "one two three"}], "pretrain", tokenizer, template, 1024)
    assert docs.packed and docs.response == [len(tokenizer("one two three")["input_ids"]) + 1]


def test_label_preview_equals_the_trainers_labels(tokenizer, tmp_path):
    """The preview and the training set come from the same encoder: identical ids and labels, example by example."""
    from engine.run.config import DataConfig
    from engine.data.loader import build_sft_dataset

    path = jsonl(tmp_path / "multi.jsonl", [{"conversations": conv(f"Question {i}?", f"Answer {i}.", "And?", "More " * i)}
                                            for i in range(1, 6)])
    template = get_template("auto", tokenizer)
    for loss in ("all", "last", "split"):
        cfg = DataConfig(datasets=[str(path)], cutoff_len=48, multiturn_loss=loss)
        train, _, _ = build_sft_dataset(cfg, tokenizer, template, seed=0)
        report = inspect(path)
        preview = [enc for _, ex in report.examples
                   for _, enc in encode_example(ex, "sft", tokenizer, template, 48, loss) if enc["input_ids"]]
        assert [(list(r["input_ids"]), list(r["labels"])) for r in train] == \
            [(e["input_ids"], e["labels"]) for e in preview]


def test_preference_preview_equals_the_dpo_stages_tokens(tokenizer, tmp_path):
    from engine.run.config import DataConfig
    from engine.data.loader import build_answer_dataset

    path = jsonl(tmp_path / "pref.jsonl", [{"prompt": f"Question {i}?", "chosen": "Good " * i, "rejected": "Bad."}
                                           for i in range(1, 5)] + [{"prompt": "long " * 60, "chosen": "a", "rejected": "b"}])
    template = get_template("auto", tokenizer)
    train, _, _ = build_answer_dataset(DataConfig(datasets=[str(path)], cutoff_len=64), tokenizer, template, 0,
                                       "preference")
    previews = [encode_example(ex, "preference", tokenizer, template, 64) for _, ex in inspect(path).examples]
    assert [[p for p, _ in parts] for parts in previews] == [["chosen", "rejected"]] * 5
    assert previews[-1][0][1]["input_ids"] == []  # the long prompt leaves no room: the stage drops it too
    for row, ((_, chosen), (_, rejected)) in zip(train, previews[:-1], strict=True):
        assert chosen["input_ids"] == row["prompt_ids"] + row["chosen_ids"]
        assert rejected["input_ids"] == row["prompt_ids"] + row["rejected_ids"]
        assert [x for x in chosen["labels"] if x != -100] == row["chosen_ids"]
    lengths = token_lengths([ex for _, ex in inspect(path).examples], "preference", tokenizer, template, 64)
    assert (lengths.truncated, lengths.lost) == (1, 1)


def test_add_dataset_copies_an_upload_and_makes_it_trainable(tmp_path):
    from engine.run.checks import check
    from engine.run.config import RunConfig

    upload = tmp_path / "upload" / "my questions.csv"
    upload.parent.mkdir()
    upload.write_text("question,answer\nWhat is 2+2?,4\nCapital of France?,Paris\n", encoding="utf-8")
    registry = workspace_registry(tmp_path / "ws")
    spec, report = add_dataset(open_source(str(upload)), "my_qa", registry, "alpaca",
                               {"instruction": "question", "output": "answer"}, copy=True)
    upload.unlink()  # the upload folder goes away; the workspace copy stays
    assert spec.path == registry.parent / "my_qa.csv" and spec.path.is_file()
    assert (spec.format, spec.kind, spec.description, report.valid) == ("alpaca", "sft", "2 records from my questions.csv", 2)
    assert list(load_registry(registry))[-1] == "my_qa" and "identity" in load_registry(registry)
    assert resolve_dataset("my_qa", registry) == spec
    cfg = RunConfig.model_validate({"data": {"datasets": ["my_qa", "identity"], "registry": str(registry)}})
    assert [p for p in check(cfg) if p[0].startswith("data")] == []
    with pytest.raises(DataError, match=f"a dataset named 'my_qa' is already registered in {registry}"):
        add_dataset(open_source(str(spec.path)), "my_qa", registry)
    with pytest.raises(DataError, match=f"a dataset named 'identity' is already registered in {SHIPPED}"):
        add_dataset(open_source(str(spec.path)), "identity", registry)
    with pytest.raises(DataError, match="kind 'preference' does not fit format 'alpaca', which holds sft data"):
        add_dataset(open_source(str(spec.path)), "again", registry, "alpaca",
                    {"instruction": "question", "output": "answer"}, kind="preference")


def test_add_dataset_refuses_unusable_records_unless_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Q1", "output": "A1"}\n{"instruction": "Q2", "output": \n'
                    '{"instruction": "Q3", "output": ""}\n{"instruction": "Q4", "output": "A4"}\n', encoding="utf-8")
    registry = workspace_registry(tmp_path / "ws")
    with pytest.raises(DataError) as err:
        add_dataset(open_source(str(path)), "d", registry)
    assert str(err.value) == (f"{path}: 2 of 4 records cannot be used (first: line 2: invalid JSON (Expecting value "
                              "at column 33)); fix them, or skip them (a copy without them is saved)")
    assert not registry.exists()  # nothing was registered
    spec, report = add_dataset(open_source(str(path)), "d", registry, skip_invalid=True, description="four minus two")
    assert spec.path == registry.parent / "d.jsonl"
    assert [json.loads(line)["instruction"] for line in spec.path.read_text().splitlines()] == ["Q1", "Q4"]
    assert spec.description == "four minus two (2 unusable records left out)"
    assert path.read_text().count("\n") == 4  # the original is untouched


def test_streaming_a_1gb_jsonl_stays_small(tmp_path):
    """What the Data tab does with a file (columns, then a capped check with preview and sample) never reads it whole."""
    import tracemalloc

    line = json.dumps({"instruction": "Summarize the text. " * 5, "input": "x" * 800, "output": "Short. " * 10}) + "\n"
    block = (line * (1_048_576 // len(line) + 1)).encode()
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        for _ in range((1 << 30) // len(block) + 1):
            f.write(block)
    try:
        assert path.stat().st_size >= 1 << 30
        tracemalloc.start()
        t0 = time.time()
        source = open_source(str(path))
        columns = columns_of(source)
        report = inspect_source(source, max_records=20_000, sample=1000)
        seconds = time.time() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        path.unlink()
    assert columns == ["instruction", "input", "output"] and report.valid == 20_000 and not report.complete
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    print(f"\n1 GiB JSONL: columns + 20,000-record check in {seconds:.1f} s, peak traced memory {peak / 2**20:.1f} MiB")


def test_inspection_says_how_a_txt_file_is_cut_into_rows(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text("".join(f"Document {i}.\n" for i in range(30)), encoding="utf-8")
    report = inspect_source(open_source(str(path)))
    assert (report.format, report.valid) == ("text", 30)
    assert report.notes[0] == "sample_by: line: 30 rows (one per non-blank line)"
    para = inspect_source(open_source(str(path), sample_by="paragraph"))
    assert (para.valid, para.notes[0]) == (1, "sample_by: paragraph: 1 rows (one per paragraph)")
    spec, _ = add_dataset(open_source(str(path), sample_by="document"), "wiki", tmp_path / "reg.yaml")
    assert (spec.sample_by, spec.path) == ("document", path)
    assert "sample_by: document" in (tmp_path / "reg.yaml").read_text()


def test_columns_the_format_does_not_read_are_listed(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"instruction": "Q", "output": "A", "source": "web", "score": 3}\n'
                    '{"instruction": "Q2", "output": "A2", "source": "book"}\n', encoding="utf-8")
    report = inspect_source(open_source(str(path)))
    assert report.ok and report.notes[-1] == ("columns not used by the alpaca format, so not trained on: 'source' "
                                              "(2 records), 'score' (1 records); map them to a field, or choose another format")
    tools = tmp_path / "tools.jsonl"
    tools.write_text('{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], '
                     '"tools": "[]", "id": "x"}\n', encoding="utf-8")
    assert not any("not used" in n for n in inspect_source(open_source(str(tools)), "sharegpt").notes[:-1])
    assert inspect_source(open_source(str(tools)), "sharegpt").notes == [
        "column not used by the sharegpt format, so not trained on: 'id' (1 records); map it to a field, or choose "
        "another format"]
