"""Export a trained checkpoint as the bundle the runtime reads: model.onnx + model.pt2 + card.json (+ results/).

- ``model.onnx`` (TorchScript exporter, dynamic batch) is what ONNX Runtime, TensorRT and the CPU engine
  builds read. Its ``metadata_props`` carry the class names, preprocessing and temperature, so the file
  alone is usable by other runtimes (``batchcls info`` shows them).
- ``model.pt2`` is the same network as a ``torch.export`` program with a dynamic batch: the runtime's one
  torch backend (``--backend cuda``/``torch``) loads it without timm or train/. It records the sha256 of
  the ONNX it was exported beside, so a retrained ONNX never runs through a stale program.
- No separate state_dict file: the program keeps every weight under its module path, and training tools
  (``--pretrained`` from the shipped model, the benchmark's timm baseline) read them from it
  (``train.models.bundle_state_dict``).

Both graphs have two outputs: ``logits`` (RAW: the runtime applies softmax(logits / card.temperature)) and
``features``, the pooled penultimate layer the classifier reads (the open-set decision and ``--embeddings``). ONNX Runtime must
match PyTorch, and the exported program ONNX Runtime, on >= 64 real images (max abs prob diff < 1e-4), or
export fails.

    python -m train.export BUNDLE   # renew model.pt2 + the ONNX metadata of a bundle
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from batchcls.card import ModelCard, load_card
from batchcls.fsutil import atomic_open, atomic_path
from train.evaluate import load_trained
from train.presets import EvalTransform

PARITY_TOL = 1e-4
MAX_BATCH = 4096  # the program's batch dimension runs 1..MAX_BATCH


class ParityError(RuntimeError):
    pass


TEXTURE_BLOCKS = (2, 4)  # EfficientNet stages whose activations' per-channel mean and spread describe texture


class WithFeatures(torch.nn.Module):
    """(logits, features) from a timm EfficientNet: features = the penultimate vector its classifier reads,
    then the per-channel mean and standard deviation of two intermediate stages ("texture").

    The intermediate statistics are what tells a cartoon frame from a photo, a wallpaper or clipart: the
    open-set decision reads them (batchcls.openset); ``--embeddings`` keeps the first ``embedding_dim``
    (the penultimate vector), as the card says.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.bn1(m.conv_stem(x))
        texture = []
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i in TEXTURE_BLOCKS:
                mean = x.mean(dim=(2, 3))
                spread = ((x * x).mean(dim=(2, 3)) - mean * mean).clamp_min(0).sqrt()
                texture += [mean, spread]
        penultimate = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return m.get_classifier()(penultimate), torch.cat([penultimate, *texture], dim=1)


def with_features(model: torch.nn.Module) -> torch.nn.Module:
    """EfficientNets (timm) get the features output; other networks export logits alone."""
    return WithFeatures(model) if all(hasattr(model, a) for a in ("conv_stem", "blocks", "forward_head")) else model


def embedding_dim(model: torch.nn.Module) -> int:
    """Length of the penultimate vector at the front of the features output (0: no features output)."""
    return int(model.num_features) if isinstance(with_features(model), WithFeatures) else 0


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def export_onnx(model: torch.nn.Module, input_size: int, path: Path) -> None:
    x = torch.zeros(1, 3, input_size, input_size)
    model = with_features(model.eval())
    names = ["logits", "features"] if isinstance(model, WithFeatures) else ["logits"]
    with atomic_path(path) as tmp:
        torch.onnx.export(model.eval(), (x,), str(tmp), input_names=["input"], output_names=names,
                          dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}}, opset_version=17,
                          dynamo=False)  # the TorchScript exporter handles timm's "same" padding at a fixed size


def onnx_metadata(card: ModelCard) -> dict[str, str]:
    """What another runtime needs to use model.onnx alone (values are strings; lists and dicts as JSON)."""
    return {
        "name": card.name,
        "architecture": card.architecture,
        "classes": json.dumps(card.classes),
        "preprocessing": json.dumps({
            "input": "float32 NCHW, RGB", "input_size": card.input_size, "resize_mode": card.resize_mode,
            "crop_pct": card.crop_pct, "interpolation": card.interpolation, "mean": card.mean, "std": card.std,
            "normalize": "(pixel / 255 - mean) / std"}),
        "temperature": repr(float(card.temperature)),
        "output": "logits: raw, probabilities = softmax(logits / temperature); features (when present): "
                  "the pooled penultimate vector the classifier reads (its first embedding_dim values: the "
                  "embedding), then the per-channel mean and standard deviation of two intermediate stages "
                  "(the open-set decision's texture statistics)",
        "embedding_dim": str(card.embedding_dim),
    }


def write_onnx_metadata(path: Path, card: ModelCard) -> str:
    """Set ``metadata_props`` (replacing ours, keeping others'); returns the file's new sha256."""
    import onnx

    model = onnx.load(str(path))
    ours = onnx_metadata(card)
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in ours]
    del model.metadata_props[:]
    for key, value in kept + list(ours.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_program(model: torch.nn.Module, input_size: int, path: Path, *, source_onnx_sha256: str) -> None:
    """``torch.export`` with a dynamic batch (1..MAX_BATCH), saved with what it was exported beside."""
    from batchcls.backends.pytorch import PROGRAM_META

    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    x = torch.zeros(2, 3, input_size, input_size)  # 2, not 1: export specialises a size-1 dimension
    program = torch.export.export(with_features(model.eval()), (x,), dynamic_shapes=({0: batch},))
    with atomic_open(path, "wb") as fh:  # a file object: torch.export.save wants a .pt2 name or a buffer
        torch.export.save(program, fh, extra_files={PROGRAM_META: json.dumps(
            {"source_onnx_sha256": source_onnx_sha256, "max_batch": MAX_BATCH})})


def parity(model: torch.nn.Module, onnx_path: Path, card, images: list[Path], *, tol: float = PARITY_TOL) -> float:
    """Max |p_torch - p_ort| over images, p = softmax(logits / T); raises ParityError above tol."""
    import onnxruntime as ort

    from batchcls.infer import softmax
    tf = EvalTransform(card)
    x = np.stack([tf(p) for p in images]).astype(np.float32)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i in range(0, len(x), 32):  # also exercises the dynamic batch axis
        with torch.inference_mode():
            ref = _logits(model(torch.from_numpy(x[i:i + 32]))).numpy()
        got = sess.run(["logits"], {"input": x[i:i + 32]})[0]
        worst = max(worst, float(np.abs(softmax(ref, card.temperature) - softmax(got, card.temperature)).max()))
    if worst >= tol:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (limit {tol:.0e}) on {len(images)} images")
    return worst


def _program_and_parity(model: torch.nn.Module, card: ModelCard, bundle: Path, parity_images: list[Path], log) -> None:
    """model.pt2 beside the card's (final) ONNX, then both parities against ONNX Runtime."""
    from batchcls.backends.pytorch import load_program, program_path

    card = dataclasses.replace(card, bundle_dir=bundle)
    export_program(model, card.input_size, program_path(card), source_onnx_sha256=card.onnx_sha256)
    worst = parity(model, card.onnx_path, card, parity_images)
    log(f"export: ONNX Runtime vs PyTorch max |dprob| {worst:.2e} on {len(parity_images)} images (limit {PARITY_TOL:.0e})")
    worst = parity(load_program(card), card.onnx_path, card, parity_images)
    log(f"export: model.pt2 vs ONNX Runtime max |dprob| {worst:.2e} (limit {PARITY_TOL:.0e})")


def export(ckpt_path: str | os.PathLike, bundle_dir: str | os.PathLike, *, temperature: float, metrics: dict,
           training: dict, parity_images: list[Path], results: dict[str, Path] | None = None,
           name: str | None = None, input_size: int | None = None, tta: str | None = None, log=print) -> Path:
    """The bundle of a checkpoint: ``name`` names the card (what ``batchcls info`` and every report show),
    ``input_size``/``tta``/``temperature`` are what serves (train/serving.py chooses them on validation;
    default: the training size, no TTA)."""
    bundle = Path(bundle_dir)
    bundle.mkdir(parents=True, exist_ok=True)
    model, ckpt, card = load_trained(ckpt_path)
    card = dataclasses.replace(card, name=name or card.name, input_size=input_size or card.input_size,
                               tta=tta or card.tta)
    onnx_path = bundle / card.onnx
    export_onnx(model, card.input_size, onnx_path)
    card = dataclasses.replace(card, temperature=float(temperature), metrics=metrics, training=training,
                               embedding_dim=embedding_dim(model))
    card = dataclasses.replace(card, onnx_sha256=write_onnx_metadata(onnx_path, card))
    _program_and_parity(model, card, bundle, parity_images, log)
    card.save(bundle)  # written last: a bundle with a card always has verified models next to it
    if results:
        (bundle / "results").mkdir(exist_ok=True)
        for name, f in results.items():
            shutil.copyfile(f, bundle / "results" / name)
    log(f"export: {card.architecture} -> {bundle} (card.json, {card.onnx}, model.pt2, T={card.temperature:.3f})")
    return bundle


def write_results_page(bundle: str | os.PathLike, page: dict) -> Path:
    """``results/README.md`` of a bundle: what it is, how it scores as served (per-class F1, the confusion
    matrix and reliability diagram beside it), the "none of these" decision, the models it was chosen from.

    ``page``: name, data, classes, counts, minutes, served (evaluate_bundle's figures), probe (the linear
    probe's test scores), decision (fit_decision's summary or None), candidates (results.md's table),
    command (what reproduces it)."""
    served, probe = page["served"], page.get("probe")
    lines = [f"# {page['name']}", "",
             f"{len(page['classes'])} classes from `{page['data']}`: train {page['counts']['train']} / val "
             f"{page['counts']['val']} / test {page['counts']['test']} images"
             + (f" (+{page['counts']['extra']} from review folders, train only)" if page['counts'].get('extra') else "")
             + f". Made in {page['minutes']:.1f} min by `{page['command']}`.", "",
             "## As served", "",
             f"`batchcls run IMAGES --model {page['bundle']} --out labels.csv` serves {page['model']} at "
             f"{served['input_size']} px{' with flip TTA' if served['tta'] == 'flip' else ''}, temperature "
             f"{served['temperature']:.3f} (size, TTA and temperature chosen on validation).", "",
             "| on the test split | accuracy | macro-F1 | ECE |", "| --- | ---: | ---: | ---: |",
             f"| this bundle | {served['acc']:.4f} | {served['macro_f1']:.4f} | {served['ece']:.4f} |"]
    if probe:
        lines.append(f"| linear probe (frozen backbone, the bar to beat) | {probe['acc']:.4f} | "
                     f"{probe['macro_f1']:.4f} | {probe['ece_calibrated']:.4f} |")
    lines += ["", "| class | test images | precision | recall | F1 |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {c} | {int(v['support'])} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} |"
              for c, v in served["per_class"].items()]
    lines += ["", "![confusion matrix of the test split, rows normalised](confusion.png)", "",
              "![reliability diagram of the test split: accuracy per confidence bin](reliability.png)", "",
              "## None of these", ""]
    decision = page.get("decision")
    if not served.get("open_set"):
        lines.append("This bundle has no open-set decision: every image gets one of the classes.")
    else:
        lines.append(f"Images that show none of the classes are labelled `unknown`. On the test split "
                     f"{served['test_flagged']:.1%} of the images are declined (accuracy with the decision on "
                     f"{served['acc_open_set']:.4f})"
                     + (f"; of {served['foreign_n']} held-out foreign images, {served['foreign_flagged']:.1%}"
                        if "foreign_flagged" in served else "") + ".")
        if served.get("foreign_flagged_by_source"):
            lines += ["", "| kind of foreign picture | declined |", "| --- | ---: |"]
            lines += [f"| {k} | {v:.1%} |" for k, v in served["foreign_flagged_by_source"].items()]
        if decision is not None:
            lines += ["", f"The decision {'passed' if decision.get('passed') else 'did NOT pass'} its gate on "
                          "validation" + (f": {decision['reason']}" if decision.get("reason") else ".")]
    lines += ["", "## How it was chosen", "", page["candidates"].strip(), ""]
    path = Path(bundle) / "results" / "README.md"
    path.parent.mkdir(exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def renew(bundle_dir: str | os.PathLike, parity_images: list[Path], *, input_size: int | None = None,
          temperature: float | None = None, tta: str | None = None, log=print) -> Path:
    """Re-export an existing bundle from its own weights: model.onnx (both outputs, at ``input_size``),
    its metadata and model.pt2, with the parity checks. ``input_size``/``temperature`` change what serves
    (train/serving.py chooses them on validation); the weights never change.

    A changed graph invalidates the bundle's open-set statistics (they describe the old features' scale
    only when the size is unchanged), so refit them with ``python -m train.decision`` afterwards.
    """
    from train.models import bundle_state_dict, create_model

    card = load_card(bundle_dir)
    bundle = Path(card.bundle_dir)
    model = create_model(card.architecture, card.num_classes, pretrained="none")
    model.load_state_dict(bundle_state_dict(bundle))
    card = dataclasses.replace(card, input_size=input_size or card.input_size,
                               temperature=float(temperature or card.temperature), embedding_dim=embedding_dim(model),
                               tta=tta or card.tta,
                               openset={})  # the old statistics describe the old graph: refit them
    export_onnx(model.eval(), card.input_size, card.onnx_path)
    card = dataclasses.replace(card, onnx_sha256=write_onnx_metadata(card.onnx_path, card))
    _program_and_parity(model.eval(), card, bundle, parity_images, log)
    card.save(bundle)
    return bundle


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Re-export a bundle from its weights: model.onnx (logits + features), "
                                             "its metadata and model.pt2.")
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[1] / "samples" / "simpsons",
                    help="folder of real images for the parity checks (default: samples/simpsons)")
    ap.add_argument("--input-size", type=int, help="serve at this input side (train/serving.py chooses it)")
    ap.add_argument("--temperature", type=float, help="the temperature fitted at that size")
    ap.add_argument("--tta", choices=["none", "flip"], help="the test-time augmentation that serves by default")
    a = ap.parse_args()
    images = sorted(p for p in a.images.rglob("*.jpg"))[:64]
    renew(a.bundle, images, input_size=a.input_size, temperature=a.temperature, tta=a.tta)
