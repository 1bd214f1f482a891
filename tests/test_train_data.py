"""Split, dedupe, sampler and presets of train/ (real sample images, no network)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

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
    """3 classes: 'big' 10 images + one byte-identical copy, 'three' 3 images, 'four' 4 images."""
    src, root = IMAGES, tmp_path / "data"
    for cls, files in {"big": src[:10], "three": src[10:13], "four": src[13:17]}.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / cls / f.name)
    shutil.copy(src[0], root / "big" / "zz_copy.jpg")
    return root


def test_split_dedupes_is_deterministic_and_keeps_tiny_classes(tiny_tree, tmp_path):
    logs = []
    m1 = D.make_split(tiny_tree, seed=3, log=logs.append)
    m2 = D.make_split(tiny_tree, seed=3, log=lambda s: None)
    assert m1 == m2
    assert m1["duplicates"] == [[f"big/{IMAGES[0].name}", "big/zz_copy.jpg"]]
    every = [rel for part in ("train", "val", "test") for rel, _ in m1[part]]
    assert len(every) == len(set(every)) == 17 and "big/zz_copy.jpg" not in every
    by_part = {p: {m1["classes"][y] for _, y in m1[p]} for p in ("train", "val", "test")}
    assert by_part["train"] == by_part["val"] == by_part["test"] == {"big", "three", "four"}
    assert any("tiny classes" in line and "three=3 (1/1/1)" in line for line in logs)
    sha = D.write_manifest(m1, tmp_path / "out" / "split.json")
    assert D.load_manifest(tmp_path / "out" / "split.json") == (m1, sha)
    assert D.make_split(tiny_tree, seed=4, log=lambda s: None)["train"] != m1["train"]


def _png_rgba(path, colour):
    img = Image.new("RGBA", (120, 90), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse([20, 10, 100, 80], fill=colour)
    img.save(path)


@pytest.fixture
def users_folder(tmp_path):
    """A folder as people have them: every format oddity, nested subfolders, junk, names in any script."""
    root = tmp_path / "drawings"
    (root / "red ball" / "2023" / "march").mkdir(parents=True)
    (root / "grün").mkdir()
    (root / "猫").mkdir()
    (root / ".git").mkdir()
    (root / "__MACOSX" / "red ball").mkdir(parents=True)
    for i in range(3):
        _png_rgba(root / "red ball" / f"a{i}.png", (220 + 10 * i, 20, 20, 255))  # alpha: composited over white
    _png_rgba(root / "red ball" / "2023" / "march" / "deep.png", (200, 30, 30, 255))  # nested: still 'red ball'
    Image.new("L", (64, 48), 90).save(root / "grün" / "grey.jpg")  # greyscale
    Image.new("CMYK", (50, 70), (0, 200, 200, 0)).save(root / "grün" / "cmyk.jpg")  # CMYK
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: upright only once the orientation is applied
    Image.new("RGB", (80, 40), (10, 150, 10)).save(root / "grün" / "rotated.jpg", exif=exif)
    Image.new("RGB", (640, 480), (20, 160, 20)).save(root / "grün" / "big.webp")  # mixed sizes
    Image.new("RGB", (31, 17), (0, 0, 200)).save(root / "猫" / "small.bmp")
    Image.new("RGB", (31, 17), (0, 0, 180)).save(root / "猫" / "b.png")
    Image.new("RGB", (300, 17), (0, 0, 160)).save(root / "猫" / "c.tiff")
    (root / "猫" / "notes.txt").write_text("not an image")  # non-image files: counted, skipped
    (root / "猫" / "Thumbs.db").write_bytes(b"\0" * 64)
    (root / "猫" / ".DS_Store").write_bytes(b"\0" * 64)  # hidden: not data at all
    (root / "猫" / "broken.jpg").write_bytes(IMAGES[0].read_bytes()[:400])  # truncated JPEG: unreadable
    (root / "猫" / "empty.png").write_bytes(b"")
    (root / "猫" / "c.gif").write_bytes(b"GIF89a garbage")
    (root / ".git" / "x.png").write_bytes(IMAGES[0].read_bytes())
    (root / "__MACOSX" / "red ball" / "._a0.png").write_bytes(b"resource fork")
    (root / "README.md").write_text("my drawings")
    return root


def test_a_users_folder_splits_with_one_line_for_what_was_skipped(users_folder):
    logs = []
    m = D.make_split(users_folder, seed=0, log=logs.append)
    assert m["classes"] == ["grün", "red ball", "猫"]  # sorted; spaces and any script are fine
    every = {rel: y for part in ("train", "val", "test") for rel, y in m[part]}
    assert every["red ball/2023/march/deep.png"] == m["classes"].index("red ball")  # nested belongs to its class
    assert set(every) == {"red ball/a0.png", "red ball/a1.png", "red ball/a2.png", "red ball/2023/march/deep.png",
                          "grün/grey.jpg", "grün/cmyk.jpg", "grün/rotated.jpg", "grün/big.webp",
                          "猫/small.bmp", "猫/b.png", "猫/c.tiff"}
    skipped = [line for line in logs if line.startswith("scan:")]
    assert len(skipped) == 1, logs
    assert "3 non-image file(s)" in skipped[0] and "3 unreadable image(s)" in skipped[0]
    assert m["skipped"]["non_image"] == 3 and set(m["skipped"]["unreadable"]) == {
        "猫/broken.jpg", "猫/empty.png", "猫/c.gif"}
    # every listed file decodes as the runtime decodes it: alpha over white, EXIF applied, grey/CMYK to RGB
    red = decode_image(users_folder / "red ball" / "a0.png")
    assert red.mode == "RGB" and red.getpixel((2, 2)) == (255, 255, 255)
    assert decode_image(users_folder / "grün" / "rotated.jpg").size == (40, 80)
    assert decode_image(users_folder / "grün" / "cmyk.jpg").mode == "RGB"


def test_a_class_too_small_to_split_says_how_many_are_needed(users_folder):
    (users_folder / "one dog").mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(users_folder / "one dog" / "x.png")
    shutil.copy(users_folder / "one dog" / "x.png", users_folder / "one dog" / "same bytes.png")
    with pytest.raises(ValueError, match=r"'one dog' has 1; every class needs at least 3 distinct, readable images"):
        D.make_split(users_folder, log=lambda s: None)


def test_review_folders_join_train_only_and_never_a_val_or_test_file(tiny_tree, tmp_path):
    """`batchcls review` output (label folders, _manifest.csv, unknown/, _errors/) as EXTRA: train only."""
    plain = D.make_split(tiny_tree, seed=1, log=lambda s: None)
    review = tmp_path / "review"
    for folder in ("three", "four", "unknown", "_errors", "not a class"):
        (review / folder).mkdir(parents=True)
    val_file, test_file = plain["val"][0][0], plain["test"][0][0]
    shutil.copy(tiny_tree / val_file, review / "four" / "moved_from_val.jpg")  # a val image, relabelled: dropped
    shutil.copy(tiny_tree / test_file, review / "three" / "was_test.jpg")  # a test image: dropped
    new = IMAGES[20:23]
    shutil.copy(new[0], review / "three" / "new0.jpg")
    shutil.copy(new[1], review / "four" / "new1.jpg")
    shutil.copy(new[1], review / "four" / "new1~2.jpg")  # the same bytes twice: once
    shutil.copy(new[2], review / "unknown" / "u.jpg")  # declined rows are no class
    shutil.copy(new[2], review / "not a class" / "v.jpg")
    (review / "_errors" / "bad.jpg").write_bytes(b"junk")
    (review / "_manifest.csv").write_text("file,path,label,confidence,error\n")
    logs = []
    m = D.make_split(tiny_tree, seed=1, extra=review, log=logs.append)
    assert m["val"] == plain["val"] and m["test"] == plain["test"]  # the measuring splits never move
    added = m["train"][len(plain["train"]):]
    assert m["train"][:len(plain["train"])] == plain["train"]
    assert sorted((Path(p).name, m["classes"][y]) for p, y in added) == [("new0.jpg", "three"), ("new1.jpg", "four")]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p, _ in added)
    assert m["extra"]["added"] == 2 and m["extra"]["already_in_data"] == 2
    assert any("unknown/" in line and "not a class/" in line for line in logs)
    # the manifest's paths resolve wherever it is read: root / absolute is the absolute path
    assert all((Path(m["root"]) / p).is_file() for p, _ in m["train"])


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
