"""Every form of the page from its schema: the run config's (RunConfig), and through ``build_schema_fields``
the Evaluate and Export tabs' (EvalConfig, ExportConfig) and the chat settings' (SamplingParams). Widgets are
derived from the fields, and values are turned back into the config.

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
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Callable

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from engine.run import stages as stage_table
from engine.run.config import ConfigError, Node, RunConfig, parse_config, read_project_yaml

from .runs import CPU, Device

LAYOUT = read_project_yaml(Path(__file__).with_name("layout.yaml"))
LAYOUT["tabs"]["hparams"]["groups"]["stage"] = stage_table.stage_fields()  # the stage table's fields, in its order
DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
SLIDER_MAX_RANGE = 1024


@dataclass(frozen=True)
class FieldSpec:
    key: str
    kind: str  # checkbox | checkboxes | radio | dropdown | multiselect | slider | number | numbers | text | devices
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


def schema_field(schema: type[BaseModel], key: str):
    """The pydantic FieldInfo of ``section.name`` in a two-level config schema (run, eval, export)."""
    section, name = key.split(".", 1) if "." in key else (None, key)
    fields = schema.model_fields[section].annotation.model_fields if section else schema.model_fields
    return fields[name]


def _field(key: str):
    return schema_field(RunConfig, key)


stages_of = stage_table.stages_of  # the stages that read a field, or None when every stage does


def visible_for(key: str, stage: str) -> bool:
    stages = stages_of(key)
    return stages is None or stage in stages


@lru_cache(maxsize=None)
def spec(key: str) -> FieldSpec:
    return derive(RunConfig, key, LAYOUT["widgets"].get(key, {}))


def derive(schema: type[BaseModel], key: str, over: dict | None = None) -> FieldSpec:
    """The widget of a schema field from its type, bounds and default; ``over`` names a widget the type does not
    say (``widget``, ``step``, ``custom``, and slider ends narrower than the schema's: ``minimum``, ``maximum``).
    ``key`` is ``section.name``, or a plain name in a flat schema (SamplingParams)."""
    over = over or {}
    info = schema_field(schema, key)
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
    if typing.get_origin(ann) is typing.Literal:
        choices = typing.get_args(ann)
        kind = "radio" if len(choices) <= 4 else "dropdown"
        return FieldSpec(key, over.get("widget", kind), default, choices)
    if ann is bool:
        return FieldSpec(key, "checkbox", default)
    if ann in (int, float):
        integer = ann is int
        step = over.get("step") or (1 if integer else 0.01)
        if lo_open and not integer and over.get("widget") != "slider":
            lo = None  # an exclusive bound is left to the config's own check (the message names the field)
        if hi_open:
            hi = hi - step
        lo, hi = over.get("minimum", lo), over.get("maximum", hi)
        bounded = lo is not None and hi is not None and (hi - lo) <= SLIDER_MAX_RANGE
        kind = over.get("widget") or ("slider" if bounded and not optional else "number")
        return FieldSpec(key, kind, default, (), lo, hi, step, integer, optional)
    if typing.get_origin(ann) is list:
        item = typing.get_args(ann)[0] if typing.get_args(ann) else str
        if typing.get_origin(item) is typing.Literal:  # a few fixed values: one checkbox each
            return FieldSpec(key, "checkboxes", default, typing.get_args(item))
        if over.get("widget") == "numbers":  # typed as "0.7, 0.3"
            return FieldSpec(key, "numbers", default)
        return FieldSpec(key, over.get("widget", "multiselect"), default, (), custom=over.get("custom", True))
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


NODE_COLUMNS = (*Node.model_fields, "use")  # the node table: the Node schema's fields, then the slots to use


def node_rows(nodes: list[dict], include: str, hostfile: str | None = None) -> list[list]:
    """The node table of a config: one row per node (host, slots, use); ``use`` is that node's part of
    ``distributed.include`` (``0,1``; empty: every slot, as a bare host in include; ``-``: not used). With a
    hostfile the rows come from the file (the page fills them in after checking its path); here, with no file
    read, only the hosts include names are known."""
    picks: dict[str, str] = {}
    for spec in [x for x in include.replace(" ", "").split("@") if x]:
        host, _, slots = spec.partition(":")
        picks[host] = slots
    if nodes:
        return [[n["host"], n["slots"], picks.get(n["host"], "-") if picks else ""] for n in nodes]
    return [[h, None, use] for h, use in picks.items()] if hostfile else []


def nodes_config(rows, hostfile: str | None = None) -> tuple[list[dict], str]:
    """(distributed.nodes, distributed.include) of the node table. With a hostfile the rows are the file's nodes,
    so only their ``use`` counts. A slot count that is no whole number is one problem naming the row."""
    try:
        rows = [list(r)[:3] + [None] * (3 - len(r)) for r in _table_rows(rows)]
    except TypeError:
        raise ConfigError([("distributed.nodes", "expected a table of rows (host, slots, use)")]) from None
    rows = [r for r in rows if str(r[0] if r[0] is not None else "").strip()]
    nodes, problems = [], []
    for i, (host, slots, _) in enumerate(rows):
        try:
            count = int(float(str(slots).strip())) if str(slots if slots is not None else "").strip() else 1
        except (ValueError, OverflowError):
            problems.append(("distributed.nodes", f"row {i + 1} ({str(host).strip()[:40]}): slots '{str(slots)[:40]}' is not a whole number"))
            continue
        nodes.append({"host": str(host).strip(), "slots": count})
    if problems:
        raise ConfigError(problems)
    uses = [("" if u is None else str(u).strip()) for _, _, u in rows]
    include = "" if all(u == "" for u in uses) else "@".join(
        h if u == "" else f"{h}:{u}" for (h, _, _), u in zip(rows, uses) if u != "-")
    return ([] if hostfile else nodes), include.replace(" ", "")


def _table_rows(value) -> list[list]:
    """Rows of a Dataframe value: a list of lists, gradio's {"headers", "data"} or a pandas frame."""
    if value is None:
        return []
    if hasattr(value, "values") and hasattr(value, "columns"):  # pandas
        return value.values.tolist()
    if isinstance(value, dict):
        return list(value.get("data") or [])
    if isinstance(value, str):  # hostfile lines typed as text (the API, older saved pages)
        from engine.run.nodes import NodeError, parse_hostfile

        try:
            return [[h, n, ""] for h, n in parse_hostfile(value, "distributed.nodes").items()] if value.strip() else []
        except NodeError as err:
            raise ConfigError([("distributed.nodes", str(err))]) from None
    return [list(r) for r in value]


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
        elif s.kind == "nodes":  # the node table: host, slots and the slots to use (distributed.include)
            value = node_rows(value, data[section]["include"], data[section]["hostfile"])
        elif s.kind == "text" and value is None:
            value = ""
        elif s.kind in ("multiselect", "checkboxes"):
            value = list(value)
        elif s.kind == "numbers":
            value = ", ".join(f"{v:g}" for v in value)
        out[key] = value
    return out


def coerce(s: FieldSpec, value: Any) -> Any:
    """A widget's value as its schema field takes it (devices aside: see ``devices_config``)."""
    if s.optional and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    if s.optional and s.kind == "number" and value == 0 and (s.minimum or 0) > 0:
        return None  # the browser shows an empty optional number as 0, which is out of range: it means None
    if s.kind in ("text", "dropdown") and isinstance(value, str) and not s.choices:
        return value.strip()
    if s.integer and isinstance(value, float) and value.is_integer():
        return int(value)
    if s.kind == "multiselect":
        return [v.strip() for v in (value or []) if isinstance(v, str) and v.strip()]
    if s.kind == "checkboxes":
        return list(value or [])
    if s.kind == "numbers":  # the config's own check names a part that is no number
        return [v.strip() for v in str(value or "").replace(";", ",").split(",") if v.strip()]
    return value


def from_values(values: dict[str, Any], visible: list[Device], base: RunConfig | None = None) -> RunConfig:
    """The RunConfig of widget values (fields not in the form come from ``base``); ConfigError lists every problem."""
    data = (base or RunConfig()).model_dump(mode="python")
    for key in form_keys():
        if key not in values:
            continue
        section, name = key.split(".", 1)
        s = spec(key)
        if s.kind == "devices":
            data[section][name] = devices_config(values[key], visible)
        elif s.kind == "nodes":
            hostfile = coerce(spec(f"{section}.hostfile"), values.get(f"{section}.hostfile", data[section]["hostfile"]))
            data[section][name], data[section]["include"] = nodes_config(values[key], hostfile)
        else:
            data[section][name] = coerce(s, values[key])
    return parse_config(data, "form")


def config_of(schema: type[BaseModel], specs: dict[str, FieldSpec], values: dict[str, Any], base: dict | None = None):
    """A job config (eval, export) of widget values {key: value}: each coerced by its spec, every problem at once."""
    data = dict(base or {})
    for key, value in values.items():
        section, name = key.split(".", 1)
        data[section] = {**data.get(section, {}), name: coerce(specs[key], value)}
    return parse_config(data, "form", schema=schema)


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
    if s.kind in ("radio", "dropdown", "checkboxes") and s.choices and choices is None:
        choices = [(choice_label(lang, key, c), c) for c in s.choices]
    if s.kind == "nodes":  # a table has no help line of its own: it goes above it
        def table_help(lg):
            return f'<div class="wb-hint">{_esc(info(lg))} {_esc(t(lg, "devices.table_use"))}</div>'

        ctx.translate(gr.HTML(table_help(lang), elem_id=common["elem_id"] + "-help"), value=table_help)
    if s.kind == "devices":
        gpus = [d for d in ctx.manager.devices if d.id != CPU]
        w = gr.CheckboxGroup(choices=[(d.name, d.id) for d in ctx.manager.devices], value=value,
                             interactive=bool(gpus), **common)
    else:
        w = widget(s, value, choices, **common)
    ctx.fields[key] = w
    extra = {}
    if choices_fn is not None:
        extra["choices"] = choices_fn
    elif s.choices and choices is None:
        extra["choices"] = lambda lang, k=key: [(choice_label(lang, k, c), c) for c in spec(k).choices]
    if s.kind != "nodes":
        extra["info"] = info
    ctx.translate(w, label=lambda lang, k=key: field_label(lang, k), **extra)
    return w


def _esc(text: str) -> str:
    import html

    return html.escape(text or "")


def widget(s: FieldSpec, value: Any, choices: list | None = None, **common) -> Any:
    """The gradio component of a field spec (any schema): label, info and elem_id come in ``common``."""
    import gradio as gr

    if s.kind == "checkbox":
        return gr.Checkbox(value=value, **common)
    if s.kind in ("radio", "dropdown") and s.choices:
        opts = list(s.choices) if choices is None else choices
        return (gr.Radio if s.kind == "radio" else gr.Dropdown)(choices=opts, value=value, **common)
    if s.kind in ("dropdown", "multiselect"):
        return gr.Dropdown(choices=choices or [], value=value, multiselect=s.kind == "multiselect",
                           allow_custom_value=s.custom, **common)
    if s.kind == "checkboxes":
        return gr.CheckboxGroup(choices=list(s.choices) if choices is None else choices, value=value, **common)
    if s.kind == "nodes":
        common.pop("info", None)
        return gr.Dataframe(value=value or [], headers=list(NODE_COLUMNS), datatype=["str", "number", "str"],
                            column_count=len(NODE_COLUMNS), row_count=max(1, len(value or [])), type="array",
                            interactive=True, **common)
    if s.kind == "slider":
        return gr.Slider(minimum=s.minimum, maximum=s.maximum, step=s.step, value=value, **common)
    if s.kind == "number":
        # an empty optional number reaches the server as 0, which gradio would refuse below a minimum of 1 with its
        # own error; coerce() reads that 0 as None, and the schema's check names a real out-of-range value
        return gr.Number(value=value, minimum=None if s.optional else s.minimum, maximum=s.maximum, step=s.step,
                         precision=0 if s.integer else None, **common)
    return gr.Textbox(value=value or "", **common)


def build_schema_fields(ctx, schema: type[BaseModel], fields: dict[str, tuple[str, dict]], prefix: str,
                        values: dict[str, Any] | None = None, choices: dict[str, list] | None = None) -> dict[str, FieldSpec]:
    """The widgets of a job form (eval, export, chat settings) from its schema: ``fields`` maps each key to
    (locale key of its label, overrides: a widget the type does not say, ``elem_id``, gradio keyword arguments).
    Each widget goes into ``ctx.shared[prefix + key]``; bounds, defaults and help come from the schema."""
    from .i18n import job_help

    defaults = schema()
    specs = {}
    for key, (label, over) in fields.items():
        over = dict(over)
        kwargs = {k: over.pop(k) for k in list(over) if k not in ("widget", "step", "custom", "minimum", "maximum")}
        s = specs[key] = derive(schema, key, over)
        value = (values or {}).get(key, _value_of(defaults, key))
        help_ = partial(job_help, label=label, description=schema_field(schema, key).description or "")
        w = widget(s, value, (choices or {}).get(key), **{"label": ctx.t(label), "info": help_(ctx.lang), **kwargs})
        ctx.shared[prefix + key] = ctx.translate(w, label=label, info=help_)
    return specs


def _value_of(cfg: BaseModel, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def build_advanced(ctx, group: str) -> None:
    """The group's advanced fields (webui/layout.yaml), in a closed, translated accordion."""
    import gradio as gr

    with gr.Accordion(ctx.t("common.advanced"), open=False) as acc:
        ctx.translate(acc, label="common.advanced")
        for key in ctx.layout[group]["advanced"]:
            build(ctx, key)
