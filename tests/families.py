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
               the ``[INST]``/``[/INST]`` control tokens of tokenizer v3) wrapped as LlamaTokenizer with
               ``legacy=False`` (no "▁" added after a special token: Mistral 7B v0.3's behaviour), and the
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

``real_vocab=True`` gives ``qwen2`` and ``mistral`` a real vocabulary instead, from llama.cpp's own tokenizer test
vocabularies (``workbench gguf-setup`` unpacks them: ``engine.jobs.gguf.tokenizer_test_vocab``), for the GGUF tests: llama.cpp
knows those tokenizers as it knows a user's model (the small ones above are, to its converter, unknown tokenizers):

- ``qwen2``:   Qwen2's byte-level BPE (151,936 ids, its pre-tokenizer: the converter's "qwen2" hash), read by
               transformers from ``ggml-vocab-qwen2.gguf``, with the same Qwen2-Instruct template and special tokens.
- ``mistral``: the 32,000-piece Llama/Mistral-v0.1 SentencePiece BPE (byte fallback, dummy prefix) rebuilt as a
               ``tokenizer.model`` from ``ggml-vocab-llama-spm.gguf``, set up as Mistral 7B Instruct v0.1/v0.2 ship
               theirs: ``[INST]``/``[/INST]`` are plain text, not tokens, and ``legacy: true`` (the text after a
               special token starts with "▁", as sentencepiece, mistral_common and llama.cpp tokenize it).

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


def llama_cpp_vocab(name: str) -> Path:
    """llama.cpp's test vocabulary for ``real_vocab`` family ``name`` (qwen2, mistral), as gguf-setup unpacked it."""
    from engine.jobs.gguf import tokenizer_test_vocab

    vocab = {"qwen2": "qwen2", "mistral": "llama-spm"}[name]
    path = tokenizer_test_vocab(vocab)
    if path is None:
        raise FileNotFoundError(f"llama.cpp's test vocabulary ggml-vocab-{vocab}.gguf is not unpacked; "
                                "run: workbench gguf-setup")
    return path


def sentencepiece_from_gguf(path: Path) -> bytes:
    """A serialized SentencePiece model of the vocabulary in the GGUF ``path`` (llama.cpp's "llama" tokenizer:
    pieces, scores and types, which GGUF numbers as SentencePiece does), as the Llama/Mistral tokenizer.model:
    BPE with byte fallback, digits split, the dummy prefix, no normalization."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    model = pb.ModelProto()
    for piece, score, kind in zip(*(meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))):
        model.pieces.add(piece=piece, score=score, type=kind)
    special = {k: meta[f"tokenizer.ggml.{k}_token_id"] for k in ("unknown", "bos", "eos")}
    model.trainer_spec.MergeFrom(pb.TrainerSpec(
        model_type=pb.TrainerSpec.BPE, vocab_size=len(model.pieces), byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=special["unknown"], bos_id=special["bos"], eos_id=special["eos"],
        pad_id=-1))
    model.normalizer_spec.MergeFrom(pb.NormalizerSpec(name="identity", add_dummy_prefix=True,
                                                      remove_extra_whitespaces=False, escape_whitespaces=True))
    return model.SerializeToString()


def _tokenizer_from_gguf(path: Path):
    """The Hugging Face tokenizer of a Qwen2 GGUF's vocabulary, as ``AutoTokenizer.from_pretrained(gguf_file=...)`` builds
    it, through transformers' fast GGUF metadata reader (seconds; the public path parses every field with gguf-py's
    reader, a minute for Qwen2's 151k tokens and merges on 2 cores)."""
    from transformers import Qwen2Tokenizer
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, vocab, config = get_gguf_tokenizer(str(path))
    assert architecture == "qwen2", f"{path} is a {architecture} vocabulary"
    backend, _ = convert_gguf_tokenizer(architecture, vocab)
    return Qwen2Tokenizer(tokenizer_object=backend, **{k: v for k, v in config.items() if k != "chat_template"})


def _real_sentencepiece_tokenizer(dest: Path, model: bytes):
    """The tokenizer of a real SentencePiece ``model`` as Mistral 7B v0.1/v0.2's own tokenizer.json has it (written
    by transformers 4's converter): BPE merges in the order of the merged pieces' scores, as sentencepiece merges
    (transformers 5, converting a tokenizer.model alone, orders them by piece id, and Llama/Mistral give whitespace
    runs like "▁▁" the lowest score: "a  b" would become "▁▁" "b", not sentencepiece's "▁" "▁b"), and the "▁" put
    before every text between special tokens by a normalizer (Prepend, Replace), as sentencepiece encodes each piece
    of text; ``legacy: true`` in tokenizer_config.json. transformers 5 loads a ``mistral`` model's tokenizer.json as
    it is (TokenizersBackend)."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    (dest / "tokenizer.model").write_bytes(model)
    proto = pb.ModelProto.FromString(model)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    merges = generate_merges(vocab, {p.piece: p.score for p in proto.pieces})
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_bos_token=True, add_eos_token=False)
    tok.init_kwargs["legacy"] = True  # written to tokenizer_config.json, as Mistral's own says it
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def _sentencepiece_tokenizer(cls, dest: Path, model: bytes, **kwargs):
    (dest / "tokenizer.model").write_bytes(model)
    return cls.from_pretrained(str(dest), **kwargs)


def _tokenizer(name: str, dest: Path, real_vocab: bool = False):
    from transformers import AutoTokenizer, GemmaTokenizer, LlamaTokenizer

    if real_vocab and name == "mistral":
        tok = _real_sentencepiece_tokenizer(dest, sentencepiece_from_gguf(llama_cpp_vocab(name)))
        tok.chat_template = MISTRAL_TEMPLATE
        return tok
    if name in ("llama", "qwen2"):
        if real_vocab and name == "qwen2":
            tok = _tokenizer_from_gguf(llama_cpp_vocab(name))
        else:
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


def build_family(name: str, dest: Path, seed: int = 0, real_vocab: bool = False) -> Path:
    """Save a tiny random ``name`` model (one of FAMILIES) with its tokenizer and chat template into ``dest``
    (``real_vocab``: qwen2 and mistral with a real vocabulary, see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}' (known: {', '.join(FAMILIES)})")
    if real_vocab and name not in ("qwen2", "mistral"):
        raise ValueError(f"no real vocabulary for the '{name}' family (only qwen2 and mistral)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(name, dest, real_vocab)
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


def family_model(tmp_path_factory, name: str, real_vocab: bool = False) -> Path:
    """``build_family`` once per pytest session (cached in the session's base temp directory)."""
    dest = tmp_path_factory.getbasetemp() / f"family-{name}{'-real-vocab' if real_vocab else ''}"
    if not (dest / "config.json").is_file():
        tmp = tmp_path_factory.mktemp(f"family-{name}-build")
        build_family(name, tmp, real_vocab=real_vocab)
        shutil.move(str(tmp), str(dest))
    return dest
