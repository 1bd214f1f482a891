#!/usr/bin/env bash
# GPU checks in one go, for a lent GPU machine: `pytest -m gpu` (CUDA backend, nvJPEG loader,
# TensorRT when installed), the engines benchmark, `batchcls run --backend auto` through the CLI and
# the training pipeline's smoke run on CUDA, then a summary. Installs nothing: it needs a
# python3 with torch (CUDA), torchvision, onnx, onnxruntime, pytest, click, pillow, pandas, tqdm;
# the package itself is used from this checkout (PYTHONPATH=.), not pip-installed.
#
# Inputs (environment):
#   MODEL  bundle to test and bench (default engines/simpsons; the gpu tests also read it)
#   DATA   JPEG folder for the benchmark. The dataset beside a checkout doesn't travel to a lent
#          machine: stage <= 1,000 JPEGs into the checkout first and carry that folder, e.g.
#            python scripts/bench_engines.py --stage tmp/bench_jpegs      (here)
#            DATA=tmp/bench_jpegs bash scripts/gpu_check.sh             (there, carry tmp/bench_jpegs)
#          Default: tmp/bench_jpegs if present, else ../shared/data/simpsons/train, else the samples.
#   OUT    where logs and bench.json go (default tmp/gpu_check)
#   BENCH_N images for the benchmark (default 8000: the staged 1,000 cycled, so a 10k img/s path runs ~1 s)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-tmp/gpu_check}
MODEL=${MODEL:-engines/simpsons}
if [ -z "${DATA:-}" ]; then
  for d in tmp/bench_jpegs ../shared/data/simpsons/train samples/simpsons; do
    if [ -d "$d" ]; then DATA=$d; break; fi
  done
fi
mkdir -p "$OUT"
export BATCHCLS_TEST_BUNDLE="$MODEL"

echo "== environment"
$PY - <<'EOF' 2>&1 | tee "$OUT/env.log"
import torch, torchvision, onnxruntime
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime {onnxruntime.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE (the gpu tests will skip)")
try:
    import tensorrt
    print(f"TensorRT {tensorrt.__version__}: TensorRT tests and benchmark run")
except ImportError:
    print("TensorRT: not installed here -> TensorRT tests SKIP; checking the CUDA backend and nvJPEG path only")
EOF

echo "== pytest -m gpu"
$PY -m pytest -m gpu tests/test_backends*.py tests/test_builders*.py tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark ($DATA, model $MODEL)"
bench_args=(--model "$MODEL" --data "$DATA" -n "${BENCH_N:-8000}" --cpu-n 200 --json "$OUT/bench.json")
if [ ! -f "$MODEL/card.json" ]; then
  echo "no bundle at $MODEL: set MODEL=<bundle folder>" | tee "$OUT/bench.log"; bench_rc=1
else
  $PY scripts/bench_engines.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo "== batchcls run --backend auto (CLI, $DATA)"
rm -f "$OUT/labels.csv"
$PY -m batchcls --verbose run "$DATA" --out "$OUT/labels.csv" --model "$MODEL" --backend auto 2>&1 | tee "$OUT/run.log"
run_rc=${PIPESTATUS[0]}
$PY - "$DATA" "$OUT/labels.csv" <<'EOF' 2>&1 | tee -a "$OUT/run.log"
import csv, sys
from pathlib import Path
files = [p for p in Path(sys.argv[1]).rglob("*") if p.is_file() and not p.name.startswith(".")]
rows = list(csv.DictReader(open(sys.argv[2])))
ok = sum(r["status"] == "ok" for r in rows)
right = sum(r["label"] == Path(r["path"]).parent.name for r in rows)
print(f"run: {len(files)} files -> {len(rows)} rows, {ok} ok, top-1 = folder name on {right}")
sys.exit(0 if len(rows) == len(files) == ok else 1)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || run_rc=1
big="$OUT/big"  # the same files copied 8x: CLI throughput once start-up is paid
rm -rf "$big" "$OUT/big.csv"; for k in 1 2 3 4 5 6 7 8; do mkdir -p "$big/c$k"; cp -r "$DATA"/. "$big/c$k/"; done
$PY -m batchcls run "$big" --out "$OUT/big.csv" --model "$MODEL" --backend auto 2>&1 | tee -a "$OUT/run.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || run_rc=1

echo "== training smoke on CUDA (bf16 autocast, random init: checks the loop, not accuracy)"
echo '{"amp": true}' > "$OUT/amp.json"
timeout 300 $PY -m train --smoke --data samples/simpsons --pretrained none --config "$OUT/amp.json" \
  --out "$OUT/train_smoke" --export "$OUT/train_smoke/engine" 2>&1 | grep -v "it/s" | tee "$OUT/train.log"
train_rc=${PIPESTATUS[0]}
grep -q "cuda" "$OUT/train.log" || { echo "training did not run on cuda"; train_rc=1; }

echo "== summary"
grep -E "passed|failed|skipped|error" "$OUT/pytest.log" | tail -1
grep -E "^SKIPPED" "$OUT/pytest.log" | sed 's/^/  /'
grep -E "target|skipping TensorRT" "$OUT/bench.log" || true
grep -E "^run:" "$OUT/run.log" || true
grep -E "selected|pipeline done" "$OUT/train.log" || true
echo "tests exit $tests_rc, bench exit $bench_rc, run exit $run_rc, train exit $train_rc; logs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$run_rc" -eq 0 ] && [ "$train_rc" -eq 0 ]
