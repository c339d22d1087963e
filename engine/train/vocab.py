"""Vocabulary extension: merge new tokens into a run's tokenizer and grow the model's embeddings to match.

``model.extend_vocab`` names the new tokens; what the path is decides how it is read:

- a tokenizer directory (``tokenizer.json``, or a SentencePiece ``*.model``), or such a file itself: the
  pieces of that tokenizer's vocabulary written in scripts without spaces between words (Chinese, Japanese
  kana, Thai, ...), by their text. Pieces of space-separated languages are left out: an added token is
  matched wherever its text occurs, so a word piece such as ``ing`` would cut other words apart;
- any other file: a UTF-8 text file with one token per line (blank lines skipped), taken as written, so
  list whole words, or pieces that should be one token wherever they occur.

Tokens the base tokenizer already encodes as one token are skipped and counted as ``present``; the rest
are added as normal tokens (not special), so they are used when text is encoded and decode as text. The
embedding matrix gets rows for the new ids, initialised to the mean of the existing rows (input and output
embeddings; tied weights stay tied), and ``embed_tokens``/``lm_head`` train with the run (LoRA and QLoRA:
``modules_to_save``; freeze: trainable next to the last layers; full: like every weight). The extended
tokenizer is saved with every checkpoint, and ``engine.run.checkpoint.fit_base`` grows a base model to a
checkpoint's tokenizer before an adapter is attached.

Imports no torch at module level: the checks and the web UI read token lists through it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from engine.run import paths

SAMPLE_CHARS = 20_000


class VocabError(ValueError):
    """A vocabulary source that cannot be used (missing, unreadable, no tokens)."""


def read_tokens(source: str | Path) -> list[str]:
    """The candidate tokens named by ``source``, in order and without duplicates; raises VocabError."""
    path = Path(source).expanduser()
    if (policy := paths.active()) is not None and str(source).strip() and not policy.allows(path):
        raise VocabError(str(policy.refusal(str(source))))
    if not str(source).strip() or not path.exists():
        raise VocabError(f"vocabulary source not found: {path}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            tokens = _tokenizer_json(path / "tokenizer.json")
        elif sorted(path.glob("*.model")):
            tokens = _sentencepiece(sorted(path.glob("*.model"))[0])
        else:
            raise VocabError(f"{path} is a directory without a tokenizer (tokenizer.json or a SentencePiece *.model)")
    elif path.suffix == ".model":
        tokens = _sentencepiece(path)
    elif path.name.endswith("tokenizer.json"):
        tokens = _tokenizer_json(path)
    else:
        tokens = _lines(path)
    tokens = list(dict.fromkeys(t for t in tokens if t))
    if not tokens:
        raise VocabError(f"{path} holds no tokens (a text file has one token per line)")
    return tokens


def _lines(path: Path) -> list[str]:
    out = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                out.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError:
                raise VocabError(f"{path}, line {n}: not UTF-8 text (a token list has one token per line)") from None
    return out


def _tokenizer_json(path: Path) -> list[str]:
    from tokenizers import Tokenizer

    try:
        tk = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - the library raises plain Exceptions for bad files
        raise VocabError(f"{path} is not a readable tokenizer.json: {err}") from None
    special = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    out = []
    for i in range(tk.get_vocab_size()):
        piece = tk.id_to_token(i)
        if piece is None or piece in special:
            continue
        out.append(tk.decode([i], skip_special_tokens=False).replace("▁", " ").strip())
    return [t for t in out if _unspaced(t)]


def _sentencepiece(path: Path) -> list[str]:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as err:
        raise VocabError(f"{path} is not a readable SentencePiece model: {err}") from None
    pieces = [sp.id_to_piece(i).replace("▁", " ").strip() for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))]
    return [t for t in pieces if _unspaced(t)]


_UNSPACED = ("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER",
             "MYANMAR", "TIBETAN")


def _unspaced(text: str) -> bool:
    """Every character is from a script written without spaces between words (a partial UTF-8 byte is not)."""
    return bool(text) and all(unicodedata.name(c, "").startswith(_UNSPACED) for c in text)


def tokens_per_char(tokenizer, text: str) -> float:
    """Tokens per character of ``text`` (lower is better: more text fits in a context, fewer steps per answer)."""
    if not text:
        return 0.0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) / len(text)


def extend_tokenizer(tokenizer, source: str | Path, sample: str = "") -> dict:
    """Add the new tokens of ``source`` to ``tokenizer`` in place; returns what happened.

    ``tokens`` read, ``added``, ``present`` (already one token: skipped), ``base_size`` and ``size`` (len of
    the tokenizer before and after), and with a ``sample`` text its tokens per character before and after.
    """
    tokens = read_tokens(source)
    before = tokens_per_char(tokenizer, sample)
    base = len(tokenizer)
    encoded = tokenizer(tokens, add_special_tokens=False)["input_ids"]
    new = [t for t, ids in zip(tokens, encoded) if len(ids) != 1]
    tokenizer.add_tokens(new)
    info = {"source": str(source), "tokens": len(tokens), "added": len(tokenizer) - base,
            "present": len(tokens) - len(new), "base_size": base, "size": len(tokenizer)}
    if sample:
        info.update(sample_chars=len(sample), tokens_per_char_before=round(before, 4),
                    tokens_per_char_after=round(tokens_per_char(tokenizer, sample), 4))
    return info


def preview(model_path: str | Path, source: str | Path, text: str, trust_remote_code: bool = False) -> dict:
    """What extending the tokenizer of ``model_path`` with ``source`` does to ``text`` (for the web UI)."""
    from engine.data.encode import load_tokenizer
    from engine.run.config import ModelConfig

    # a fresh tokenizer (extending changes it), loaded as training loads it
    tokenizer = load_tokenizer(ModelConfig(path=str(model_path), trust_remote_code=trust_remote_code))
    return extend_tokenizer(tokenizer, source, text)


def sample_text(data_cfg, chars: int = SAMPLE_CHARS) -> str:
    """About ``chars`` characters of the run's datasets (every string of their first records), to measure on.
    A dataset that cannot be read is left out here; the run's data loading reports it."""
    from engine.data.errors import DataError
    from engine.data.readers import read_records
    from engine.data.registry import resolve_dataset

    parts, total = [], 0

    def walk(value):
        nonlocal total
        if isinstance(value, str):
            parts.append(value)
            total += len(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for name in data_cfg.datasets:
        try:
            spec = resolve_dataset(name, data_cfg.registry)
            for _, record in read_records(spec.path, sample_by=spec.sample_by):
                walk(record)
                if total >= chars / len(data_cfg.datasets):
                    break
        except DataError:
            continue
    return "\n".join(parts)[:chars]


def _rows(weight) -> int:
    return int(getattr(weight, "ds_shape", weight.shape)[0])  # ZeRO-3 partitions hold the full shape in ds_shape


def resize_embeddings(model, num_tokens: int, known: int | None = None) -> range:
    """Give ``model`` embedding rows for ``num_tokens`` tokens; returns the ids set to the mean.

    Rows of ids from ``known`` (default: the rows the model had) up to ``num_tokens`` are set to the mean of
    the rows below ``known``, in the input and the output embeddings (one matrix when they are tied). Works on
    a ZeRO-3 partitioned model too (the rows are gathered, changed on rank 0 and partitioned again).
    """
    import contextlib

    import torch
    from transformers.integrations import is_deepspeed_zero3_enabled

    rows = _rows(model.get_input_embeddings().weight)
    known = rows if known is None else known
    if num_tokens > rows:
        model.resize_token_embeddings(num_tokens, mean_resizing=False)
    ids = range(known, num_tokens)
    if not len(ids):
        return ids
    weights = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not weights[0]:
        weights.append(out.weight)
    gather = contextlib.nullcontext()
    if is_deepspeed_zero3_enabled():
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(weights, modifier_rank=0)
    with gather, torch.no_grad():
        for w in weights:
            w[known:num_tokens] = w[:known].float().mean(0).to(w.dtype)
    return ids
