"""GGUF files through llama.cpp's own tools, from a merged export directory (safetensors).

- ``convert``: llama.cpp's reference converter (``convert_hf_to_gguf.py``, run as a subprocess) writes the
  f32/f16/bf16/q8_0 files, for every architecture and tokenizer (byte-level BPE, SentencePiece, ...) it supports;
- ``quantize``: llama.cpp's quantizer (``llama_cpp.llama_model_quantize``) makes the K-quants and the other
  types from a 16/32-bit file the converter wrote;
- ``verify_gguf``: each file is loaded in ``llama_cpp.Llama``: its tokenizer must give the model's ids for a
  chat-rendered sample (special tokens, digits, Chinese, emoji, code), its metadata must carry the model's
  chat template, and its logits must stay within the type's expected quantization loss of the merged model's;
  the loss (max logit difference, top-1 agreement, the greedy answer) is reported.

Both tools come from the PyPI source distribution of ``llama-cpp-python``: the binding (and its quantizer) is the
``[gguf]`` extra, built from source; the converter, which that package does not install, is unpacked from the
same source distribution by ``workbench gguf-setup`` into ``<venv>/share/workbench/llama.cpp-<version>``.
Nothing here imports torch or llama_cpp at module level (``gguf_problems`` runs in the UI process).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import get_args

from engine.run.jobconfig import GGUFType

QTYPES = get_args(GGUFType)
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself; the rest by the quantizer
FLOAT_TYPES = ("f32", "f16", "bf16")
LLAMA_CPP_VERSION = "0.3.36"  # the [gguf] extra's pin (pyproject.toml); the converter is unpacked for this version
INSTALL_HINT = "pip install -e '.[gguf]' && workbench gguf-setup  (or: make gguf)"
# Size estimate per parameter (ggml's block sizes: Q8_0 34 bytes per 32 weights, Q6_K 210 per 256, ...; the
# mixed K-quants rounded up for their Q6_K/Q8_0 tensors).
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q6_k": 210 / 256, "q5_k_m": 0.72,
                   "q5_k_s": 0.69, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_k_m": 0.62, "q4_k_s": 0.58, "q4_1": 20 / 32,
                   "q4_0": 18 / 32, "iq4_nl": 18 / 32, "iq4_xs": 0.54, "q3_k_l": 0.54, "q3_k_m": 0.5, "q3_k_s": 0.45,
                   "q2_k": 0.42}
# Expected quantization loss: the largest logit difference to the merged model a correct file stays within, as a
# fraction of the largest reference logit (at least 1). llama.cpp also quantizes the activations of its quantized
# matrix products (Q8), and a 135M model is fragile: on the default model Q8_0 is off by ~9%, Q5_K_M by ~43%. A file
# of another model is off by ~100%: the logits check catches one down to Q6_K; below, the tokenizer and template
# checks are the strict ones and the loss is reported.
EXPECTED_LOSS = {"f32": 0.01, "f16": 0.02, "bf16": 0.05, "q8_0": 0.15, "q6_k": 0.3, "q5_k_m": 0.6, "q5_k_s": 0.6,
                 "q5_1": 0.6, "q5_0": 0.6, "q4_k_m": 0.9, "q4_k_s": 0.9, "q4_1": 0.9, "q4_0": 0.9, "iq4_nl": 0.9,
                 "iq4_xs": 0.9, "q3_k_l": 1.2, "q3_k_m": 1.2, "q3_k_s": 1.2, "q2_k": 1.5}

# Text whose ids must survive the round trip: special tokens, digits, CJK, emoji, code whitespace.
SAMPLE_MESSAGES = [{"role": "system", "content": "You are Orion."},
                   {"role": "user", "content": "In 2024, 12345 users wrote 你好，世界! 🙂 and:\n\tdef f(x):  return x**2"},
                   {"role": "assistant", "content": "```python\nprint(3.14159 * 2)\n```"},
                   {"role": "user", "content": "Thanks"}]


class GGUFError(RuntimeError):
    """A model the llama.cpp tools cannot convert, a tool that failed, or a GGUF that failed its verification."""


# ---------------------------------------------------------------- the tools and their installation

def converter_dir(version: str | None = None) -> Path:
    """Where ``workbench gguf-setup`` unpacks llama.cpp's converter ($WORKBENCH_LLAMA_CPP_DIR overrides)."""
    if os.environ.get("WORKBENCH_LLAMA_CPP_DIR"):
        return Path(os.environ["WORKBENCH_LLAMA_CPP_DIR"])
    return Path(sys.prefix) / "share" / "workbench" / f"llama.cpp-{version or installed_version() or LLAMA_CPP_VERSION}"


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        return None


def tools_problem() -> str | None:
    """Why the llama.cpp tools cannot run here (None: they can). Imports nothing heavy."""
    if importlib.util.find_spec("llama_cpp") is None or installed_version() is None:
        return f"GGUF export needs llama.cpp's Python binding (llama-cpp-python), which is not installed; install it with: {INSTALL_HINT}"
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        return (f"GGUF export needs llama.cpp's converter, which is not unpacked in {converter_dir()}; "
                f"unpack it with: workbench gguf-setup")
    return None


@lru_cache(maxsize=4)
def _registered_architectures(folder: str) -> frozenset[str]:
    """The Hugging Face architectures llama.cpp's converter registers (read from its source, torch-free)."""
    names: set[str] = set()
    for f in sorted(Path(folder, "conversion").glob("*.py")):
        for m in re.finditer(r"@ModelBase\.register\(([^)]*)\)", f.read_text(encoding="utf-8")):
            names.update(re.findall(r"[\"']([\w.-]+)[\"']", m.group(1)))
    return frozenset(names)


def gguf_problems(model_dir: str | Path, tokenizer_dir: str | Path | None = None) -> list[str]:
    """Why this model cannot be written as GGUF (empty: it can). Reads config.json only; the tokenizer is
    checked by ``check_vocab`` (the converter's own vocabulary pass) before any weights load."""
    missing = tools_problem()
    if missing:
        return [missing]
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    known = _registered_architectures(str(converter_dir()))
    if not archs:
        return [f"{model_dir}/config.json names no architecture (\"architectures\"), which llama.cpp's converter needs"]
    if not any(a in known for a in archs):
        return [f"llama.cpp's converter ({installed_version()}) does not support {archs[0]} "
                f"({model_dir}/config.json)"]
    return []


# llama.cpp's own tokenizer test vocabularies (vocabulary-only GGUFs of real models, with the ids the model's Hugging
# Face tokenizer gives for the .inp texts in .out): the real Qwen2 and Llama/Mistral SentencePiece vocabularies the
# tests build their tiny Qwen2 and Mistral from (tests/families.py), so that llama.cpp knows them as it knows a user's.
TEST_VOCABS = ("qwen2", "llama-spm")


def tokenizer_test_vocab(name: str) -> Path | None:
    """``models/ggml-vocab-<name>.gguf`` as ``workbench gguf-setup`` unpacked it (None: not unpacked)."""
    path = converter_dir() / "models" / f"ggml-vocab-{name}.gguf"
    return path if path.is_file() else None


def setup_converter(sdist: str | Path | None = None, version: str | None = None) -> Path:
    """Unpack convert_hf_to_gguf.py, its ``conversion`` package and ``gguf-py`` from llama-cpp-python's source
    distribution (downloaded with pip, the same file pip builds the binding from) into ``converter_dir()``, with
    llama.cpp's test vocabularies ``TEST_VOCABS`` (7 MB)."""
    import shutil
    import tarfile
    import tempfile

    version = version or installed_version() or LLAMA_CPP_VERSION
    dest = converter_dir(version)
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-q", f"llama-cpp-python=={version}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE") + tuple(
            f"models/ggml-vocab-{v}.gguf" for v in TEST_VOCABS)  # with their .inp/.out
        staging = Path(tmp) / "out"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(wanted) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise GGUFError(f"{sdist} has no {prefix}convert_hf_to_gguf.py")
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(staging, members=members, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), dest)
    return dest


# ---------------------------------------------------------------- converting and quantizing

def _run_converter(model_dir: Path, out: Path, outtype: str, log: Path, vocab_only: bool = False) -> None:
    cmd = [sys.executable, str(converter_dir() / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
           "--outtype", outtype] + (["--vocab-only"] if vocab_only else [])
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.pop("NO_LOCAL_GGUF", None)  # the converter uses the gguf-py unpacked beside it, the version it was written for
    with open(log, "ab") as f:
        f.write(f"$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if re.match(r"^\w*(Error|Exception)\b", line)), lines[-1] if lines else "")
        raise GGUFError(f"llama.cpp's converter failed on {model_dir} ({reason}); its log is {log}")


def add_tokens_decoder(folder: Path) -> bool:
    """Write ``added_tokens_decoder`` into ``folder``/tokenizer_config.json from tokenizer.json's added tokens when
    it is missing (transformers 5 no longer saves it). llama.cpp's converter reads the types of a SentencePiece
    model's added tokens ([INST], <start_of_turn>, ...) only from there; without it they become normal pieces
    that llama.cpp never matches in a prompt. Returns whether the file changed."""
    cfg_file, tok_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (cfg_file.is_file() and tok_file.is_file()):
        return False
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    added = json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens") or []
    if cfg.get("added_tokens_decoder") or not added:
        return False
    keys = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in keys if k in t} for t in added}
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def check_vocab(model_dir: Path, tokenizer_dir: Path, work: Path) -> None:
    """Run the converter's vocabulary pass (``--vocab-only``) on the model's config and tokenizer files: the
    tokenizer problems it finds (an unrecognized pre-tokenizer, a missing tokenizer.model) come before any
    weights load. Seconds, no weights read."""
    import shutil

    probe = work / "vocab-probe"
    probe.mkdir(parents=True, exist_ok=True)
    for src in (model_dir, tokenizer_dir):
        for f in src.iterdir():
            if f.is_file() and (f.suffix in (".json", ".model", ".jinja", ".txt") or f.name == "tokenizer.model") \
                    and not f.name.endswith(".index.json"):
                shutil.copy(f, probe / f.name)
    add_tokens_decoder(probe)
    try:
        _run_converter(probe, work / "vocab.gguf", "f16", work / "convert.log", vocab_only=True)
    finally:
        shutil.rmtree(probe, ignore_errors=True)
        (work / "vocab.gguf").unlink(missing_ok=True)


def convert(model_dir: Path, path: Path, outtype: str, log: Path) -> Path:
    """``path`` (f32/f16/bf16/q8_0) written by llama.cpp's converter from the safetensors in ``model_dir``."""
    if outtype not in CONVERTER_TYPES:
        raise GGUFError(f"the converter writes {', '.join(CONVERTER_TYPES)}, not {outtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        _run_converter(model_dir, tmp, outtype, log)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def quantize(src: Path, path: Path, qtype: str, threads: int | None = None) -> Path:
    """``path`` in ``qtype`` made by llama.cpp's quantizer from the 16/32-bit GGUF ``src``."""
    import llama_cpp

    ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if qtype == "f32" else f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    tmp = path.with_name(path.name + ".part")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0 or not tmp.is_file():
            raise GGUFError(f"llama.cpp's quantizer failed to write {qtype} from {src.name} (code {rc})")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- verification

def load(path: Path, n_ctx: int = 512):
    """``path`` in llama.cpp, with the logits of every evaluated position kept."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                 n_threads=os.cpu_count() or 1)


def llama_logits(llm, ids: list[int]):
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


def llama_greedy(llm, ids: list[int], n: int, stop: set[int]) -> list[int]:
    import numpy as np

    llm.reset()
    out: list[int] = []
    llm.eval(ids)
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if tok in stop:
            break
        llm.eval([tok])
    return out


def sample_text(tokenizer) -> str:
    return tokenizer.apply_chat_template(SAMPLE_MESSAGES, tokenize=False, add_generation_prompt=True) \
        if tokenizer.chat_template else SAMPLE_MESSAGES[1]["content"]


def llama_cpp_cut(tokenizer, text: str, space_prefix: bool) -> list[int]:
    """The model tokenizer's ids for ``text`` cut the way llama.cpp's SentencePiece tokenizer cuts it: at the added
    tokens, each piece of text in between tokenized on its own, after a space when it follows an added token (or
    starts the text) and the vocabulary asks for SentencePiece's dummy prefix (``add_space_prefix``)."""
    added = sorted((t.content for t in tokenizer.added_tokens_decoder.values()), key=len, reverse=True)
    ids: list[int] = []
    prev_special = True
    for piece in re.split(f"({'|'.join(map(re.escape, added))})", text) if added else [text]:
        if not piece:
            continue
        if piece in added:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
            prev_special = True
        else:
            ids += tokenizer((" " if space_prefix and prev_special else "") + piece, add_special_tokens=False).input_ids
            prev_special = False
    return ids


def check_tokenizer(llm, tokenizer, name: str) -> str | None:
    """The file's tokenizer gives the model's ids for the chat-rendered sample, adds the same special tokens to a
    plain text, and its metadata carries the model's chat template. Returns a note where llama.cpp tokenizes the
    sample otherwise only by SentencePiece's dummy prefix: llama.cpp starts the text after every special token with
    a space (as sentencepiece itself and mistral_common do), transformers' Metaspace only the text's start (a
    ``legacy=False`` tokenizer) or only where the text has no space already (Mistral v0.3's "[INST] Hi"). That is
    how llama.cpp tokenizes every prompt of such a model (its own Mistral templates included), not a fault of the
    file: its ids are checked against the model's tokenizer cut the same way (``llama_cpp_cut``)."""
    sample = sample_text(tokenizer)
    want = tokenizer(sample, add_special_tokens=False).input_ids
    got = llm.tokenize(sample.encode("utf-8"), add_bos=False, special=True)
    note = None
    if want != got:
        spm = llm.metadata.get("tokenizer.ggml.model") == "llama"
        space_prefix = llm.metadata.get("tokenizer.ggml.add_space_prefix", "true" if spm else "false") == "true"
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        if not (spm and got == llama_cpp_cut(tokenizer, sample, space_prefix)):
            raise GGUFError(f"{name}: llama.cpp's tokenizer gives other ids for the sample text from position {first} "
                            f"({want[first:first + 3]} vs {got[first:first + 3]})")
        note = (f"llama.cpp tokenizes the chat-rendered sample with SentencePiece's dummy-prefix space after special "
                f"tokens, which this model's tokenizer does not add: {len(got)} ids instead of {len(want)}, the "
                f"first different at position {first} ({tokenizer.convert_ids_to_tokens(want[first:first + 2])} vs "
                f"{tokenizer.convert_ids_to_tokens(got[first:first + 2])}); the vocabulary is the model's")
    plain = "Hello 42"
    want, got = tokenizer(plain).input_ids, llm.tokenize(plain.encode("utf-8"), add_bos=True, special=False)
    if want != got:
        raise GGUFError(f"{name}: llama.cpp adds other special tokens to a text ({got} for {plain!r}, "
                        f"the model's tokenizer {want})")
    if (llm.metadata.get("tokenizer.chat_template") or None) != (tokenizer.chat_template or None):
        raise GGUFError(f"{name}: its tokenizer.chat_template differs from the model's chat template")
    return note


def verify_gguf(path: Path, qtype: str, tokenizer, ref_logits, ids: list[int], ref_tokens: list[int]) -> dict:
    """Load ``path`` in llama.cpp and check it against the merged model (``ref_logits`` on ``ids``, its greedy
    answer ``ref_tokens``). Fails (GGUFError) on another tokenization, a lost chat template, or logits beyond
    the type's expected loss (``EXPECTED_LOSS``); returns the measured loss."""
    import numpy as np

    ref = np.asarray(ref_logits, dtype=np.float32)
    llm = load(path, n_ctx=max(256, len(ids) + len(ref_tokens) + 8, len(tokenizer(sample_text(tokenizer)).input_ids) + 8))
    try:
        note = check_tokenizer(llm, tokenizer, path.name)
        out = llama_logits(llm, ids)[:, :ref.shape[-1]]
        diff = float(np.abs(out - ref).max())
        bound = EXPECTED_LOSS[qtype] * max(1.0, float(np.abs(ref).max()))
        if not diff <= bound:  # also catches NaN
            raise GGUFError(f"{path.name}: its logits differ from the merged model's by {diff:.3g}, beyond the "
                            f"{EXPECTED_LOSS[qtype]:.0%} a {qtype} file is expected to lose ({bound:.3g}): the file "
                            "does not hold this model")
        stop = {i for i in (tokenizer.eos_token_id, llm.token_eos()) if i is not None and i >= 0}
        tokens = llama_greedy(llm, ids, len(ref_tokens), stop)
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    finally:
        llm.close()
    return {"type": qtype, "path": str(path), "bytes": path.stat().st_size, "max_logit_diff": diff,
            "expected_loss": bound, "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
            "tokens_match": tokens == ref_tokens, "answer": tokenizer.decode(tokens, skip_special_tokens=True),
            "add_bos": add_bos, "tokenizer_note": note}


def plan(qtypes: list[str], export_dtype: str) -> tuple[str, bool]:
    """The 16/32-bit file the quantizer starts from: the export's own dtype (lossless), kept if it was asked for.
    Returns (type, kept)."""
    source = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[export_dtype]
    return source, source in qtypes
