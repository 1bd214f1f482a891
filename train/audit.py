"""Label audit: the held-out images whose label the trained model disputes, for a person to review.

    python -m train.audit --run runs/train                       # -> runs/train/audit/val.csv + val-sheet-NN.png
    python -m train.audit --run runs/train --verdicts docs/label-audit-val.csv

A split drawn from a scraped folder carries that folder's label noise, so part of every "error" is the label's,
not the model's. The audit lists each disagreement (and each unreadable image) once, most confident first, with
contact sheets to look at. A person writes one verdict per row (VERDICTS); read back, the verdicts say how far
the model could still climb and where the labels themselves cap the score. Images go through batchcls's own run
pipeline (ONNX Runtime, no torch), so the audit sees exactly what users get.
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from batchcls.backends import load_backend
from batchcls.card import load_card
from batchcls.decode import decode_image
from batchcls.errors import BatchclsError
from batchcls.fsutil import atomic_open
from batchcls.infer import Classifier
from batchcls.metrics import f1_table
from batchcls.pipeline import RunOptions, classify
from batchcls.scan import InputFile
from train import data as D

# In the order the ceilings lift them: what a better model could fix first, what no model should "fix" last.
VERDICTS = {
    "model_error": "one recognisable character: the model is wrong",
    "several": "several characters in view; the label names one of them",
    "unclear": "too small, dark, cropped or disguised to tell who it is",
    "wrong_label": "the image shows a different character than its label says",
}
FIELDS = ["rank", "path", "label", "predicted", "confidence", "verdict"]


def predict_split(manifest: dict, split: str, *, model: str | None = None, root: str | None = None,
                  backend: str | None = None, options: RunOptions = RunOptions()) -> list[dict]:
    """One row per image of the split: path (relative to the data root), label, predicted, confidence."""
    root = root or manifest["root"]
    classes = manifest["classes"]
    labels = {rel: classes[idx] for rel, idx in manifest[split]}
    files = [InputFile(path=os.path.join(root, rel), rel=rel) for rel in labels]
    card = load_card(model)
    classifier = Classifier(card, load_backend(card, backend))
    rows = []
    for batch in classify(files, classifier, options):
        for r in batch:
            ok = r["status"] == "ok"
            rows.append({"path": r["path"], "label": labels[r["path"]],
                         "predicted": r["label"] if ok else f"<error: {r['error']}>",
                         "confidence": r["confidence"] if ok else 0.0})
    return rows


def disagreements(rows: list[dict]) -> list[dict]:
    """Rows whose prediction isn't their label, most confident first (those are the likeliest label errors)."""
    return sorted((r for r in rows if r["predicted"] != r["label"]), key=lambda r: -float(r["confidence"]))


def read_verdicts(path: str | os.PathLike) -> dict[str, str]:
    """path -> verdict from a reviewed audit CSV; rows left blank are skipped, unknown verdicts are an error."""
    verdicts = {}
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            verdict = (row.get("verdict") or "").strip()
            if not verdict:
                continue
            if verdict not in VERDICTS:
                raise ValueError(f"{path}:{line}: unknown verdict {verdict!r}; use one of {', '.join(VERDICTS)}")
            verdicts[row["path"]] = verdict
    return verdicts


def write_audit(disputed: list[dict], path: Path, verdicts: dict[str, str]) -> None:
    """The review sheet: verdicts already given for a path are carried over, so a re-audit after retraining
    only asks about new rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        for rank, r in enumerate(disputed):
            w.writerow({"rank": rank, "path": r["path"], "label": r["label"], "predicted": r["predicted"],
                        "confidence": f"{float(r['confidence']):.4f}", "verdict": verdicts.get(r["path"], "")})


def contact_sheets(disputed: list[dict], root: str, prefix: Path, *, per_sheet: int = 20, columns: int = 5,
                   tile: int = 220) -> list[Path]:
    """PNG pages of thumbnails captioned 'rank label' / 'predicted confidence', in CSV order."""
    font = ImageFont.load_default(size=13)
    sheets = []
    for start in range(0, len(disputed), per_sheet):
        page = disputed[start:start + per_sheet]
        rows = (len(page) + columns - 1) // columns
        sheet = Image.new("RGB", (columns * tile, rows * (tile + 36)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, r in enumerate(page):
            x, y = (i % columns) * tile, (i // columns) * (tile + 36)
            try:
                thumb = decode_image(os.path.join(root, r["path"]))
                thumb.thumbnail((tile - 6, tile - 6))
                sheet.paste(thumb, (x, y))
            except Exception as e:  # an unreadable image still gets its captioned slot
                draw.text((x + 4, y + 4), f"unreadable: {e}"[:40], fill="gray", font=font)
            draw.text((x + 2, y + tile - 2), f"{start + i} {r['label']}"[:34], fill="black", font=font)
            draw.text((x + 2, y + tile + 14), f"-> {r['predicted']} {float(r['confidence']):.2f}"[:34],
                      fill="firebrick", font=font)
        out = prefix.parent / f"{prefix.name}-sheet-{start // per_sheet:02d}.png"
        sheet.save(out)
        sheets.append(out)
    return sheets


def ceilings(rows: list[dict], verdicts: dict[str, str]) -> list[tuple[str, float, float]]:
    """(scenario, macro-F1, accuracy) as scored, then with each verdict's disagreements counted as right in
    turn. Unreviewed disagreements count as model errors, which only raises the ceilings: a conservative bound."""
    truth = [r["label"] for r in rows]
    fixed: set[str] = set()
    out = []
    for name, lifted in [("as scored", None), ("if every model_error were right", "model_error"),
                         ("... and every 'several' image", "several"),
                         ("... and every 'unclear' image (wrong labels left)", "unclear")]:
        if lifted:
            fixed.add(lifted)
        pred = [r["label"] if r["predicted"] != r["label"] and verdicts.get(r["path"], "model_error") in fixed
                else r["predicted"] for r in rows]
        macro, micro, _ = f1_table(truth, pred)
        out.append((name, macro, micro))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/train", help="run folder holding split.json")
    p.add_argument("--split", default="val", choices=["val", "test"],
                   help="held-out split to audit (val: test is for the one final score per model)")
    p.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    p.add_argument("--data", default=None, help="data root, if it moved since split.json was written")
    p.add_argument("--verdicts", default=None, help="a reviewed audit CSV (path, verdict columns)")
    p.add_argument("--out", default=None, help="output folder (default: <run>/audit)")
    p.add_argument("--no-sheets", action="store_true", help="skip the PNG contact sheets")
    args = p.parse_args(argv)
    try:
        audit(args)
    except (BatchclsError, ValueError, OSError) as e:  # one line for users; the run pipeline's own errors too
        raise SystemExit(f"error: {e}") from None


def audit(args: argparse.Namespace) -> None:
    split_path = Path(args.run) / "split.json"
    if not split_path.is_file():
        raise ValueError(f"{split_path} not found: point --run at a `make train` run folder")
    manifest, _ = D.load_manifest(split_path)
    root = args.data or manifest["root"]
    out = Path(args.out or Path(args.run) / "audit")
    verdicts = read_verdicts(args.verdicts) if args.verdicts else {}
    rows = predict_split(manifest, args.split, model=args.model, root=root)
    disputed = disagreements(rows)
    write_audit(disputed, out / f"{args.split}.csv", verdicts)
    sheets = [] if args.no_sheets else contact_sheets(disputed, root, out / args.split)
    print(f"audit {args.split}: {len(rows)} images, {len(disputed)} disagreements "
          f"({len(disputed) / max(len(rows), 1):.1%}) -> {out / f'{args.split}.csv'}"
          + (f" + {len(sheets)} contact sheet(s)" if sheets else ""))
    if not verdicts:
        print(f"next: fill its verdict column ({', '.join(VERDICTS)}), then pass it as --verdicts")
        return
    given = Counter(verdicts[r["path"]] for r in disputed if r["path"] in verdicts)
    print(f"verdicts: {sum(given.values())} of {len(disputed)} disagreements reviewed: "
          + ", ".join(f"{v} {given[v]}" for v in VERDICTS))
    print(f"{'':52} {'macro-F1':>8} {'accuracy':>8}")
    for name, macro, acc in ceilings(rows, verdicts):
        print(f"{name:52} {macro:8.4f} {acc:8.4f}")


if __name__ == "__main__":
    main()
