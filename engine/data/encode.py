"""Tokenization for training: SFT examples with label masks, and packed pretraining blocks.

The web UI's label-mask preview calls ``encode_sft`` and ``label_spans`` too, so what the
user sees is exactly what the trainer gets.
"""

from __future__ import annotations

from typing import Literal

from .errors import DataError

IGNORE_INDEX = -100
MultiturnLoss = Literal["all", "last", "split"]


def _fit(pairs: list[tuple[list[int], list[int]]], cutoff_len: int) -> list[tuple[list[int], list[int]]]:
    """The turns that fit in ``cutoff_len`` tokens (see ``encode_sft`` for the rule)."""
    kept, total = [], 0
    for prompt, response in pairs:
        if total + len(prompt) >= cutoff_len:  # not even one answer token fits: drop this and later turns
            break
        room = cutoff_len - total - len(prompt)
        if len(response) > room:
            kept.append((prompt, response[:room]))
            break
        kept.append((prompt, response))
        total += len(prompt) + len(response)
    return kept


def _join(pairs: list[tuple[list[int], list[int]]], trained: set[int]) -> dict:
    input_ids, labels = [], []
    for i, (prompt, response) in enumerate(pairs):
        input_ids += prompt + response
        labels += [IGNORE_INDEX] * len(prompt) + (response if i in trained else [IGNORE_INDEX] * len(response))
    return {"input_ids": input_ids, "labels": labels}


def encode_sft(example: dict, template, tokenizer, cutoff_len: int,
               multiturn_loss: MultiturnLoss = "all") -> list[dict]:
    """Tokenize one conversation into training examples ``{"input_ids", "labels"}``.

    ``labels`` is -100 on every prompt token (prefix, system prompt, user turns, assistant
    headers) and equals ``input_ids`` on the answer tokens that carry loss, including the
    end-of-turn token(s) that close each answer.

    multiturn_loss:
      * ``all``   one example, loss on every assistant answer;
      * ``last``  one example, loss on the last (kept) assistant answer only;
      * ``split`` one example per turn: the whole history before it as prompt, loss on that answer only.

    Truncation to ``cutoff_len`` keeps whole turns from the start of the conversation:
      1. a turn is kept whole while everything so far plus its prompt and answer fits;
      2. the first turn that does not fit whole is kept with its answer cut to the room left,
         if its prompt leaves room for at least one answer token; otherwise it is dropped;
      3. every later turn is dropped.
    So when the first turn's prompt alone is >= cutoff_len, nothing is returned (the caller
    counts such examples). With ``split``, the rule applies to each turn's example, and a turn
    whose history no longer fits yields no example (nor do the turns after it).
    """
    if multiturn_loss not in ("all", "last", "split"):
        raise ValueError(f"multiturn_loss must be all, last or split, not {multiturn_loss!r}")
    pairs = template.encode_turns(tokenizer, example["messages"])
    if multiturn_loss == "split":
        out = []
        for k in range(len(pairs)):
            kept = _fit(pairs[: k + 1], cutoff_len)
            if len(kept) <= k:
                break
            out.append(_join(kept, {k}))
        return out
    kept = _fit(pairs, cutoff_len)
    if not kept:
        return []
    trained = set(range(len(kept))) if multiturn_loss == "all" else {len(kept) - 1}
    return [_join(kept, trained)]


def encode_pretrain(texts: list[str], tokenizer, cutoff_len: int) -> list[dict]:
    """Concatenate documents, each followed by EOS, and cut into blocks of exactly ``cutoff_len``.

    The remainder shorter than a block is dropped; ``labels`` equals ``input_ids``.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token to separate documents", field="tokenizer")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids += list(doc) + [eos]
    blocks = [ids[i: i + cutoff_len] for i in range(0, len(ids) - cutoff_len + 1, cutoff_len)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def label_spans(tokenizer, encoded: dict) -> list[tuple[str, bool]]:
    """Decoded text in runs of (text, trained) for showing a label mask."""
    spans: list[tuple[list[int], bool]] = []
    for token, label in zip(encoded["input_ids"], encoded["labels"]):
        trained = label != IGNORE_INDEX
        if spans and spans[-1][1] == trained:
            spans[-1][0].append(token)
        else:
            spans.append(([token], trained))
    return [(tokenizer.decode(ids, skip_special_tokens=False), trained) for ids, trained in spans]
