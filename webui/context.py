"""What every tab shares: the run manager, the form's widgets, and the language switch."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.run.config import ConfigError, RunConfig
from engine.run.paths import PathPolicy

from . import form
from .i18n import DEFAULT, t
from .runs import RunManager


@dataclass
class Context:
    manager: RunManager
    defaults: RunConfig
    lang: str = DEFAULT  # the language the page is built in
    fields: dict[str, Any] = field(default_factory=dict)  # run-config key -> widget
    texts: list[tuple[Any, dict[str, Callable[[str], Any]]]] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # components one tab hands to another
    on_load: list[tuple] = field(default_factory=list)  # (fn, inputs, outputs[, triggers]) run when a page opens
    on_lang: list[tuple] = field(default_factory=list)  # (fn, inputs, outputs) run after a language switch
    policy: PathPolicy | None = None  # the folders every path of the page must lie in (default: project + workspace)

    def __post_init__(self):
        if self.policy is None:
            self.policy = PathPolicy.for_workspace(self.workspace)
        self.values = form.to_values(self.defaults, self.manager.devices)
        self.layout = form.LAYOUT["tabs"]

    @property
    def workspace(self) -> Path:
        return self.manager.workspace

    def t(self, key: str, **kw) -> str:
        return t(self.lang, key, **kw)

    def translate(self, component, **attrs: Callable[[str], Any] | str):
        """Register a component's translatable attributes: a locale key, or a function of the language."""
        fns = {name: (lambda lang, k=v: t(lang, k)) if isinstance(v, str) else v for name, v in attrs.items()}
        self.texts.append((component, fns))
        return component

    def language_updates(self, lang: str) -> list:
        import gradio as gr

        return [gr.update(**{name: fn(lang) for name, fn in fns.items()}) for _, fns in self.texts]

    def field_list(self) -> list[str]:
        return [k for k in form.form_keys() if k in self.fields]

    def config_from(self, data: dict) -> RunConfig:
        """The RunConfig of a handler's input dict (components -> values); raises ConfigError."""
        values = {k: data[self.fields[k]] for k in self.field_list() if self.fields[k] in data}
        return self.confine(form.from_values(values, self.manager.devices, self.defaults))

    def confine(self, cfg):
        """``cfg`` (a RunConfig, EvalConfig or ExportConfig) when every path field it marks is inside the policy's
        folders; else ConfigError naming each refused field."""
        problems = self.policy.problems(cfg)
        if problems:
            raise ConfigError(problems, "form")
        return cfg
