# batchcls — every entry point a user or CI needs. Variables can be overridden: make train DATA=/path/to/images
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/simpsons/train
IMAGES ?= samples/simpsons
OUT ?= labels.csv
MODEL ?= engines/simpsons

.PHONY: install install-dev run test bench train train-smoke engine

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python  ## runtime only: ONNX Runtime on CPU, no torch
	$(BIN)/pip install -q -e .

install-dev: $(BIN)/python  ## everything: training stack, Ray, test tools
	$(BIN)/pip install -q -e '.[train,ray,dev]'

run: install  ## classify the committed sample folder with the shipped model
	$(BIN)/batchcls run $(IMAGES) --out $(OUT) --overwrite

test: install-dev
	$(BIN)/python -m pytest -q

bench: install-dev
	$(BIN)/python scripts/bench_run.py
	$(BIN)/python scripts/bench_ray.py
