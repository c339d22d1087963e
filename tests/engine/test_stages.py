"""Every training stage as a real DeepSpeed-launched run on the tiny model: pt, rm, dpo, kto, orpo, then rl against
the rm run's reward model. The five independent runs start together (module fixture) to share the launch cost.

Numbers asserted: DPO's first loss is ln 2 (policy = reference: LoRA's B starts at 0 and the reference is the base
with the adapter disabled), and the rm run's logged reward accuracy equals the accuracy of its saved reward model
on exactly the held-out pairs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from engine.run import launch, rundir
from engine.run.checks import check
from engine.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
REGISTRY = str(ROOT / "data" / "dataset_info.yaml")
STEPS = 2

RUNS = {
    "pt": {"data": {"datasets": ["text_demo"], "cutoff_len": 64, "max_samples": 40}},
    # 40 pairs, 8 held out: two eval batches of 4, so TRL's mean of batch accuracies is the plain accuracy
    "rm": {"data": {"datasets": ["preference_demo"], "val_size": 0.2, "max_samples": 40}},
    "dpo": {"data": {"datasets": ["preference_demo"], "max_samples": 16}},
    "kto": {"data": {"datasets": ["kto_demo"], "max_samples": 16},
            "method": {"stage": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.75}},
    "orpo": {"data": {"datasets": ["preference_demo"], "max_samples": 16}},
}
METRICS = {
    "pt": ["loss", "tokens", "tokens_per_s"],
    "rm": ["loss", "accuracy", "margin", "eval_accuracy", "eval_margin"],
    "dpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"],
    "kto": ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins"],
    "orpo": ["loss", "nll_loss", "log_odds_ratio", "rewards/accuracies", "rewards/margins"],
    "rl": ["loss", "reward", "reward_std", "kl", "rewards/reward_model/mean", "completions/mean_length"],
}


def _cfg(tiny_model, run_dir, stage, **sections) -> RunConfig:
    data = {
        "model": {"path": str(tiny_model)},
        "method": {"stage": stage},
        "data": {"registry": REGISTRY, "cutoff_len": 128},
        "training": {"max_steps": STEPS, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "save_steps": STEPS, "eval_steps": STEPS, "logging_steps": 1,
                     "precision": "fp32"},
        "output": {"run_dir": str(run_dir)},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return RunConfig.model_validate(data)


def _finish(run_dir: Path) -> Path:
    status = launch.wait(run_dir, timeout=600)
    assert status is not None and status.state == "completed", (status, rundir.log_tail(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("stages")
    threads = os.environ.get("WORKBENCH_THREADS")
    os.environ["WORKBENCH_THREADS"] = "1"  # five runs share the cores
    try:
        started = {stage: launch.start(_cfg(tiny_model, base / stage, stage, **sections)) for stage, sections in RUNS.items()}
        reward = _finish(started["rm"]) / rundir.FINAL  # rl starts as soon as its reward model is there
        started["rl"] = launch.start(_cfg(tiny_model, base / "rl", "rl", data={"datasets": ["preference_demo"]},
                                          method={"stage": "rl", "reward_model": str(reward), "max_new_tokens": 8}))
        done = {stage: _finish(run_dir) for stage, run_dir in started.items()}
    finally:
        if threads is None:
            os.environ.pop("WORKBENCH_THREADS", None)
        else:
            os.environ["WORKBENCH_THREADS"] = threads
    return done


@pytest.mark.parametrize("stage", list(METRICS))
def test_stage_runs_and_logs_its_metrics(runs, stage):
    rows = [r for r in rundir.read_metrics(runs[stage]) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    logged = set().union(*(rundir.read_metrics(runs[stage])))
    assert set(METRICS[stage]) <= logged, sorted(logged)
    assert (runs[stage] / rundir.FINAL / rundir.CONFIG).is_file()
    assert (runs[stage] / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()


def test_dpo_first_loss_is_ln2(runs):
    first = rundir.read_metrics(runs["dpo"])[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margins"] == 0.0 and first["rewards/chosen"] == 0.0
    assert not (runs["dpo"] / rundir.FINAL / "ref").exists()  # no second adapter: the reference is the bare base


def test_kto_weights_reach_the_trainer(runs):
    import torch

    args = torch.load(runs["kto"] / f"checkpoint-{STEPS}" / "training_args.bin", weights_only=False)
    assert (args.desirable_weight, args.undesirable_weight) == (1.5, 0.75)


def test_reward_accuracy_is_measured_on_the_held_out_pairs(runs, tokenizer):
    import torch
    import yaml

    from engine.data.loader import build_answer_dataset
    from engine.data.templates import get_template
    from engine.train.stages import load_reward_model

    cfg = RunConfig.model_validate(yaml.safe_load((runs["rm"] / rundir.CONFIG).read_text()))
    train, held_out, stats = build_answer_dataset(cfg.data, tokenizer, get_template("auto", tokenizer),
                                                  seed=cfg.training.seed, kind="preference")
    assert (stats["train"], stats["eval"]) == (32, 8)
    assert not {tuple(p) for p in held_out["prompt_ids"]} & {tuple(p) for p in train["prompt_ids"]}
    model, _ = load_reward_model(runs["rm"] / rundir.FINAL, cfg.model)  # LoRA merged, trained score head

    def score(ids):
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    margins = [score(r["prompt_ids"] + r["chosen_ids"]) - score(r["prompt_ids"] + r["rejected_ids"]) for r in held_out]
    last_eval = [r for r in rundir.read_metrics(runs["rm"]) if "eval_accuracy" in r][-1]
    assert last_eval["step"] == STEPS  # evaluated with the final weights
    assert last_eval["eval_accuracy"] == sum(m > 0 for m in margins) / len(margins)
    assert last_eval["eval_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)


def test_rl_scores_with_the_rm_run(runs):
    rows = [r for r in rundir.read_metrics(runs["rl"]) if "reward" in r]
    assert len(rows) == STEPS and all(math.isfinite(r["reward"]) for r in rows)
    assert rows[0]["completions/mean_length"] <= 8


# ---------------------------------------------------------------- refused before compute

@pytest.mark.parametrize("change, field, words", [
    ({"method": {"stage": "rl"}}, "method.reward_model", "set method.reward_model"),
    ({"method": {"stage": "rl", "reward_model": "/nonexistent/final"}}, "method.reward_model", "not found"),
    ({"method": {"stage": "rl", "reward_model": "TINY"}}, "method.reward_model", "not a reward model"),
    ({"method": {"stage": "rl", "num_generations": 3}}, "method.num_generations", "multiple of 3"),
    ({"method": {"stage": "rl", "max_new_tokens": 128}}, "method.max_new_tokens", "no room"),
    ({"method": {"stage": "dpo"}, "data": {"datasets": ["text_demo"]}}, "data.datasets[0]", "needs preference data"),
    ({"method": {"stage": "pt"}, "data": {"datasets": ["identity"]}}, "data.datasets[0]", "needs pretrain data"),
    ({"method": {"stage": "kto"}, "data": {"datasets": ["kto_demo"]}, "training": {"per_device_train_batch_size": 1}},
     "training.per_device_train_batch_size", "at least 2"),
    ({"method": {"stage": "dpo", "lora_target": "q_proj,lm_head"}, "data": {"datasets": ["preference_demo"]}},
     "method.lora_target", "lm_head"),
])
def test_stage_combinations_that_cannot_train_are_refused(tiny_model, tmp_path, change, field, words):
    stage = change["method"]["stage"]
    if change["method"].get("reward_model") == "TINY":
        change["method"]["reward_model"] = str(tiny_model)  # a causal LM, no score head
    sections = {"data": {"datasets": ["preference_demo"]}, **change}
    problems = check(_cfg(tiny_model, tmp_path / "run", stage, **sections))
    assert any(f == field and words in m for f, m in problems), problems


def test_reward_model_must_come_from_an_rm_run(runs, tiny_model, tmp_path):
    ok = _cfg(tiny_model, tmp_path / "a", "rl", method={"stage": "rl", "reward_model": str(runs["rm"] / rundir.FINAL)},
              data={"datasets": ["preference_demo"]})
    assert check(ok) == []
    wrong = ok.model_copy(deep=True)
    wrong.method.reward_model = str(runs["dpo"] / rundir.FINAL)
    assert [m for f, m in check(wrong) if f == "method.reward_model"] == [
        f"{runs['dpo'] / rundir.FINAL} is a checkpoint of a dpo run; the reward model must come from an rm run"]


def test_a_reward_model_is_refused_where_a_language_model_is_needed(runs, tmp_path):
    from engine.run.checkpoint import reward_model_refusal
    from engine.run.jobchecks import check_eval, check_export
    from engine.run.jobconfig import EvalConfig, ExportConfig
    from engine.serve.sampling import InferenceError, resolve_target

    final = (runs["rm"] / rundir.FINAL).resolve()
    sentence = reward_model_refusal(final)
    with pytest.raises(InferenceError) as err:  # chat and the API
        resolve_target(str(final))
    assert str(err.value) == sentence
    assert ("model.checkpoints[0]", sentence) in check_eval(EvalConfig.model_validate(
        {"model": {"checkpoints": [str(final)]}}))
    assert check_export(ExportConfig.model_validate({"model": {"checkpoint": str(final)},
                                                     "output": {"dir": str(tmp_path / "out")}})) == [
        ("model.checkpoint", sentence)]
    resolve_target(str(runs["dpo"] / rundir.FINAL))  # the language-model stages stay chat-able
