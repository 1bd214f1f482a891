"""``batchcls info``: what a person wants to know about a bundle, in a dozen lines (``--json``: the whole card)."""
from __future__ import annotations

import json
import re
import textwrap
from typing import Any

from batchcls.card import CARD_FILE, ModelCard

SHOWN_CLASSES = 60  # every class up to this many (a few wrapped lines); past it the first ones and the count
WIDTH = 110  # the class list wraps here, indented under its label
_HEADLINE_METRIC = re.compile(r"(test|val)_(acc|macro_f1)")  # the split's accuracy and macro-F1


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def openset_point(card: ModelCard) -> dict[str, Any] | None:
    """The card's open-set section (``openset``: one fitted decision per model file x TTA), when it has one."""
    point = getattr(card, "openset", None)
    if point is None and card.bundle_dir is not None:  # a card read by a ModelCard that does not keep the key
        try:
            point = json.loads((card.bundle_dir / CARD_FILE).read_text()).get("openset")
        except (OSError, ValueError, AttributeError):
            point = None
    return point if isinstance(point, dict) and point else None


def _classes(card: ModelCard) -> str:
    """The class list, wrapped: all of them, or past SHOWN_CLASSES the first ones and where the rest are."""
    shown = card.classes[:SHOWN_CLASSES]
    rest = card.num_classes - len(shown)
    text = f"{card.num_classes}: {', '.join(shown)}" + (f", ... ({rest} more: batchcls info --json)" if rest else "")
    return "\n".join(textwrap.wrap(text, WIDTH, initial_indent="classes:     ", subsequent_indent=" " * 13,
                                    break_on_hyphens=False))


def _serving(card: ModelCard) -> str:
    """How the bundle serves unless told otherwise: the test-time augmentation its card chose on validation."""
    other = "--tta none turns it off" if card.tta == "flip" else "--tta flip averages each image with its mirror"
    return f"serving:     tta {card.tta} (the card's choice, made on validation; {other})"


def summary(card: ModelCard) -> str:
    resize = (f"center crop {card.crop_pct:g} of the shorter side" if card.resize_mode == "center_crop"
              else "whole frame squashed")
    lines = [f"model:       {card.name} ({card.architecture}), {card.bundle_dir}",
             _classes(card),
             f"input:       {card.input_size}x{card.input_size} RGB, {resize}, {card.interpolation}; "
             f"mean {', '.join(f'{m:g}' for m in card.mean)}, std {', '.join(f'{s:g}' for s in card.std)}",
             f"calibration: softmax temperature {card.temperature:.4g}",
             _serving(card)]
    shown = {k: v for k, v in card.metrics.items() if _HEADLINE_METRIC.fullmatch(k)} or dict(list(card.metrics.items())[:4])
    if shown:
        lines.append(f"metrics:     {', '.join(f'{k} {_number(v)}' for k, v in shown.items())}")
    point = openset_point(card)
    for entry in (point or {}).get("configs", []) if isinstance((point or {}).get("configs"), list) else []:
        gate = entry.get("gate", {}) if isinstance(entry, dict) else {}
        if not isinstance(entry, dict) or not isinstance(gate, dict):
            continue
        seen = (f"; on validation it flagged {gate['foreign_flagged']:.1%} of foreign images and at most "
                f"{max(gate['flagged'].values()):.2%} of frames at any size" if gate.get("flagged") else "")
        lines.append(f"open set:    {entry.get('model')} --tta {entry.get('tta')}: {entry.get('method')}, 'unknown' "
                     f"below known_score {_number(entry.get('cut'))}, gate {'passed' if gate.get('passed') else 'FAILED'}"
                     f"{seen}")
    if card.training.get("command"):
        lines.append(f"trained by:  {card.training['command']}")
    lines.append("(batchcls info --json prints the whole card and the ONNX file's metadata)")
    return "\n".join(lines)
