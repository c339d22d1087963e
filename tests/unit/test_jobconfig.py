"""Eval and export configs: shipped examples load, overrides and errors name the field and line, every field documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.run.config import ConfigError
from engine.run.jobconfig import SCHEMAS, EvalConfig, ExportConfig, load_job_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["eval", "export"])
def test_shipped_job_examples_load_with_overrides(kind):
    cfg = load_job_config(kind, ROOT / "configs" / "examples" / f"{kind}.yaml", ["output.dir=/tmp/x"])
    assert isinstance(cfg, SCHEMAS[kind]) and cfg.output.dir == "/tmp/x"
    assert (ROOT / "models" / "SmolLM2-135M-Instruct").name in (cfg.model.base or "models/SmolLM2-135M-Instruct")


def test_export_example_targets_the_lora_example_run():
    cfg = load_job_config("export", ROOT / "configs" / "examples" / "export.yaml")
    ev = load_job_config("eval", ROOT / "configs" / "examples" / "eval.yaml")
    assert cfg.model.checkpoint == ev.model.checkpoints[0] == "workspace/runs/lora_sft/final"
    assert cfg.output.gguf == ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"] and (ROOT / ev.benchmark.file).is_file()


def test_job_config_errors_name_field_and_line(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model:\n  checkpoint: x\noutput:\n  dtyp: float16\n  max_shard_size: lots\n")
    with pytest.raises(ConfigError) as err:
        load_job_config("export", path)
    fields = dict(err.value.problems)
    assert "output.dtyp (line 4)" in fields and "output.max_shard_size (line 5)" in fields
    with pytest.raises(ConfigError, match=r"output\.gguf\.0"):
        load_job_config("export", ROOT / "configs" / "examples" / "export.yaml", ["output.gguf=[q5_k]"])
    with pytest.raises(ConfigError, match="unknown section 'train'"):
        load_job_config("eval", ROOT / "configs" / "examples" / "eval.yaml", ["train.x=1"])


@pytest.mark.parametrize("schema", [EvalConfig, ExportConfig])
def test_every_job_field_has_a_description(schema):
    for section, info in schema.model_fields.items():
        for name, field in info.annotation.model_fields.items():
            assert field.description, f"{section}.{name}"


def test_shipped_harness_example_loads():
    from engine.jobs.harness import project_tasks

    cfg = load_job_config("eval", ROOT / "configs" / "examples" / "eval_harness.yaml", ["harness.limit=4"])
    assert cfg.tasks.harness and not cfg.tasks.choice and cfg.harness.limit == 4
    assert set(cfg.harness.tasks) <= set(project_tasks()) == {"workbench_mcq_demo", "workbench_gen_demo"}
