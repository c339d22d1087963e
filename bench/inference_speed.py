"""Time to first token and streamed tokens/s of engine.serve.inference against plain transformers generate.

    .venv/bin/python bench/inference_speed.py [--model models/SmolLM2-135M-Instruct] [--tokens 64] [--repeats 3]

Prints one line per measurement (median of the repeats). Greedy decoding, so both sides produce the
same tokens; plain generate's TTFT is a generate call with max_new_tokens=1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.serve.inference import ChatModel
from engine.run.config import DEFAULT_MODEL
from engine.serve.sampling import SamplingParams

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a map."}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, model {args.model}, {args.tokens} new tokens, median of {args.repeats}")

    chat = ChatModel.load(args.model)
    params = SamplingParams(temperature=0, max_new_tokens=args.tokens)
    chat.generate(PROMPT, params)  # warm up
    ttft, rate, n = [], [], 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        stream = chat.stream(PROMPT, params)
        first = None
        for _piece in stream:
            first = first or time.perf_counter()
        end = time.perf_counter()
        n = stream.result.completion_tokens
        ttft.append(first - t0)
        rate.append(n / (end - t0))
    print(f"engine stream : TTFT {statistics.median(ttft) * 1000:7.1f} ms (first text piece), {statistics.median(rate):6.1f} tok/s ({n} tokens)")
    t0 = time.perf_counter()
    whole = chat.generate(PROMPT, params)
    print(f"engine whole  : {whole.completion_tokens / (time.perf_counter() - t0):6.1f} tok/s")

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4)
        first, rate = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=1)
            first.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
            rate.append((out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0))
    print(f"plain generate: TTFT {statistics.median(first) * 1000:7.1f} ms (1-token generate), {statistics.median(rate):6.1f} tok/s")


if __name__ == "__main__":
    main()
