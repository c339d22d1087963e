"""Issue 13, items 2 and 4: what the checks refuse before any compute, each with one sentence naming the field.

Every case here once passed validation, started a run and failed after the model loaded, with a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.cli import main
from engine.run import rundir
from engine.run.checks import check
from engine.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _cfg(model, tmp_path, datasets=("identity",), **sections) -> RunConfig:
    data = {"model": {"path": str(model)},
            "data": {"datasets": list(datasets), "registry": str(ROOT / "data" / "dataset_info.yaml")},
            "training": {"max_steps": 8},
            "output": {"run_dir": str(tmp_path / "run")}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


def _fields(problems) -> dict[str, str]:
    return dict(problems)


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    return out


def test_a_sound_config_has_no_problem(tiny_model, tmp_path):
    assert check(_cfg(tiny_model, tmp_path)) == []


def test_model_without_tokenizer_files(model_copy, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    problem = _fields(check(_cfg(model_copy, tmp_path)))["model.path"]
    assert "has no tokenizer files" in problem and str(model_copy) in problem


def test_config_json_that_is_not_json(model_copy, tmp_path):
    (model_copy / "config.json").write_text("{'model_type': llama")
    assert "config.json is not valid JSON" in _fields(check(_cfg(model_copy, tmp_path)))["model.path"]


def test_lora_target_names_read_from_the_safetensors_header(tiny_model, tmp_path):
    assert check(_cfg(tiny_model, tmp_path, method={"lora_target": "q_proj,v_proj,lm_head"})) == []
    problem = _fields(check(_cfg(tiny_model, tmp_path, method={"lora_target": "q_proj,query_key_value"})))
    assert problem["method.lora_target"].startswith(f"{tiny_model.name} has no module named query_key_value")
    assert "q_proj" in problem["method.lora_target"].split("its modules:")[1]


@pytest.mark.parametrize("text, says", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "x",\n', "line 2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": ["a list"], "output": "b"}\n', "line 2: field 'instruction' must be a string"),
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": {"x": 1}}\n', "line 2: field 'output' must be a string"),
    ("\n\n", "file is empty"),
])
def test_dataset_records_are_read_by_the_check(tiny_model, tmp_path, text, says):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    problem = _fields(check(_cfg(tiny_model, tmp_path, datasets=[str(path)])))["data.datasets[0]"]
    assert says in problem and str(path) in problem


def test_dataset_with_no_usable_record(tiny_model, tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    problem = _fields(check(_cfg(tiny_model, tmp_path, datasets=[str(path)])))["data.datasets[0]"]
    assert "empty" in problem or "no usable record" in problem, problem


def test_run_directory_name_too_long(tiny_model, tmp_path, capsys):
    cfg = _cfg(tiny_model, tmp_path, output={"run_dir": str(tmp_path / ("r" * 5000))})
    assert "is 5000 bytes long" in _fields(check(cfg))["output.run_dir"]
    config = tmp_path / "c.yaml"
    config.write_text(cfg.model_dump_json())  # JSON is YAML
    assert main(["train", str(config)]) == 2  # before: an OSError traceback
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output.run_dir" in err


def _checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "README.md").write_text("model card")  # what a save killed early leaves
    if complete:
        (path / rundir.TRAINER_STATE).write_text(json.dumps({"global_step": step, "epoch": step / 10}))
    return path


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8, complete=False)  # left by a save killed before saves went through tmp-
    (tmp_path / "tmp-checkpoint-12" / "checkpoint-12").mkdir(parents=True)
    assert rundir.resumable_checkpoint(tmp_path).name == "checkpoint-4"
    assert [p.name for p in rundir.incomplete_checkpoints(tmp_path)] == ["tmp-checkpoint-12", "checkpoint-8"]


def test_resume_needs_a_complete_checkpoint(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 8, complete=False)
    problem = _fields(check(_cfg(tiny_model, tmp_path, training={"max_steps": 8, "resume_from": "latest"})))
    assert "has none (checkpoint-8: incomplete saves, delete them)" in problem["training.resume_from"]
    _checkpoint(run_dir, 4)
    assert check(_cfg(tiny_model, tmp_path, training={"max_steps": 8, "resume_from": "latest"})) == []


def test_completed_run_resumes_only_with_more_steps_or_epochs(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    _checkpoint(run_dir, 4)
    _checkpoint(run_dir, 8)
    (run_dir / rundir.FINAL).mkdir()
    for training in ({"max_steps": 8}, {"max_steps": 8, "resume_from": str(run_dir / "checkpoint-4")},
                     {"max_steps": -1, "num_train_epochs": 0.8}):
        problems = check(_cfg(tiny_model, tmp_path, training={**training, "resume_from": training.get("resume_from", "latest")}))
        assert [f for f, _ in problems] == ["training.resume_from"], problems
        assert "already trained" in problems[0][1] and "raise training." in problems[0][1]
    assert check(_cfg(tiny_model, tmp_path, training={"max_steps": 12, "resume_from": "latest"})) == []
    assert check(_cfg(tiny_model, tmp_path, training={"max_steps": -1, "num_train_epochs": 2, "resume_from": "latest"})) == []


def test_replace_dir_swaps_a_whole_directory_for_another(tmp_path):
    staged, target = tmp_path / "tmp-final", tmp_path / "final"
    for d, text in ((target, "old"), (staged, "new")):
        d.mkdir()
        (d / "weights").write_text(text)
    rundir.replace_dir(staged, target)
    assert (target / "weights").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_relative_paths_resolve_from_here_then_from_the_project(tiny_model, tmp_path, monkeypatch):
    from engine.run.config import DEFAULT_MODEL, DEFAULT_REGISTRY
    from engine.run.launch import resolve_paths

    assert Path(DEFAULT_MODEL).is_absolute() and Path(DEFAULT_REGISTRY).is_absolute()
    monkeypatch.chdir(tmp_path)  # a server started from another folder: Start used to miss the registry
    cfg = resolve_paths(_cfg(tiny_model, tmp_path, datasets=["identity", "data/identity.json"],
                             data={"registry": "data/dataset_info.yaml"}))
    assert cfg.data.registry == str(ROOT / "data" / "dataset_info.yaml")
    assert cfg.data.datasets == ["identity", str(ROOT / "data" / "identity.json")]
    assert check(cfg) == []
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "identity.json").write_text("[]")  # what is here comes first
    assert resolve_paths(_cfg(tiny_model, tmp_path, datasets=["data/identity.json"])).data.datasets == [
        str(tmp_path / "data" / "identity.json")]
