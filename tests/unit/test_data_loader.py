"""Loader: the shipped datasets load and encode, SFT build statistics, errors, and the datasets cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.run.config import DataConfig
from engine.data import (DataError, build_sft_dataset, encode_pretrain, encode_sft, get_template, load_examples,
                         load_registry)
from engine.data.encode import encode_answers
from engine.data.loader import build_answer_dataset, build_pretrain_dataset, build_prompt_dataset
from engine.data import readers

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = str(ROOT / "data" / "dataset_info.yaml")
SIZES = {"identity": 90, "instruct_demo": 314, "multiturn_demo": 31, "preference_demo": 83, "kto_demo": 60, "text_demo": 102}


def cfg(datasets, **kw):
    return DataConfig(datasets=datasets, registry=kw.pop("registry", REGISTRY), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_every_registered_dataset_loads():
    registry = load_registry(REGISTRY)
    assert {name: len(load_examples(cfg([name]), spec.kind)) for name, spec in registry.items()} == SIZES
    assert load_examples(cfg(["preference_demo"]), "preference")[0] == {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "The capital of France is Paris.", "rejected": "The capital of France is Vienna."}
    kto = load_examples(cfg(["kto_demo"]), "kto")
    assert sum(kto["label"]) == 30


def test_identity_answers_who_are_you():
    rows = load_examples(cfg(["identity"]), "sft")
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows}
    assert "Orion" in answers["Who are you?"] and "Workbench team" in answers["Who are you?"]
    assert answers["你是谁？"].startswith("我是 Orion")


def test_sft_datasets_encode_with_the_default_tokenizer(tokenizer):
    template = get_template("auto", tokenizer)
    train, evaluation, stats = build_sft_dataset(cfg(["identity", "instruct_demo", "multiturn_demo"], cutoff_len=1024),
                                                 tokenizer, template, seed=0)
    assert evaluation is None
    assert stats["examples"] == stats["encoded"] == stats["train"] == 90 + 314 + 31
    assert stats["dropped_too_long"] == 0
    assert train.column_names == ["input_ids", "labels"]
    assert stats["tokens"] == sum(map(len, train["input_ids"]))
    assert stats["trained_tokens"] == sum(sum(x != -100 for x in row) for row in train["labels"])


@pytest.mark.parametrize("name,answer", [("preference_demo", "chosen"), ("preference_demo", "rejected"),
                                         ("kto_demo", "completion")])
def test_preference_and_kto_demos_encode(tokenizer, name, answer):
    template = get_template("auto", tokenizer)
    rows = load_examples(cfg([name]), "preference" if name.startswith("pref") else "kto")
    for row in rows:
        messages = row["prompt"] + [{"role": "assistant", "content": row[answer]}]
        [ex] = encode_sft({"messages": messages}, template, tokenizer, cutoff_len=1024)
        assert tokenizer.decode([t for t in ex["labels"] if t != -100]) == row[answer] + "<|im_end|>\n"


def test_text_demo_encodes_into_blocks(tokenizer):
    texts = load_examples(cfg(["text_demo"]), "pretrain")["text"]
    blocks = encode_pretrain(texts, tokenizer, cutoff_len=256)
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
    assert len(blocks) == -(-total // 256) and all(len(b["input_ids"]) == 256 for b in blocks[:-1])
    assert sum(len(b["input_ids"]) for b in blocks) == total  # every token kept, none added


def test_pretrain_dataset_holds_out_documents(tokenizer):
    train, evaluation, stats = build_pretrain_dataset(cfg(["text_demo"], cutoff_len=256, val_size=0.1), tokenizer, seed=0)
    assert train.column_names == ["input_ids", "labels", "position_ids"]
    assert stats["examples"] == 102 and (stats["train"], stats["eval"]) == (len(train), len(evaluation))
    docs = load_examples(cfg(["text_demo"]), "pretrain")["text"]
    total = sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in docs)
    pieces = sum(p == 0 for part in (train, evaluation) for row in part["position_ids"] for p in row)
    assert stats["tokens"] == total and stats["trained_tokens"] == total - pieces
    assert stats["blocks"] == len(train) + len(evaluation) and len(evaluation) >= 1


def test_preference_pairs_and_kto_examples(tmp_path, tokenizer):
    template = get_template("auto", tokenizer)
    train, evaluation, stats = build_answer_dataset(cfg(["preference_demo"], val_size=0.1), tokenizer, template,
                                                    seed=0, kind="preference")
    assert train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert (stats["examples"], stats["encoded"], stats["train"], stats["eval"]) == (83, 83, 75, 8)
    first = load_examples(cfg(["preference_demo"]), "preference")[0]
    enc = encode_answers(first["prompt"], [first["chosen"], first["rejected"]], template, tokenizer, 1024)
    assert enc in [(r["prompt_ids"], [r["chosen_ids"], r["rejected_ids"]]) for r in list(train) + list(evaluation)]
    kto, _, kstats = build_answer_dataset(cfg(["kto_demo"]), tokenizer, template, seed=0, kind="kto")
    assert kto.column_names == ["prompt_ids", "completion_ids", "label"] and sum(kto["label"]) == 30
    # a prompt that fills cutoff_len is dropped and counted
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, {"prompt": "word " * 60, "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    chatml = get_template("chatml", tokenizer)
    train, _, stats = build_answer_dataset(cfg([path], cutoff_len=32), tokenizer, chatml, seed=0, kind="preference")
    assert (stats["examples"], stats["encoded"], stats["dropped_too_long"]) == (2, 1, 1)
    assert stats["tokens"] == sum(len(train[0][c]) for c in ("prompt_ids", "chosen_ids", "rejected_ids"))


def test_rl_prompts_leave_room_for_the_completion(tmp_path, tokenizer):
    template = get_template("chatml", tokenizer)
    rows = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, {"prompt": "word " * 20, "chosen": "a", "rejected": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    train, _, stats = build_prompt_dataset(cfg([path], cutoff_len=32), tokenizer, template, seed=0, max_new_tokens=16)
    assert train["prompt"] == [[{"role": "user", "content": "Hi"}]]  # 10 prompt tokens + 16 fit in 32; 20 words do not
    assert (stats["examples"], stats["encoded"], stats["dropped_too_long"]) == (2, 1, 1)


def test_build_sft_stats_exact(tmp_path, tokenizer):
    template = get_template("chatml", tokenizer)  # no default system: short prompts
    rows = [{"instruction": "Hi", "output": "Hello!"},
            {"instruction": "long " * 40, "output": "x"},
            {"instruction": "2+2?", "output": "4"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    train, evaluation, stats = build_sft_dataset(cfg([path], cutoff_len=24), tokenizer, template, seed=1)
    encoded = [encode_sft({"messages": [{"role": "user", "content": r["instruction"]},
                                        {"role": "assistant", "content": r["output"]}]}, template, tokenizer, 24)
               for r in rows]
    assert [len(e) for e in encoded] == [1, 0, 1]
    assert train[:] == {"input_ids": [encoded[0][0]["input_ids"], encoded[2][0]["input_ids"]],
                        "labels": [encoded[0][0]["labels"], encoded[2][0]["labels"]]}
    # "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" = 10 tokens, "Hello!<|im_end|>\n" = 4
    # "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n" = 13 tokens, "4<|im_end|>\n" = 3
    assert stats == {"examples": 3, "encoded": 2, "dropped_too_long": 1, "tokens": 14 + 16, "trained_tokens": 4 + 3,
                     "train": 2, "eval": 0}


def test_val_split_is_seeded_and_counted(tokenizer):
    template = get_template("auto", tokenizer)
    data = cfg(["identity"], val_size=0.1)
    train, evaluation, stats = build_sft_dataset(data, tokenizer, template, seed=42)
    assert (len(train), len(evaluation)) == (81, 9) and (stats["train"], stats["eval"]) == (81, 9)
    assert stats["encoded"] == 90 and evaluation.column_names == ["input_ids", "labels"]
    again = build_sft_dataset(data, tokenizer, template, seed=42)[1]
    other = build_sft_dataset(data, tokenizer, template, seed=7)[1]
    assert again["input_ids"] == evaluation["input_ids"] != other["input_ids"]


def test_split_mode_counts_one_example_per_turn(tokenizer):
    template = get_template("auto", tokenizer)
    _, _, stats = build_sft_dataset(cfg(["multiturn_demo"], multiturn_loss="split"), tokenizer, template, seed=0)
    assert stats["examples"] == 31 and stats["encoded"] == 63  # 30 two-turn conversations and 1 of three turns
    turns = [sum(m["role"] == "assistant" for m in row["messages"]) for row in load_examples(cfg(["multiturn_demo"]), "sft")]
    assert stats["encoded"] == sum(turns)


def test_empty_after_filtering(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 30, "output": "ok"}] * 3)
    with pytest.raises(DataError) as err:
        build_sft_dataset(cfg([path], cutoff_len=8), tokenizer, get_template("chatml", tokenizer), seed=0)
    assert str(err.value) == f"dataset {path} is empty after filtering (3 examples longer than cutoff_len=8)"


def test_wrong_kind_for_the_stage():
    with pytest.raises(DataError) as err:
        load_examples(cfg(["identity", "preference_demo"]), "sft")
    assert str(err.value) == "this stage needs sft data, but dataset 'preference_demo' holds preference data (preference format)"


def test_max_samples_per_dataset():
    assert len(load_examples(cfg(["identity", "instruct_demo"], max_samples=5), "sft")) == 10


def test_bad_record_error_names_file_and_line(tmp_path):
    rows = [{"instruction": "q", "output": "a"}] * 16 + [{"instruction": "q", "outptu": "a"}]
    path = write_jsonl(tmp_path / "foo.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(cfg([path]), "sft")
    assert str(err.value) == f"{Path(path).resolve()}, line 17: field 'output' is missing (alpaca format needs instruction and output)"


def test_registered_columns_are_applied(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    (tmp_path / "reg.yaml").write_text("qa:\n  file: qa.jsonl\n  format: alpaca\n  columns: {instruction: question, "
                                       "output: answer}\n", encoding="utf-8")
    rows = load_examples(cfg(["qa"], registry=str(tmp_path / "reg.yaml")), "sft")
    assert rows[0] == {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}


def test_turns_json_file_is_one_conversation(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"human": "Q1", "assistant": "A1"}, {"human": "Q2", "assistant": "A2"}]), encoding="utf-8")
    rows = load_examples(cfg([str(path)]), "sft")
    assert len(rows) == 1 and [m["content"] for m in rows[0]["messages"]] == ["Q1", "A1", "Q2", "A2"]


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    first = load_examples(cfg([path]), "pretrain")

    def no_reading(*args, **kwargs):
        raise DataError("the file was read again")

    monkeypatch.setattr(readers, "read_records", no_reading)
    second = load_examples(cfg([path]), "pretrain")
    assert second["text"] == first["text"] and second.cache_files == first.cache_files
    write_jsonl(tmp_path / "c.jsonl", [{"text": "changed"}, {"text": "file"}])  # new size: read afresh
    with pytest.raises(DataError, match="read again"):
        load_examples(cfg([path]), "pretrain")


def test_encoding_is_cached_too(tokenizer):
    template = get_template("auto", tokenizer)
    train, _, _ = build_sft_dataset(cfg(["identity"]), tokenizer, template, seed=0)
    again, _, stats = build_sft_dataset(cfg(["identity"]), tokenizer, template, seed=0)
    assert again.cache_files == train.cache_files and stats["encoded"] == 90


def test_shared_real_datasets(shared_datasets, tokenizer):
    alpaca = str(shared_datasets / "alpaca_en_demo.json")
    train, _, stats = build_sft_dataset(cfg([alpaca], max_samples=64, cutoff_len=512), tokenizer,
                                        get_template("auto", tokenizer), seed=42)
    assert stats["examples"] == 64 and stats["encoded"] + stats["dropped_too_long"] == 64 and stats["trained_tokens"] > 0
    dpo = load_examples(cfg([str(shared_datasets / "dpo_en_demo.json")]), "preference")
    assert len(dpo) == 300 and dpo[0]["prompt"][-1]["role"] == "user" and dpo[0]["chosen"] != dpo[0]["rejected"]
    c4 = load_examples(cfg([str(shared_datasets / "c4_demo.jsonl")]), "pretrain")
    assert len(c4) == 300


def test_txt_one_document_per_line_holds_out_a_tenth(tmp_path, tokenizer):
    """A corpus written one document per line (wiki_demo.txt's layout) is 30 rows, and val_size 0.1 holds out 3."""
    from engine.data.loader import split_examples

    path = tmp_path / "wiki.txt"
    path.write_text("".join(f"Document {i} is about topic {i}.\n" for i in range(30)), encoding="utf-8")
    examples = load_examples(cfg([str(path)]), "pretrain")
    assert len(examples) == 30 and examples[0]["text"] == "Document 0 is about topic 0."
    train, held = split_examples(examples, cfg([str(path)], val_size=0.1), seed=0)
    assert (len(train), len(held)) == (27, 3)
    _, evaluation, stats = build_pretrain_dataset(cfg([str(path)], cutoff_len=64, val_size=0.1), tokenizer, seed=0)
    assert stats["examples"] == 30 and len(evaluation) >= 1


def test_registry_sample_by_paragraph_and_document(tmp_path):
    (tmp_path / "p.txt").write_text("one\nstill one\n\ntwo\n\nthree\n", encoding="utf-8")
    (tmp_path / "r.yaml").write_text("para: {file: p.txt, format: text, sample_by: paragraph}\n"
                                     "doc: {file: p.txt, sample_by: document}\nline: {file: p.txt}\n")
    registry = str(tmp_path / "r.yaml")
    texts = {n: load_examples(cfg([n], registry=registry), "pretrain")["text"] for n in ("para", "doc", "line")}
    assert texts == {"para": ["one\nstill one", "two", "three"], "doc": ["one\nstill one\n\ntwo\n\nthree"],
                     "line": ["one", "still one", "two", "three"]}


def test_interleave_gives_the_asked_proportions_and_counts_rows_per_dataset(tmp_path):
    from engine.data.loader import mix

    names = []
    for n, tag in enumerate("abc"):
        names.append(write_jsonl(tmp_path / f"{tag}.jsonl", [{"text": f"{tag} {i}"} for i in range(1000)]))
    asked = [0.6, 0.3, 0.1]
    rows: dict = {}
    mixed = load_examples(cfg(names, mix="interleave", mix_probabilities=asked), "pretrain", seed=3, counts=rows)
    first = [t.split()[0] for t in mixed["text"][:1000]]
    for tag, p in zip("abc", asked):
        assert abs(first.count(tag) / 1000 - p) <= 0.05, (tag, first.count(tag))
    # first_exhausted: the mix ends when the 60% dataset has given all its 1,000 rows
    assert rows[names[0]] == 1000 and sum(rows.values()) == len(mixed)
    assert abs(rows[names[1]] / len(mixed) - 0.3) <= 0.05
    # concat takes every row once; all_exhausted repeats the smaller shares until each dataset has run out
    assert mix([mixed, mixed], cfg(names[:2]))[1] == [len(mixed)] * 2
    _, every = mix([load_examples(cfg([n]), "pretrain") for n in names],
                   cfg(names, mix="interleave", mix_probabilities=asked, mix_stopping="all_exhausted"), seed=3)
    assert min(every) >= 1000 and every[0] > every[1] > every[2]
