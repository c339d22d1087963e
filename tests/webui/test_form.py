"""The form is derived from RunConfig, and config -> widgets -> config is the identity."""

from __future__ import annotations

import pytest

from engine.run.config import ConfigError, RunConfig
from webui import form, i18n
from webui.runs import Device

CPU = [Device("cpu", "CPU")]
GPUS = [Device("0", "GPU 0"), Device("1", "GPU 1"), Device("2", "GPU 2")]


def _changed_config() -> RunConfig:
    """A config where every form field differs from its default."""
    return RunConfig.model_validate({
        "model": {"path": "/models/x", "template": "chatml", "dtype": "bfloat16", "quantization": "nf4",
                  "double_quant": False, "trust_remote_code": True,
                  "extend_vocab": "/vocab.txt", "rope_scaling": "yarn", "rope_factor": 4.0},
        "method": {"stage": "sft", "finetuning_type": "qlora", "freeze_trainable_layers": 5, "lora_rank": 32,
                   "lora_alpha": 64, "lora_dropout": 0.05, "lora_target": "q_proj,v_proj", "modules_to_save": "lm_head",
                   "beta": 0.3, "dpo_loss": "ipo", "sft_weight": 0.5,
                   "desirable_weight": 1.5, "undesirable_weight": 0.75, "reward_model": "/runs/rm/final",
                   "num_generations": 8, "max_new_tokens": 32, "kl_beta": 0.1,
                   "use_dora": True, "use_rslora": True, "init_lora_weights": "olora", "loraplus_lr_ratio": 16.0},
        "data": {"datasets": ["identity", "instruct_demo"], "registry": "/r/reg.yaml", "cutoff_len": 333,
                 "max_samples": 77, "val_size": 0.1, "multiturn_loss": "split",
                 "mix": "interleave", "mix_probabilities": [0.75, 0.25], "mix_stopping": "all_exhausted"},
        "training": {"num_train_epochs": 1.5, "max_steps": 30, "per_device_train_batch_size": 8,
                     "gradient_accumulation_steps": 3, "learning_rate": 2.5e-5, "lr_scheduler_type": "linear",
                     "warmup_ratio": 0.25, "weight_decay": 0.01, "max_grad_norm": 0.5, "optim": "sgd",
                     "precision": "fp32", "gradient_checkpointing": True, "memory_gb": 3.5, "batch_by": "tokens", "seed": 7, "logging_steps": 2,
                     "save_steps": 9, "eval_steps": 4, "save_total_limit": 2, "neftune_noise_alpha": 5.0,
                     "report_to": ["tensorboard", "mlflow"]},
        "distributed": {"devices": "0,2", "num_processes": 2, "zero_stage": 2, "offload": True,
                        "master_port": 29555, "nodes": [{"host": "node-a", "slots": 2}, {"host": "node-b", "slots": 1}],
                        "include": "node-a:0", "launcher": "no_ssh", "master_addr": "10.0.0.1", "timeout": 120},
        "output": {"run_dir": "/tmp/somewhere"},
    })


def _hostfile_config() -> RunConfig:
    """Several machines from a hostfile: the node table shows the file's nodes, so the config has no nodes of its own
    (a config with both is refused by the checks, and the page cannot make one)."""
    cfg = _changed_config()
    cfg.distributed.nodes = []
    cfg.distributed.hostfile = "/etc/hosts.ds"
    cfg.distributed.include = "node-a:0@node-b"
    return cfg


def test_every_field_is_placed_exactly_once():
    placed = []
    for tab in form.LAYOUT["tabs"].values():
        placed += tab.get("basic", []) + tab.get("advanced", [])
        for keys in tab.get("groups", {}).values():
            placed += keys
    assert sorted(placed) == sorted(form.form_keys())
    assert len(placed) == len(set(placed))
    # resume_from: the Resume button; include: the node table's "use" column
    assert set(form.all_keys()) - set(form.form_keys()) == {"training.resume_from", "distributed.include"}


def test_changed_config_differs_in_every_form_field():
    a, b, h = (form.to_values(c, GPUS) for c in (RunConfig(), _changed_config(), _hostfile_config()))
    same = [k for k in form.form_keys() if a[k] == b[k] and a[k] == h[k] and k != "method.stage"]  # sft: the default
    assert same == []


def test_stage_fields_show_only_for_their_stages():
    assert form.visible_for("method.beta", "dpo") and not form.visible_for("method.beta", "sft")
    assert form.visible_for("method.reward_model", "rl") and not form.visible_for("method.reward_model", "dpo")
    assert form.visible_for("training.learning_rate", "rm")
    stage_only = {k for k in form.form_keys() if form.stages_of(k)}
    assert stage_only and stage_only <= set(form.LAYOUT["tabs"]["hparams"]["groups"]["stage"])


@pytest.mark.parametrize("devices", [CPU, GPUS])
def test_round_trip_of_values(devices):
    for cfg in (RunConfig(), form.load_defaults(), _changed_config(), _hostfile_config()):
        if devices is CPU:
            cfg = cfg.model_copy(deep=True)
            cfg.distributed.devices = ""
        assert form.from_values(form.to_values(cfg, devices), devices) == cfg


@pytest.mark.parametrize("make", [_changed_config, _hostfile_config])
def test_round_trip_through_real_widgets(make):
    """Build the widgets with the values, let gradio serialise them as the page would, and read them back."""
    import gradio as gr

    from webui.context import Context
    from webui.runs import RunManager

    class _Manager(RunManager):
        def __init__(self):
            self.devices = GPUS
            self.workspace = None

    cfg = make()
    ctx = Context(manager=_Manager(), defaults=cfg)
    with gr.Blocks():
        for key in form.form_keys():
            choices = None
            if key == "model.template":
                choices = ["auto", "chatml"]
            elif key in ("model.path", "data.datasets"):
                choices = []
            form.build(ctx, key, choices=choices)
    values = {}
    for key, widget in ctx.fields.items():
        payload = widget.postprocess(widget.value)
        if isinstance(widget, gr.Dataframe):  # the table's payload goes through JSON as its data model
            payload = type(payload).model_validate_json(payload.model_dump_json())
        else:
            payload = payload.model_dump() if hasattr(payload, "model_dump") else payload
        values[key] = widget.preprocess(payload)
    assert form.from_values(values, GPUS) == cfg


def test_widgets_follow_types_bounds_and_defaults():
    assert form.spec("model.double_quant").kind == "checkbox"
    assert form.spec("method.finetuning_type").kind == "radio"
    assert form.spec("method.finetuning_type").choices == ("full", "freeze", "lora", "qlora")
    assert form.spec("training.optim").kind == "dropdown"
    rank = form.spec("method.lora_rank")
    assert (rank.kind, rank.minimum, rank.maximum, rank.default) == ("slider", 1, 1024, 8)
    dropout = form.spec("method.lora_dropout")  # lt=1.0 -> the slider stops one step short of 1
    assert dropout.kind == "slider" and dropout.maximum == pytest.approx(0.99)
    cutoff = form.spec("data.cutoff_len")  # too wide a range for a slider
    assert (cutoff.kind, cutoff.minimum, cutoff.maximum, cutoff.integer) == ("number", 8, 1_048_576, True)
    assert form.spec("data.max_samples").optional and form.spec("data.max_samples").kind == "number"
    assert form.spec("distributed.devices").kind == "devices"
    assert form.spec("data.datasets").kind == "multiselect"


def test_ui_defaults_are_a_valid_config_with_cpu_friendly_values():
    from engine.run.config import DEFAULT_MODEL

    cfg = form.load_defaults()
    assert cfg.model.path == DEFAULT_MODEL and DEFAULT_MODEL.endswith("models/SmolLM2-135M-Instruct")
    assert cfg.data.datasets == ["identity"]
    assert cfg.method.finetuning_type == "lora"
    assert (cfg.data.cutoff_len, cfg.training.per_device_train_batch_size, cfg.training.gradient_accumulation_steps,
            cfg.training.logging_steps) == (512, 4, 1, 1)
    assert cfg.training.seed == RunConfig().training.seed  # everything else is the config's own default


def test_bad_values_name_every_field_at_once():
    values = form.to_values(RunConfig(), CPU)
    values["training.per_device_train_batch_size"] = None  # a cleared number box
    values["data.cutoff_len"] = 4  # below ge=8
    with pytest.raises(ConfigError) as err:
        form.from_values(values, CPU)
    fields = {f for f, _ in err.value.problems}
    assert fields == {"training.per_device_train_batch_size", "data.cutoff_len"}


def test_device_checkboxes():
    assert form.devices_value("", GPUS) == ["0", "1", "2"]
    assert form.devices_value("0,2", GPUS) == ["0", "2"]
    assert form.devices_config(["2", "0"], GPUS) == "0,2"
    assert form.devices_config(["0", "1", "2"], GPUS) == ""  # all of them: the config's "every visible GPU"
    assert form.devices_value("", CPU) == ["cpu"] and form.devices_config(["cpu"], CPU) == ""


def test_chinese_covers_every_english_text_and_every_field():
    en, zh = i18n.table("en"), i18n.table("zh")
    assert i18n.flat_keys(en) - i18n.flat_keys(zh) == set()
    for key in form.all_keys():
        assert i18n.field_label("zh", key) != i18n.field_label("en", key) or key.startswith("method.lora")
        assert zh["fields"][key]["info"], key
        assert en["fields"][key]["label"], key
    assert i18n.field_info("en", "method.lora_rank") == "LoRA rank r."  # English help is the schema's description
    assert i18n.t("zh", "train.started", run="r1") == "已开始运行 r1。"
    assert i18n.choice_label("zh", "distributed.zero_stage", 0) == "0（关闭）"
    assert "node-a:0,1@node-b:0" in i18n.field_info("zh", "distributed.include")
    from webui.tabs import evaluate, export

    for rows in (evaluate.ROWS, (*export.ROWS, export.HUB)):  # the job forms' help, from their schemas in English
        for label, _ in (field for row in rows for field in row.values()):
            assert i18n.job_help("zh", label, "") and i18n.job_help("en", label, "english") == "english", label


def test_no_locale_text_is_cut_at_a_comma():
    """A comma in an unquoted value of a YAML flow mapping ({label: ..., info: ...}) ends the value there and
    makes the rest a key of its own with no text."""
    for lang in ("en", "zh"):
        table = i18n.table(lang)
        for key, entry in table["fields"].items():
            assert set(entry) <= {"label", "info"}, (lang, key, entry)

        def leaves(d):
            for v in d.values():
                yield from leaves(v) if isinstance(v, dict) else [v]

        assert all(isinstance(v, str) and v for v in leaves(table)), lang


def test_an_empty_optional_number_shown_as_zero_means_none():
    values = form.to_values(RunConfig(), CPU)
    values.update({"training.eval_steps": 0, "training.save_total_limit": 0, "distributed.master_port": 0,
                   "data.max_samples": 0})
    cfg = form.from_values(values, CPU)
    assert (cfg.training.eval_steps, cfg.training.save_total_limit, cfg.distributed.master_port,
            cfg.data.max_samples) == (None, None, None, None)
    values["training.max_steps"] = 0  # not optional: 0 is passed on as is (and -1 means 'use epochs')
    assert form.from_values(values, CPU).training.max_steps == 0


def _job_ctx(workspace):
    from webui.context import Context
    from webui.runs import RunManager

    class _Manager(RunManager):
        def __init__(self):
            self.devices = CPU
            self.workspace = workspace

    return Context(manager=_Manager(), defaults=RunConfig())


def test_job_forms_come_from_their_schemas(tmp_path):
    """Evaluate, Export and the chat settings take widgets, bounds, defaults and help from their schemas, and
    their values become a job config through the same coercion as the run form."""
    import gradio as gr

    from engine.run.jobconfig import EvalConfig, ExportConfig
    from engine.serve.sampling import SamplingParams
    from webui.tabs import chat, evaluate, export

    ctx = _job_ctx(tmp_path)
    with gr.Blocks():
        specs = {}
        for row in evaluate.ROWS:
            specs |= form.build_schema_fields(ctx, EvalConfig, row, "ev:")
        ex_specs = {}
        for row in (*export.ROWS, export.HUB):
            ex_specs |= form.build_schema_fields(ctx, ExportConfig, row, "ex:")
    new = ctx.shared["ev:generation.max_new_tokens"]
    assert (new.minimum, new.maximum, new.value) == (1, 8192, 64)  # ge, le and default of EvalGeneration
    assert new.info == form.schema_field(EvalConfig, "generation.max_new_tokens").description
    assert ctx.shared["ex:output.dtype"].value == ExportConfig().output.dtype
    assert type(ctx.shared["ex:output.gguf"]).__name__ == "CheckboxGroup"
    assert ctx.shared["ex:hub.token"].type == "password"

    values = {k: ctx.shared["ev:" + k].value for k in evaluate.KEYS}
    values |= {"data.max_samples": 0, "generation.batch_size": 4.0, "benchmark.file": " b.jsonl "}
    cfg = form.config_of(EvalConfig, specs, values, {"tasks": {"choice": True}})
    assert (cfg.data.max_samples, cfg.generation.batch_size, cfg.benchmark.file, cfg.tasks.choice) == (None, 4, "b.jsonl", True)
    with pytest.raises(ConfigError) as err:
        form.config_of(EvalConfig, specs, values | {"generation.max_new_tokens": 0})
    assert [f for f, _ in err.value.problems] == ["generation.max_new_tokens"]
    ex = form.config_of(ExportConfig, ex_specs, {k: ctx.shared["ex:" + k].value for k in export.KEYS}
                        | {"output.gguf": ["f16"], "model.checkpoint": "/c"})
    assert ex.output.gguf == ["f16"] and ex.model.checkpoint == "/c"

    # chat and eval sample with the same bounds, declared once in SamplingParams
    for name in ("temperature", "top_p"):
        assert form.schema_field(EvalConfig, f"generation.{name}").metadata == SamplingParams.model_fields[name].metadata
    temp = form.derive(SamplingParams, "temperature", chat.SLIDERS["temperature"])
    assert (temp.kind, temp.minimum, temp.maximum, temp.default) == ("slider", 0.0, 2.0, 0.7)


def test_evaluate_lists_the_workspace_datasets(tmp_path):
    from engine.data.registry import append_entry, workspace_registry
    from webui.tabs import evaluate

    assert "instruct_demo" in evaluate.datasets(tmp_path)  # no workspace registry yet: the project's
    data = tmp_path / "datasets" / "mine.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text('{"instruction": "hi", "output": "hello"}\n')
    append_entry(workspace_registry(tmp_path), "my_qa", data, "alpaca", "sft")
    names = evaluate.datasets(tmp_path)
    assert "my_qa" in names and "instruct_demo" in names
    assert evaluate.registry(tmp_path) == workspace_registry(tmp_path)
