"""The web page's path policy: every path typed into, uploaded to or loaded by the page must lie inside
the project, the workspace or a configured data root, after symlinks and ``..`` are resolved.

One policy for every path field. The schemas mark their path fields (``json_schema_extra={"path": kind}``
on RunConfig, EvalConfig and ExportConfig fields), and :func:`problems` walks a config by those marks, so a
new path field is confined as soon as it is marked (a test fails for a path-like field left unmarked). The
page's other paths (a registry to preview, a dataset to add, a vocabulary source, a config file to load or
save, a chat model) go through :meth:`PathPolicy.check` too.

Kinds of path field: ``path`` (a file or directory; empty means none), ``dataset`` (a registered name or a
data file: plain names are left to the registry), ``checkpoint`` (a directory, or ``latest``).

The data roots come from ``webui/defaults.yaml`` (``data_roots``), ``$WORKBENCH_DATA_ROOTS`` (separated by
``os.pathsep``) and ``workbench webui --data-root DIR`` (repeatable); relative ones are inside the project.
The command line is the user's own shell and is not confined. Imports no torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS_FILE = ROOT / "webui" / "defaults.yaml"
ENV = "WORKBENCH_DATA_ROOTS"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a registered dataset name (engine.data.registry.NAME)
KEYWORDS = {"checkpoint": ("latest",)}


class PathRefused(ValueError):
    """A path outside the folders the page may use; ``field`` names where it was typed."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        self.field = field


def configured_roots(extra: Iterable[str | Path] = (), defaults: Path = DEFAULTS_FILE) -> list[Path]:
    """The data roots: defaults.yaml's ``data_roots``, then $WORKBENCH_DATA_ROOTS, then ``extra`` (--data-root)."""
    import yaml

    listed: list = []
    if defaults.is_file():
        listed = list((yaml.safe_load(defaults.read_text(encoding="utf-8")) or {}).get("data_roots") or [])
    listed += [p for p in os.environ.get(ENV, "").split(os.pathsep) if p.strip()]
    listed += list(extra)
    return [ROOT / Path(str(r)).expanduser() for r in listed]  # ROOT / an absolute path is that path


@dataclass(frozen=True)
class PathPolicy:
    """Allows paths inside ``roots`` (each resolved, so a root that is itself a link counts where it points)."""

    roots: tuple[Path, ...]

    @classmethod
    def for_workspace(cls, workspace: str | Path | None, extra: Iterable[str | Path] = ()) -> "PathPolicy":
        # the project's models/ may be a link to a shared model store: it is the project's folder all the same
        ws = [Path(workspace)] if workspace is not None else []
        return cls(tuple([ROOT, ROOT / "models", *ws] + configured_roots(extra)))

    def allows(self, path: Path) -> bool:
        """Whether ``path`` (resolved: symlinks and ``..``) lies in a root; a path that cannot be resolved (a NUL
        byte, a name too long for the system) is not allowed."""
        try:
            real = path.expanduser().resolve()
            return any(real.is_relative_to(r.expanduser().resolve()) for r in self.roots)
        except (OSError, ValueError, RuntimeError):
            return False

    def refusal(self, text: str, field: str = "") -> PathRefused:
        """The one sentence every refused path gets (it names the typed text, never a file's content)."""
        roots = ", ".join(str(r) for r in dict.fromkeys(self.roots))
        return PathRefused(f"'{_short(str(text))}' is outside the folders this page may read ({roots}); upload the file instead, "
                           "or add its folder to data_roots in webui/defaults.yaml", field)

    def check(self, text: str | Path, field: str = "", base: Path | None = None) -> Path:
        """``text`` as the page will use it (absolute; relative to ``base``, else as found from here or from the
        project, like ``registry.find_path``), or PathRefused when it lies outside every root."""
        if (why := unusable(str(text))):
            raise PathRefused(f"'{_short(str(text))}' cannot be a path: {why}", field)
        path = locate(text, base)
        if not self.allows(path):
            raise self.refusal(str(text), field)
        return path

    def problems(self, cfg, prefix: str = "") -> list[tuple[str, str]]:
        """(field, sentence) for every marked path field of ``cfg`` (a RunConfig, EvalConfig or ExportConfig) that
        is refused."""
        out = []
        for key, kind in path_fields(type(cfg)):
            section, name = key.split(".", 1)
            value = getattr(getattr(cfg, section), name)
            for item in value if isinstance(value, list) else [value]:
                if not is_path_value(item, kind):
                    continue
                try:
                    self.check(item, key)
                except PathRefused as err:
                    out.append((prefix + key, str(err)))
        return out


_ACTIVE: PathPolicy | None = None


def confine_process(policy: PathPolicy | None) -> None:
    """Confine this process's readers of user-named files (registry includes and entries, bare dataset paths,
    vocabulary sources) to ``policy``: the web UI's server process calls it, so a file the page reaches
    indirectly (a registry that includes /etc/shadow) is refused like one typed into it. None lifts it."""
    global _ACTIVE
    _ACTIVE = policy


def active() -> PathPolicy | None:
    """The process's policy (None: not confined, as on the command line)."""
    return _ACTIVE


def _short(text: str) -> str:
    """``text`` for a message: control characters shown as \\xNN, cut after 300 characters."""
    text = "".join(c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 300 else f"{text[:300]}…"


def unusable(text: str) -> str | None:
    """Why ``text`` cannot name a file on this system (a control character, a name or path too long), or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "it holds a control character"
    if len(text.encode("utf-8", "surrogateescape")) >= 4096 or any(len(part.encode("utf-8", "surrogateescape")) > 255
                                                                      for part in text.split("/")):
        return "a name in it is longer than the file system allows (255 bytes a name, 4096 a path)"
    return None


def locate(text: str | Path, base: Path | None = None) -> Path:
    """A typed path made absolute: relative to ``base`` when given, else from here or (when only there) the project."""
    path = Path(str(text).strip()).expanduser()
    if path.is_absolute():
        return path
    if base is not None:
        return Path(base) / path
    if not exists(path) and exists(ROOT / path):
        return ROOT / path
    return Path.cwd() / path


def exists(path: Path) -> bool:
    """``path.exists()`` that is False, not an error, for a name too long or with a NUL byte."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def is_path_value(value: Any, kind: str) -> bool:
    """Whether a field's value names a path (empty means none; a dataset's plain name and 'latest' do not)."""
    if value is None or not str(value).strip():
        return False
    text = str(value).strip()
    if text in KEYWORDS.get(kind, ()):
        return False
    if kind == "dataset" and NAME.fullmatch(text) and not exists(locate(text)):
        return False  # a registered name: the registry it comes from is a path field of its own
    return True


def path_fields(schema) -> list[tuple[str, str]]:
    """(``section.name``, kind) of every field a config schema marks as a path."""
    out = []
    for section, sf in schema.model_fields.items():
        for name, info in sf.annotation.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and "path" in extra:
                out.append((f"{section}.{name}", extra["path"]))
    return out
