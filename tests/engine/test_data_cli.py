"""`workbench data inspect|add`: what they print and their exit codes (0 valid, 1 invalid data, 2 bad arguments)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.cli import main
from engine.data import load_registry

ROOT = Path(__file__).resolve().parents[2]
WORKBENCH = ROOT / ".venv" / "bin" / "workbench"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def qa_csv(tmp_path) -> Path:
    path = tmp_path / "qa.csv"
    rows = ["question,answer"] + [f"Question {i}?,{'answer ' * (i * 10)}" for i in range(1, 9)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_inspect_prints_format_counts_percentiles_and_truncation(capsys, qa_csv, default_model, tokenizer):
    from engine.data.encode import encode_sft
    from engine.data.templates import get_template

    template = get_template("auto", tokenizer)
    full = [len(encode_sft({"messages": [{"role": "user", "content": f"Question {i}?"},
                                         {"role": "assistant", "content": "answer " * (i * 10)}]},
                           template, tokenizer, 10**6)[0]["input_ids"]) for i in range(1, 9)]
    code, out, err = run(capsys, "data", "inspect", str(qa_csv), "--columns", "instruction=question,output=answer",
                         "--model", str(default_model), "--cutoff-len", "64")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == [f"source: {qa_csv}", "format: alpaca (detected), kind sft, columns instruction=question, "
                         "output=answer", "records: 8 read, 8 usable, 0 unusable"]
    assert lines[3] == f"tokens ({default_model}, template auto; all 8 usable records):"
    assert lines[4].split() == ["p50", "p90", "p99", "max"]
    assert [line.split()[0] for line in lines[5:8]] == ["prompt", "response", "total"]
    response = [int(x.replace(",", "")) for x in lines[6].split()[1:]]
    assert response == sorted(response) and response[-1] > 80  # 80 words of answer, and more
    assert int(lines[7].split()[-1]) == max(full)
    truncated = sum(n > 64 for n in full)
    assert 0 < truncated < 8
    assert lines[8] == (f"cutoff_len 64: {truncated} truncated ({100 * truncated / 8:.1f}%), 0 lose their whole answer "
                        "(dropped in training)")
    assert lines[-1] == "result: OK"


def test_inspect_exits_1_on_invalid_data_and_names_each_line(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Q", "output": "A"}\n{"instruction": "Q"\n{"instruction": "Q", "output": ""}\n',
                    encoding="utf-8")
    code, out, _ = run(capsys, "data", "inspect", str(path))
    assert code == 1
    assert "records: 3 read, 1 usable, 2 unusable" in out
    assert f"  {path}, line 2: invalid JSON (Expecting ',' delimiter at column 20)" in out
    assert f"  {path}, line 3: field 'output' is empty" in out
    assert out.splitlines()[-1] == "result: INVALID"
    code, out, _ = run(capsys, "data", "inspect", str(path), "--max-records", "1")
    assert code == 0 and "note: only the first 1 records were checked; the rest were not read" in out
    empty = tmp_path / "e.csv"
    empty.write_text("", encoding="utf-8")
    code, out, _ = run(capsys, "data", "inspect", str(empty))
    assert code == 1 and f"  {empty}: file is empty" in out


def test_bad_arguments_exit_2(capsys, qa_csv, tmp_path):
    code, _, err = run(capsys, "data", "inspect", str(qa_csv), "--columns", "question")
    assert code == 2 and "--columns takes field=column pairs" in err
    code, _, err = run(capsys, "data", "inspect", str(qa_csv), "--columns", "query=question")
    assert code == 2 and "--columns: unknown field 'query'" in err
    code, _, err = run(capsys, "data", "inspect", str(qa_csv), "--model", str(tmp_path))
    assert code == 2 and "no tokenizer here" in err
    with pytest.raises(SystemExit) as exit_:
        main(["data", "inspect", str(qa_csv), "--format", "alpacca"])
    assert exit_.value.code == 2


def test_add_registers_in_the_workspace_and_refuses_a_taken_name(capsys, qa_csv, tmp_path):
    ws = tmp_path / "ws"
    code, out, err = run(capsys, "data", "add", str(qa_csv), "--name", "my_qa", "--workspace", str(ws),
                         "--columns", "instruction=question,output=answer", "--copy", "--description", "mine")
    assert code == 0, err
    registry = ws / "datasets" / "dataset_info.yaml"
    spec = load_registry(registry)["my_qa"]
    assert (spec.path, spec.format, spec.kind, spec.description) == (ws / "datasets" / "my_qa.csv", "alpaca", "sft", "mine")
    assert out.splitlines()[-1] == f"train on it: workbench train CONFIG data.registry={registry} data.datasets=[my_qa]"
    code, _, err = run(capsys, "data", "add", str(qa_csv), "--name", "identity", "--workspace", str(ws))
    assert code == 1 and "a dataset named 'identity' is already registered in" in err
    code, _, err = run(capsys, "data", "add", str(qa_csv), "--name", "plain", "--workspace", str(ws))
    assert code == 1 and "cannot tell the format from the keys (answer, question)" in err


def test_add_into_a_new_workspace_refuses_a_name_of_an_included_registry(capsys, qa_csv, tmp_path):
    ws = tmp_path / "fresh"  # no registry yet: the one `data add` would create includes the project's
    code, _, err = run(capsys, "data", "add", str(qa_csv), "--name", "identity", "--workspace", str(ws),
                       "--columns", "instruction=question,output=answer")
    assert code == 1 and "a dataset named 'identity' is already registered in" in err and "data/dataset_info.yaml" in err
    assert not (ws / "datasets" / "dataset_info.yaml").exists()


def test_the_installed_command(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a document"}) + "\n", encoding="utf-8")
    done = subprocess.run([str(WORKBENCH), "data", "inspect", str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "format: text (detected), kind pretrain" in done.stdout
