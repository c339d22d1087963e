"""Translations: every label and message of the page, in English and Simplified Chinese.

The tables are data files (``locales/en.yaml``, ``locales/zh.yaml``). English field help is
the run config's own description (declared once, in engine/run/config.py); other languages
translate it in ``fields.<section.name>.info``; the job forms' help (Evaluate, Export) likewise comes from
their schemas and is translated in ``<tab>.help.<name>``. Imports no gradio.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.run.config import RunConfig, read_project_yaml
from engine.run.stages import STAGE_NAMES

LOCALES = Path(__file__).with_name("locales")
LANGUAGES = {"en": "English", "zh": "简体中文"}
DEFAULT = "en"


@lru_cache(maxsize=None)
def table(lang: str) -> dict[str, Any]:
    return read_project_yaml(LOCALES / f"{lang}.yaml") or {}


def _lookup(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flat_keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flat_keys(v, key + ".")
        else:
            out.add(key)
    return out


def t(lang: str, key: str, **kw: Any) -> str:
    """The text of ``key`` in ``lang`` (English when missing there), formatted with ``kw``."""
    text = _lookup(table(lang if lang in LANGUAGES else DEFAULT), key)
    if not isinstance(text, str):
        text = _lookup(table(DEFAULT), key)
    if not isinstance(text, str):
        return key
    try:
        return text.format(**kw) if kw else text
    except (KeyError, IndexError, ValueError):
        return text


def description(key: str) -> str:
    section, name = key.split(".", 1)
    return RunConfig.model_fields[section].annotation.model_fields[name].description or ""


def field_label(lang: str, key: str) -> str:
    fields = table(lang if lang in LANGUAGES else DEFAULT).get("fields", {})
    label = (fields.get(key) or {}).get("label") or (table(DEFAULT).get("fields", {}).get(key) or {}).get("label")
    return label or key.split(".", 1)[1].replace("_", " ").capitalize()


def field_info(lang: str, key: str) -> str:
    if key == "method.stage":  # every row of the stage table, each named in the page's language
        lang = lang if lang in LANGUAGES else DEFAULT
        text = table(lang)["fields"][key]["info"]
        return text.format(stages=t(lang, "stages.sep").join(t(lang, "stages.item", name=s, text=t(lang, f"stages.{s}"))
                                                   for s in STAGE_NAMES))
    if lang != DEFAULT:
        info = (table(lang).get("fields", {}).get(key) or {}).get("info")
        if info:
            return info
    return description(key)


def job_help(lang: str, label: str, description: str) -> str:
    """The help line of a job form's field (Evaluate, Export) whose label is the locale key ``label``
    (``<section>.<name>``): English is the job schema's description; other languages translate it in
    ``<section>.help.<name>``."""
    if lang != DEFAULT and lang in LANGUAGES:
        section, name = label.split(".", 1)
        text = _lookup(table(lang), f"{section}.help.{name}")
        if isinstance(text, str) and text:
            return text
    return description


def choice_label(lang: str, key: str, value: Any) -> str:
    labels = (table(lang if lang in LANGUAGES else DEFAULT).get("choices", {}).get(key) or {})
    fallback = (table(DEFAULT).get("choices", {}).get(key) or {})
    for table_ in (labels, fallback):
        for k in (value, str(value)):
            if table_.get(k):
                return str(table_[k])
    return str(value)
