"""Push an export to a model hub: one attempt, a reachability check first, a clear message when offline."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


class HubError(RuntimeError):
    """The push could not be done; the export itself stays on disk."""


def offline() -> bool:
    """Whether the environment puts the Hugging Face Hub in offline mode (HF_HUB_OFFLINE), as the hub library reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


OFFLINE_HINT = "offline mode is on (HF_HUB_OFFLINE=1 where the web UI or CLI was started; unset it to go online)"


def _reachable(endpoint: str, timeout: float) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return f"hub.endpoint '{endpoint}' is not a URL"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as err:
        return f"cannot reach {endpoint} ({err.__class__.__name__}: {err})"


def push(hub, folder: Path) -> dict:
    """Create ``hub.repo_id`` (if needed) and upload ``folder``; raises HubError with a one-line reason."""
    endpoint = (hub.endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    token = hub.token or os.environ.get("HF_TOKEN", "")
    where = f"the export is kept at {folder}; push it later with `workbench export` or huggingface-cli upload"
    if "/" not in hub.repo_id.strip("/"):
        raise HubError(f"hub.repo_id must look like user/name, not '{hub.repo_id}'")
    if not token:
        raise HubError(f"push to {hub.repo_id} needs a token: set hub.token or $HF_TOKEN ({where})")
    if offline():
        raise HubError(f"push to {hub.repo_id} skipped: {OFFLINE_HINT}; {where}")
    problem = _reachable(endpoint, hub.timeout_s)
    if problem:
        raise HubError(f"push to {hub.repo_id} failed: {problem}; this machine looks offline, so it is not retried; {where}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=hub.repo_id, folder_path=str(folder), repo_type="model",
                                 commit_message="Upload model exported by Workbench")
    except Exception as err:  # noqa: BLE001 - any hub failure ends the push with its message, once
        raise HubError(f"push to {hub.repo_id} failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; {where}") from None
    return {"repo_id": hub.repo_id, "url": f"{endpoint}/{hub.repo_id}", "commit": getattr(info, "oid", None)}
