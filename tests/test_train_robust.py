"""Training for what users send: the degradations, outlier exposure, distillation targets and the portable
checkpoint, on the committed sample frames and foreign fixtures (a few optimizer steps, CPU)."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from train.degrade import Degrade  # noqa: E402
from train.teacher import teacher_targets  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
FOREIGN = REPO / "tests" / "fixtures" / "foreign"
SHIPPED = REPO / "engines" / "simpsons"


def frames(n: int = 8) -> np.ndarray:
    from PIL import Image

    paths = sorted(SAMPLES.glob("*/*.jpg"))[:n]
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((96, 96))) for p in paths])


def test_degrade_keeps_the_batch_shape_and_changes_the_pixels_reproducibly():
    batch = frames()
    out = Degrade(1.0)(batch, np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - batch).mean() > 1.0  # shrunk, re-encoded, blurred: not the same pixels
    np.testing.assert_array_equal(out, Degrade(1.0)(batch, np.random.default_rng(0)))  # seeded: resumable
    np.testing.assert_array_equal(Degrade(0.0)(batch, np.random.default_rng(0)), batch)  # p=0: untouched
    assert not np.shares_memory(out, batch)  # the pixel cache is never written


def test_teacher_targets_are_flip_averaged_probabilities_of_the_teacher(tmp_path):
    from batchcls.card import load_card

    card = load_card(SHIPPED)
    pixels = np.resize(frames(4), (4, 200, 200, 3)).astype(np.uint8)
    probs = teacher_targets(SHIPPED, pixels, card.classes, tmp_path, log=lambda m: None)
    assert probs.shape == (4, card.num_classes)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert list(tmp_path.glob("teacher-*.npy"))  # cached: a resumed run does not recompute them
    with pytest.raises(ValueError, match="other classes"):
        teacher_targets(SHIPPED, pixels, card.classes[:5], tmp_path)


def test_outlier_exposure_and_degradations_train_and_resume_from_the_portable_checkpoint(tmp_path):
    from train.train import TrainConfig, main

    foreign = tmp_path / "foreign"
    shutil.copytree(FOREIGN, foreign)
    common = dict(data=str(SAMPLES), model="efficientnet_lite0", pretrained="none", input_size=64, start_size=0,
                  batch_size=8, num_workers=0, epochs=2, ema_decay=0.9, degrade=0.8, oe_dir=str(foreign), oe_batch=4,
                  progress=False, patience=0)
    logs: list[str] = []
    out = tmp_path / "run"
    summary = main(TrainConfig(**common, out_dir=str(out), epochs_this_run=1), log=logs.append)
    assert any("outlier exposure: 8 foreign images" in line for line in logs), logs
    assert summary["train_images_per_s"] > 0 and (out / "ckpt_portable.pt").is_file()
    portable = torch.load(out / "ckpt_portable.pt", map_location="cpu", weights_only=False)
    assert portable["portable"] and "optimizer" not in portable
    assert all(v.dtype == torch.float16 for v in portable["model"].values() if v.is_floating_point())
    # another machine: only the portable checkpoint and the split travel
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(out / "ckpt_portable.pt", other / "ckpt_portable.pt")
    shutil.copy(out / "split.json", other / "split.json")
    logs.clear()
    again = main(TrainConfig(**common, out_dir=str(other), resume=True), log=logs.append)
    assert any("portable checkpoint" in line for line in logs), logs
    history = json.loads((other / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and again["history"][-1]["epoch"] == 2
