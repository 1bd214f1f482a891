"""Training pipeline for batchcls: split -> search -> train -> evaluate -> calibrate -> export.

Run it with ``python -m train`` (or ``make train``); see train/pipeline.py.
"""
