"""Tokenization for training: SFT examples with label masks, prompts with candidate answers (preference,
KTO), and packed pretraining blocks.

The web UI's label-mask preview calls ``encode_sft`` and ``label_spans`` too, so what the
user sees is exactly what the trainer gets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .errors import DataError

if TYPE_CHECKING:
    from engine.run.config import ModelConfig

IGNORE_INDEX = -100
MultiturnLoss = Literal["all", "last", "split"]


def load_tokenizer(model_cfg: ModelConfig):
    """The tokenizer of ``model_cfg.path`` as training uses it (pad = EOS when it has none, right padding). The
    web UI's previews and token counts load it here too, on first use: transformers is imported only then."""
    from transformers import AutoTokenizer

    tok = keep_legacy(AutoTokenizer.from_pretrained(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def keep_legacy(tok):
    """``tok``, saving its ``legacy`` flag again. transformers 5 reads a LlamaTokenizer's ``legacy`` (Llama 2's
    tokenizer_config.json says true) but no longer writes it, and rebuilds that tokenizer's pre-tokenizer from the
    flag when it loads: a checkpoint, final/ or an export of such a model would reload as legacy=False and tokenize
    the text after a special token without its leading "▁" ("<s>[INST]" as "[" instead of "▁["), unlike the base
    model, sentencepiece and llama.cpp. (A ``mistral`` model's tokenizer.json is loaded as it is, flag or not.)"""
    if isinstance(getattr(tok, "legacy", None), bool):
        tok.init_kwargs["legacy"] = tok.legacy
    return tok


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
    tools = example.get("tools")  # passed only when there are some: a template object without tools need not take them
    pairs = template.encode_turns(tokenizer, example["messages"], tools) if tools else \
        template.encode_turns(tokenizer, example["messages"])
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


def encode_answers(prompt: list[dict], answers: list[str], template, tokenizer,
                   cutoff_len: int) -> tuple[list[int], list[list[int]]] | None:
    """Tokenize a prompt and each of its candidate answers (a preference pair's chosen and rejected, or a KTO
    completion) exactly as ``encode_sft`` tokenizes the conversation ``prompt + [assistant answer]``.

    Returns ``(prompt_ids, [answer_ids, ...])``: ``prompt_ids`` is every token before the last answer
    (prefix, system prompt, earlier turns, the last user turn and the assistant header), each
    ``answer_ids`` the answer with its end-of-turn token(s), so ``prompt_ids + answer_ids`` equals the
    SFT encoding of that conversation. Truncation keeps the prompt whole and cuts every answer to the
    room left in ``cutoff_len``; when the prompt alone fills ``cutoff_len`` (no answer token fits),
    ``None`` is returned and the caller counts the example as dropped.
    """
    prompt_ids, out = None, []
    for answer in answers:
        pairs = template.encode_turns(tokenizer, list(prompt) + [{"role": "assistant", "content": answer}])
        head = [t for p, r in pairs[:-1] for t in p + r] + pairs[-1][0]
        if prompt_ids is not None and head != prompt_ids:
            raise DataError(f"template '{template.name}' renders the same prompt differently for different answers, "
                            "so the answers cannot be compared", field="template")
        prompt_ids = head
        out.append(pairs[-1][1])
    if prompt_ids is None or len(prompt_ids) >= cutoff_len:
        return None
    room = cutoff_len - len(prompt_ids)
    return prompt_ids, [a[:room] for a in out]


def encode_pretrain(texts: list[str], tokenizer, cutoff_len: int) -> list[dict]:
    """Pack documents into blocks of ``cutoff_len`` tokens for continued pretraining.

    Every document is followed by EOS and the documents are laid end to end, so a block holds exactly
    ``cutoff_len`` tokens (only the last block may be shorter) and no position is padding. A document
    that reaches the end of a block is cut there and its remainder opens the next block.

    Document boundaries are kept inside a block: ``position_ids`` restart at 0 at the start of every
    document and of every continued remainder (a *piece*), attention stays within a piece (the
    padding-free collator turns the restarts into sequence boundaries), and ``labels`` is -100 at the
    first token of every piece, because no visible token precedes it. Every other token, the EOS
    included, is a target: ``labels`` equals ``input_ids`` there.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token to separate documents", field="tokenizer")
    eos = tokenizer.eos_token_id
    blocks: list[dict] = []
    block = {"input_ids": [], "labels": [], "position_ids": []}
    for doc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        doc = list(doc) + [eos]
        while doc:
            room = cutoff_len - len(block["input_ids"])
            piece, doc = doc[:room], doc[room:]
            block["input_ids"] += piece
            block["labels"] += [IGNORE_INDEX] + piece[1:]
            block["position_ids"] += list(range(len(piece)))
            if len(block["input_ids"]) == cutoff_len:
                blocks.append(block)
                block = {"input_ids": [], "labels": [], "position_ids": []}
    if block["input_ids"]:
        blocks.append(block)
    return blocks


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
