"""The data layer: read files, normalize formats, apply chat templates, tokenize with label masks.

The loader (which imports ``datasets``) is imported on first use, so the web UI can read the
registry and the templates without paying for it.
"""

from .encode import IGNORE_INDEX, encode_pretrain, encode_sft, label_spans
from .errors import DataError
from .formats import FORMATS, KIND_OF_FORMAT, KINDS, detect_format, iter_examples, normalize, read_records
from .registry import DatasetSpec, RegistryError, load_registry, resolve_dataset
from .templates import (AutoTemplate, Template, TemplateError, get_template, suggest_template, template_mismatch,
                        template_names)

__all__ = [
    "IGNORE_INDEX", "encode_pretrain", "encode_sft", "label_spans", "DataError", "FORMATS", "KIND_OF_FORMAT",
    "KINDS", "detect_format", "iter_examples", "normalize", "read_records", "build_sft_dataset", "example_messages",
    "load_dataset_spec", "load_examples", "DatasetSpec", "RegistryError", "load_registry", "resolve_dataset",
    "AutoTemplate", "Template", "TemplateError", "get_template", "suggest_template", "template_mismatch",
    "template_names",
]

_LAZY = {"build_sft_dataset", "example_messages", "load_dataset_spec", "load_examples"}


def __getattr__(name):
    if name in _LAZY:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
