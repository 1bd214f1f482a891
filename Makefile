# batchcls — every entry point a user or CI needs. Variables can be overridden: make train DATA=/path/to/images
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= ../shared/data/simpsons/train
IMAGES ?= samples/simpsons
OUT ?= labels.csv
MODEL ?= engines/simpsons

.PHONY: install install-dev run test lint bench train train-more train-long train-smoke bench-train audit engine soak train-shipped

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The editable install follows code changes by itself; pip only needs to run again when pyproject.toml (the
# dependencies, the entry points) changes, so the install is a file the recipe touches, newer than both.
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

install: $(VENV)/.installed  ## runtime only: ONNX Runtime on CPU, no torch

install-dev: $(BIN)/python  ## everything: training stack, Ray, test tools
	$(BIN)/pip install -q -e '.[train,ray,dev]'

run: $(VENV)/.installed  ## classify the committed sample folder with the shipped model
	$(BIN)/batchcls run $(IMAGES) --out $(OUT) --overwrite

test: install-dev lint  ## lint, then the test suite (what CI runs)
	$(BIN)/python -m pytest -q

lint: install-dev  ## ruff (rules and import order in pyproject.toml)
	$(BIN)/ruff check .

bench: install-dev
	$(BIN)/python scripts/bench_run.py
	$(BIN)/python scripts/bench_ray.py
	$(BIN)/python scripts/bench_watch.py
	$(BIN)/python scripts/bench_engines.py

# Fault injection against real runs: kill -9 at random moments, torn last rows, a full tmpfs, second writers,
# hostile trees and names, tampered bundles, rows pointing outside --images. Prints how many faults were
# survived with nothing lost (every file exactly once, parsed by csv, pandas and read_rows); fails if any was not.
soak: install-dev  ## inject faults into real runs and report how many were survived with nothing lost; SOAK_ARGS="--rounds 50 --seed 7"
	$(BIN)/python scripts/soak.py $(SOAK_ARGS)

engine: install-dev  ## fastest engine this machine allows, beside $(MODEL)'s card: TensorRT plan on an NVIDIA GPU, else CPU optimized + INT8 (kept only if macro-F1 holds); more flags via ENGINE_ARGS="--val-dir DIR"
	@if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q -e '.[tensorrt]' || echo "tensorrt is not installable here: the build falls back to CPU engines"; fi
	$(BIN)/batchcls engine build --model $(MODEL) $(ENGINE_ARGS)

# --- training (train/): `make train DATA=folder` builds a new bundle engines/<name> for any image folder ---
# The recipe itself lives in train/ (TrainConfig's defaults + RECIPES) or a jobs/*.json file, never here.
# NAME: the bundle's name (default: the data folder's); EXPORT: its folder (default engines/<name>), never
# replaced without OVERWRITE=1; EXTRA: corrected `batchcls review` folders, added to train only; BUDGET: minutes.
train: MODELS ?= efficientnet_lite0
train: PRETRAINED ?= offline
train: BUDGET ?= 20
train:  ## a bundle for DATA (a folder of <class>/<image>): split -> probe -> fine-tune -> serving -> export -> open-set decision -> results page
	@test "$(origin DATA)" != file || { echo "make train needs DATA=<a folder of class folders>: make train DATA=~/pictures/birds makes engines/birds" >&2; exit 2; }
	BATCHCLS_TRAIN_COMMAND='make train DATA=$(DATA)$(if $(NAME), NAME=$(NAME))$(if $(EXTRA), EXTRA=$(EXTRA)) MODELS="$(MODELS)" PRETRAINED=$(PRETRAINED) BUDGET=$(BUDGET)' \
	$(BIN)/python -m train --data $(DATA) --models "$(MODELS)" --pretrained $(PRETRAINED) --budget-min $(BUDGET) \
	  $(if $(NAME),--name $(NAME)) $(if $(EXPORT),--export $(EXPORT)) $(if $(EXTRA),--extra $(EXTRA)) \
	  $(if $(RUN),--out $(RUN)) $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite-bundle)

# A second stage for CPUs that fit only ~6 epochs in the budget: the same split, the Lite0 checkpoint of a
# Simpsons run (FROM, backbone and head) trained on with a fresh one-cycle (jobs/train-more.json), evaluated once
# on test, calibrated and exported to $(OUT)/export (copy it over engines/simpsons if it beats it). No search:
# lr 1e-3 is fixed, a third of the first stage's peak.
train-more: OUT = runs/train-more
train-more: FROM ?= runs/train/simpsons
train-more: EXPORT ?= $(OUT)/export
train-more:  ## continue a Simpsons run's Lite0 for jobs/train-more.json's epochs, then evaluate + calibrate + export
	mkdir -p $(OUT) && cp -n $(FROM)/split.json $(OUT)/split.json
	BATCHCLS_TRAIN_COMMAND='make train-more DATA=$(DATA) FROM=$(FROM) OUT=$(OUT) EXPORT=$(EXPORT)' \
	$(BIN)/python -m train --data $(DATA) --name simpsons --models efficientnet_lite0 --pretrained $(FROM)/efficientnet_lite0/ckpt_best.pt \
	  --no-search --config jobs/train-more.json --out $(OUT) --export $(EXPORT) --budget-min 0 $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite-bundle)

# Unattended, ~2.5 h on 2 cores (jobs/train-long.json: 20 epochs at 128 px, a fresh one-cycle to lr 1e-3, EMA,
# selection on val NLL; no early stop: a restarted one-cycle gets worse before it gets better): Lite0 trained on
# from a bundle's weights (FROM, head included) on the same seeded split. Rerun the
# same command after an interruption: it resumes from $(OUT)/efficientnet_lite0/ckpt_last.pt (a finished run
# only re-evaluates and exports). Exports to $(OUT)/export; copy it over engines/simpsons if it beats it.
# EPOCHS=N shortens (or lengthens) the schedule; the card records the command.
train-long: OUT = runs/long
train-long: FROM ?= engines/simpsons
train-long: EXPORT ?= $(OUT)/export
train-long: RECIPE ?= jobs/train-long.json
train-long: EPOCHS ?=
train-long:  ## long Lite0 run from $(FROM) with EMA, resumable; exports to $(OUT)/export
	BATCHCLS_TRAIN_COMMAND='make train-long DATA=$(DATA) FROM=$(FROM) OUT=$(OUT) EXPORT=$(EXPORT) RECIPE=$(RECIPE) EPOCHS=$(EPOCHS)' \
	$(BIN)/python -m train --data $(DATA) --name simpsons --models efficientnet_lite0 --pretrained $(FROM) --no-search \
	  --config $(RECIPE) $(if $(EPOCHS),--epochs $(EPOCHS)) --out $(OUT) --export $(EXPORT) --budget-min 0 \
	  $(if $(filter 1 yes true,$(OVERWRITE)),--overwrite-bundle)

# A person's check of the labels: the val images the model disputes, most confident first, with contact sheets;
# with a reviewed CSV (VERDICTS=docs/label-audit-val.csv for the shipped split) it prints what the labels allow.
audit: RUN ?= runs/train/simpsons
audit: VERDICTS ?=
audit: install-dev  ## val disagreements of $(MODEL) on $(RUN)'s split -> $(RUN)/audit/; VERDICTS=reviewed.csv for the ceilings
	$(BIN)/python -m train.audit --run $(RUN) --model $(MODEL) $(if $(VERDICTS),--verdicts $(VERDICTS))

train-smoke: SMOKE_OUT ?= runs/train-smoke
train-smoke:  ## the whole training pipeline on samples/simpsons at tiny size (< 3 min); exports to runs/train-smoke (ignored)
	rm -rf $(SMOKE_OUT)
	$(BIN)/python -m train --smoke --data samples/simpsons --out $(SMOKE_OUT)/run --export $(SMOKE_OUT)/engine

# The benchmark of `make train` on two small folders built from offline package data, against a linear probe
# and a plain fine-tune of the same wall-clock (docs/benchmarks.md#training-on-your-own-folder).
bench-train: install-dev  ## make train vs linear probe vs plain fine-tune on two small folders; BENCH_BUDGET=6
	$(BIN)/python scripts/bench_train.py --budget $(or $(BENCH_BUDGET),6) --out runs/bench-train

# --- the shipped model (docs/results.md): train-shipped rebuilds engines/simpsons' weights and decision ----------
# Lite0 trained on from $(FROM) with users' degradations, outlier exposure on the foreign training images and
# distillation of $(FROM)'s flip-averaged answers (jobs/train-robust.json), then the pipeline's later steps:
# evaluate, calibrate, serving choice, export, the "none of these" decision of every served configuration.
# Rerun the same command after an interruption: it resumes from $(OUT)/efficientnet_lite0/ckpt_last.pt, or from
# the committed portable checkpoint (jobs/checkpoints/robust-lite0.pt) on a machine that has none.
train-shipped: OUT = runs/robust
train-shipped: FROM ?= engines/simpsons
train-shipped: EXPORT ?= $(OUT)/export
train-shipped: install-dev  ## rebuild the shipped model from $(FROM) and the data folder (hours on a CPU); exports to $(EXPORT)
	test -d runs/foreign/train || $(BIN)/python scripts/build_foreign.py runs/foreign
	mkdir -p $(OUT)/efficientnet_lite0
	test -f $(OUT)/efficientnet_lite0/ckpt_last.pt || test ! -f jobs/checkpoints/robust-lite0.pt \
	  || cp jobs/checkpoints/robust-lite0.pt $(OUT)/efficientnet_lite0/ckpt_portable.pt
	BATCHCLS_TRAIN_COMMAND='make train-shipped DATA=$(DATA) FROM=$(FROM) OUT=$(OUT) EXPORT=$(EXPORT)' \
	$(BIN)/python -m train --data $(DATA) --models efficientnet_lite0 --pretrained $(FROM) --no-search \
	  --config jobs/train-robust.json --out $(OUT) --export $(EXPORT) --budget-min 0 --overwrite-bundle
