"""A tiny run on tool-calling data (the glaive_toolcall layout), then the trained checkpoint answers with tools."""

from __future__ import annotations

import math
from pathlib import Path

from engine.run import rundir
from engine.serve.inference import ChatModel
from engine.serve.sampling import SamplingParams
from test_train import _cfg, _run

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "data" / "toolcall_demo.jsonl"


def test_lora_sft_on_tool_calls_then_chat_with_tools(tiny_model, tmp_path):
    run_dir = _run(_cfg(tiny_model, tmp_path / "run", model={"path": str(tiny_model), "template": "qwen"},
                        data={"datasets": [str(DEMO)], "cutoff_len": 512},
                        training={"max_steps": 4, "save_steps": 4, "per_device_train_batch_size": 2}))
    losses = [r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    chat = ChatModel.load(str(run_dir / "final"))
    assert chat.template.name == "qwen"  # the run's template, saved with the checkpoint
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                               "parameters": {"type": "object", "properties": {}}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    assert chat.tokenizer.decode(chat.check(ask, tools)).count("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"") == 1
    result = chat.generate(ask, SamplingParams(temperature=0, max_new_tokens=8), tools=tools)
    assert result.completion_tokens > 0 and isinstance(chat.tool_calls(result)[1], list)
