"""Split, dedupe, sampler and presets of train/ (real sample images, no network)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from batchcls.decode import decode_image
from batchcls.presets import EvalPreset, normalize
from train import data as D
from train.presets import BatchAugment, EvalTransform, cache_preset, cache_side, preprocessing_card

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "simpsons"
IMAGES = sorted(SAMPLES.glob("*/*.jpg"))


def card(size=64, **kw):
    return preprocessing_card(architecture="efficientnet_lite0", classes=["a", "b"], input_size=size,
                              mean=[0.5] * 3, std=[0.5] * 3, **kw)


@pytest.mark.parametrize("n, expected", [(1, (1, 0, 0)), (2, (1, 1, 0)), (3, (1, 1, 1)), (8, (6, 1, 1)),
                                         (100, (70, 15, 15))])
def test_split_counts(n, expected):
    assert D.split_counts(n, 0.15, 0.15) == expected


@pytest.fixture
def tiny_tree(tmp_path):
    """3 classes: 'big' 10 images + one byte-identical copy, 'three' 3 images, 'one' 1 image."""
    src = IMAGES
    for cls, files in {"big": src[:10], "three": src[10:13], "one": src[13:14]}.items():
        (tmp_path / cls).mkdir()
        for f in files:
            shutil.copy(f, tmp_path / cls / f.name)
    shutil.copy(src[0], tmp_path / "big" / "zz_copy.jpg")
    return tmp_path


def test_split_dedupes_is_deterministic_and_keeps_tiny_classes(tiny_tree, tmp_path):
    logs = []
    m1 = D.make_split(tiny_tree, seed=3, log=logs.append)
    m2 = D.make_split(tiny_tree, seed=3, log=lambda s: None)
    assert m1 == m2
    assert m1["duplicates"] == [[f"big/{IMAGES[0].name}", "big/zz_copy.jpg"]]
    every = [rel for part in ("train", "val", "test") for rel, _ in m1[part]]
    assert len(every) == len(set(every)) == 14 and "big/zz_copy.jpg" not in every
    by_part = {p: {m1["classes"][y] for _, y in m1[p]} for p in ("train", "val", "test")}
    assert by_part["train"] == {"big", "three", "one"} and "three" in by_part["val"] and "three" in by_part["test"]
    assert any("tiny classes" in line and "one=1 (1/0/0)" in line for line in logs)
    sha = D.write_manifest(m1, tmp_path / "out" / "split.json")
    assert D.load_manifest(tmp_path / "out" / "split.json") == (m1, sha)
    assert D.make_split(tiny_tree, seed=4, log=lambda s: None)["train"] != m1["train"]


def test_missing_data_folder_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="DATA="):
        D.scan(tmp_path / "nope")


def test_class_weights_and_sampler_shards():
    labels = [0] * 90 + [1] * 10
    w = D.class_weights(labels, 2, "inverse")
    assert w[:90].sum() == pytest.approx(w[90:].sum())
    assert D.class_weights(labels, 2, "sqrt")[0] == pytest.approx(1 / np.sqrt(90))
    with pytest.raises(ValueError, match="sqrt, inverse, none"):
        D.class_weights(labels, 2, "bogus")
    full = list(D.WeightedShardSampler(w, 100, seed=1))
    shards = [list(D.WeightedShardSampler(w, 100, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(full) and len(shards[0]) == len(shards[1]) == 50
    assert 0.3 < np.mean(np.asarray(full) >= 90) < 0.7  # balanced: the 10% class drawn about half the time


@pytest.mark.parametrize("kw", [{}, {"resize_mode": "center_crop", "crop_pct": 0.875, "interpolation": "bicubic"}])
def test_eval_transform_equals_runtime_preprocessing(kw):
    c = card(size=96, **kw)
    tf = EvalTransform(c)
    preset = EvalPreset.from_card(c)
    for path in IMAGES[::4]:
        runtime = normalize(preset(decode_image(path, min_side=preset.min_decode_side))[None], c.mean, c.std)[0]
        np.testing.assert_array_equal(tf(path), runtime)


def _eval_pixels(c, paths):
    preset = EvalPreset.from_card(c)
    return np.stack([preset(decode_image(p)) for p in paths])


def test_downscaled_eval_transform_shape():
    x = EvalTransform(card(size=64), downscale=0.5)(IMAGES[0])
    assert x.shape == (3, 64, 64) and x.dtype == np.float32


def test_batch_augment_without_augmentation_is_the_eval_preset():
    """No crop, rotation, flip or downscale: the train batch IS the runtime's preprocessing of those pixels."""
    c = card(size=64)
    pixels = _eval_pixels(c, IMAGES[:6])
    plain = BatchAugment(c, scale=(1, 1), ratio=(1, 1), rotation=0, flip=False, p_downscale=0)
    out = plain(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(out, normalize(pixels, c.mean, c.std), atol=1e-5)


def test_batch_augment_flips_mirror_and_augmentation_changes_pixels():
    c = card(size=64)
    pixels = torch.from_numpy(_eval_pixels(c, IMAGES[:1]).repeat(32, axis=0))
    expected = normalize(pixels.numpy()[:1], c.mean, c.std)[0]
    flips = BatchAugment(c, scale=(1, 1), ratio=(1, 1), rotation=0, p_downscale=0)(pixels, torch.Generator().manual_seed(0))
    mirrored = [np.allclose(x, expected[:, :, ::-1], atol=1e-5) for x in flips.numpy()]
    same = [np.allclose(x, expected, atol=1e-5) for x in flips.numpy()]
    assert all(m or s for m, s in zip(mirrored, same)) and 0 < sum(mirrored) < 32
    full = BatchAugment(c, p_downscale=1.0)(pixels, torch.Generator().manual_seed(0))
    assert full.shape == (32, 3, 64, 64) and full.dtype == torch.float32 and torch.isfinite(full).all()
    assert full.min() >= -1.0 - 1e-5 and full.max() <= 1.0 + 1e-5  # mean=std=0.5: pixels map into [-1, 1]
    assert all(not np.allclose(x, expected, atol=1e-2) for x in full.numpy())  # every image was changed
    again = BatchAugment(c, p_downscale=1.0)(pixels, torch.Generator().manual_seed(0))
    assert torch.equal(full, again)  # seeded: a resumed epoch augments identically


def test_pixel_cache_decodes_every_item_once_and_is_reused(tmp_path):
    c = card(size=64)
    preset = cache_preset(c, cache_side(c))
    items = [[p.relative_to(SAMPLES).as_posix(), 0] for p in IMAGES[:9]]
    rows = D.pixel_cache(SAMPLES, items, preset, tmp_path, workers=2, log=lambda *a: None)  # real spawn workers
    assert rows.shape == (9, 80, 80, 3) and rows.dtype == np.uint8
    for (rel, _), row in zip(items, rows):
        np.testing.assert_array_equal(row, preset(decode_image(SAMPLES / rel)))
    (path,) = tmp_path.glob("pixels-80-*.npy")
    mtime = path.stat().st_mtime_ns
    assert D.pixel_cache(SAMPLES, items, preset, tmp_path, workers=0, log=lambda *a: None).shape == rows.shape
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    D.pixel_cache(SAMPLES, items[:4], preset, tmp_path, workers=0, log=lambda *a: None)
    assert len(list(tmp_path.glob("pixels-80-*.npy"))) == 2 and not list(tmp_path.glob("*.tmp.npy"))


def test_train_lists_every_format_the_runtime_reads(tmp_path):
    """One list of image extensions: train/ finds a dataset's files by the runtime's formats, not its own."""
    from PIL import Image

    from batchcls.decode import ALLOWED_FORMATS, IMAGE_EXTS
    from train.data import scan

    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
           ".tif": "TIFF", ".tiff": "TIFF"}
    (tmp_path / "cls").mkdir()
    for ext, f in fmt.items():
        Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "cls" / f"a{ext}", format=f)
    (tmp_path / "cls" / "notes.txt").write_text("not an image")
    listed = scan(tmp_path)["cls"]
    assert sorted(listed) == sorted(f"cls/a{ext}" for ext in fmt)
    assert all(decode_image(tmp_path / rel).size == (8, 8) for rel in listed)  # and the runtime reads each
    assert {f for e, f in Image.registered_extensions().items() if e in IMAGE_EXTS} == set(ALLOWED_FORMATS)
