# Two entry points (see README): `make demo` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Without CUDA: the CPU torch build on local disk and the GPU machine's Triton (docs/design.md §8).
# numpy<2.4: the Triton 3.6 interpreter breaks on runtime-bound K-loops under numpy 2.4.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
TORCH_PINS := torch triton
else
TORCH_PINS := torch==2.13.0 triton==3.6.0
endif

.PHONY: venv demo test test-all lint wheel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS) "numpy<2.4"
	$(BIN)/pip install -q -e ".[dev,plot,triton]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/laser-triton demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check laser_triton kernels tests perf

clean:
	rm -rf $(VENV) build dist *.egg-info out
