"""Hostile input through the Gradio API against a real `workbench webui` process.

* Every path field of the run, evaluation and export schemas (found from their ``path`` marks, not a hand
  list) and every other path the page takes (registry preview, Add a dataset, vocabulary preview, config
  load/save/upload, chat model, the side-by-side chat's right model) gets /etc/shadow, a relative path climbing out, and a link inside the
  workspace that points to /etc: each is refused with the policy's sentence, and no line of a file outside
  comes back.
* Every field of the run form gets a wrong type, out-of-bounds numbers, 5,000 characters and control
  characters: each call comes back (a message, or Gradio's own refusal of the value), and the server log holds
  no traceback through Workbench's code (Gradio logs its own input refusals; those are checked to be only that).
"""

from __future__ import annotations

import re
import time
import typing
from pathlib import Path

import pytest

from engine.run.config import RunConfig
from engine.run.jobconfig import EvalConfig, ExportConfig
from engine.run.paths import path_fields
from webui import form

from webui_server import ROOT, Server

pytestmark = pytest.mark.slow  # a real server (~40 s to start) and ~300 calls: about 4 minutes on 2 busy cores

REFUSED = "is outside the folders this page may read"
SECRETS = ("root:", "localhost")  # the first characters of /etc/shadow's and /etc/hosts' lines
# where each marked field of the job schemas is typed on the page (None: the page has no widget for it)
EVAL_WIDGETS = {"model.base": "ev-base", "model.checkpoints": "ev-ckpts", "data.datasets": "ev-data",
                "data.registry": None, "benchmark.file": "ev-bench", "output.dir": None,
                "output.job_dir": None}
EXPORT_WIDGETS = {"model.checkpoint": "ex-ckpt", "model.base": None, "output.dir": "ex-dir", "output.job_dir": None}


class Page:
    """The page's event handlers, found by the elem_ids of their inputs and outputs, called through gradio_client."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
        config = self.client.config
        self.comps = {c["id"]: c for c in config["components"]}
        self.deps = [d for d in config["dependencies"] if d.get("api_name") and d.get("backend_fn")]

    def elem(self, cid) -> str | None:
        return self.comps[cid]["props"].get("elem_id")

    def endpoint(self, inputs: tuple[str, ...], outputs: tuple[str, ...] = ()) -> dict:
        for d in self.deps:
            ins, outs = {self.elem(i) for i in d["inputs"]}, {self.elem(o) for o in d["outputs"]}
            if set(inputs) <= ins and set(outputs) <= outs:
                return d
        raise AssertionError(f"no event handler takes {inputs} and gives {outputs}")

    def call(self, dep: dict, **values) -> tuple:
        """Call with the page's current values, ``values`` (elem_id -> value) replacing some; returns the outputs,
        or ("gradio refused: <message>",) when Gradio refused an input before Workbench's code ran."""
        from gradio_client.exceptions import AppError

        args = []
        for cid in dep["inputs"]:
            if self.comps[cid]["type"] == "state":  # kept on the server, not sent by a client
                continue
            eid = self.elem(cid)
            args.append(values[eid] if eid in values else self.comps[cid]["props"].get("value"))
        try:
            out = self.client.predict(*args, api_name="/" + dep["api_name"])
        except AppError as err:
            return (f"gradio refused: {err}",)
        return out if isinstance(out, tuple) else (out,)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    workspace = tmp / "ws"
    workspace.mkdir()
    (workspace / "link-out").symlink_to("/etc")
    server = Server(workspace, tmp / "server.log")
    server.start()
    try:
        yield Page(server.url), workspace, server
    finally:
        server.stop()


def outside(workspace: Path) -> list[str]:
    return ["/etc/shadow", "../../../../../../../etc/hosts", str(workspace / "link-out" / "hosts")]


def text_of(out) -> str:
    return " ".join(str(o) for o in out)


def assert_refused(out, what: str) -> None:
    text = text_of(out)
    assert REFUSED in text, f"{what}: {text[:500]}"
    assert not any(s in text for s in SECRETS), f"{what} echoed a file's content: {text[:500]}"


def elem_of(key: str) -> str:
    return "f-" + key.replace(".", "-")


def test_every_path_field_of_the_run_form_is_confined(page):
    p, workspace, _ = page
    preview = p.endpoint(("f-model-path",), ("preview-yaml",))
    start = p.endpoint(("f-model-path",), ("train-msg",))
    keys = [k for k, _ in path_fields(RunConfig)]
    assert set(keys) - set(form.form_keys()) <= set(form.LAYOUT["not_in_form"])  # not typed on the page at all
    for key in (k for k in keys if k in form.form_keys()):
        multi = form.spec(key).kind == "multiselect"
        for bad in outside(workspace):
            value = [bad] if multi else bad
            out = p.call(preview, **{elem_of(key): value})
            assert_refused(out, f"preview {key}={bad}")
            assert key in str(out[0])
        assert_refused(p.call(start, **{elem_of(key): [outside(workspace)[0]] if multi else outside(workspace)[0]}),
                       f"start {key}")
    assert not list((workspace / "runs").glob("*")) if (workspace / "runs").exists() else True


def test_the_pages_other_paths_are_confined(page):
    p, workspace, server = page
    registry = p.endpoint(("f-data-registry", "f-method-stage"), ("registry-msg",))
    datasets = p.endpoint(("f-data-registry", "f-data-datasets"), ("data-preview",))
    add_path = p.endpoint(("data-path",), ("data-save-msg",))
    vocab = p.endpoint(("f-model-extend_vocab",), ("vocab-box",))
    info = p.endpoint(("f-model-path", "f-method-finetuning_type"), ("model-info-box",))
    load_cfg = p.endpoint(("cfg-path",), ("cfg-msg",))
    save_cfg = p.endpoint(("cfg-path", "f-model-path"), ("cfg-msg",))
    chat = p.endpoint(("chat-model",), ("chat-status-box",))
    right_info = p.endpoint(("chat-right",), ("chat-right-box",))
    right_load = p.endpoint(("chat-right", "chat-template"), ("chat-status-box",))
    hostfile = p.endpoint(("f-distributed-hostfile",), ("devices-msg",))  # a chosen hostfile fills the node table
    for bad in outside(workspace):
        assert_refused(p.call(hostfile, **{"f-distributed-hostfile": bad}), f"hostfile {bad}")
        assert_refused(p.call(registry, **{"f-data-registry": bad}), f"registry {bad}")
        assert_refused(p.call(datasets, **{"f-data-registry": bad}), f"dataset preview registry {bad}")
        assert_refused(p.call(datasets, **{"f-data-datasets": [bad]}), f"dataset preview path {bad}")
        assert_refused(p.call(add_path, **{"data-path": bad}), f"add a dataset {bad}")
        assert_refused(p.call(vocab, **{"f-model-extend_vocab": bad}), f"vocabulary {bad}")
        assert_refused(p.call(info, **{"f-model-path": "/etc" if bad.startswith("/etc") else str(Path(bad).parent)}),
                       f"model info {bad}")
        assert_refused(p.call(load_cfg, **{"cfg-path": bad + ".yaml"}), f"load config {bad}")
        assert_refused(p.call(save_cfg, **{"cfg-path": bad + ".yaml"}), f"save config {bad}")
        assert not Path(bad + ".yaml").exists() and not (workspace / bad).with_suffix(".yaml").exists()
        assert_refused(p.call(chat, **{"chat-model": "/etc" if bad.startswith("/etc") else str(Path(bad).parent),
                                      "chat-run": None}), f"chat {bad}")
        assert_refused(p.call(right_info, **{"chat-right": bad}), f"side by side, right side {bad}")
        assert_refused(p.call(right_load, **{"chat-right": bad}), f"load right {bad}")
    # a file inside the workspace (one JSON line is a YAML mapping: an upload copied there can be one) that includes
    # /etc/shadow and names /etc/hosts as a dataset file, chosen as the registry
    evil = workspace / "datasets" / "evil.jsonl"
    evil.parent.mkdir(exist_ok=True)
    evil.write_text('{"include": "/etc/shadow", "x": {"file": "/etc/hosts"}, "instruction": "a", "output": "b"}\n')
    assert_refused(p.call(registry, **{"f-data-registry": str(evil)}), "a registry that includes /etc/shadow")
    assert_refused(p.call(datasets, **{"f-data-registry": str(evil), "f-data-datasets": ["x"]}), "its dataset")
    # an "upload" that names a file on the server instead of sending one
    upload = p.endpoint(("btn-upload",), ("cfg-msg",))
    fake = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "passwd.yaml"}
    out = text_of(p.call(upload, **{"btn-upload": fake}))
    assert (REFUSED in out or out.startswith("gradio refused")) and "root:" not in out
    data_upload = p.endpoint(("data-upload",), ("data-save-msg",))
    out = text_of(p.call(data_upload, **{"data-upload": dict(fake, orig_name="passwd.jsonl")}))
    assert (REFUSED in out or out.startswith("gradio refused")) and "root:" not in out
    # a hostfile has no suffix to check, and Gradio copies a server file named this way into its upload folder
    # before any handler runs, so the handler cannot tell it from an upload: it is not kept, and none of it is echoed
    hostfile_upload = p.endpoint(("btn-hostfile-upload",), ("devices-msg",))
    out = text_of(p.call(hostfile_upload, **{"btn-hostfile-upload": dict(fake, orig_name="hostfile")}))
    assert ("wb-msg-error" in out or out.startswith("gradio refused")) and "root:" not in out and "/bin/" not in out
    assert not (workspace / "hostfiles").exists()


@pytest.mark.parametrize("schema,widgets", [(EvalConfig, EVAL_WIDGETS), (ExportConfig, EXPORT_WIDGETS)],
                         ids=["eval", "export"])
def test_every_path_field_of_the_job_forms_is_confined(page, schema, widgets):
    p, workspace, _ = page
    assert set(widgets) == {k for k, _ in path_fields(schema)}, "a new path field: say where the page takes it"
    start = p.endpoint(("ev-base",) if schema is EvalConfig else ("ex-dir",), ("ev-status",) if schema is EvalConfig
                       else ("ex-status",))
    for key, eid in widgets.items():
        if eid is None:
            continue
        section, name = key.split(".")
        multi = typing.get_origin(schema.model_fields[section].annotation.model_fields[name].annotation) is list
        for bad in outside(workspace):
            out = p.call(start, **{eid: [bad] if multi else bad})
            text = text_of(out)
            if text.startswith("gradio refused"):  # a dropdown without custom values: Gradio refuses it first
                assert "not in the list of choices" in text and "root:" not in text
                continue
            assert_refused(out, f"{schema.__name__} {key}={bad}")


def hostile_values(key: str) -> list:
    s = form.spec(key)
    long, control = "x" * 5000, "a\x00b\x1b[31m\r\n\u202ez\x7f"
    if s.kind in ("slider", "number"):
        lo = s.minimum if s.minimum is not None else 0
        hi = s.maximum if s.maximum is not None else 10**9
        return ["abc", lo - 10**9, hi + 10**9, long, control]
    if s.kind == "checkbox":
        return ["abc", 7, long, control]
    if s.kind in ("multiselect", "devices"):
        return ["notalist", [long], [control], [12]]
    return [12345, [1, 2], long, control]


def test_every_form_field_survives_hostile_values(page):
    p, _, server = page
    preview = p.endpoint(("f-model-path",), ("preview-yaml",))
    keys = [k for k in form.form_keys() if elem_of(k) in {p.elem(i) for i in preview["inputs"]}]
    assert len(keys) == len(form.form_keys())  # Preview reads every field of the form
    t0, calls, refused_by_gradio = time.time(), 0, 0
    for key in keys:
        for bad in hostile_values(key):
            out = p.call(preview, **{elem_of(key): bad})
            calls += 1
            text = text_of(out)
            assert text.strip(), f"{key}={bad!r:.40}: nothing came back"
            refused_by_gradio += text.startswith("gradio refused")
            if not text.startswith("gradio refused") and "model:" not in str(out[1]):  # no config: a message says why
                assert "wb-msg" in str(out[0]) and key in str(out[0]), f"{key}={bad!r:.40}: {str(out[0])[:300]}"
    log = server.log.read_text(errors="replace")
    ours = [block for block in log.split("Traceback (most recent call last):")[1:]
            if re.search(rf'File "{re.escape(str(ROOT))}/(webui|engine)/', block)]
    assert not ours, f"{len(ours)} tracebacks through Workbench's code; the first:\n{ours[0][-3000:]}"
    others = re.findall(r"^(\w[\w.]*(?:Error|Exception)): ", log, flags=re.M)
    # pydantic's ValidationError: Gradio checking a table's payload against its data model (the node table)
    assert set(others) <= {"gradio.exceptions.Error", "gradio.exceptions.ComponentProcessingError", "TypeError",
                           "ValueError", "pydantic_core._pydantic_core.ValidationError"}, set(others)
    print(f"{calls} hostile calls in {time.time() - t0:.0f} s; Gradio refused {refused_by_gradio} before the handler")
