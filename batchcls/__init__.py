"""batchcls: classify whole folders of images with a trained model bundle.

    import batchcls
    model = batchcls.load()                  # the shipped Simpsons model, on ONNX Runtime (no torch)
    model.predict("frame.jpg")               # {"path": ..., "label": ..., "confidence": ..., "status": "ok", ...}
    model.predict([path, pil_image, hwc_uint8_array, jpeg_bytes], top_k=3)   # one dict per item, in order

``load`` and ``Model`` come from ``batchcls.api`` on first use, so ``import batchcls`` (and the CLI's
``--help``) stays instant: numpy, Pillow and ONNX Runtime load when a model does.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchcls.errors import BatchclsError, InputError, ModelError, OutputError

__version__ = "0.1.0"
__all__ = ["BatchclsError", "InputError", "Model", "ModelError", "OutputError", "__version__", "load"]

if TYPE_CHECKING:
    from batchcls.api import Model, load


def __getattr__(name: str) -> Any:
    if name in ("load", "Model"):
        from batchcls import api

        return getattr(api, name)
    raise AttributeError(f"module 'batchcls' has no attribute {name!r}")
