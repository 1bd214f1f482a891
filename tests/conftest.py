import os
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
