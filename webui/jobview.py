"""What the Evaluate and Export tabs share: checkpoint choices and job status cards (their fields come from the
job schemas through ``form.build_schema_fields``).

Imports no gradio and no torch.
"""

from __future__ import annotations

from pathlib import Path

from engine.run import jobs, rundir
from engine.run.checkpoint import workspace_checkpoints
from engine.run.config import ConfigError

from .i18n import t
from .views import badge, esc, message


def checkpoint_choices(workspace: Path) -> list[tuple[str, str]]:
    """(label, path) of every final/ and checkpoint-N/ of the workspace's language-model runs (not reward models),
    newest run first, and of its exports."""
    out = workspace_checkpoints(workspace)
    for job in jobs.list_jobs("export", workspace):
        result = jobs.read_result(job) or {}
        if result.get("output_dir") and Path(result["output_dir"]).is_dir():
            out.append((f"export: {Path(result['output_dir']).name}", result["output_dir"]))
    return out


def job_choices(kind: str, workspace: Path) -> list[str]:
    return [p.name for p in jobs.list_jobs(kind, workspace)]


def job_dir(kind: str, workspace: Path, name: str | None) -> Path | None:
    if not name or "/" in name or name in (".", ".."):
        return None
    path = jobs.job_root(kind, workspace) / name
    return path if (path / rundir.CONFIG).is_file() else None


def status_html(lang: str, path: Path | None) -> str:
    if path is None:
        return ""
    status = rundir.read_status(path)
    if status is None:
        return ""
    phase = getattr(status, "phase", "") or ""
    progress = f" {status.step}/{status.total_steps}" if status.total_steps else ""
    html = f'<div class="wb-job" data-state="{esc(status.state)}">{badge(lang, status.state)} <b>{esc(path.name)}</b>{esc(progress)} {esc(phase)}</div>'
    if status.state == "failed":
        html += message("error", t(lang, "jobs.failed"), [status.error or ""])
    return html


def problems_html(lang: str, err: Exception) -> str:
    if isinstance(err, ConfigError):
        return message("error", t(lang, "jobs.not_started"), [f"{f}: {m}" if f else m for f, m in err.problems])
    return message("error", t(lang, "jobs.not_started"), [str(err)])
