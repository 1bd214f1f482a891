#!/usr/bin/env bash
# The GPU recipe, on a lent GPU machine, in the checkout's root, once every data piece has been carried there
# (see tools/gpu-transfer/gpu_train.py; the last piece travels with the call that runs this): check and unpack the pieces,
# make the split and check it lists the same files as here, train Lite0 from ImageNet weights at 224 px with
# bf16 autocast for 32 epochs with EMA (jobs/train-gpu.json), evaluate raw and EMA, calibrate, export to
# runs/gpu/export, and cut bundle + results into <= 15 MiB parts under $OUT/bundle for the way back
# (here: python tools/gpu-transfer/gpu_train.py join <fetched>/bundle --out runs/gpu).
# Training stops itself at TRAIN_TIMEOUT s (default 500, inside the device tool's 10 min); run the same
# call again while the machine is warm and it resumes from the last epoch's checkpoint.
# Needs python3 with torch (CUDA), timm, tqdm, pillow, numpy, onnx, onnxruntime, matplotlib; installs nothing.
# GPU_DIR (default runs/gpu) and RECIPE (default jobs/train-gpu.json) let a test run it on CPU at tiny size.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
GPU=${GPU_DIR:-runs/gpu}
RECIPE=${RECIPE:-jobs/train-gpu.json}
OUT=${OUT:-$GPU/out}
RUN=$GPU/run
mkdir -p "$RUN" "$GPU/report"
$PY tools/gpu-transfer/gpu_train.py unpack --all --pack "$GPU/pack" --into "$GPU/data"
$PY tools/gpu-transfer/gpu_train.py split --pack "$GPU/pack" --data "$GPU/data/train" --out "$RUN/split.json"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
# the weights packed beside the data (data.json names them); PRETRAINED=<file or bundle> overrides
WEIGHTS=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['weights'] or '')" "$GPU/pack/data.json")
PRETRAINED=${PRETRAINED:-${WEIGHTS:+$GPU/data/$WEIGHTS}}
PRETRAINED=${PRETRAINED:-engines/simpsons}
set +e
BATCHCLS_TRAIN_COMMAND="bash tools/gpu-transfer/gpu_train.sh ($RECIPE, data from tools/gpu-transfer/gpu_train.py pack)" \
timeout "${TRAIN_TIMEOUT:-500}" $PY -m train --data "$GPU/data/train" --models efficientnet_lite0 \
  --pretrained "$PRETRAINED" --no-search --config "$RECIPE" \
  --out "$RUN" --export "$GPU/export" --budget-min 0 2>&1 | tee -a "$RUN/train.log"
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" = 124 ]; then echo "training stopped at TRAIN_TIMEOUT: run this again to resume"; exit 124; fi
if [ "$rc" != 0 ]; then echo "training failed (rc $rc): see $RUN/train.log"; exit "$rc"; fi
cp "$RUN/train.log" "$RUN/results.md" "$RUN/results.csv" "$RUN/efficientnet_lite0/history.json" "$GPU/report/"
for w in raw ema; do cp "$RUN/efficientnet_lite0/$w/metrics.json" "$GPU/report/metrics_$w.json"; done
$PY tools/gpu-transfer/gpu_train.py split-out "$GPU/export" "$GPU/report" --out "$OUT/bundle"
