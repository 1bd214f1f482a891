#!/usr/bin/env bash
# The wheel as a user gets it: build it, install it into a fresh venv outside the checkout (runtime only, so no
# torch), then from another folder classify a copy of samples/ with the shipped model, through the CLI and the
# Python API. Needs PyPI (or a mirror pip is set up for) for the runtime dependencies. Usage:
#   scripts/wheel_check.sh            PYTHON=python3.12 scripts/wheel_check.sh      KEEP=1 keeps the work folder
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/batchcls-wheel.XXXXXX")"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
say() { echo "wheel_check: $*"; }
fail() { echo "wheel_check: FAIL: $*" >&2; exit 1; }

# Build from a copy of the files git knows (tracked, or new and not ignored): no build/ folder is left in the
# checkout, and no stale file of an earlier build can reach the wheel. The bundle symlink is copied as a link.
mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --no-recursion --ignore-failed-read -cf - -T - 2>/dev/null) | tar -xf - -C "$WORK/src"
"$PY" -m venv "$WORK/venv"
PIP=("$WORK/venv/bin/pip" --disable-pip-version-check -q)
"${PIP[@]}" wheel "$WORK/src" --no-deps -w "$WORK/dist"
WHEEL="$(ls "$WORK"/dist/batchcls-*.whl)"
say "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KiB)"

"$WORK/venv/bin/python" - "$WHEEL" <<'EOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = {n.split("/")[0] for n in names}
extra = {t for t in tops if t != "batchcls" and not t.endswith(".dist-info")}
assert not extra, f"the wheel installs more than batchcls: {sorted(extra)}"
bundle = sorted(n for n in names if n.startswith("batchcls/bundles/"))
want = {"card.json", "model.onnx", "openset-model-none.npz", "openset-model-flip.npz"}  # + INT8's when shipped
assert want <= {n.rsplit("/", 1)[1] for n in bundle} and all(n.startswith("batchcls/bundles/simpsons/") for n in bundle), bundle
EOF

"${PIP[@]}" install "$WHEEL"
"$WORK/venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
  || fail "torch was installed with the runtime wheel"

# From a folder that is neither the checkout nor the images' parent.
cp -r "$REPO/samples/simpsons" "$WORK/images"
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
BIN="$WORK/venv/bin"
"$BIN/batchcls" info --json > info.json
"$BIN/python" -c "import json, sys; b = json.load(open('info.json'))['bundle']; sys.exit('site-packages' not in b)" \
  || fail "batchcls info does not name the installed bundle: $(head -c 300 info.json)"
"$BIN/batchcls" run "$WORK/images" --out labels.csv
"$BIN/python" - "$WORK/images" <<'EOF' || fail "labels.csv"
import csv, json, pathlib, sys
images = pathlib.Path(sys.argv[1])
files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file())
rows = list(csv.DictReader(open("labels.csv", newline="")))
classes = set(json.load(open("info.json"))["classes"])
assert sorted(r["path"] for r in rows) == files, "not one row per file"
assert all(r["status"] == "ok" and r["label"] in classes for r in rows), [r for r in rows if r["status"] != "ok"][:3]
right = sum(r["label"] == r["path"].split("/")[0] for r in rows)
assert right >= 0.9 * len(rows), f"only {right}/{len(rows)} sample images labelled as their folder"
print(f"wheel_check: batchcls run: {len(rows)} rows, {right} labelled as their folder")
EOF

# The Python API gives the CLI's rows, and never imports torch.
"$BIN/python" - "$WORK/images" <<'EOF' || fail "Python API"
import csv, pathlib, sys
import batchcls
images = pathlib.Path(sys.argv[1])
model = batchcls.load()
cli = {r["path"]: r for r in csv.DictReader(open("labels.csv", newline=""))}
paths = sorted(images.rglob("*.jpg"))[:8]
for p, row in zip(paths, model.predict([str(p) for p in paths])):
    want = cli[p.relative_to(images).as_posix()]
    assert (row["label"], f"{row['confidence']:.6f}") == (want["label"], want["confidence"]), (row, want)
assert "torch" not in sys.modules, "batchcls imported torch"
print(f"wheel_check: Python API: {len(paths)} rows equal to the CLI's")
EOF

# A missing extra is a one-line hint naming it.
BUNDLE="$("$BIN/python" -c "import batchcls.card as c; print(c.default_bundle())")"
cp -r "$BUNDLE" "$WORK/bundle"
if "$BIN/batchcls" engine build --target cpu --model "$WORK/bundle" 2> engine.err; then
  fail "engine build ran without the engine extra"
fi
[ "$(wc -l < engine.err)" -eq 1 ] && grep -q "batchcls\[engine\]" engine.err \
  || fail "engine build without onnx: $(cat engine.err)"
say "ok: $(cat engine.err)"
say "passed"
