"""Training pipeline for batchcls: split -> search -> train -> evaluate -> calibrate -> export.

Run it with ``python -m train`` (or ``make train``); see train/pipeline.py.
"""
import os

# Must be set before torch loads OpenMP. On a shared CPU, OpenMP threads that spin-wait at every barrier
# while a sibling thread is descheduled make training several times slower than one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
