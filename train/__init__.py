"""Training pipeline for batchcls: split -> search -> train -> evaluate -> calibrate -> export.

Run it with ``python -m train`` (or ``make train``); see train/pipeline.py.
"""
import os

# Must be set before torch loads OpenMP. On a shared CPU, OpenMP threads that spin-wait at every barrier
# while a sibling thread is descheduled made training ~4x slower than one thread (measured here, 2 cores, load ~5).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
