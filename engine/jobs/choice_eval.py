"""Multiple-choice benchmarks (MMLU / C-Eval style) from local JSONL files, scored by choice log-likelihood.

The file format is documented in data/benchmarks/README.md. ``read_benchmark`` checks every line
and reports all problems with their line numbers before any model loads.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

LETTERS = string.ascii_uppercase


class BenchmarkError(ValueError):
    """A benchmark file in the wrong format; the message names the file and line."""


@dataclass
class Question:
    question: str
    choices: list[str]
    answer: int
    subject: str = ""


def _parse(record, line: int) -> Question | str:
    if not isinstance(record, dict):
        return f"line {line}: expected a JSON object, got {type(record).__name__}"
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        return f"line {line}: 'question' is missing or empty"
    if "choices" in record:
        choices = record["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, (str, int, float)) for c in choices):
            return f"line {line}: 'choices' must be a list of answers"
    else:
        choices = [record[k] for k in LETTERS if k in record]
        if not choices:
            return f"line {line}: no choices: give 'choices': [...] or the columns A, B, C, D"
    choices = [str(c) for c in choices]
    if not 2 <= len(choices) <= 26:
        return f"line {line}: {len(choices)} choices; a question needs 2 to 26"
    answer = str(record.get("answer", "")).strip().upper()
    if len(answer) != 1 or answer not in LETTERS[: len(choices)]:
        return f"line {line}: 'answer' must be one letter of {LETTERS[0]}-{LETTERS[len(choices) - 1]}, not {record.get('answer')!r}"
    return Question(question.strip(), choices, LETTERS.index(answer), str(record.get("subject", "")))


def read_benchmark(path: str | Path, max_samples: int | None = None) -> list[Question]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    questions, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                parsed = _parse(json.loads(raw), n)
            except ValueError as err:
                parsed = f"line {n}: not valid JSON ({err})"
            if isinstance(parsed, str):
                problems.append(parsed)
            else:
                questions.append(parsed)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise BenchmarkError(f"{path}: " + "; ".join(problems[:5]) + more + " — see data/benchmarks/README.md for the format")
    if not questions:
        raise BenchmarkError(f"{path}: the benchmark holds no questions")
    return questions[:max_samples] if max_samples else questions


def render(q: Question) -> str:
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    return "\n".join(lines) + "\nAnswer with the letter of the correct choice.\nAnswer:"


def score(model, tokenizer, template, questions: list[Question], progress=None) -> dict:
    """Accuracy (0-100), per subject, and each question's predicted letter."""
    import torch

    letter_ids = [tokenizer.encode(LETTERS[i], add_special_tokens=False)[0] for i in range(26)]
    correct, per_subject, picks = 0, {}, []
    for q in questions:
        prompt = template.render_generation_prompt([{"role": "user", "content": render(q)}])
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
        scores = [logp[letter_ids[i]].item() for i in range(len(q.choices))]
        pick = max(range(len(scores)), key=scores.__getitem__)
        ok = pick == q.answer
        correct += ok
        s = per_subject.setdefault(q.subject or "all", [0, 0])
        s[0] += ok
        s[1] += 1
        picks.append(LETTERS[pick])
        if progress:
            progress()
    return {"accuracy": 100 * correct / len(questions), "questions": len(questions),
            "by_subject": {k: 100 * c / n for k, (c, n) in sorted(per_subject.items())}, "picks": picks}
