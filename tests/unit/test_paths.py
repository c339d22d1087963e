"""The page's path policy (engine/run/paths.py): one sentence for every path outside the project, the
workspace and the data roots, after symlinks and `..`; path fields found from the schemas' marks."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from engine.run import paths
from engine.run.config import RunConfig
from engine.run.jobconfig import SCHEMAS
from engine.run.paths import ROOT, PathPolicy, PathRefused, path_fields

SCHEMA_LIST = [RunConfig, *SCHEMAS.values()]
# Every string field of a schema is either marked as a path or listed here as not one, so a new path field
# cannot skip the policy unnoticed: this test fails until it is marked (or listed here, if it is not a path).
NOT_PATHS = {
    "RunConfig": {"model.template", "method.lora_target", "method.modules_to_save", "distributed.devices", "distributed.include", "distributed.master_addr"},
    "EvalConfig": {"model.template", "harness.tasks"},
    "ExportConfig": {"output.max_shard_size", "verify.prompt", "hub.repo_id", "hub.token", "hub.endpoint"},
}


def outside_values(workspace: Path) -> list[str]:
    """/etc/shadow, a relative path climbing out, and a link inside the workspace that points to /etc."""
    link = workspace / "link-out"
    if not link.is_symlink():
        link.symlink_to("/etc")
    return ["/etc/shadow", "../../../../../../etc/hosts", str(link / "hosts")]


def _strings(schema) -> set[str]:
    out = set()
    for section, sf in schema.model_fields.items():
        for name, info in sf.annotation.model_fields.items():
            ann = info.annotation
            args = [a for a in typing.get_args(ann) if a is not type(None)] or [ann]
            inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args]
            if str in inner:
                out.add(f"{section}.{name}")
    return out


@pytest.mark.parametrize("schema", SCHEMA_LIST, ids=lambda s: s.__name__)
def test_every_string_field_is_a_marked_path_or_declared_not_one(schema):
    marked = {key for key, _ in path_fields(schema)}
    unclassified = _strings(schema) - marked - NOT_PATHS[schema.__name__]
    assert not unclassified, f"mark these as paths (json_schema_extra={{'path': ...}}) or list them in NOT_PATHS: {unclassified}"
    assert marked and not marked & NOT_PATHS[schema.__name__]


@pytest.mark.parametrize("schema", SCHEMA_LIST, ids=lambda s: s.__name__)
def test_each_marked_field_refuses_paths_outside_with_one_sentence(schema, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    policy = PathPolicy.for_workspace(workspace)
    for key, kind in path_fields(schema):
        section, name = key.split(".")
        is_list = typing.get_origin(schema.model_fields[section].annotation.model_fields[name].annotation) is list
        for bad in outside_values(workspace):
            cfg = schema.model_validate({section: {name: [bad] if is_list else bad}})
            problems = policy.problems(cfg)
            assert problems == [(key, str(policy.refusal(bad)))], (key, bad)
            assert "is outside the folders this page may read" in problems[0][1]
        assert policy.problems(schema()) == []  # the defaults are inside the project


def test_inside_paths_names_and_keywords_pass(tmp_path):
    workspace = tmp_path / "ws"
    (workspace / "data").mkdir(parents=True)
    (workspace / "data" / "a.jsonl").write_text("{}\n")
    policy = PathPolicy.for_workspace(workspace)
    cfg = RunConfig.model_validate({"data": {"datasets": ["identity", str(workspace / "data" / "a.jsonl"), "data/identity.json"]},
                                    "training": {"resume_from": "latest"}, "output": {"run_dir": str(workspace / "runs" / "new")},
                                    "model": {"path": "models/SmolLM2-135M-Instruct", "extend_vocab": ""}})
    assert policy.problems(cfg) == []
    assert policy.check("data/dataset_info.yaml") == ROOT / "data" / "dataset_info.yaml"  # found from the project
    assert policy.check("configs/x.yaml", base=workspace) == workspace / "configs" / "x.yaml"
    # a link that stays inside is fine; `..` that climbs out of the workspace into another folder is not
    (workspace / "inner").symlink_to(workspace / "data")
    assert policy.allows(workspace / "inner" / "a.jsonl")
    assert not policy.allows(workspace / ".." / "elsewhere")
    assert not policy.allows(workspace / "a\x00b")  # a name that cannot be resolved is refused, not an error
    with pytest.raises(PathRefused, match=r"^'x{300}…' cannot be a path: a name in it is longer than the file system"):
        policy.check("x" * 5000)  # inside the project, but no file can have that name
    with pytest.raises(PathRefused, match=r"^'/etc/a\\x00b\\x1b' cannot be a path: it holds a control character$"):
        policy.check("/etc/a\x00b\x1b")


def test_data_roots_from_defaults_environment_and_option(tmp_path, monkeypatch):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    defaults = tmp_path / "defaults.yaml"
    defaults.write_text(f"data_roots: [{a}]\n")
    monkeypatch.setenv(paths.ENV, str(b))
    assert paths.configured_roots([c], defaults) == [a, b, c]
    policy = PathPolicy.for_workspace(tmp_path / "ws", [c])
    assert policy.allows(c / "x.jsonl") and policy.allows(b / "x.jsonl")
    monkeypatch.delenv(paths.ENV)
    assert not PathPolicy.for_workspace(tmp_path / "ws").allows(b / "x.jsonl")
    err = PathPolicy.for_workspace(tmp_path / "ws").refusal("/etc/shadow", "data.registry")
    assert err.field == "data.registry" and str(err).startswith("'/etc/shadow' is outside the folders this page may read (")


def test_a_confined_process_refuses_what_a_registry_or_a_vocabulary_reaches_outside(tmp_path):
    """The web UI's server confines its whole process: a registry inside the workspace that includes /etc/shadow or
    names /etc/hosts as a file is refused with the sentence, and not one of their lines is quoted."""
    from engine.data import DataError, load_registry, resolve_dataset
    from engine.train.vocab import VocabError, read_tokens

    workspace = tmp_path / "ws"
    workspace.mkdir()
    link = outside_values(workspace)[2]
    registry = workspace / "evil.jsonl"  # one JSON line is a YAML mapping: an upload can be a registry
    registry.write_text('{"include": "/etc/shadow", "a": {"file": "/etc/hosts"}, "b": {"file": "%s"}}\n' % link)
    paths.confine_process(PathPolicy.for_workspace(workspace))
    try:
        with pytest.raises(DataError) as err:
            load_registry(registry)
        assert [(p.line, p.field) for p in err.value.problems] == [(1, "include"), (1, "file"), (1, "file")]
        assert all(REFUSED in p.message for p in err.value.problems)
        assert "root:" not in str(err.value) and "localhost" not in str(err.value)
        for source in ("/etc/shadow", "../../../../../../../../etc/hosts", link):
            with pytest.raises(DataError, match=REFUSED):
                resolve_dataset(source, ROOT / "data" / "dataset_info.yaml")
            with pytest.raises(VocabError, match=REFUSED):
                read_tokens(source)
            with pytest.raises(DataError, match=REFUSED):
                load_registry(source)
        assert "identity" in load_registry(ROOT / "data" / "dataset_info.yaml")  # the project's own is fine
    finally:
        paths.confine_process(None)
    with pytest.raises(DataError) as err:  # the command line is not confined: the registry is read as it says
        load_registry(registry)
    assert REFUSED not in str(err.value)


REFUSED = "is outside the folders this page may read"
