"""Evaluation: metrics equal the reference libraries, multiple choice with known answers, base vs. checkpoint, bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.run import jobs, launch, rundir
from engine.jobs.choice_eval import BenchmarkError, read_benchmark, score
from engine.jobs.evaluate import evaluate
from engine.run.jobchecks import check_eval
from engine.run.jobconfig import EvalConfig
from engine.jobs.textmetrics import sample_scores
from test_export import _Progress, make_adapter

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("pred,ref,hyp_tokens,ref_tokens", [
    ("The capital of France is Paris.", "Paris is the capital of France.",
     "The capital of France is Paris .", "Paris is the capital of France ."),
    ("法国的首都是巴黎。", "巴黎是法国的首都。", "法国 的 首都 是 巴黎 。", "巴黎 是 法国 的 首都 。"),
])
def test_bleu_rouge_equal_the_reference_libraries(pred, ref, hyp_tokens, ref_tokens):
    import sacrebleu
    from rouge_chinese import Rouge

    got = sample_scores(pred, ref)
    assert got["bleu-4"] == pytest.approx(sacrebleu.sentence_bleu(hyp_tokens, [ref_tokens], tokenize="none").score)
    rouge = Rouge().get_scores(hyp_tokens, ref_tokens)[0]
    for k in ("rouge-1", "rouge-2", "rouge-l"):
        assert got[k] == pytest.approx(100 * rouge[k]["f"])
    assert sample_scores(ref, ref)["bleu-4"] == pytest.approx(100) and sample_scores(ref, ref)["rouge-l"] == pytest.approx(100, abs=1e-4)
    if pred.startswith("The"):
        assert got["rouge-1"] == pytest.approx(100 * 6 / 7, abs=1e-4)  # 6 of 7 unigrams shared ("The" vs "the")


def test_benchmark_format_errors_name_the_line(tmp_path):
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"question": "q1", "choices": ["a", "b"], "answer": "A"}\n'
                   '{"question": "q2", "choices": ["a", "b"], "answer": "C"}\n'
                   'not json\n'
                   '{"question": "q4", "A": "x", "B": "y", "answer": "b"}\n'
                   '{"choices": ["a", "b"], "answer": "A"}\n')
    with pytest.raises(BenchmarkError) as err:
        read_benchmark(bad)
    msg = str(err.value)
    assert "line 2: 'answer' must be one letter of A-B, not 'C'" in msg and "line 3: not valid JSON" in msg
    assert "line 5: 'question' is missing" in msg and "line 4" not in msg and "README" in msg
    demo = read_benchmark(ROOT / "data" / "benchmarks" / "mcq_demo.jsonl")
    assert len(demo) == 20 and {q.answer for q in demo} == {0, 1, 2, 3}


class _Biased(torch.nn.Module):
    """A 'model' that always puts the most probability on one token, and the next most on another."""

    def __init__(self, vocab, first, second):
        super().__init__()
        self.logits = torch.zeros(vocab)
        self.logits[first], self.logits[second] = 5.0, 3.0
        self.device = torch.device("cpu")

    def forward(self, input_ids, **_):
        return type("Out", (), {"logits": self.logits.expand(1, input_ids.shape[1], -1)})()


def test_multiple_choice_accuracy_with_known_answers(tokenizer, tmp_path):
    from engine.data.templates import get_template

    path = tmp_path / "mc.jsonl"
    answers = ["B", "B", "A", "C", "B", "A"]
    with open(path, "w") as f:
        for i, a in enumerate(answers):
            f.write(json.dumps({"question": f"q{i}", "choices": ["x", "y", "z"], "answer": a, "subject": "s" + str(i % 2)}) + "\n")
    questions = read_benchmark(path)
    letter = lambda c: tokenizer.encode(c, add_special_tokens=False)[0]  # noqa: E731
    model = _Biased(len(tokenizer), letter("B"), letter("A"))
    out = score(model, tokenizer, get_template("auto", tokenizer), questions)
    assert out["picks"] == ["B"] * 6 and out["accuracy"] == pytest.approx(100 * 3 / 6)
    assert out["by_subject"] == {"s0": pytest.approx(100 * 2 / 3), "s1": pytest.approx(100 * 1 / 3)}
    two = read_benchmark(path, max_samples=2)
    assert len(two) == 2


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("evalrun") / "checkpoint-2", seed=3)


def _cfg(tiny_model, adapter, tmp_path, **tasks) -> EvalConfig:
    return EvalConfig.model_validate({
        "model": {"checkpoints": [str(adapter)]},
        "tasks": {"loss": True, "generation": True, "choice": True, **tasks},
        "data": {"datasets": ["instruct_demo"], "registry": str(ROOT / "data/dataset_info.yaml"), "max_samples": 6},
        "generation": {"batch_size": 4, "max_new_tokens": 6},
        "benchmark": {"file": str(ROOT / "data/benchmarks/mcq_demo.jsonl"), "max_samples": 4},
        "output": {"job_dir": str(tmp_path / "job")},
    })


def test_base_vs_checkpoint_in_one_table(tiny_model, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model, adapter, tmp_path)
    (tmp_path / "job").mkdir()
    result = evaluate(cfg, tmp_path / "job", _Progress())
    base, tuned = result["rows"]
    assert base["model"].startswith("base") and tuned["model"].endswith("checkpoint-2")
    for row in result["rows"]:
        assert math.isfinite(row["loss"]) and row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        assert 0 <= row["bleu-4"] <= 100 and 0 <= row["rouge-l"] <= 100 and 0 <= row["accuracy"] <= 100
    assert base["loss"] != tuned["loss"]
    preds = [json.loads(x) for x in (tmp_path / "job" / result["predictions"][tuned["model"]]).read_text().splitlines()]
    assert len(preds) == 6 and {"prompt", "reference", "prediction", "bleu-4", "rouge-1", "rouge-2", "rouge-l"} <= set(preds[0])
    assert preds[0]["reference"] == "The capital of France is Paris."

    # the loss equals transformers' own masked loss on the same example
    from engine.data.encode import encode_sft
    from engine.data.templates import get_template
    from engine.jobs.evaluate import load_eval_examples, loss_and_ppl
    from engine.run.checkpoint import load_tokenizer_for

    tok = load_tokenizer_for(adapter)
    tok.padding_side = "right"
    conv = load_eval_examples(cfg)[:1]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), str(adapter)).eval()
    enc = encode_sft({"messages": conv[0]}, get_template("auto", tok), tok, 1024)[0]
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss.item()
    assert loss_and_ppl(model, tok, get_template("auto", tok), conv, cfg, lambda n: None)["loss"] == pytest.approx(ref, rel=1e-5)


def test_bad_inputs_are_reported_before_work(tiny_model, default_model, adapter, tmp_path):
    cfg = _cfg(tiny_model, adapter, tmp_path)
    cfg.model.checkpoints = [str(tmp_path / "missing")]
    assert any("checkpoint not found" in m for _, m in check_eval(cfg))

    cfg = _cfg(tiny_model, adapter, tmp_path)
    cfg.model.base = str(default_model)
    assert any(f == "model.base" and "does not match the base model" in m for f, m in check_eval(cfg))

    cfg = _cfg(tiny_model, adapter, tmp_path)
    cfg.data.datasets = ["text_demo"]
    assert any("without reference answers" in m for _, m in check_eval(cfg))

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a"], "answer": "A"}\n')
    cfg = _cfg(tiny_model, adapter, tmp_path)
    cfg.benchmark.file = str(bad)
    assert any(f == "benchmark.file" and "line 1: 1 choices" in m for f, m in check_eval(cfg))


def test_eval_job_through_the_launcher(tiny_model, adapter, tmp_path):
    cfg = _cfg(tiny_model, adapter, tmp_path, generation=False, choice=False)
    job_dir = launch.start(cfg)
    status = launch.wait(job_dir, timeout=240)
    assert status.state == "completed", (status, rundir.log_tail(job_dir))
    rows = jobs.read_result(job_dir)["rows"]
    assert [r["model"].startswith("base") for r in rows] == [True, False]
    assert status.step == status.total_steps == 12
