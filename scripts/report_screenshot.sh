#!/usr/bin/env bash
# Retake docs/report.png: classify samples/simpsons, build the HTML report, screenshot it in headless Chromium.
#   scripts/report_screenshot.sh                  # with the shipped model (engines/simpsons)
#   scripts/report_screenshot.sh colours          # with the tiny test bundle (red/green/blue), before a model exists
#   scripts/report_screenshot.sh path/to/bundle   # any bundle
# Needs Chromium (apt-get install -y chromium) and the venv (make install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MODEL=${1:-engines/simpsons}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "$MODEL" = colours ]; then
    MODEL="$WORK/colours"
    "$PYTHON" -c "import sys, pathlib; sys.path.insert(0, 'tests'); from bundles import make_colour_bundle; make_colour_bundle(pathlib.Path(sys.argv[1]))" "$MODEL"
fi
"$PYTHON" -m batchcls.cli run samples/simpsons --model "$MODEL" --out "$WORK/labels.csv" --quiet
"$PYTHON" -m batchcls.cli report "$WORK/labels.csv" --images samples/simpsons --out "$WORK/report.html"
mkdir -p docs
/usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --user-data-dir="$WORK/profile" --hide-scrollbars --virtual-time-budget=5000 \
    --window-size=1200,1300 --screenshot="$PWD/docs/report.png" "file://$WORK/report.html" 2>/dev/null
echo "wrote docs/report.png"
