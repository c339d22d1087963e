"""The run-config form: widgets derived from RunConfig's fields, and values turned back into a RunConfig.

Each field's widget comes from its pydantic type (bool -> checkbox, Literal -> radio or
dropdown, bounded int/float -> slider, other numbers -> number box, str -> textbox), its
bounds (ge/gt/le/lt), its default and its description. ``layout.yaml`` only places fields
on tabs and names the few widgets that need more than the type says (the model path,
the template and dataset choices, the device checkboxes).

``to_values`` and ``from_values`` are exact inverses for every config (tested), so Save,
Load, Start and the preview all see the config the page shows.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import yaml
from annotated_types import Ge, Gt, Le, Lt

from engine.run import stages as stage_table
from engine.run.config import ConfigError, RunConfig, parse_config

from .runs import CPU, Device

LAYOUT = yaml.safe_load(Path(__file__).with_name("layout.yaml").read_text(encoding="utf-8"))
LAYOUT["tabs"]["hparams"]["groups"]["stage"] = stage_table.stage_fields()  # the stage table's fields, in its order
DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
SLIDER_MAX_RANGE = 1024


@dataclass(frozen=True)
class FieldSpec:
    key: str
    kind: str  # checkbox | radio | dropdown | multiselect | slider | number | text | devices
    default: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    integer: bool = False
    optional: bool = False
    custom: bool = False  # a dropdown that also takes typed values (paths)


def all_keys() -> list[str]:
    return [f"{s}.{n}" for s, sf in RunConfig.model_fields.items() for n in sf.annotation.model_fields]


def form_keys() -> list[str]:
    return [k for k in all_keys() if k not in LAYOUT["not_in_form"]]


def _field(key: str):
    section, name = key.split(".", 1)
    return RunConfig.model_fields[section].annotation.model_fields[name]


stages_of = stage_table.stages_of  # the stages that read a field, or None when every stage does


def visible_for(key: str, stage: str) -> bool:
    stages = stages_of(key)
    return stages is None or stage in stages


@lru_cache(maxsize=None)
def spec(key: str) -> FieldSpec:
    info = _field(key)
    ann, optional = info.annotation, False
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional, ann = True, args[0]
    default = info.get_default(call_default_factory=True)
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, Lt):
            hi, hi_open = m.lt, True
    over = LAYOUT["widgets"].get(key, {})
    if typing.get_origin(ann) is typing.Literal:
        choices = typing.get_args(ann)
        kind = "radio" if len(choices) <= 4 else "dropdown"
        return FieldSpec(key, over.get("widget", kind), default, choices)
    if ann is bool:
        return FieldSpec(key, "checkbox", default)
    if ann in (int, float):
        integer = ann is int
        step = over.get("step") or (1 if integer else 0.01)
        if lo_open and not integer:
            lo = None  # an exclusive bound is left to the config's own check (the message names the field)
        if hi_open:
            hi = hi - step
        bounded = lo is not None and hi is not None and (hi - lo) <= SLIDER_MAX_RANGE
        kind = over.get("widget") or ("slider" if bounded and not optional else "number")
        return FieldSpec(key, kind, default, (), lo, hi, step, integer, optional)
    if typing.get_origin(ann) is list:
        return FieldSpec(key, "multiselect", default, (), custom=True)
    return FieldSpec(key, over.get("widget", "text"), default, (), optional=optional, custom=bool(over.get("custom")))


def load_defaults(path: str | Path = DEFAULTS_FILE) -> RunConfig:
    """The form's starting config: RunConfig's defaults with the UI's CPU-friendly overrides."""
    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    data.pop("data_roots", None)  # not a run-config field: the folders the Data tab may read typed paths from
    return parse_config(data, str(path), text)


# ------------------------------------------------------------------ config <-> widget values

def devices_value(devices: str, visible: list[Device]) -> list[str]:
    gpus = [d.id for d in visible if d.id != CPU]
    if not gpus:
        return [CPU]
    chosen = [d.strip() for d in devices.split(",") if d.strip()]
    return chosen or gpus


def devices_config(value: list[str] | None, visible: list[Device]) -> str:
    gpus = [d.id for d in visible if d.id != CPU]
    chosen = [v for v in (value or []) if v != CPU]
    if not gpus or sorted(chosen) == sorted(gpus):
        return ""  # every visible GPU (or the CPU)
    return ",".join(sorted(chosen, key=lambda v: (len(v), v)))


def to_values(cfg: RunConfig, visible: list[Device]) -> dict[str, Any]:
    """Widget values for every form field of ``cfg``."""
    data = cfg.model_dump(mode="python")
    out = {}
    for key in form_keys():
        section, name = key.split(".", 1)
        value = data[section][name]
        s = spec(key)
        if s.kind == "devices":
            value = devices_value(value, visible)
        elif s.kind == "text" and value is None:
            value = ""
        elif s.kind == "multiselect":
            value = list(value)
        out[key] = value
    return out


def from_values(values: dict[str, Any], visible: list[Device], base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of widget values (fields not in the form come from ``base``); ConfigError lists every problem."""
    data = (base or RunConfig()).model_dump(mode="python")
    for key in form_keys():
        if key not in values:
            continue
        section, name = key.split(".", 1)
        value, s = values[key], spec(key)
        if s.kind == "devices":
            value = devices_config(value, visible)
        elif s.optional and (value is None or (isinstance(value, str) and not value.strip())):
            value = None
        elif s.optional and s.kind == "number" and value == 0 and (s.minimum or 0) > 0:
            value = None  # the browser shows an empty optional number as 0, which is out of range: it means None
        elif s.kind in ("text", "dropdown") and isinstance(value, str) and not s.choices:
            value = value.strip()
        elif s.integer and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif s.kind == "multiselect":
            value = [v.strip() for v in (value or []) if isinstance(v, str) and v.strip()]
        data[section][name] = value
    return parse_config(data, "form")


def problems_by_field(err: ConfigError) -> list[tuple[str, str]]:
    return [(field.replace("form: ", ""), msg) for field, msg in err.problems]


# ------------------------------------------------------------------ widgets (gradio)

def build(ctx, key: str, value: Any = None, choices: list | Callable | None = None, **kwargs) -> Any:
    """The widget of one field, labelled in the page's language, registered for language switches."""
    import gradio as gr

    from .i18n import choice_label, field_info, field_label, t

    s, lang = spec(key), ctx.lang
    info = (lambda lg: f"{field_info(lg, key)} {t(lg, 'form.optional')}") if s.optional and s.kind == "number" else \
        (lambda lg: field_info(lg, key))
    value = ctx.values[key] if value is None else value
    choices_fn = choices if callable(choices) else None
    if choices_fn is not None:
        choices = choices_fn(lang)
    common = dict(label=field_label(lang, key), info=info(lang), elem_id="f-" + key.replace(".", "-"))
    common.update(kwargs)
    if s.kind == "checkbox":
        w = gr.Checkbox(value=value, **common)
    elif s.kind in ("radio", "dropdown") and s.choices:
        opts = [(choice_label(lang, key, c), c) for c in s.choices] if choices is None else choices
        w = (gr.Radio if s.kind == "radio" else gr.Dropdown)(choices=opts, value=value, **common)
    elif s.kind in ("dropdown", "multiselect"):
        w = gr.Dropdown(choices=choices or [], value=value, multiselect=s.kind == "multiselect",
                        allow_custom_value=s.custom, **common)
    elif s.kind == "devices":
        gpus = [d for d in ctx.manager.devices if d.id != CPU]
        opts = [(d.name, d.id) for d in ctx.manager.devices]
        w = gr.CheckboxGroup(choices=opts, value=value, interactive=bool(gpus), **common)
    elif s.kind == "slider":
        w = gr.Slider(minimum=s.minimum, maximum=s.maximum, step=s.step, value=value, **common)
    elif s.kind == "number":
        w = gr.Number(value=value, minimum=s.minimum, maximum=s.maximum, step=s.step,
                      precision=0 if s.integer else None, **common)
    else:
        w = gr.Textbox(value=value or "", **common)
    ctx.fields[key] = w
    extra = {}
    if choices_fn is not None:
        extra["choices"] = choices_fn
    elif s.choices and choices is None:
        extra["choices"] = lambda lang, k=key: [(choice_label(lang, k, c), c) for c in spec(k).choices]
    ctx.translate(w, label=lambda lang, k=key: field_label(lang, k), info=info, **extra)
    return w


def build_advanced(ctx, group: str) -> None:
    """The group's advanced fields (webui/layout.yaml), in a closed, translated accordion."""
    import gradio as gr

    with gr.Accordion(ctx.t("common.advanced"), open=False) as acc:
        ctx.translate(acc, label="common.advanced")
        for key in ctx.layout[group]["advanced"]:
            build(ctx, key)
