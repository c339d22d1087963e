"""GGUF files for llama.cpp-compatible tools, written from a merged export directory (safetensors).

Supported: Llama-architecture models (``LlamaForCausalLM``, e.g. SmolLM2) with default RoPE, no biases,
and a byte-level BPE tokenizer whose pre-tokenizer is GPT-2's or Llama 3's (the ones transformers'
GGUF reader rebuilds exactly, so the round trip can be checked). Anything else (other architectures,
SentencePiece tokenizers, llama3/yarn RoPE scaling) is refused by ``gguf_problems`` before work starts.

The layout follows llama.cpp's converter (``convert_hf_to_gguf.py``, class ``LlamaModel``):

- tensors are renamed (``_GLOBAL_NAMES``, ``_LAYER_NAMES``); q/k projection rows are permuted from the
  Hugging Face rotary layout (two halves) to llama.cpp's (interleaved pairs);
- 1-D tensors (norms) stay F32; 2-D tensors take the file's type, falling back to F16 when a row does not
  divide into 32-element blocks; a tied ``lm_head`` is not written (readers reuse ``token_embd``);
- ``q4_0`` files keep the token embedding (the output matrix too, when untied) in Q8_0: llama.cpp's
  quantizer gives those Q6_K, which gguf-py cannot write;
- metadata: ``llama.*`` hyperparameters and ``tokenizer.ggml.*`` (tokens with their types, merges, special
  ids, add_bos/add_eos) plus ``tokenizer.chat_template``.

Tensors are quantized (gguf-py's ``gguf.quants``, which follows ggml's reference quantizers) and written one
at a time, so memory stays at about one tensor. ``verify_gguf`` loads the file back with transformers
(``gguf_file=``): the tokenizer must give the same ids, and the logits must equal the merged model's with the
same rounding applied (``expected_logits``); the loss against the unrounded model is reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import get_args

from engine.run.jobconfig import GGUFType

QTYPES = get_args(GGUFType)
# Size estimate per parameter (blocks of 32 weights: Q8_0 34 bytes, Q4_0 18 bytes).
BYTES_PER_PARAM = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}

_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")

# Hugging Face pre-tokenizers with a llama.cpp name that transformers' GGUF reader rebuilds the same way.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Text whose ids must survive the round trip: special tokens, digits, CJK, emoji, code whitespace.
SAMPLE_MESSAGES = [{"role": "system", "content": "You are Orion."},
                   {"role": "user", "content": "In 2024, 12345 users wrote 你好，世界! 🙂 and:\n\tdef f(x):  return x**2"}]


class GGUFError(RuntimeError):
    """A model or tokenizer this writer does not support, or a GGUF that failed its verification."""


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Hugging Face Llama tensor (None: not written, e.g. rotary buffers)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    return None


def permute_rotary(w, n_head: int):
    """Rows of a q/k projection from the HF rotary layout (first half, second half) to llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- what is supported

def _hparams(config: dict) -> dict:
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {
        "layers": config["num_hidden_layers"], "hidden": config["hidden_size"], "ffn": config["intermediate_size"],
        "heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "context": config.get("max_position_embeddings", 2048), "eps": config.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
        "rope_type": rope.get("rope_type", rope.get("type", "default")), "vocab": config["vocab_size"],
        "tied": config.get("tie_word_embeddings", False),
    }


def pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``) for this tokenizer.json, None if unsupported."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


def _describe(pre: dict | None) -> str:
    if not pre:
        return "none"
    if pre.get("type") == "Sequence":
        return " + ".join(p.get("type", "?") for p in pre.get("pretokenizers", []))
    return pre.get("type", "?")


def gguf_problems(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> list[str]:
    """Why this model cannot be written as GGUF (empty: it can). Reads config.json and tokenizer.json only."""
    model_dir = Path(model_dir)
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") != "llama" or arch != "LlamaForCausalLM":
        return [f"GGUF export supports Llama-architecture models (LlamaForCausalLM); {model_dir} is "
                f"{arch} (model_type {config.get('model_type')!r})"]
    problems = []
    hp = _hparams(config)
    if hp["rope_type"] != "default":
        problems.append(f"GGUF export supports default RoPE only; {model_dir}/config.json has "
                        f"rope_type {hp['rope_type']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            problems.append(f"GGUF export does not support {key}=true ({model_dir}/config.json)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"GGUF export supports hidden_act silu, not {config['hidden_act']!r} ({model_dir}/config.json)")
    tok_file = tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        return problems + [f"GGUF export needs a fast tokenizer: {tok_file} is missing"]
    tj = json.loads(tok_file.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        kind = f"{model.get('type')} tokenizer" + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
        problems.append(f"GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama 3 style); {tok_file} is a {kind}")
    elif pre_tokenizer(tj) is None:
        problems.append(f"GGUF export supports GPT-2 or Llama 3 pre-tokenization; {tok_file} pre-tokenizes with "
                        f"{_describe(tj.get('pre_tokenizer'))}")
    return problems


# ---------------------------------------------------------------- writing

def _vocab(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    import gguf

    vocab, added = tokenizer_json["model"]["vocab"], tokenizer_json.get("added_tokens", [])
    top = max([*vocab.values(), *(t["id"] for t in added)])
    if top >= vocab_size:
        raise GGUFError(f"the tokenizer has token id {top} but the model's vocab_size is {vocab_size}")
    tokens: list[str | None] = [None] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for token, i in vocab.items():
        tokens[i] = token
    for t in added:
        tokens[t["id"]] = t["content"]
        types[t["id"]] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    for i, token in enumerate(tokens):
        if token is None:  # embedding rows the tokenizer never produces
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"].get("merges", [])]
    return tokens, types, merges


def _add_metadata(writer, hp: dict, qtype: str, tokenizer_dir: Path, name: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[qtype]
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hp["vocab"])
    writer.add_context_length(hp["context"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_block_count(hp["layers"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(float(hp["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hp["eps"]))

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tokens, types, merges = _vocab(tj, hp["vocab"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    for add, tid in ((writer.add_bos_token_id, tok.bos_token_id), (writer.add_eos_token_id, tok.eos_token_id),
                     (writer.add_unk_token_id, tok.unk_token_id), (writer.add_pad_token_id, tok.pad_token_id)):
        if tid is not None:
            add(int(tid))
    plain, with_special = tok("a", add_special_tokens=False).input_ids, tok("a").input_ids
    writer.add_add_bos_token(len(with_special) > len(plain) and with_special[0] == tok.bos_token_id)
    writer.add_add_eos_token(len(with_special) > len(plain) and with_special[-1] == tok.eos_token_id)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _order(name: str) -> tuple:
    """llama.cpp's order: the embedding, the blocks in turn, then the output norm and head."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (1, int(m.group(1)), name) if m else (0 if name == "token_embd.weight" else 2, 0, name)


def _tensor_type(gname: str, shape: tuple[int, ...], qtype: str):
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    want = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[qtype]
    if qtype == "q4_0" and gname in ("token_embd.weight", "output.weight"):
        want = T.Q8_0
    return want if want == T.F16 or shape[-1] % 32 == 0 else T.F16


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return [model_dir / "model.safetensors"]


def write_gguf(model_dir: str | Path, path: str | Path, qtype: str, tokenizer_dir: str | Path | None = None) -> Path:
    """Write ``path`` (f16 / q8_0 / q4_0) from the safetensors model in ``model_dir``; returns the path."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    model_dir, path = Path(model_dir), Path(path)
    tokenizer_dir = Path(tokenizer_dir or model_dir)
    if qtype not in QTYPES:
        raise GGUFError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(QTYPES)}")
    problems = gguf_problems(model_dir, tokenizer_dir)
    if problems:
        raise GGUFError("; ".join(problems))
    hp = _hparams(json.loads((model_dir / "config.json").read_text(encoding="utf-8")))

    handles = [safe_open(str(f), framework="pt") for f in _weight_files(model_dir)]
    plan, unknown = [], []  # plan: (gguf name, hf name, handle, shape, ggml type)
    for h in handles:
        for hf in h.keys():
            gname = gguf_name(hf)
            if gname is None and not hf.endswith("rotary_emb.inv_freq"):
                unknown.append(hf)
            if gname is None or (gname == "output.weight" and hp["tied"]):
                continue
            shape = tuple(h.get_slice(hf).get_shape())
            plan.append((gname, hf, h, shape, _tensor_type(gname, shape, qtype)))
    plan.sort(key=lambda p: _order(p[0]))
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(hp["layers"])
                                                             for n in _LAYER_NAMES.values()}
    if not hp["tied"]:
        expected.add("output.weight")
    if unknown:
        raise GGUFError(f"{model_dir} has tensors a Llama GGUF has no place for: {', '.join(sorted(unknown)[:5])}")
    missing = sorted(expected - {p[0] for p in plan})
    if missing:
        raise GGUFError(f"{model_dir} lacks tensors for {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        _add_metadata(writer, hp, qtype, tokenizer_dir, model_dir.name)
        for gname, _, _, shape, ttype in plan:
            if ttype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if ttype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(gname, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, ttype)
                writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, hf, h, _, ttype in plan:
            data = h.get_tensor(hf).to(torch.float32).numpy()
            if gname.endswith(("attn_q.weight", "attn_k.weight")):
                data = permute_rotary(data, hp["heads"] if ".attn_q." in gname else hp["kv_heads"])
            writer.write_tensor_data(np.ascontiguousarray(gguf.quants.quantize(data, ttype)))
        writer.close()
        tmp.replace(path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- verification

def expected_logits(reference, qtype: str, ids):
    """Logits of ``reference`` with every weight rounded the way ``write_gguf`` stores it (same types, same
    quantizer, no file involved): what a correct file must reproduce, quantization error included."""
    import gguf
    import torch

    swapped = {}
    for name, p in reference.named_parameters():
        gname = gguf_name(name)
        if gname is not None and p.dim() == 2:
            ttype = _tensor_type(gname, tuple(p.shape), qtype)
            w = p.detach().float().numpy()
            swapped[name] = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, ttype), ttype).reshape(w.shape))
    with torch.no_grad():
        return torch.func.functional_call(reference, swapped, kwargs={"input_ids": ids}).logits.float()


def verify_gguf(path: Path, qtype: str, tokenizer, reference, ids, ref_tokens: list[int]) -> dict:
    """Load ``path`` back with transformers (``gguf_file=``) and check it against ``reference`` (the merged
    model in fp32) on ``ids``.

    Fails (GGUFError) when the tokenizer gives other ids for a sample with special tokens, or when the logits
    differ from ``expected_logits`` (the reference with the file's rounding) by more than 0.1% of the
    largest logit. Reports the quantization loss against the reference: max logit difference, top-1
    agreement over the prompt positions, and whether ``len(ref_tokens)`` greedy tokens are the same.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.jobs.export import greedy

    g_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    sample = tokenizer.apply_chat_template(SAMPLE_MESSAGES, tokenize=False, add_generation_prompt=True) \
        if tokenizer.chat_template else SAMPLE_MESSAGES[1]["content"]
    want, got = tokenizer(sample, add_special_tokens=False).input_ids, g_tok(sample, add_special_tokens=False).input_ids
    if want != got:
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise GGUFError(f"{path.name}: its tokenizer gives other ids for the sample text from position {first} "
                        f"({want[first:first + 3]} vs {got[first:first + 3]})")
    if tokenizer("a").input_ids != g_tok("a").input_ids:
        raise GGUFError(f"{path.name}: its tokenizer adds other special tokens to a text ({g_tok('a').input_ids} for 'a', "
                        f"the model's tokenizer {tokenizer('a').input_ids})")
    if (g_tok.chat_template or None) != (tokenizer.chat_template or None):
        raise GGUFError(f"{path.name}: its chat template differs from the model's")

    with torch.no_grad():
        ref = reference(input_ids=ids).logits.float()
    expected = expected_logits(reference, qtype, ids)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    file_diff = (out - expected).abs().max().item()
    file_tol = 1e-3 * max(1.0, expected.abs().max().item())
    if not file_diff <= file_tol:  # also catches NaN
        raise GGUFError(f"{path.name}: its logits differ from the merged model's (with {qtype} rounding) by "
                        f"{file_diff:.3g} > {file_tol:.3g}: the file does not hold this model")
    tokens = greedy(model, g_tok, ids, len(ref_tokens))
    return {"type": qtype, "path": str(path), "bytes": path.stat().st_size, "file_diff": file_diff,
            "max_logit_diff": (out - ref).abs().max().item(),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "tokens_match": tokens == ref_tokens, "answer": g_tok.decode(tokens, skip_special_tokens=True)}
