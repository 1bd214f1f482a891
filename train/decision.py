"""Fit the "none of these" decision of a bundle for every way it is served (``batchcls.builders.decision``).

    python -m train.decision --bundle engines/simpsons                      # FP32 (+ shipped INT8) x TTA
    python -m train.decision --bundle engines/simpsons --test --report runs/decision.json   # + the test tables

The foreign images it fits and gates on are built once from offline package data (``train/foreign.py``) when
``--foreign`` names no folder that has them.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from batchcls.builders import decision as B
from batchcls.errors import BatchclsError


def foreign_folder(foreign: Path | None, log: Callable[[str], None] = print) -> Path:
    """``foreign`` (default runs/foreign) with train/ val/ test/ in it, built here when missing."""
    root = Path(foreign or "runs/foreign")
    if not all((root / k).is_dir() for k in ("train", "val")):
        from train.foreign import build_sets

        log(f"decision: building the foreign image sets in {root} (offline package data and synthetic images)")
        build_sets(root, log=log)
    return root


def fit_decision(bundle: Path, *, manifest: Path | None = None, foreign_train: Path | None = None,
                 foreign_val: Path | None = None, foreign: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """What ``make train`` calls after export: every served configuration of ``bundle`` fitted, gated, written.

    ``foreign_train`` / ``foreign_val`` name the two folders directly (siblings of one root), else ``foreign``."""
    root = foreign_train.parent if foreign_train is not None else foreign_folder(foreign, log)
    if foreign_val is not None and foreign_val.parent != root:
        raise ValueError("foreign_train and foreign_val must be folders of one root (train/ and val/)")
    return B.fit_decision(Path(bundle), manifest=manifest, foreign=root, log=log)


def markdown(report: dict) -> str:
    """The report's tables for docs/: per configuration, the fit on validation and, with --test, the test split."""
    lines = []
    for e in report.get("fit", {}).get("configs", []):
        g = e["gate"]
        lines += [f"**{e['model']}, --tta {e['tta']}**: method `{e['method']}`, cut {e['cut']:.3f}; gate "
                  f"{'passed' if g['passed'] else 'FAILED'} ({g['reason']})", "",
                  "| validation condition | accuracy | macro-F1 | flagged | correct frames flagged |", "|---|---:|---:|---:|---:|"]
        for c in g["flagged"]:
            lines.append(f"| {c} | {g.get('acc', {}).get(c, float('nan')):.4f} | "
                         f"{g.get('macro_f1', {}).get(c, float('nan')):.4f} | {g['flagged'][c]:.2%} | "
                         f"{g['correct_flagged'][c]:.2%} |")
        near = g.get("near_ood") or {}
        lines += ["", f"Foreign validation half flagged: {g['foreign_flagged']:.1%}. Near-OOD (left-out characters "
                  f"{', '.join(near.get('left_out', [])) or '-'}): {near.get('flagged', float('nan')):.1%} flagged.", "",
                  "| candidate method | cut | foreign val flagged | most val flagged |", "|---|---:|---:|---:|"]
        lines += [f"| `{m}` | {r['cut']:.3f} | {r['foreign_flagged']:.1%} | {r['max_val_flagged']:.2%} |"
                  for m, r in e["candidates"].items()]
        lines.append("")
    for name, t in report.get("test", {}).items():
        lines += [f"**Test split, {name}** (`{t['method']}`, cut {t['cut']:.3f}); foreign test half flagged "
                  f"{t['foreign_test_flagged']:.1%} of {t['foreign_test_n']}", "",
                  "| test condition | accuracy | with the decision | macro-F1 | flagged |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c} | {r['acc']:.4f} | {r['acc_decision']:.4f} | {r.get('macro_f1', float('nan')):.4f} | "
                  f"{r['flagged']:.2%} |" for c, r in t["conditions"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True, help="the bundle to fit (card.json + model.onnx)")
    ap.add_argument("--split", type=Path, help="its training run's split manifest (default: found by the card's sha256)")
    ap.add_argument("--foreign", type=Path, help="folder with train/ val/ test/ foreign images (default: runs/foreign, "
                    "built if missing)")
    ap.add_argument("--model", type=Path, action="append", help="fit only this model file (repeatable)")
    ap.add_argument("--cache", type=Path, help="decoded pixels are cached here (default runs/decision-cache)")
    ap.add_argument("--no-fit", action="store_true", help="keep the fitted decisions; with --test, only report")
    ap.add_argument("--test", action="store_true", help="also score the test split and the foreign test half once")
    ap.add_argument("--report", type=Path, help="write the fit (and test tables) as JSON here")
    ap.add_argument("--markdown", type=Path, help="write them as markdown tables here (for docs/)")
    args = ap.parse_args(argv)
    foreign = foreign_folder(args.foreign)
    report: dict = {}
    try:
        if not args.no_fit:
            report["fit"] = B.fit_decision(args.bundle, manifest=args.split, foreign=foreign, models=args.model,
                                           cache=args.cache)
        if args.test:
            report["test"] = B.test_tables(args.bundle, manifest=args.split, foreign=foreign, cache=args.cache)
    except BatchclsError as e:
        raise SystemExit(f"error: {e}") from None
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(report))


if __name__ == "__main__":
    main()
