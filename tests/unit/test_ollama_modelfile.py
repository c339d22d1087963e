"""Ollama Modelfiles: the Go-template subset renderer, and each family's template rendering like its Jinja one."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.jobs.gotemplate import TemplateError, render
from engine.jobs.ollama import (SAMPLE_CONVERSATIONS, match_template, ollama_name, ollama_templates, read_modelfile,
                                render_ollama, write_modelfile)


def test_go_template_subset():
    msgs = [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "U"}, {"Role": "assistant", "Content": "A"}]
    t = ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
         '<{{ .Role }}>{{ .Content }}{{ if $last }}.{{ else if eq .Role "system" "user" }}|{{ else }}?{{ end }}\n'
         '{{- end }}')
    assert render(t, {"Messages": msgs}) == "<system>S|<user>U|<assistant>A."
    assert render("a {{- /* note */ -}}\n b{{ if and .X (not .Y) }}x{{ else }}y{{ end }}", {"X": "1", "Y": []}) == "abx"
    assert render("{{ range .L }}{{ . }},{{ else }}none{{ end }}", {"L": []}) == "none"
    assert render("{{ $n := 1 }}{{ if .F }}{{ $n = 2 }}{{ end }}{{ $n }} {{ index .L 1 }}", {"F": True, "L": [5, 6]}) == "2 6"
    for bad, why in (("{{ with .X }}{{ end }}", "not supported"), ("{{ if .X }}", "no {{ end }}"),
                     ("{{ printf .X }}", "'printf' is not supported"), ("{{ end }}", "without")):
        with pytest.raises(TemplateError, match=why):
            render(bad, {"X": 1})


def test_every_template_of_the_data_file_parses_and_names_its_stops():
    for name, entry in ollama_templates().items():
        text = render_ollama(entry["template"], SAMPLE_CONVERSATIONS[3])
        assert "Hello! 42" in text and "你好" in text, name
        assert entry["stop"], name


@pytest.mark.parametrize("family,expected,system", [
    ("llama", "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    ("qwen2", "chatml", "You are a helpful assistant."), ("mistral", "mistral", ""), ("gemma", "gemma", "")])
def test_each_family_template_renders_like_its_jinja_template(family, expected, system, tmp_path_factory):
    from families import family_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(family_model(tmp_path_factory, family))
    strip_bos = family in ("mistral", "gemma")  # llama.cpp adds their BOS itself (tokenizer.ggml.add_bos_token)
    name, default_system, entry = match_template(tok, strip_bos)
    assert (name, default_system) == (expected, system)
    for conv in SAMPLE_CONVERSATIONS:
        hf = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        hf = hf[len(tok.bos_token):] if strip_bos else hf
        assert render_ollama(entry["template"], conv, default_system) == hf, conv


def test_modelfile_of_a_template_no_ollama_format_matches(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tmp_path / "My Model_v2"
    shutil.copytree(tiny_model, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "do_sample": True,
                                                                  "temperature": 0.7, "top_p": 0.9}))
    gguf = model_dir / "gguf" / "My Model_v2-q6_k.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"")
    info = write_modelfile(gguf, model_dir, tok, add_bos=False)
    mf = read_modelfile(gguf.with_suffix(".Modelfile"))
    assert info["template"] is None and "TEMPLATE" not in mf and "SYSTEM" not in mf
    assert mf["FROM"] == ["./My Model_v2-q6_k.gguf"]
    assert mf["PARAMETER"] == ['stop "<|im_end|>"', 'stop "<|endoftext|>"', "temperature 0.7", "top_p 0.9", "num_ctx 2048"]
    assert info["command"] == f"ollama create my-model_v2:q6_k -f {gguf.with_suffix('.Modelfile')}"
    assert ollama_name("Ünïcode Name!", "q8_0") == "n-code-name:q8_0"
