#!/usr/bin/env bash
# GPU checks in one go, for a lent GPU machine: `pytest -m gpu` (CUDA backend, nvJPEG loader,
# TensorRT when installed) and the engines benchmark, then a summary. Installs nothing: it needs a
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
#   BENCH_N images for the benchmark (default 1000)
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
$PY -m pytest -m gpu tests/test_engines.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
tests_rc=${PIPESTATUS[0]}

echo "== benchmark ($DATA, model $MODEL)"
bench_args=(--model "$MODEL" --data "$DATA" -n "${BENCH_N:-1000}" --cpu-n 200 --json "$OUT/bench.json")
if [ ! -f "$MODEL/card.json" ]; then
  echo "no bundle at $MODEL: set MODEL=<bundle folder>" | tee "$OUT/bench.log"; bench_rc=1
else
  $PY scripts/bench_engines.py "${bench_args[@]}" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

echo "== summary"
grep -E "passed|failed|skipped|error" "$OUT/pytest.log" | tail -1
grep -E "^SKIPPED" "$OUT/pytest.log" | sed 's/^/  /'
grep -E "target|skipping TensorRT" "$OUT/bench.log" || true
echo "tests exit $tests_rc, bench exit $bench_rc; logs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
