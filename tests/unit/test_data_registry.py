"""Dataset registry: the shipped file, and each malformed entry's message with its line."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.data import DataError, DatasetSpec, load_registry, resolve_dataset
from engine.data.registry import RegistryError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "data" / "dataset_info.yaml"
EXPECTED = {"identity": ("alpaca", "sft"), "instruct_demo": ("alpaca", "sft"), "multiturn_demo": ("sharegpt", "sft"),
            "preference_demo": ("preference", "preference"), "kto_demo": ("kto", "kto"), "text_demo": ("text", "pretrain")}


def test_shipped_registry():
    registry = load_registry(SHIPPED)
    assert {name: (s.format, s.kind) for name, s in registry.items()} == EXPECTED
    for spec in registry.values():
        assert spec.path.is_file() and spec.description


def registry_file(tmp_path, text, data=("a.json",)):
    for name in data:
        (tmp_path / name).write_text('[{"instruction": "q", "output": "a"}]', encoding="utf-8")
    path = tmp_path / "reg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_entry_fields_and_defaults(tmp_path):
    path = registry_file(tmp_path, "mine:\n  file: a.json\n  columns: {instruction: question}\n")
    assert load_registry(path) == {"mine": DatasetSpec("mine", tmp_path / "a.json", "alpaca", "sft",
                                                       {"instruction": "question"}, "")}


def test_invalid_yaml_names_the_line(tmp_path):
    path = registry_file(tmp_path, "ok:\n  file: a.json\nbad:\n  file: a.json\n   format: alpaca\n")
    with pytest.raises(DataError) as err:
        load_registry(path)
    assert err.value.line == 5
    assert str(err.value) == f"{path}, line 5: invalid YAML (mapping values are not allowed here)"


@pytest.mark.parametrize("entry,line,message", [
    ("x:\n  file: a.json\n  fromat: alpaca\n", 3, "entry 'x': unknown key 'fromat' (allowed: file, format, columns, kind, sample_by, description)"),
    ("x:\n  file: a.json\n  sample_by: line\n", 3, "entry 'x': sample_by applies to .txt files only, and 'a.json' is not one"),
    ("x:\n  format: alpaca\n", 2, "entry 'x': key 'file' is missing"),
    ("x:\n  file: missing.json\n", 2, "entry 'x': file '{dir}/missing.json' does not exist"),
    ("x:\n  file: a.json\n  format: alpacca\n", 3, "entry 'x': unknown format 'alpacca' (one of auto, alpaca, sharegpt, "),
    ("x:\n  file: a.json\n  format: alpaca\n  kind: preference\n", 4,
     "entry 'x': kind 'preference' does not fit (format 'alpaca' holds sft data)"),
    ("x:\n  file: a.json\n  columns: {question: q}\n", 3, "entry 'x': unknown canonical field 'question' in columns"),
    ("x: a.json\n", 1, "entry 'x' must be a mapping with file, format, kind and description"),
    ("- a.json\n", 1, "the registry must map dataset names to entries"),
])
def test_malformed_entries(tmp_path, entry, line, message):
    path = registry_file(tmp_path, entry)
    with pytest.raises(DataError) as err:
        load_registry(path)
    assert err.value.line == line
    assert str(err.value).startswith(f"{path}, line {line}: " + message.format(dir=tmp_path))


def test_every_problem_is_reported_at_once(tmp_path):
    path = registry_file(tmp_path, "a:\n  file: a.json\nb:\n  file: nope.json\nc:\n  file: a.json\n  size: 3\n")
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert [(p.line, p.field) for p in err.value.problems] == [(4, "file"), (7, "size")]
    assert str(err.value).startswith(f"{path}: 2 problems: line 4: entry 'b': file ")
    assert list(err.value.specs) == ["a"]
    assert resolve_dataset("a", path).format == "alpaca"  # the good entries stay usable
    with pytest.raises(RegistryError):
        resolve_dataset("b", path)


def test_auto_format_is_detected(tmp_path):
    path = registry_file(tmp_path, "x:\n  file: a.json\n  format: auto\n")
    assert load_registry(path)["x"].format == "alpaca"


def test_resolve_by_name_by_path_and_unknown(tmp_path):
    spec = resolve_dataset("identity", SHIPPED)
    assert spec.path == ROOT / "data" / "identity.json"
    (tmp_path / "d.jsonl").write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    by_path = resolve_dataset(str(tmp_path / "d.jsonl"), SHIPPED)
    assert (by_path.format, by_path.kind, by_path.columns) == ("preference", "preference", {})
    with pytest.raises(DataError) as err:
        resolve_dataset("identiy", SHIPPED)
    assert str(err.value) == (f"{SHIPPED}: unknown dataset 'identiy': not a registered name (known: identity, "
                              "instruct_demo, multiturn_demo, preference_demo, kto_demo, text_demo) and not a data file")


def test_resolve_reports_a_broken_registry(tmp_path):
    path = registry_file(tmp_path, "x:\n  file: nope.json\n")
    with pytest.raises(DataError, match="entry 'x': file .* does not exist"):
        resolve_dataset("x", path)


def test_include_layers_a_registry_over_another(tmp_path):
    (tmp_path / "ws").mkdir()
    path = registry_file(tmp_path / "ws", f"include: {SHIPPED}\nmine:\n  file: a.json\n")
    registry = load_registry(path)
    assert list(registry) == [*EXPECTED, "mine"]
    assert registry["identity"].registry == SHIPPED and registry["mine"].registry == path
    assert resolve_dataset("identity", path).path == ROOT / "data" / "identity.json"
    assert resolve_dataset("mine", path).path == tmp_path / "ws" / "a.json"


def test_include_problems_name_their_own_file(tmp_path):
    registry_file(tmp_path, "")
    (tmp_path / "base.yaml").write_text("x:\n  file: nope.json\n", encoding="utf-8")
    top = tmp_path / "top.yaml"
    top.write_text("include: [base.yaml, top.yaml]\nidentity:\n  file: a.json\nx2:\n  file: a.json\n", encoding="utf-8")
    with pytest.raises(RegistryError) as err:
        load_registry(top)
    assert [(p.file, p.line) for p in err.value.problems] == [(str(tmp_path / "base.yaml"), 2), (str(top), 1)]
    assert "makes a cycle" in err.value.problems[1].message
    assert str(err.value).startswith(f"{top}: 2 problems: {tmp_path / 'base.yaml'}, line 2: entry 'x': file ")
    assert list(err.value.specs) == ["identity", "x2"]


def test_a_name_registered_in_an_included_registry_and_here(tmp_path):
    path = registry_file(tmp_path, f"include: {SHIPPED}\nidentity:\n  file: a.json\n")
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert str(err.value) == f"{path}, line 2: dataset 'identity' is registered twice (also in {SHIPPED})"


def test_a_save_to_disk_directory_is_a_dataset_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(tmp_path / "corpus")
    path = registry_file(tmp_path, "corpus:\n  file: corpus\n")
    assert (load_registry(path)["corpus"].format, resolve_dataset(str(tmp_path / "corpus"), path).kind) == ("text", "pretrain")


def test_check_name_and_append_entry(tmp_path):
    from engine.data.registry import append_entry, check_name, workspace_registry

    registry = workspace_registry(tmp_path / "ws")
    for bad in ("", "a/b", "has space", "include", "-x"):
        with pytest.raises(DataError, match="cannot name a dataset"):
            check_name(bad, registry)
    check_name("fine", registry)  # no registry yet: any good name is free
    registry.parent.mkdir(parents=True)
    (registry.parent / "qa.csv").write_text("question,answer\nq,a\n", encoding="utf-8")
    spec = append_entry(registry, "qa", registry.parent / "qa.csv", "alpaca", "sft",
                        {"instruction": "question", "output": "answer"}, "Q & A: \"quoted\"")
    assert spec == DatasetSpec("qa", registry.parent / "qa.csv", "alpaca", "sft",
                               {"instruction": "question", "output": "answer"}, 'Q & A: "quoted"')
    assert "file: qa.csv\n" in registry.read_text(encoding="utf-8")  # relative: the workspace can move
    elsewhere = registry_file(tmp_path, "")
    append_entry(registry, "other", tmp_path / "a.json", "alpaca", "sft")
    assert load_registry(registry)["other"].path == tmp_path / "a.json" and elsewhere.exists()
    assert list(load_registry(registry)) == [*EXPECTED, "qa", "other"]
    with pytest.raises(DataError) as err:
        check_name("identity", registry)
    assert str(err.value) == f"a dataset named 'identity' is already registered in {SHIPPED}; choose another name"
    with pytest.raises(DataError, match=f"'qa' is already registered in {registry}"):
        check_name("qa", registry)
