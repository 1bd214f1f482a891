"""End-to-end: train.py (single process and torchrun/gloo DDP), resume, and the whole smoke pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples" / "simpsons"
TINY = ["--data", str(SAMPLES), "--input_size", "64", "--epochs", "1", "--batch_size", "8", "--num_workers", "0",
        "--progress", "false"]


def _run(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
def test_torchrun_two_ranks_gloo_writes_one_checkpoint(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    r = _run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "train.train", *TINY,
              "--out_dir", str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "[rank 0/2] cpu ready" in log and "[rank 1/2] cpu ready" in log
    assert log.count(" *best ") == 1  # rank 0 only
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ckpt_best.pt", "ckpt_best_ema.pt", "ckpt_best_raw.pt",
                                                             "ckpt_last.pt", "ckpt_portable.pt"]
    ckpt = torch.load(tmp_path / "ckpt_last.pt", map_location="cpu", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    assert ckpt["config"]["input_size"] == 64 and len(ckpt["split_sha256"]) == 64


@pytest.mark.slow
def test_config_json_then_flags_and_resume(tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps({"epochs": 3, "lr": 5e-4}))
    r = _run([sys.executable, "-m", "train.train", "--config", str(tmp_path / "cfg.json"), *TINY,
              "--epochs", "2", "--epochs_this_run", "1", "--out_dir", str(tmp_path / "run")])
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 5e-4 and saved["epochs"] == 2  # JSON applied, then the flag won
    assert "continue with --resume" in r.stdout
    r = _run([sys.executable, "-m", "train.train", "--out_dir", str(tmp_path / "run"), "--resume", "true",
              "--num_workers", "0", "--progress", "false"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout
    ckpt = torch.load(tmp_path / "run" / "ckpt_last.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 6


def test_unknown_model_is_one_line(tmp_path):
    r = _run([sys.executable, "-m", "train", "--data", str(SAMPLES), "--models", "resnet9000", "--out", str(tmp_path)])
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: unknown model 'resnet9000': choose one of efficientnet_lite0, efficientnet_lite2, efficientnetv2_b0, vgg16"]


@pytest.fixture(scope="session")
def foreign_images() -> None:
    """The foreign image sets a run builds once per user ($BATCHCLS_CACHE or ~/.cache/batchcls), built before the
    smoke starts its clock: its time is the pipeline's."""
    import importlib.util

    if importlib.util.find_spec("train.foreign") is not None:
        from train import pipeline

        pipeline.foreign_sets(print)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a first build of the foreign images (once per machine) comes before the clock starts
def test_smoke_pipeline_end_to_end(tmp_path, foreign_images):
    """split -> probe -> search -> train -> eval -> calibrate -> serving -> export -> decision -> results page."""
    import importlib.util

    t = time.time()
    r = _run([sys.executable, "-m", "train", "--smoke", "--data", str(SAMPLES), "--out", str(tmp_path / "run"),
              "--export", str(tmp_path / "engine")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t < 180
    run, engine = tmp_path / "run", tmp_path / "engine"
    for f in ("split.json", "search/search.csv", "results.md", "results.csv", "serving.json", "served.json",
              "efficientnet_lite0/probe/ckpt_best.pt", "efficientnet_lite0/probe/metrics.json",
              "efficientnet_lite0/raw/per_class.csv", "efficientnet_lite0/ema/confusion.png",
              "efficientnet_lite0/raw/reliability.png"):
        assert (run / f).is_file(), f
    assert "ONNX Runtime vs PyTorch" in r.stdout and "probe: efficientnet_lite0 linear head" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == f"use it: batchcls run IMAGES --model {engine} --out labels.csv"
    assert not list(tmp_path.glob(".engine*"))  # the bundle was moved into place whole

    import onnxruntime as ort

    from batchcls.card import load_card
    from batchcls.decode import decode_image
    from batchcls.presets import EvalPreset, normalize
    card = load_card(engine)
    assert card.name == "simpsons"  # named after the data folder (samples/simpsons)
    assert card.classes == sorted(p.name for p in SAMPLES.iterdir() if p.is_dir())
    assert card.input_size in (64, 72) and card.tta in ("none", "flip")  # chosen on validation
    assert card.resize_mode == "squash" and card.mean == [0.5] * 3
    assert card.temperature > 0 and set(card.metrics) >= {"val_nll", "val_macro_f1", "test_macro_f1", "test_ece_calibrated",
                                                           "served"}
    assert set(card.training) >= {"git_commit", "command", "dataset", "split_manifest_sha256", "date", "weights",
                                  "linear_probe"}
    table = (run / "results.csv").read_text().splitlines()
    assert table[0].startswith("model,weights,") and "val_nll" in table[0] and len(table) == 1 + 3  # probe, raw, EMA
    assert card.training["weights"] in ("probe", "raw", "ema")
    assert len(card.onnx_sha256) == 64 and (engine / "results" / "results.md").is_file()
    # the results page: per-class F1, the confusion matrix and the reliability diagram, as served
    page = (engine / "results" / "README.md").read_text()
    assert page.startswith("# simpsons\n") and "| class | test images | precision | recall | F1 |" in page
    assert all(f"| {c} |" in page for c in card.classes) and "linear probe" in page
    for png in ("confusion.png", "reliability.png"):
        assert (engine / "results" / png).stat().st_size > 1000 and f"]({png})" in page
    # the open-set decision, where train/decision.py is installed
    if importlib.util.find_spec("train.decision") is not None:
        assert card.openset and "## None of these" in page and "held-out foreign images" in page
    # the runtime's own preprocessing feeds the exported graph: raw logits, dynamic batch
    preset = EvalPreset.from_card(card)
    imgs = sorted(SAMPLES.glob("*/*.jpg"))[:3]
    x = normalize(np.stack([preset(decode_image(p, min_side=preset.min_decode_side)) for p in imgs]), card.mean, card.std)
    sess = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_outputs()[0].name == "logits"
    assert sess.run(None, {"input": x})[0].shape == (3, card.num_classes)
    # model.pt2 beside it for the torch backend, and the ONNX file describes itself (metadata_props)
    from batchcls.backends import load_backend
    from batchcls.backends.onnxruntime import onnx_metadata
    assert "model.pt2 vs ONNX Runtime" in r.stdout
    np.testing.assert_allclose(load_backend(card, "torch").infer(x), sess.run(None, {"input": x})[0], atol=1e-4)
    meta = onnx_metadata(card.onnx_path)
    assert json.loads(meta["classes"]) == card.classes and float(meta["temperature"]) == card.temperature
    assert meta["name"] == "simpsons"

    # A second stage from that checkpoint (make train-more): keeps the head, and exports only if validation
    # improves on where it started (val NLL). Here the checkpoint claims a perfect score, so nothing is exported.
    ckpt_path = run / "efficientnet_lite0" / "ckpt_best.pt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["best_val_nll"] = 0.0
    torch.save(ckpt, tmp_path / "perfect.pt")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "split.json").write_bytes((run / "split.json").read_bytes())
    r = _run([sys.executable, "-m", "train", "--smoke", "--no-search", "--data", str(SAMPLES), "--models", "efficientnet_lite0",
              "--pretrained", str(tmp_path / "perfect.pt"), "--out", str(tmp_path / "more"), "--export", str(tmp_path / "engine2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "NOT exported" in r.stdout and not (tmp_path / "engine2").exists()
    assert (tmp_path / "more" / "efficientnet_lite0" / "raw" / "metrics.json").is_file()
