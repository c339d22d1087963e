"""The stage table (engine/run/stages.py) is the one home of a stage: every row has its builder, its locale
strings, an example config, and everything derived from the table agrees with it."""

from __future__ import annotations

import typing
from pathlib import Path

import yaml

from engine.run import stages
from engine.run.config import MethodConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]
LOCALES = ROOT / "webui" / "locales"


def test_every_row_has_a_builder_locale_strings_and_an_example():
    from engine.train.stages import STAGES as BUILDERS

    examples = {}
    for path in sorted((ROOT / "configs" / "examples").glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if "method" in data:
            examples.setdefault((data["method"] or {}).get("stage", "sft"), path.name)
    tables = {lang: yaml.safe_load((LOCALES / f"{lang}.yaml").read_text(encoding="utf-8")) for lang in ("en", "zh")}
    missing = []
    for row in stages.ROWS:
        if row.name not in BUILDERS:
            missing.append(f"{row.name}: no trainer builder in engine/train/stages.py STAGES")
        for lang, table in tables.items():
            if not (table.get("stages") or {}).get(row.name):
                missing.append(f"{row.name}: no stages.{row.name} in webui/locales/{lang}.yaml")
        if row.name not in examples:
            missing.append(f"{row.name}: no example config in configs/examples/ with method.stage {row.name}")
        if not row.description or not row.kind:
            missing.append(f"{row.name}: no description or data kind")
    assert missing == []
    assert set(BUILDERS) == set(stages.STAGES)  # no builder without a row


def test_derived_facts_follow_the_table():
    from webui import form
    from webui.plots import stage_panels

    assert typing.get_args(MethodConfig.model_fields["stage"].annotation) == stages.STAGE_NAMES
    keys = set(form.all_keys())
    for row in stages.ROWS:
        assert set(row.fields) <= {k for k in keys if k.startswith("method.")}, row.name
        assert stage_panels(row.name) == [list(p) for p in row.metrics]
        for key in row.fields:
            assert form.visible_for(key, row.name)
    assert form.LAYOUT["tabs"]["hparams"]["groups"]["stage"] == stages.stage_fields()
    assert {k for k in keys if form.stages_of(k)} == set(stages.stage_fields())


def test_stage_checks_come_from_the_row():
    from engine.run.checks import check

    cfg = RunConfig()
    cfg.method.stage = "kto"
    cfg.training.per_device_train_batch_size = 1
    assert any(f == "training.per_device_train_batch_size" and "kto" in m for f, m in check(cfg))
    assert stages.stage_problems(cfg) == stages.STAGES["kto"].checks(cfg) != []
    cfg.method.stage = "sft"
    assert stages.stage_problems(cfg) == []


def test_checks_and_data_tabs_do_not_import_the_trainer_builders():
    import ast

    for rel in ("engine/run/checks.py", "engine/run/stages.py", "engine/run/config.py", "webui/tabs/data.py",
                "webui/tabs/data_add.py"):
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not {m for m in imported if m and (m.startswith(("torch", "trl")) or m == "engine.train.stages")}, rel


def test_a_token_budget_fills_the_batches_of_packed_stages_only():
    def cfg(stage, batch_by):
        return RunConfig.model_validate({"model": {"path": "m"}, "method": {"stage": stage},
                                         "data": {"datasets": ["d"], "cutoff_len": 512},
                                         "training": {"per_device_train_batch_size": 4, "batch_by": batch_by}})

    from engine.train.stages import describe_batch, token_budget

    assert {row.name for row in stages.ROWS if row.packed} == {"sft", "pt"}
    assert stages.batch_fill(cfg("sft", "tokens")) == ("tokens", 2048) and token_budget(cfg("pt", "tokens")) == 2048
    assert describe_batch(cfg("sft", "tokens")) == "≤ 2,048 tokens"
    for stage, batch_by in (("sft", "examples"), ("dpo", "tokens"), ("kto", "examples")):
        assert stages.batch_fill(cfg(stage, batch_by)) == ("examples", 4) and token_budget(cfg(stage, batch_by)) is None
        assert describe_batch(cfg(stage, batch_by)) == "4 examples"
