"""The LoRA-variant, rope, tracker-free and mixing fields: one sentence for each setting that cannot train."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.run import checks
from engine.run.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]


def _problems(tiny_model, **sections) -> dict[str, str]:
    data = {"model": {"path": str(tiny_model)},
            "data": {"datasets": ["identity"], "registry": str(ROOT / "data" / "dataset_info.yaml")}}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return dict(checks.check(RunConfig.model_validate(data)))


@pytest.mark.parametrize("sections, field, start", [
    ({"data": {"datasets": ["identity", "instruct_demo"], "mix": "interleave", "mix_probabilities": [0.5, 0.4]}},
     "data.mix_probabilities", "the probabilities 0.5, 0.4 sum to 0.9, not 1"),
    ({"data": {"datasets": ["identity", "instruct_demo"], "mix_probabilities": [0.5, 0.5]}},
     "data.mix_probabilities", "probabilities only apply to data.mix interleave"),
    ({"data": {"datasets": ["identity"], "mix": "interleave", "mix_probabilities": [0.5, 0.5]}},
     "data.mix_probabilities", "2 probabilities for 1 datasets"),
    ({"model": {"rope_scaling": "linear", "rope_factor": 0.5}}, "model.rope_factor", "a rope factor of 0.5 would shrink"),
    ({"model": {"quantization": "nf4"}, "method": {"finetuning_type": "qlora", "init_lora_weights": "pissa"}},
     "method.init_lora_weights", "PiSSA starts from an SVD of the full-precision weights"),
    ({"method": {"finetuning_type": "full", "loraplus_lr_ratio": 16}}, "method.loraplus_lr_ratio",
     "LoRA+ sets the learning rates of LoRA adapters"),
])
def test_setting_that_cannot_train_is_refused_in_one_sentence(tiny_model, sections, field, start):
    problems = _problems(tiny_model, **sections)
    assert problems.get(field, "").startswith(start), problems


def test_dora_on_quantized_weights_follows_the_installed_peft(tiny_model, monkeypatch):
    sections = dict(model={"quantization": "nf4"}, method={"finetuning_type": "qlora", "use_dora": True})
    assert "method.use_dora" not in _problems(tiny_model, **sections)  # peft 0.21 wraps bnb layers with DoRA
    monkeypatch.setattr(checks, "_peft_version", lambda: (0, 9))
    assert _problems(tiny_model, **sections)["method.use_dora"].startswith(
        "DoRA on nf4-quantized weights needs peft >= 0.10 (installed: 0.9)")


def test_good_settings_pass_and_cutoff_past_the_context_warns(tiny_model):
    ok = _problems(tiny_model, data={"datasets": ["identity", "instruct_demo"], "mix": "interleave",
                                     "mix_probabilities": [0.7, 0.3]},
                   method={"use_dora": True, "use_rslora": True, "init_lora_weights": "olora", "loraplus_lr_ratio": 16},
                   model={"rope_scaling": "yarn", "rope_factor": 2.0}, training={"neftune_noise_alpha": 5})
    assert ok == {}
    cfg = RunConfig.model_validate({"model": {"path": str(tiny_model)}, "data": {"cutoff_len": 5000}})
    assert checks.rope_warning(cfg).startswith("data.cutoff_len=5000 is beyond the 2048-token context")
    assert "rope_factor 3" in checks.rope_warning(cfg)
    assert checks.rope_warning(cfg.model_copy(update={"model": cfg.model.model_copy(update={"rope_scaling": "linear"})})) is None
