"""encode_sft label masks for every multi-turn mode, the truncation rule, preference/KTO answers, and packed
pretraining blocks."""

from __future__ import annotations

import pytest

from engine.data import IGNORE_INDEX, encode_pretrain, encode_sft, get_template, label_spans
from engine.data.encode import encode_answers

X = IGNORE_INDEX
CONV = {"messages": [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
]}
ANSWER1 = [19556, 17, 2, 198]  # "Hello!" "<|im_end|>" "\n"
ANSWER2 = [36, 2, 198]         # "4" "<|im_end|>" "\n"


def chat_ids(tokenizer, messages, **kwargs):
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(params=["auto", "chatml"])
def template(request, tokenizer):
    smol = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    return get_template(request.param, tokenizer, default_system=None if request.param == "auto" else smol)


@pytest.fixture
def parts(tokenizer):
    """Hand-checked lengths: prompt 1 (system + user + header), answer 1, prompt 2, answer 2."""
    full = chat_ids(tokenizer, CONV["messages"])
    p1 = len(chat_ids(tokenizer, CONV["messages"][:1], add_generation_prompt=True))
    p2 = len(chat_ids(tokenizer, CONV["messages"][:3], add_generation_prompt=True)) - p1 - len(ANSWER1)
    assert (p1, p2, len(full)) == (31, 13, 51)  # 3+16+2 system, 3+1+2 user, 4 header; 3+4+2+4; +4+3 answers
    assert full[p1: p1 + 4] == ANSWER1 and full[-3:] == ANSWER2
    return full, p1, p2


def test_all_turns_trained(tokenizer, template, parts):
    full, p1, p2 = parts
    [ex] = encode_sft(CONV, template, tokenizer, cutoff_len=1024, multiturn_loss="all")
    assert ex["input_ids"] == full
    assert ex["labels"] == [X] * p1 + ANSWER1 + [X] * p2 + ANSWER2
    assert label_spans(tokenizer, ex)[1] == ("Hello!<|im_end|>\n", True)
    assert [text for text, trained in label_spans(tokenizer, ex) if trained] == ["Hello!<|im_end|>\n", "4<|im_end|>\n"]


def test_last_turn_trained(tokenizer, template, parts):
    full, p1, p2 = parts
    [ex] = encode_sft(CONV, template, tokenizer, cutoff_len=1024, multiturn_loss="last")
    assert ex["input_ids"] == full
    assert ex["labels"] == [X] * (p1 + 4 + p2) + ANSWER2


def test_split_turns(tokenizer, template, parts):
    full, p1, p2 = parts
    first, second = encode_sft(CONV, template, tokenizer, cutoff_len=1024, multiturn_loss="split")
    assert first["input_ids"] == chat_ids(tokenizer, CONV["messages"][:2]) == full[: p1 + 4]
    assert first["labels"] == [X] * p1 + ANSWER1
    assert second["input_ids"] == full
    assert second["labels"] == [X] * (p1 + 4 + p2) + ANSWER2


def test_truncation_on_the_real_conversation(tokenizer, template, parts):
    full, p1, p2 = parts
    # room for the first turn and 1 token of the second answer
    [ex] = encode_sft(CONV, template, tokenizer, cutoff_len=p1 + 4 + p2 + 1, multiturn_loss="all")
    assert ex["input_ids"] == full[: p1 + 4 + p2 + 1]
    assert ex["labels"][-1] == ANSWER2[0]
    # first prompt alone too long: nothing
    assert encode_sft(CONV, template, tokenizer, cutoff_len=p1, multiturn_loss="all") == []
    assert encode_sft(CONV, template, tokenizer, cutoff_len=p1, multiturn_loss="split") == []


class FixedTemplate:
    """Turns of known lengths: prompt 5 / answer 3, then prompt 4 / answer 6."""

    def encode_turns(self, tokenizer, messages):
        return [([1] * 5, [2] * 3), ([3] * 4, [4] * 6)]


@pytest.mark.parametrize("cutoff,ids,labels", [
    (100, [1] * 5 + [2] * 3 + [3] * 4 + [4] * 6, [X] * 5 + [2] * 3 + [X] * 4 + [4] * 6),  # all fits
    (18, [1] * 5 + [2] * 3 + [3] * 4 + [4] * 6, [X] * 5 + [2] * 3 + [X] * 4 + [4] * 6),   # exactly fits
    (17, [1] * 5 + [2] * 3 + [3] * 4 + [4] * 5, [X] * 5 + [2] * 3 + [X] * 4 + [4] * 5),   # last answer cut
    (13, [1] * 5 + [2] * 3 + [3] * 4 + [4] * 1, [X] * 5 + [2] * 3 + [X] * 4 + [4] * 1),   # 1 answer token left
    (12, [1] * 5 + [2] * 3, [X] * 5 + [2] * 3),                                           # turn 2 prompt fills it: dropped
    (9, [1] * 5 + [2] * 3, [X] * 5 + [2] * 3),
    (6, [1] * 5 + [2] * 1, [X] * 5 + [2] * 1),                                            # first answer cut to 1 token
    (5, None, None),                                                                      # first prompt >= cutoff
])
def test_truncation_rule(cutoff, ids, labels):
    out = encode_sft({"messages": []}, FixedTemplate(), None, cutoff_len=cutoff, multiturn_loss="all")
    assert out == ([] if ids is None else [{"input_ids": ids, "labels": labels}])


def test_truncation_rule_split():
    out = encode_sft({"messages": []}, FixedTemplate(), None, cutoff_len=13, multiturn_loss="split")
    assert out == [
        {"input_ids": [1] * 5 + [2] * 3, "labels": [X] * 5 + [2] * 3},
        {"input_ids": [1] * 5 + [2] * 3 + [3] * 4 + [4], "labels": [X] * 12 + [4]},
    ]
    assert len(encode_sft({"messages": []}, FixedTemplate(), None, cutoff_len=12, multiturn_loss="split")) == 1
    last = encode_sft({"messages": []}, FixedTemplate(), None, cutoff_len=12, multiturn_loss="last")
    assert last == [{"input_ids": [1] * 5 + [2] * 3, "labels": [X] * 5 + [2] * 3}]  # last *kept* turn


def test_bad_mode():
    with pytest.raises(ValueError, match="multiturn_loss"):
        encode_sft(CONV, FixedTemplate(), None, cutoff_len=10, multiturn_loss="first")


PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def test_answers_are_tokenized_as_sft_tokenizes_them(tokenizer, template):
    prompt_ids, (chosen, rejected) = encode_answers(PROMPT, ["4", "Five, I think."], template, tokenizer, 1024)
    for answer, ids in (("4", chosen), ("Five, I think.", rejected)):
        [sft] = encode_sft({"messages": PROMPT + [{"role": "assistant", "content": answer}]}, template, tokenizer, 1024,
                           multiturn_loss="last")
        assert prompt_ids + ids == sft["input_ids"]
        assert ids == [t for t in sft["labels"] if t != X]  # the answer is exactly what SFT trains on
    assert chosen == ANSWER2 and tokenizer.decode(rejected) == "Five, I think.<|im_end|>\n"
    assert prompt_ids == chat_ids(tokenizer, PROMPT, add_generation_prompt=True)


def test_answer_truncation_keeps_the_prompt(tokenizer, template):
    prompt_ids, (chosen, rejected) = encode_answers(PROMPT, ["4", "Five, I think."], template, tokenizer, 1024)
    n = len(prompt_ids)
    # every answer is cut to the room the whole prompt leaves
    assert encode_answers(PROMPT, ["4", "Five, I think."], template, tokenizer, n + 2) == (prompt_ids, [chosen[:2], rejected[:2]])
    assert encode_answers(PROMPT, ["4"], template, tokenizer, n + 1) == (prompt_ids, [chosen[:1]])
    assert encode_answers(PROMPT, ["4"], template, tokenizer, n) is None  # the prompt alone fills cutoff_len


def test_encode_pretrain_blocks(tokenizer):
    texts = ["The quick brown fox.", "Jumps over the lazy dog!", "Short."]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    stream = ids[0] + [2] + ids[1] + [2] + ids[2] + [2]
    assert len(stream) == 17  # 5 + eos + 7 + eos + 2 + eos
    blocks = encode_pretrain(texts, tokenizer, cutoff_len=8)
    # no padding: the blocks are the stream cut every 8 tokens, the last one shorter
    assert [b["input_ids"] for b in blocks] == [stream[:8], stream[8:16], stream[16:]]
    # positions restart at every document and at the remainder of a cut one: doc 2 starts at 6 and is cut at 8,
    # its 6 other tokens open block 2; doc 3 starts there at 6 and its EOS is cut off into block 3
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert blocks[1]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert blocks[2]["position_ids"] == [0]
    # the first token of every piece is no target; everything else is, the EOS included
    for b in blocks:
        assert b["labels"] == [X if p == 0 else t for t, p in zip(b["input_ids"], b["position_ids"])]
    assert blocks[0]["labels"][5] == 2 and blocks[1]["labels"][5] == 2 and blocks[2]["labels"] == [X]
    [whole] = encode_pretrain(texts, tokenizer, cutoff_len=17)
    assert whole["input_ids"] == stream and whole["position_ids"] == list(range(6)) + list(range(8)) + list(range(3))
    assert encode_pretrain(texts, tokenizer, cutoff_len=1000) == [whole]


def test_packed_blocks_attend_within_documents(tokenizer, tiny_model):
    """The PT collator turns each block's position restarts into sequence boundaries of one padding-free row."""
    from transformers import AutoModelForCausalLM

    from engine.train.stages import DocumentPieces

    texts = ["The quick brown fox.", "Jumps over the lazy dog!", "Short."]
    blocks = encode_pretrain(texts, tokenizer, cutoff_len=8)
    batch = DocumentPieces(AutoModelForCausalLM.from_pretrained(tiny_model))(blocks[:2])
    assert batch["input_ids"].tolist() == [blocks[0]["input_ids"] + blocks[1]["input_ids"]]
    assert batch["position_ids"].tolist() == [blocks[0]["position_ids"] + blocks[1]["position_ids"]]
    assert batch["labels"].tolist() == [blocks[0]["labels"] + blocks[1]["labels"]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 8, 14, 16]
    assert (batch["input_ids"] != tokenizer.pad_token_id).sum() == 14  # only the 2 EOS are pad-id tokens: no padding
