"""`workbench webui` leaves HF_HUB_OFFLINE as the user set it, and the header says which mode the Hub is in."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from webui import app, server
from webui.runs import Device


class _Stop(Exception):
    pass


@pytest.mark.parametrize("setting", [None, "1"])
def test_webui_keeps_the_users_hub_setting(monkeypatch, setting, tmp_path):
    if setting is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", setting)
    seen = {}

    def create(workspace, lang="en", **_):
        seen["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
        raise _Stop

    monkeypatch.setattr(app, "create", create)
    with pytest.raises(_Stop):
        server.serve(workspace=str(tmp_path))
    assert seen == {"HF_HUB_OFFLINE": setting}


def test_header_shows_the_hub_mode(monkeypatch, tmp_path):
    ctx = SimpleNamespace(manager=SimpleNamespace(devices=[Device("cpu", "CPU")]), workspace=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "Hub: offline (HF_HUB_OFFLINE)" in app.header_html(ctx, "en")
    assert "Hub：离线" in app.header_html(ctx, "zh")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert "Hub: online" in app.header_html(ctx, "en")
