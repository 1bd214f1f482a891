"""``python -m train``: the whole pipeline (see train/pipeline.py)."""
from train.pipeline import main

main()
