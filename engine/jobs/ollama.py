"""An Ollama Modelfile next to each GGUF: FROM, the chat template in Ollama's syntax, stop tokens, parameters.

The model's Jinja chat template cannot be translated in general, so the Modelfile takes the known Ollama
template (``ollama_templates.yaml``) that renders the same text as the Jinja template for sample conversations
(checked with ``engine.jobs.gotemplate``, the way Ollama fills its variables: a default system prompt is the
Modelfile's SYSTEM and becomes the first message when a chat has none). When none matches, the Modelfile has no
TEMPLATE and Ollama derives one from the GGUF's ``tokenizer.chat_template`` itself; the result says so.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from engine.jobs.gotemplate import TemplateError, render

_SAMPLE_TEXT = "In 2024, 12345 users wrote 你好，世界! 🙂 and:\n\tdef f(x):  return x**2"
SAMPLE_CONVERSATIONS = [
    [{"role": "user", "content": _SAMPLE_TEXT}],
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Orion."},
     {"role": "user", "content": _SAMPLE_TEXT}],
    [{"role": "system", "content": "You are Orion."}, {"role": "user", "content": _SAMPLE_TEXT}],
    [{"role": "system", "content": "You are Orion."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! 42"}, {"role": "user", "content": _SAMPLE_TEXT}],
]
_MARK = "\x00SYSTEM\x00"


@lru_cache(maxsize=1)
def ollama_templates() -> dict[str, dict]:
    import yaml

    return yaml.safe_load((Path(__file__).with_name("ollama_templates.yaml")).read_text(encoding="utf-8"))


def render_ollama(template: str, messages: list[dict], system: str = "") -> str:
    """The prompt Ollama renders for ``messages`` (chat API) with a Modelfile SYSTEM of ``system``."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    return render(template, {"Messages": msgs, "System": sys_text, "Tools": None, "Response": "", "Prompt": ""})


def _hf_text(tokenizer, messages: list[dict], strip_bos: bool) -> str | None:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # a template that refuses this conversation (e.g. no system role): not a sample for it
        return None
    bos = tokenizer.bos_token
    if strip_bos and bos and text.startswith(bos):  # llama.cpp adds the BOS token itself when tokenizing
        text = text[len(bos):]
    return text


def match_template(tokenizer, strip_bos: bool) -> tuple[str, str, dict] | None:
    """(name, default system prompt, template entry) of the Ollama template that renders like the tokenizer's
    Jinja chat template for every sample conversation it accepts; None when none does."""
    if not tokenizer.chat_template:
        return None
    wanted = [(conv, _hf_text(tokenizer, conv, strip_bos)) for conv in SAMPLE_CONVERSATIONS]
    wanted = [(c, t) for c, t in wanted if t is not None]
    if not wanted:
        return None
    first_conv, first_text = wanted[0]
    for name, entry in ollama_templates().items():
        template = entry["template"]
        try:
            systems = [""]
            marked = render_ollama(template, first_conv, _MARK)
            if _MARK in marked:  # a default system prompt the Jinja template adds when a chat has none
                pre, post = marked.split(_MARK, 1)
                if first_text.startswith(pre) and first_text.endswith(post) and len(first_text) > len(pre) + len(post):
                    systems.append(first_text[len(pre):len(first_text) - len(post)])
            for system in systems:
                if all(render_ollama(template, conv, system) == text for conv, text in wanted):
                    return name, system, entry
        except TemplateError:
            raise
        except Exception:  # noqa: BLE001 - a template that does not fit these messages simply does not match
            continue
    return None


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError('a Modelfile block cannot hold """')
    return f'"""{text}"""'


def ollama_name(name: str, qtype: str) -> str:
    """A model name Ollama accepts: lower-case letters, digits, '-', '_', '.', with the type as tag."""
    base = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"
    return f"{base}:{qtype}"


def _stops(model_dir: Path, tokenizer, entry: dict | None) -> list[str]:
    ids = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    stops = [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]
    vocab = tokenizer.get_vocab()
    stops += [s for s in (entry or {}).get("stop", []) if s in vocab]
    return list(dict.fromkeys(s for s in stops if s))


def _parameters(model_dir: Path) -> list[tuple[str, object]]:
    params: list[tuple[str, object]] = []
    gen = model_dir / "generation_config.json"
    g = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else {}
    if g.get("do_sample"):
        for hf, ollama in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if g.get(hf) is not None:
                params.append((ollama, g[hf]))
    if g.get("repetition_penalty") not in (None, 1.0):
        params.append(("repeat_penalty", g["repetition_penalty"]))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    ctx = config.get("max_position_embeddings") or config.get("max_sequence_length")
    if ctx:
        params.append(("num_ctx", min(int(ctx), 8192)))  # the model's context, capped so a laptop can hold its cache
    return params


def write_modelfile(gguf_path: Path, model_dir: Path, tokenizer, add_bos: bool) -> dict:
    """Write ``<gguf>.Modelfile`` beside ``gguf_path``; returns its path, the ``ollama create`` command and the
    template it carries (name or None)."""
    qtype = gguf_path.stem.rsplit("-", 1)[-1]
    match = match_template(tokenizer, strip_bos=add_bos)
    path = gguf_path.with_suffix(".Modelfile")
    name = ollama_name(model_dir.name, qtype)
    command = f"ollama create {name} -f {path}"
    lines = [f"# Ollama Modelfile written by Workbench for {gguf_path.name}. Create the model with:",
             f"#   {command}", f"FROM ./{gguf_path.name}"]
    if match:
        tname, system, entry = match
        lines.append(f"# chat template: Ollama's {tname} format, checked against the model's Jinja chat template")
        lines.append(f"TEMPLATE {_quote(entry['template'])}")
        if system:
            lines.append(f"SYSTEM {_quote(system)}")
    else:
        lines.append("# No TEMPLATE: none of the known Ollama formats renders this model's chat template the same; "
                     "Ollama derives one from the GGUF's tokenizer.chat_template")
    stops = _stops(model_dir, tokenizer, match[2] if match else None)
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in _parameters(model_dir)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"path": str(path), "command": command, "template": match[0] if match else None,
            "system": match[1] if match else "", "stop": stops}


def read_modelfile(path: Path) -> dict:
    """The directives of a Modelfile this module wrote: FROM, TEMPLATE, SYSTEM, PARAMETER (a list each)."""
    text = Path(path).read_text(encoding="utf-8")
    out: dict[str, list] = {}
    for m in re.finditer(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER) (?:"""(.*?)"""|([^\n]*))$', text, re.M | re.S):
        out.setdefault(m.group(1), []).append(m.group(2) if m.group(2) is not None else m.group(3))
    return out
