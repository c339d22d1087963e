"""Tiny random models of the families people fine-tune, each with a tokenizer and chat template of its family.

``build_family(name, dest)`` saves a 2-layer, hidden-64 model built from the family's transformers config class
(``AutoModelForCausalLM.from_config``) with the architecture quirks that trip up tooling, plus a tokenizer, a chat
template and a generation config that fit the family:

- ``llama``:   LlamaConfig (tied embeddings) over the default model's byte-level BPE tokenizer and its own ChatML
               template (the conftest ``tiny_model``).
- ``qwen2``:   Qwen2Config: q/k/v projections with biases, tied embeddings. The default model's byte-level BPE
               tokenizer re-templated as Qwen2-Instruct: ChatML with Qwen's default system prompt, no bos,
               eos ``<|im_end|>``, pad ``<|endoftext|>``, generation stopping at either.
- ``mistral``: MistralConfig: untied head, a sliding-window attention config (4096, as Mistral 7B v0.1), grouped
               KV heads. A SentencePiece BPE tokenizer (byte fallback, Llama-style ``<unk>``/``<s>``/``</s>`` and
               the ``[INST]``/``[/INST]`` control tokens of tokenizer v3) wrapped as LlamaTokenizer, and the
               ``[INST] ...[/INST] answer</s>`` template (the system prompt opens the first instruction, as the
               ``mistral`` registry template and LLaMA-Factory's put it; Mistral's own v0.3 Jinja moves it to the
               last instruction, which is not prefix-stable).
- ``gemma``:   GemmaConfig: embeddings scaled by sqrt(hidden), RMSNorm as (1 + weight), head_dim (32) times heads
               != hidden, one KV head (multi-query), GeLU-tanh MLP, tied embeddings. A SentencePiece BPE tokenizer
               (Gemma's ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3; byte fallback, no dummy prefix)
               wrapped as GemmaTokenizer, and Gemma 3's text template (``<start_of_turn>``/``<end_of_turn>``, the
               system prompt inside the first user turn, contents trimmed); generation stops at ``<eos>`` or
               ``<end_of_turn>``.

Each SentencePiece family keeps its ``tokenizer.model`` next to ``tokenizer.json`` (llama.cpp's converter reads
it). The SentencePiece models are trained at build time (tens of milliseconds) on a few KB of the repository's
English/Chinese demo data plus code and digits. Vocabulary size == embedding rows for every family.

Use ``family_model(tmp_path_factory, name)`` in a session fixture to build each family once per session.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"

FAMILIES = ("llama", "qwen2", "mistral", "gemma")
# the registry template (engine/data/templates.yaml) that renders each family's own template token for token
REGISTRY_TEMPLATE = {"llama": "chatml", "qwen2": "qwen", "mistral": "mistral", "gemma": "gemma"}

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)

# Mistral's own v0.3 template (its tool parts left out): the system prompt goes into the last instruction only, so
# the text of a conversation changes as it grows ('auto' cannot split it into turns); for template-advice tests
MISTRAL_V03_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

GEMMA_TEMPLATE = (  # Gemma 3's chat template, its text part
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
    "{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)

_CODE = '''def fibonacci(n: int) -> list[int]:
    """The first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]

for i in range(10):
    print(i, i ** 2, {"key": [1, 2.5, None]})
'''
_DIGITS = "0123456789 42 3.14159 2026-11-30 10:45 1,000,000 -7 +8 99%\n"


def sentencepiece_corpus() -> list[str]:
    """A few KB of mixed English / Chinese / code / digits: the repository's demo data plus a code snippet."""
    rows = [json.loads(line) for line in (ROOT / "data" / "instruct_demo.jsonl").read_text(encoding="utf-8").splitlines()[:60]]
    identity = json.loads((ROOT / "data" / "identity.json").read_text(encoding="utf-8"))[:20]
    lines = [f"{r['instruction']} {r['output']}" for r in rows + identity]
    zh = (ROOT / "data" / "vocab_zh_demo.txt").read_text(encoding="utf-8").split()
    lines += [" ".join(zh[i:i + 12]) for i in range(0, len(zh), 12)]
    return lines + _CODE.splitlines() + [_DIGITS.strip()] * 3


def train_sentencepiece(specials: dict[str, int], user_defined: list[str], add_dummy_prefix: bool,
                        vocab_size: int = 1000) -> bytes:
    """A serialized SentencePiece BPE model with byte fallback; ``specials`` maps pad/unk/bos/eos pieces to ids."""
    import sentencepiece as spm

    ids = {f"{k}_id": -1 for k in ("pad", "unk", "bos", "eos")}
    pieces = {}
    for kind, (piece, tid) in specials.items():
        ids[f"{kind}_id"], pieces[f"{kind}_piece"] = tid, piece
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentencepiece_corpus()), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        user_defined_symbols=user_defined, add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        **ids, **pieces)
    return out.getvalue()


def _sentencepiece_tokenizer(cls, dest: Path, model: bytes, **kwargs):
    (dest / "tokenizer.model").write_bytes(model)
    return cls.from_pretrained(str(dest), **kwargs)


def _tokenizer(name: str, dest: Path):
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    if name in ("llama", "qwen2"):
        tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
        if name == "qwen2":
            tok.bos_token = None
            tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
            tok.chat_template = QWEN2_TEMPLATE
        return tok
    if name == "mistral":
        model = train_sentencepiece({"unk": ("<unk>", 0), "bos": ("<s>", 1), "eos": ("</s>", 2)},
                                    ["[INST]", "[/INST]"], add_dummy_prefix=True)
        tok = _sentencepiece_tokenizer(LlamaTokenizer, dest, model, add_bos_token=True, add_eos_token=False,
                                       legacy=False)
        tok.chat_template = MISTRAL_TEMPLATE
        return tok
    model = train_sentencepiece({"pad": ("<pad>", 0), "eos": ("<eos>", 1), "bos": ("<bos>", 2), "unk": ("<unk>", 3)},
                                ["<mask>", "<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False)
    tok = _sentencepiece_tokenizer(GemmaTokenizer, dest, model, add_bos_token=True, add_eos_token=False)
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def _config(name: str, tok):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if name == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=False)
    if name == "mistral":
        return MistralConfig(**common, tie_word_embeddings=False, sliding_window=4096)
    return GemmaConfig(**dict(common, num_key_value_heads=1), head_dim=32, hidden_activation="gelu_pytorch_tanh",
                       tie_word_embeddings=True)


def _generation_config(name: str, tok, config) -> dict:
    if name == "llama":
        return json.loads((DEFAULT_MODEL / "generation_config.json").read_text(encoding="utf-8"))
    stops = {"qwen2": ["<|im_end|>", "<|endoftext|>"], "mistral": ["</s>"], "gemma": ["<eos>", "<end_of_turn>"]}[name]
    eos = [tok.convert_tokens_to_ids(t) for t in stops]
    return {"bos_token_id": config.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": config.pad_token_id}


def build_family(name: str, dest: Path, seed: int = 0) -> Path:
    """Save a tiny random ``name`` model (one of FAMILIES) with its tokenizer and chat template into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}' (known: {', '.join(FAMILIES)})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(name, dest)
    config = _config(name, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == len(tok), "vocabulary and embedding rows must agree"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    cfg_file = dest / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if tok_cfg.pop("vocab_file", None) is not None:  # an absolute path to where it was built; tokenizer.model sits here
        cfg_file.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps(_generation_config(name, tok, config), indent=2) + "\n",
                                                 encoding="utf-8")
    return dest


def family_model(tmp_path_factory, name: str) -> Path:
    """``build_family`` once per pytest session (cached in the session's base temp directory)."""
    dest = tmp_path_factory.getbasetemp() / f"family-{name}"
    if not (dest / "config.json").is_file():
        tmp = tmp_path_factory.mktemp(f"family-{name}-build")
        build_family(name, tmp)
        shutil.move(str(tmp), str(dest))
    return dest
