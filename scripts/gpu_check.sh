#!/usr/bin/env bash
# The GPU check, in one go, for a lent NVIDIA machine (an H100 or H200 with torch, torchvision and ONNX Runtime
# for the CPU; no TensorRT, no network; only the working tree is copied there). Under 8 minutes:
#   1. every gpu-marked test (tests/test_gpu_cuda.py and the backends' own) and the GPU path's rules (tests/test_gpu_path.py);
#   2. scripts/gpu_profile.py: each stage's images/s alone, end to end with nvJPEG and with --cpu-decode;
#   3. one table: rows CPU vs GPU (tests/route_parity.py's comparison), images/s, stage rates, start-up, the
#      TensorRT checks that could not run.
# Installs nothing and needs no data beside the checkout (the tests and the profile make their JPEGs from
# samples/). Keep its output in docs/ with the commit it ran on:
#   COMMIT=$(git rev-parse HEAD) bash scripts/gpu_check.sh        (the commit, when .git does not travel)
#
# Environment: MODEL (bundle, default engines/simpsons), OUT (default tmp/gpu_check), N (profile files,
# default 10000), PYTHON (default python3).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-tmp/gpu_check}
MODEL=${MODEL:-engines/simpsons}
COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (set COMMIT=)")}
rm -rf "$OUT" && mkdir -p "$OUT/report"
export BATCHCLS_TEST_BUNDLE="$MODEL" BATCHCLS_GPU_REPORT="$OUT/report"
start=$(date +%s)

$PY - "$COMMIT" > "$OUT/env.txt" 2>&1 <<'EOF'
import sys, torch, torchvision, onnxruntime
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU (every gpu test skips)"
try:
    import tensorrt
    trt = f"TensorRT {tensorrt.__version__}"
except ImportError:
    trt = "no TensorRT"
print(f"{gpu}; torch {torch.__version__}, torchvision {torchvision.__version__}, onnxruntime "
      f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())}), {trt}; commit {sys.argv[1]}")
EOF
echo "== $(cat "$OUT/env.txt")"

echo "== tests (at most 6 minutes)"
timeout 240 $PY -m pytest -m gpu tests/test_gpu_cuda.py tests/test_gpu.py tests/test_backends*.py tests/test_builders*.py \
  -q -rs -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml" > "$OUT/pytest.log" 2>&1
tests_rc=$?
timeout 120 $PY -m pytest tests/test_gpu_path.py -q -p no:cacheprovider --junitxml="$OUT/junit-rules.xml" \
  >> "$OUT/pytest.log" 2>&1 || tests_rc=1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 20

left=$(( 450 - ($(date +%s) - start) ))
echo "== profile (at most ${left}s)"
if [ "$left" -gt 30 ]; then
  timeout "$left" $PY scripts/gpu_profile.py --model "$MODEL" -n "${N:-10000}" --work "$OUT/frames" \
    --json "$OUT/profile.json" --cprofile > "$OUT/profile.log" 2>&1
  profile_rc=$?
  grep -E "^start-up|tottime|batchcls/" "$OUT/profile.log" | head -n 30
else
  echo "no time left for the profile"; profile_rc=124
fi

echo
echo "================================================================================================"
$PY scripts/gpu_profile.py --table "$OUT" | tee "$OUT/table.txt"
echo "tests exit $tests_rc, profile exit $profile_rc, $(( $(date +%s) - start ))s; logs in $OUT"
[ "$tests_rc" -eq 0 ] && [ "$profile_rc" -eq 0 ]
