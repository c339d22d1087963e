"""Side-by-side chat in the worker, one pairing after another on tiny checkpoints: an adapter against its own base
(adapter switched off), two adapters of one run on one base (named peft adapters, switched per answer), the same
model twice (no second copy), and a full checkpoint against its base (a second model, its cost planned before it
loads and given back when the comparison ends); both answers are written at the same time, each exactly as its side
answers alone with the same seed, and Stop stops both."""

from __future__ import annotations

import threading

import pytest

from chat_fixtures import make_full_run, make_lora_run
from engine.run.checkpoint import CheckpointError, origin_of, resolve
from engine.serve.compare import BASE_OF_LEFT, plan
from engine.serve.concurrent import merge
from engine.serve.inference import ChatModel
from engine.serve.sampling import InferenceError, SamplingParams, param_count, resolve_target
from engine.serve.worker import InferenceWorker, WorkerError

ASK = [{"role": "user", "content": "Who are you?"}]
SEEDED = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, max_new_tokens=24, seed=7)


def interleaved(pieces: list[tuple[str, str]]) -> bool:
    """Every side's first piece came before any side's last one (the answers were written at the same time)."""
    order = [side for side, _ in pieces]
    sides = set(order)
    first = max(order.index(s) for s in sides)
    last = min(len(order) - 1 - order[::-1].index(s) for s in sides)
    return len(sides) > 1 and first < last


def texts(pieces: list[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for side, piece in pieces:
        out[side] = out.get(side, "") + piece
    return out


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    make_lora_run(tiny_model, root, step=3, seed=3)
    lora = make_lora_run(tiny_model, root, step=5, seed=5)
    return lora, make_full_run(tiny_model, root)


def test_plans_before_any_weights_load(tiny_model, runs, tmp_path):
    lora, full = runs
    a5, a3, tiny = resolve_target(str(lora / "checkpoint-5")), str(lora / "checkpoint-3"), str(tiny_model)
    assert plan(a5, BASE_OF_LEFT).kind == "base" and plan(a5, BASE_OF_LEFT).bytes == 0
    assert plan(a5, tiny).kind == "base"  # the base typed as a path is the same as "base of left"
    assert plan(a5, str(lora / "checkpoint-5")).kind == "same"
    two = plan(a5, a3)
    assert two.kind == "adapter" and 0 < two.bytes < 2**20 and two.name == "20250101-000000-sft-lora/checkpoint-3"
    ckpt = resolve_target(str(full / "checkpoint-4"))
    both = plan(ckpt, BASE_OF_LEFT, on_gpu=False)
    from transformers import AutoModelForCausalLM

    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert both.kind == "model" and both.params == params and both.bytes == params * 4  # float32 on the CPU
    assert plan(ckpt, BASE_OF_LEFT, on_gpu=True).bytes == params * 2  # bfloat16 on a GPU
    assert plan(ckpt, BASE_OF_LEFT, quantization="nf4").bytes < params
    assert param_count(tiny_model) == params
    with pytest.raises(InferenceError, match="is a base model"):
        plan(resolve_target(tiny), BASE_OF_LEFT)
    # an export names its base in its model card
    export = tmp_path / "export"
    export.mkdir()
    for f in tiny_model.iterdir():
        (export / f.name).symlink_to(f)
    (export / "README.md").write_text(f"---\nbase_model: {tiny_model}\n---\n# export\n")
    assert origin_of(resolve(export)) == tiny_model.resolve()
    (export / "README.md").write_text("---\nbase_model: SomeOrg/not-here\n---\n")
    with pytest.raises(CheckpointError, match="its model card's base_model.* SomeOrg/not-here, which is not a model"):
        origin_of(resolve(export))


class Endless:
    """A stream that writes until it is cancelled (or fails after its first piece); it gives up after ~10 s, so a
    merge that never cancels it fails the test instead of hanging it."""

    def __init__(self, fail: bool = False):
        self.cancelled, self.fail = threading.Event(), fail

    def __iter__(self):
        yield "x"
        if self.fail:
            raise RuntimeError("out of memory on this side")
        for _ in range(2000):
            if self.cancelled.wait(0.005):
                return
            yield "y"

    def cancel(self):
        self.cancelled.set()


def test_merge_stops_every_stream_and_raises_a_failure():
    streams = {"left": Endless(), "right": Endless()}
    asked = iter(range(1000))
    pieces = list(merge(streams, lambda: next(asked) == 5, poll=0.01))  # a stop on the 5th look
    assert {s for s, _ in pieces} == {"left", "right"} and all(s.cancelled.is_set() for s in streams.values())
    streams = {"left": Endless(), "right": Endless(fail=True)}
    with pytest.raises(RuntimeError, match="out of memory on this side"):
        list(merge(streams, lambda: False))
    assert streams["left"].cancelled.is_set()  # one side failing ends the other


@pytest.mark.slow  # two loads, seven answers of 24 tokens: ~20 s on 2 busy cores
def test_answers_at_once_on_one_base_repeat_each_answer_alone(runs):
    """Three answers at once on one tiny base (adapter 5, adapter 3, the base with adapters off): they take turns per
    token, each with its own adapters and its own seeded generator, and give exactly the tokens each gives alone."""
    import torch

    lora, _ = runs
    left = ChatModel.load(str(lora / "checkpoint-5"))
    right = ChatModel.from_target(resolve_target(str(lora / "checkpoint-3")), share=left, prefix="r")
    try:
        assert right.weights is left.weights
        alone = {"a5": left.generate(ASK, SEEDED), "a3": right.generate(ASK, SEEDED),
                 "base": left.generate(ASK, SEEDED, use_adapter=False)}
        assert len({tuple(r.token_ids) for r in alone.values()}) == 3
        torch.manual_seed(123)  # torch's global generator plays no part
        streams = {"a5": left.stream(ASK, SEEDED), "a3": right.stream(ASK, SEEDED),
                   "base": left.stream(ASK, SEEDED, use_adapter=False)}
        pieces = list(merge(streams, lambda: False))
        assert interleaved(pieces)
        for name, stream in streams.items():
            assert stream.result.token_ids == alone[name].token_ids and texts(pieces)[name] == alone[name].text
        other = left.generate(ASK, SEEDED.model_copy(update={"seed": 8}))
        assert other.token_ids != alone["a5"].token_ids  # the seed does decide the answer
    finally:
        right.unload()
        left.unload()


@pytest.mark.slow  # one worker process, six small loads: ~60 s on 2 busy cores
def test_every_pairing_in_the_worker(tiny_model, runs):
    lora, full = runs
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    worker = InferenceWorker()
    try:
        with pytest.raises(WorkerError, match="load a model on the left first"):
            worker.compare(BASE_OF_LEFT)

        def alone(use_adapter=True):  # (greedy answer, seeded answer) of the loaded model chatted alone
            return tuple("".join(worker.chat(ASK, p, use_adapter=use_adapter)) for p in (greedy, SEEDED))

        worker.load(str(lora / "checkpoint-3"))
        alone3 = alone()
        worker.load(str(lora / "checkpoint-5"))
        alone5 = alone()
        base = alone(use_adapter=False)  # the plain base answers the same (checked below)
        assert len({alone3, base, alone5}) == 3
        with pytest.raises(WorkerError, match="press Load right"):
            list(worker.compare_chat(ASK, greedy))

        def both():
            """Each side's (greedy, seeded) answer side by side; the seeded pieces of the two sides come interleaved."""
            got = texts(list(worker.compare_chat(ASK, greedy)))
            pieces = list(worker.compare_chat(ASK, SEEDED))
            assert interleaved(pieces)
            seeded = texts(pieces)
            return (got["left"], seeded["left"]), (got["right"], seeded["right"])

        rss = worker.rss()
        info = worker.compare(BASE_OF_LEFT)  # adapter against its own base: the adapter is switched off
        assert info["kind"] == "base" and info["shared"] and info["estimate"] == 0
        assert both() == (alone5, base)
        info = worker.compare(str(lora / "checkpoint-3"))  # two adapters of one run: one base, named adapters
        assert info["kind"] == "adapter" and info["shared"] and info["adapters"] == [str(lora / "checkpoint-3")]
        assert both() == (alone5, alone3)
        assert worker.rss() < rss + 40 * 2**20  # no second base (the tiny base alone is ~13 MB in float32)
        info = worker.compare(str(lora / "checkpoint-5"))
        assert info["kind"] == "same" and both() == (alone5, alone5)
        assert worker.uncompare() is not None and worker.right is None
        assert alone() == alone5  # the left adapter is untouched by all of this

        # a full checkpoint against its base: a second model in the worker, the two generating on two threads
        worker.load(str(full / "checkpoint-4"))
        tuned = alone()
        planned = worker.plan(BASE_OF_LEFT)
        assert planned.kind == "model" and planned.bytes == param_count(tiny_model) * 4
        info = worker.compare(BASE_OF_LEFT)
        assert info["kind"] == "model" and not info["shared"] and info["base"] == str(tiny_model.resolve())
        assert info["estimate"] == planned.bytes
        assert both() == (tuned, base) and tuned != base  # the base as a model of its own answers as with the adapter off

        # Stop stops both, mid-answer
        stream = worker.compare_chat(ASK, SamplingParams(temperature=0, max_new_tokens=400))
        started = set()
        for side, _ in stream:
            started.add(side)
            if started == {"left", "right"}:
                break
        worker.stop()
        list(stream)
        for side in ("left", "right"):
            assert worker.results[side].finish_reason == "cancelled"
            assert 0 < worker.results[side].completion_tokens < 400
        assert "".join(worker.chat(ASK, greedy)) == tuned[0]  # still serving
    finally:
        worker.unload()


@pytest.mark.slow  # loads the 135M default model: ~30 s on 2 busy cores
def test_switching_off_gives_the_second_model_back(tiny_model, default_model):
    """A 135M-parameter model on the right costs ~540 MB in float32 (its weights are paged in from the mapped file
    as it answers); switching the comparison off gives them back to the system."""
    worker = InferenceWorker()
    try:
        worker.load(str(tiny_model))
        assert worker.plan(str(default_model)).bytes > 500 * 2**20
        before = worker.rss()
        assert worker.compare(str(default_model))["kind"] == "model"
        list(worker.compare_chat(ASK, SamplingParams(temperature=0, max_new_tokens=2)))
        answered = worker.rss()
        assert answered - before > 400 * 2**20
        after = worker.uncompare()
        assert answered - after["rss"] > 400 * 2**20
        assert "".join(worker.chat(ASK, SamplingParams(temperature=0, max_new_tokens=2)))  # the left one still answers
    finally:
        worker.unload()
