"""Chat-template advice for the Model tab: the suggested template of a model and mismatch warnings.

Needs the model's tokenizer (``apply_chat_template``), the one thing the server process loads
from a model directory, through the loader training uses (``engine.data.encode.load_tokenizer``).
It is loaded on first use, so the server starts without importing transformers or torch, and
cached per directory and modification time.
"""

from __future__ import annotations

import threading
from pathlib import Path

from engine.data.encode import load_tokenizer
from engine.data.templates import suggest_template, template_mismatch
from engine.run.config import ModelConfig

_cache: dict[tuple[str, float], object] = {}
_lock = threading.Lock()


def _stamp(path: Path) -> float:
    files = [path / n for n in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja")]
    return max((f.stat().st_mtime for f in files if f.exists()), default=0.0)


def tokenizer(path: Path, trust_remote_code: bool = False):
    key = (str(path), _stamp(path))
    with _lock:
        if key not in _cache:
            _cache[key] = load_tokenizer(ModelConfig(path=str(path), trust_remote_code=trust_remote_code))
        return _cache[key]


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - advice only; a broken tokenizer shows up when the run starts
        return None


def suggested(path: Path) -> str | None:
    tok = _safe(lambda: tokenizer(path))
    return suggest_template(tok) if tok is not None else None


def advice(path: Path, template: str) -> tuple[str, str] | None:
    """(kind, message) for the chosen template: 'mismatch' or 'no_template', else None."""
    tok = _safe(lambda: tokenizer(path))
    if tok is None:
        return None
    if template == "auto" and not getattr(tok, "chat_template", None):
        return ("no_template", "")
    warning = _safe(lambda: template_mismatch(tok, template))
    return ("mismatch", warning) if warning else None
