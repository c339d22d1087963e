"""lm-evaluation-harness as an eval task: the project's offline task YAMLs run for real on the tiny model and
its checkpoint, the harness scores the multiple-choice demo as the hand-written evaluator does, and a task
that cannot run here is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.jobs import evaluate as evaluate_mod
from engine.jobs.evaluate import check_eval, evaluate
from engine.run.config import ConfigError
from engine.run.jobconfig import EvalConfig
from test_export import _Progress, make_adapter

ROOT = Path(__file__).resolve().parents[2]
MCQ = ROOT / "data" / "benchmarks" / "mcq_demo.jsonl"


def _cfg(base, checkpoints, tmp_path, **harness) -> EvalConfig:
    return EvalConfig.model_validate({
        "model": {"base": str(base), "checkpoints": [str(c) for c in checkpoints]},
        "tasks": {"loss": False, "generation": False, "choice": False, "harness": True},
        "harness": {"tasks": ["workbench_mcq_demo", "workbench_gen_demo"], "limit": 8, **harness},
        "output": {"dir": str(tmp_path / "job")},
    })


def test_harness_tasks_on_base_and_checkpoint(tiny_model, tmp_path):
    adapter = make_adapter(tiny_model, tmp_path / "run" / "checkpoint-2", seed=3)
    cfg = _cfg(tiny_model, [adapter], tmp_path)
    assert check_eval(cfg) == []
    (tmp_path / "job").mkdir()
    result = evaluate(cfg, tmp_path / "job", _Progress())
    assert [r["model"].startswith("base") for r in result["rows"]] == [True, False]
    for row in result["rows"]:
        assert row["harness"]["workbench_mcq_demo"]["sample_len"] == 8
        assert row["workbench_mcq_demo acc"] in {k / 8 for k in range(9)}  # 8 questions scored
        assert row["workbench_gen_demo exact_match"] in {k / 8 for k in range(9)}
    assert result["harness"] == ["workbench_mcq_demo", "workbench_gen_demo"]


@pytest.mark.heavy
@pytest.mark.slow
def test_harness_scores_the_demo_as_the_choice_evaluator_does(default_model):
    """Same prompt (the chat template's), same letters: the same accuracy on the 20 demo questions."""
    from engine.data.templates import get_template
    from engine.jobs import harness
    from engine.jobs.choice_eval import read_benchmark, score
    from engine.run.checkpoint import load_for_eval, load_tokenizer_for

    import torch

    tok = load_tokenizer_for(default_model)
    model = load_for_eval(None, default_model, torch.float32)
    mine = score(model, tok, get_template("auto", tok), read_benchmark(MCQ))
    theirs = harness.run(model, tok, ["workbench_mcq_demo"], 0, None, 4, chat_template=True)
    assert len(set(mine["picks"])) > 1  # a real model, not one letter everywhere
    assert theirs["workbench_mcq_demo"]["acc"] * 100 == pytest.approx(mine["accuracy"])


@pytest.mark.slow  # indexes lm_eval's ~15k task YAMLs
def test_unknown_or_unreachable_tasks_are_refused_before_loading(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(evaluate_mod, "load_for_eval", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = _cfg(tiny_model, [], tmp_path, tasks=["workbench_mcq_demo", "no_such_task", "arc_easy"])
    with pytest.raises(ConfigError) as err:
        evaluate(cfg, tmp_path, _Progress())
    text = str(err.value)
    assert "harness task 'no_such_task' is not known to lm-evaluation-harness" in text
    assert "harness task 'arc_easy' needs dataset 'allenai/ai2_arc' from the Hugging Face Hub, and offline mode is on" in text
    assert "workbench_mcq_demo" not in text.split("not known")[0][-40:]
