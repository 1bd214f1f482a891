#!/usr/bin/env bash
# Retake docs/report-1280.png and docs/report-390.png: the shipped model's report on samples/simpsons, as
# headless Chromium lays it out 1280 and 390 px wide. The same test that checks the layout takes them.
# Needs Chromium (apt-get install -y chromium) and the dev venv (make install-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
BATCHCLS_UPDATE_SCREENSHOTS=1 "${PYTHON:-.venv/bin/python}" -m pytest -q tests/test_report.py -k layout_reachable
echo "wrote docs/report-1280.png docs/report-390.png"
