"""Generate Workbench's demo datasets from the hand-written tables in demo_source.yaml.

    python data/make_demo.py        # rewrites the files below, byte for byte the same each time

identity.json (alpaca), instruct_demo.jsonl (alpaca), multiturn_demo.json (sharegpt),
preference_demo.json (prompt/chosen/rejected), kto_demo.jsonl (prompt/completion/label),
text_demo.jsonl ({"text"}). Every answer is either hand-written or computed, so it is correct.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SRC = yaml.safe_load((HERE / "demo_source.yaml").read_text(encoding="utf-8"))


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def num(x: float) -> str:
    """A number with at most two decimals and no trailing zeros."""
    text = f"{x:,.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def alpaca(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def identity() -> list[dict]:
    ident = SRC["identity"]
    rows = [alpaca(q, ident["answers"][kind]) for kind, qs in ident["questions"].items() for q in qs]
    rows += [
        alpaca("Answer the following question about yourself.", ident["answers"]["name"], "What's your name?"),
        alpaca("Answer the user's question.", ident["answers"]["maker"], "Who is the developer behind you?"),
        alpaca("回答下面这个关于你自己的问题。", ident["answers"]["name_zh"], "你叫什么名字？"),
    ]
    return rows


def arithmetic(rng: random.Random, zh: bool = False) -> tuple[str, str, int]:
    op = rng.choice("+-×÷")
    if op == "÷":
        b = rng.randint(2, 12)
        c = rng.randint(2, 25)
        a, result = b * c, c
    else:
        a, b = rng.randint(10, 99), rng.randint(2, 99 if op != "×" else 20)
        result = {"+": a + b, "-": a - b, "×": a * b}[op]
    question = f"计算 {a} {op} {b}。" if zh else rng.choice(["What is {}?", "Calculate {}.", "Compute {}."]).format(f"{a} {op} {b}")
    return question, f"{a} {op} {b} = {result}" + ("。" if zh else "."), result


CONVERSIONS = [  # from, to, factor or function, range
    ("kilometers", "miles", lambda v: v / 1.609344, (1, 200)),
    ("miles", "kilometers", lambda v: v * 1.609344, (1, 150)),
    ("kilograms", "pounds", lambda v: v / 0.45359237, (1, 120)),
    ("pounds", "kilograms", lambda v: v * 0.45359237, (1, 250)),
    ("degrees Celsius", "degrees Fahrenheit", lambda v: v * 9 / 5 + 32, (-20, 40)),
    ("degrees Fahrenheit", "degrees Celsius", lambda v: (v - 32) * 5 / 9, (0, 110)),
    ("inches", "centimeters", lambda v: v * 2.54, (1, 100)),
    ("centimeters", "inches", lambda v: v / 2.54, (1, 250)),
    ("hours", "minutes", lambda v: v * 60, (1, 48)),
    ("meters", "centimeters", lambda v: v * 100, (1, 90)),
]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Practice makes progress",
    "Small steps every day add up to big results",
    "Reading books opens new worlds",
    "The library closes at nine tonight",
    "Fresh bread smells wonderful in the morning",
]


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def instruct() -> list[dict]:
    rng = random.Random(1234)
    rows = []
    for country, capital, continent, c_zh, cap_zh, cont_zh in SRC["capitals"]:
        q = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"])
        rows.append(alpaca(q.format(country), f"The capital of {country} is {capital}."))
        rows.append(alpaca(f"Which continent is {country} in?", f"{cap(country)} is in {continent}."))
        rows.append(alpaca(f"{c_zh}的首都是哪里？", f"{c_zh}的首都是{cap_zh}。"))
    for zh, n in ((False, 30), (True, 15)):
        for _ in range(n):
            question, answer, _ = arithmetic(rng, zh)
            rows.append(alpaca(question, answer))
    for _ in range(10):
        p, n = rng.choice([5, 10, 15, 20, 25, 50, 75]), 20 * rng.randint(1, 25)
        rows.append(alpaca(f"What is {p}% of {n}?", f"{p}% of {n} is {num(p * n / 100)}."))
    for i in range(25):
        src, dst, fn, (lo, hi) = CONVERSIONS[i % len(CONVERSIONS)]
        v = rng.choice([x for x in range(lo, hi + 1) if abs(x) != 1])  # no "1 miles"
        exact = abs(fn(v) - round(fn(v))) < 1e-9
        rows.append(alpaca(f"Convert {v} {src} to {dst}.",
                           f"{v} {src} is {'' if exact else 'about '}{num(fn(v))} {dst}."))
    for _ in range(8):
        nums = rng.sample(range(1, 100), rng.randint(4, 7))
        rows.append(alpaca("Sort the following numbers in ascending order.", ", ".join(map(str, sorted(nums))),
                           ", ".join(map(str, nums))))
    for _ in range(5):
        nums = rng.sample(range(1, 500), 5)
        rows.append(alpaca("Which is the largest number in this list?", f"The largest number is {max(nums)}.",
                           ", ".join(map(str, nums))))
    for s in SENTENCES:
        rows.append(alpaca("Count the words in the following sentence.", f"The sentence has {len(s.split())} words.", s))
        rows.append(alpaca("Rewrite the following sentence in uppercase.", s.upper() + ".", s + "."))
        rows.append(alpaca("Reverse the order of the words in this sentence.", " ".join(reversed(s.split())), s))
    for n in rng.sample(range(2, 120), 10):
        verdict = "Yes, {} is a prime number." if is_prime(n) else "No, {} is not a prime number" + (
            f"; it is divisible by {min(d for d in range(2, n) if n % d == 0)}." if n > 3 else ".")
        rows.append(alpaca(f"Is {n} a prime number?", verdict.format(n)))
    for n in rng.sample(range(1, 1000), 5):
        rows.append(alpaca(f"Is {n} even or odd?", f"{n} is {'even' if n % 2 == 0 else 'odd'}."))
    for term, text in SRC["definitions"]:
        rows.append(alpaca(rng.choice(["What is {}?", "Define {}.", "Explain what {} is."]).format(term), text))
    for term, text in SRC["definitions_zh"]:
        rows.append(alpaca(f"什么是{term}？", text))
    rows += [alpaca(q, a) for q, a in SRC["howto"] + SRC["howto_zh"]]
    for name, symbol, z, _ in SRC["elements"]:
        rows.append(alpaca(f"What is the chemical symbol for {name.lower()}?", f"The chemical symbol for {name.lower()} is {symbol}."))
        rows.append(alpaca(f"What is the atomic number of {name.lower()}?", f"{name} has atomic number {z}."))
    rows += [alpaca(f"Tell me about the planet {name}.", text) for name, text in SRC["planets"]]
    return rows


def multiturn() -> list[dict]:
    rng = random.Random(99)
    ident = SRC["identity"]["answers"]

    def conv(*turns, system: str = "") -> dict:
        roles = ["human", "gpt"]
        out = {"conversations": [{"from": roles[i % 2], "value": t} for i, t in enumerate(turns)]}
        return {**out, "system": system} if system else out

    rows = [conv(*chat) for chat in SRC["chats"]]
    for country, capital, continent, *_ in rng.sample(SRC["capitals"], 10):
        rows.append(conv(f"What is the capital of {country}?", f"The capital of {country} is {capital}.",
                         "Which continent is it in?", f"{cap(country)} is in {continent}.",
                         system="You are a concise geography tutor." if len(rows) % 2 else ""))
    for _ in range(8):
        a, b, d = rng.randint(3, 19), rng.randint(3, 12), rng.randint(5, 60)
        rows.append(conv(f"What is {a} × {b}?", f"{a} × {b} = {a * b}.", f"Now add {d} to that.",
                         f"{a * b} + {d} = {a * b + d}."))
    rows.append(conv("hi", ident["greeting"], "Who made you?", ident["maker"]))
    rows.append(conv("Hello! What's your name?", ident["name"], "What can you do?", ident["abilities"]))
    rows.append(conv("你好", ident["greeting_zh"], "你是谁开发的？", ident["maker_zh"]))
    for _, _, _, c_zh, cap_zh, cont_zh in rng.sample(SRC["capitals"], 4):
        rows.append(conv(f"{c_zh}的首都是哪里？", f"{c_zh}的首都是{cap_zh}。", "它在哪个大洲？", f"{c_zh}位于{cont_zh}。"))
    return rows


def wrong_capital(i: int, country: str) -> str:
    caps = SRC["capitals"]
    return SRC["capital_distractors"].get(country) or caps[(i + 7) % len(caps)][1]


def preference() -> list[dict]:
    rng = random.Random(7)
    ident = SRC["identity"]["answers"]
    rows = []
    for i, (country, capital, *_) in enumerate(SRC["capitals"]):
        rows.append({"prompt": f"What is the capital of {country}?", "chosen": f"The capital of {country} is {capital}.",
                     "rejected": f"The capital of {country} is {wrong_capital(i, country)}."})
    for _ in range(20):
        question, answer, result = arithmetic(rng)
        wrong = result + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append({"prompt": question, "chosen": answer, "rejected": f"The answer is {wrong}."})
    qs = SRC["identity"]["questions"]
    for kind in ("intro", "name", "maker", "intro_zh", "maker_zh"):
        for q in qs[kind][:2]:
            rejected = "我不方便透露。" if kind.endswith("_zh") else "I'd rather not say."
            rows.append({"prompt": q, "chosen": ident[kind],
                         "rejected": rejected})
    for q, a in SRC["howto"]:
        rows.append({"prompt": q, "chosen": a, "rejected": "Just look it up online."})
    defs = SRC["definitions"]
    for i, (term, text) in enumerate(defs[:10]):
        rows.append({"prompt": f"What is {term}?", "chosen": text, "rejected": defs[(i + 10) % len(defs)][1]})
    return rows


def kto() -> list[dict]:
    rng = random.Random(11)
    ident = SRC["identity"]["answers"]
    rows = []
    for i, (country, capital, *_) in enumerate(SRC["capitals"][:20]):
        good = i % 2 == 0
        rows.append({"prompt": f"What is the capital of {country}?",
                     "completion": f"The capital of {country} is {capital if good else wrong_capital(i, country)}.",
                     "label": good})
    for i in range(20):
        question, answer, result = arithmetic(rng)
        good = i % 2 == 0
        rows.append({"prompt": question, "completion": answer if good else f"The answer is {result + rng.choice([-3, 1, 7])}.",
                     "label": good})
    for i, q in enumerate(SRC["identity"]["questions"]["intro"][:10]):
        good = i % 2 == 0
        rows.append({"prompt": q, "completion": ident["intro"] if good else "I'd rather not say.", "label": good})
    defs = SRC["definitions"]
    for i, (term, text) in enumerate(defs[:10]):
        good = i % 2 == 0
        rows.append({"prompt": f"What is {term}?", "completion": text if good else defs[(i + 10) % len(defs)][1],
                     "label": good})
    return rows


def text() -> list[dict]:
    paras = [f"{n} (symbol {s}) is the chemical element with atomic number {z}. {t}" for n, s, z, t in SRC["elements"]]
    paras += [t for _, t in SRC["planets"]]
    paras += [f"The {u} (symbol {s}) is the SI base unit of {q}. {t}" for u, s, q, t in SRC["si_units"]]
    paras += SRC["science_paragraphs"]
    by_continent: dict[str, list[str]] = {}
    for country, capital, continent, *_ in SRC["capitals"]:
        by_continent.setdefault(continent, []).append(f"{capital} is the capital of {country}.")
    paras += [f"Some countries of {c} and their capitals: " + " ".join(s) for c, s in by_continent.items()]
    paras += [f"{cap_zh}是{c_zh}的首都，{c_zh}位于{cont_zh}。" for _, _, _, c_zh, cap_zh, cont_zh in SRC["capitals"]]
    return [{"text": p} for p in paras]


def write_json(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_jsonl(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    write_json("identity.json", identity())
    write_jsonl("instruct_demo.jsonl", instruct())
    write_json("multiturn_demo.json", multiturn())
    write_json("preference_demo.json", preference())
    write_jsonl("kto_demo.jsonl", kto())
    write_jsonl("text_demo.jsonl", text())


if __name__ == "__main__":
    main()
