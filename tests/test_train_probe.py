"""The linear probe: a fitted head on frozen features, saved as a checkpoint that trains on and exports."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SAMPLES

from train import data as D
from train import models
from train.probe import fit_head, fit_probe, last_linear
from train.train import TrainConfig


def test_fit_head_separates_what_a_linear_model_can_and_decay_shrinks_it():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 8)) + np.eye(3, 8)[y] * 3.0
    w, b = fit_head(x, y, 3, 1e-4)
    assert w.shape == (3, 8) and b.shape == (3,)
    assert ((x @ w.T + b).argmax(1) == y).mean() > 0.9
    strong, _ = fit_head(x, y, 3, 10.0)
    assert np.abs(strong).sum() < np.abs(w).sum()


@pytest.mark.slow
def test_the_probe_is_a_checkpoint_that_trains_on_and_shares_the_pixel_cache(tmp_path):
    split = tmp_path / "run" / "split.json"
    D.write_manifest(D.make_split(SAMPLES, seed=0, log=lambda s: None), split)
    cfg = TrainConfig(data=str(SAMPLES), split=str(split), model="efficientnet_lite0", pretrained="offline",
                      input_size=64, num_workers=0)
    logs = []
    probe = fit_probe(cfg, tmp_path / "run" / "m" / "probe", log=logs.append)
    assert 0 <= probe["val"]["acc"] <= 1 and probe["weight_decay"] > 0
    assert len(list((tmp_path / "run" / "cache").glob("pixels-80-*.npy"))) == 1  # what train.train reads
    ckpt = torch.load(probe["ckpt"], weights_only=False)
    assert ckpt["weights"] == "probe" and ckpt["classes"] == sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())
    # as pretrained weights for the fine-tune, the fitted head is kept (same classes), the backbone is ImageNet's
    model = models.create_model("efficientnet_lite0", len(ckpt["classes"]), pretrained=probe["ckpt"],
                                classes=ckpt["classes"])
    assert torch.equal(last_linear(model).weight, ckpt["model"]["classifier.weight"])
    assert ckpt["model"]["classifier.weight"].abs().sum() > 0
    imagenet = models.create_model("efficientnet_lite0", 8, pretrained="offline")
    assert torch.equal(model.conv_head.weight, imagenet.conv_head.weight)
    # a rerun reads the features back instead of computing them
    logs.clear()
    again = fit_probe(cfg, tmp_path / "run" / "m" / "probe", log=logs.append)
    assert not any("features of" in line for line in logs) and again["val"] == probe["val"]
