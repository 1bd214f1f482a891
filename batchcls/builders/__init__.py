"""Building engines from a bundle's ONNX model, stored beside its card (``batchcls engine build``).

- TensorRT (NVIDIA GPU with the tensorrt package, ``tensorrt.py``): ``model.plan`` + ``model.plan.json``
  (what the plan is tied to) + a timing cache;
- CPU (``cpu.py``): ``model.opt.onnx`` (ONNX Runtime offline-optimized) and ``model.int8.onnx`` (static
  INT8), with ``engines.json`` recording whether INT8 was kept and the macro-F1s that decided it
  (``parity.py`` compares the rows); with ``ship``, ``shipped-int8.onnx`` + ``shipped-int8.json``: the
  INT8 model a bundle carries to every machine, with its gate figures and a probe checked at load.

Builders use the runtime (``batchcls.backends``, ``batchcls.pipeline``) to judge what they built; the
runtime only reads what they leave (``batchcls.backends.record``), so imports point one way.
"""
from __future__ import annotations

from collections.abc import Callable

from batchcls.card import load_card
from batchcls.errors import ModelError
from batchcls.machine import machine_facts

TARGETS = ("auto", "tensorrt", "cpu")


def build_engines(model: str | None, *, target: str = "auto", fp16: bool = True, max_batch: int = 256,
                  val_dir: str | None = None, calib_dir: str | None = None, calib_images: int = 300,
                  ship: bool = False, log: Callable[[str], None] = print) -> str:
    """Build the fastest engine this machine allows; returns the target that was built.

    auto: a TensorRT plan when the tensorrt package and a CUDA GPU are here, else CPU engines.
    """
    if target not in TARGETS:
        raise ModelError(f"unknown engine target {target!r}: choose one of {', '.join(TARGETS)}")
    card = load_card(model)
    if target == "auto":
        facts = machine_facts()
        target = "tensorrt" if facts.tensorrt_version and facts.gpu_name else "cpu"
        if facts.gpu_name and not facts.tensorrt_version:
            log(f"{facts.gpu_name} found but no tensorrt package: building CPU engines; the cuda backend "
                "needs no build (pip install 'batchcls[tensorrt]' for a TensorRT plan)")
    if target == "tensorrt":
        from batchcls.builders.tensorrt import build_plan

        build_plan(card, fp16=fp16, max_batch=max_batch, log=log)
    else:
        import importlib.util

        from batchcls.builders.cpu import build_cpu_engines

        # onnx reads the graph; ONNX Runtime's quantizer imports ml_dtypes, its pre-processing sympy
        missing = [m for m in ("onnx", "ml_dtypes", "sympy") if importlib.util.find_spec(m) is None]
        if missing:
            raise ModelError(f"building CPU engines needs {', '.join(missing)}: pip install 'batchcls[engine]'")
        build_cpu_engines(card, val_dir=val_dir, calib_dir=calib_dir, calib_images=calib_images, ship=ship,
                          log=log)
    return target
