"""Build the foreign-image sets: OUT/train for outlier exposure, OUT/val and OUT/test for measuring.

The logic lives in train/foreign.py (``build_sets``), which ``make train`` also calls; this is its command
line. Every source package goes wholly to train or wholly to val+test, so the measured "none of these" rate is
not flattered by images the model trained on. See docs/foreign-images.md for the packages and their licences.

Usage:
    python scripts/build_foreign.py OUT [--seed N]

The script installs nothing: a missing source is skipped with one line naming the package to install.
It is deterministic for a given --seed and the same package versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.foreign import build_sets, halves, synthetic  # noqa: E402, F401 - after the sys.path line; halves/synthetic for tests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="output folder: OUT/train, OUT/val and OUT/test are replaced")
    parser.add_argument("--seed", type=int, default=0, help="seeds every sample, crop, frame and the val/test halving")
    args = parser.parse_args()
    build_sets(args.out, seed=args.seed, log=lambda line: print(line, file=sys.stderr))


if __name__ == "__main__":
    main()
