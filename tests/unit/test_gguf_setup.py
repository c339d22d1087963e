"""`workbench gguf-setup` unpacks from llama-cpp-python's source distribution exactly what the GGUF export and its
tests use: the converter, its package, gguf-py, the licence, and llama.cpp's Qwen2 and Llama/Mistral SentencePiece
test vocabularies (with their reference texts and ids); nothing else of llama.cpp's sources."""

from __future__ import annotations

import io
import tarfile

from engine.jobs.gguf import TEST_VOCABS, converter_dir, setup_converter, tokenizer_test_vocab


def test_gguf_setup_unpacks_the_converter_and_the_test_vocabularies(tmp_path, monkeypatch):
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    names = ["convert_hf_to_gguf.py", "conversion/llama.py", "gguf-py/gguf/__init__.py", "LICENSE",
             "models/ggml-vocab-qwen2.gguf", "models/ggml-vocab-qwen2.gguf.inp", "models/ggml-vocab-qwen2.gguf.out",
             "models/ggml-vocab-llama-spm.gguf", "models/ggml-vocab-llama-spm.gguf.out",
             "models/ggml-vocab-bert-bge.gguf", "models/templates/x.jinja", "src/llama-vocab.cpp", "README.md"]
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(prefix + name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    monkeypatch.setenv("WORKBENCH_LLAMA_CPP_DIR", str(tmp_path / "llama.cpp"))
    assert tokenizer_test_vocab("qwen2") is None
    dest = setup_converter(sdist, version="0.3.36")
    assert dest == converter_dir() == tmp_path / "llama.cpp"
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted(n for n in names[:9])
    assert TEST_VOCABS == ("qwen2", "llama-spm")
    assert tokenizer_test_vocab("qwen2").read_text() == "models/ggml-vocab-qwen2.gguf" and tokenizer_test_vocab("llama-spm").is_file()
