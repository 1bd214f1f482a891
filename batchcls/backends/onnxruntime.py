"""ONNX Runtime: the CPU backend every install has (and CUDA where onnxruntime-gpu is installed)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from batchcls.backends.record import (
    cpu_family,
    file_sha256,
    int8_path,
    local_cpu_engine,
    opt_path,
    read_record,
    shipped_int8,
    shipped_int8_path,
    shipped_probe_path,
)
from batchcls.card import ModelCard
from batchcls.errors import ModelError, first_line
from batchcls.fsutil import atomic_write
from batchcls.machine import default_threads
from batchcls.presets import normalize

PROBE_TOLERANCE = 0.01  # relative logit difference to the gate machine's run: rounding noise, not saturation

FEATURES = "features"  # the model's second output: the pooled penultimate layer (open-set, --embeddings)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        if device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ModelError("onnxruntime has no CUDA provider here: use --device cpu or install onnxruntime-gpu")
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers_for(device))
        except Exception as e:  # ORT raises its own untyped errors for corrupt files
            raise ModelError(f"cannot load ONNX model {model_path}: {first_line(e)}") from e
        check_providers(device, self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        self.logits_name = outputs[0]
        self.has_features = FEATURES in outputs
        self.model_path = model_path

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> logits; the features output, when the model has one, is not fetched."""
        return self.session.run([self.logits_name], {self.input_name: batch})[0]

    def embed(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 NCHW -> (logits, penultimate features or None for a one-output model), in one run."""
        if not self.has_features:
            return self.infer(batch), None
        logits, features = self.session.run([self.logits_name, FEATURES], {self.input_name: batch})
        return logits, features


def providers_for(device: str) -> list:
    """ONNX Runtime's provider list for ``device``: cuda:N puts the CUDA provider on GPU N first."""
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    index = int(device.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def check_providers(device: str, active: list[str]) -> None:
    """ONNX Runtime drops a provider that fails to start (a missing CUDA/cuDNN library) with only a log
    line and runs on the CPU; asked for a GPU, that is an error here, not a silent CPU run."""
    if device.startswith("cuda") and "CUDAExecutionProvider" not in active:
        raise ModelError(f"onnxruntime could not start its CUDA provider on {device} (it would run on the CPU; "
                         "see its log above, usually a missing CUDA or cuDNN library): fix the install, or use "
                         "--backend cuda or --device cpu")


def cpu_model_path(card: ModelCard) -> Path:
    """The fastest ONNX file this CPU may run: what ``make engine`` built and gated here, else the INT8
    model the bundle ships if this CPU computes the logits its gate measured, else the FP32 ONNX."""
    local = local_cpu_engine(card)
    if local is not None and (local.name != int8_path(card).name or _open_set_fits(card, local)):
        return local
    if local is not None:  # a local INT8 build the open-set statistics do not describe: its FP32 sibling
        return opt_path(card) if opt_path(card).is_file() else card.onnx_path
    entry = shipped_int8(card)
    if entry is not None and _open_set_fits(card, shipped_int8_path(card)) and shipped_int8_checked(card, entry):
        return shipped_int8_path(card)
    return card.onnx_path


def _open_set_fits(card: ModelCard, model: Path) -> bool:
    """Does ``model`` have an open-set decision of its own that passed its gate (or is there none to keep)?

    INT8 moves the signals the decision reads, so each model file has its own fitted statistics
    (``batchcls.openset.Decisions``); a file whose decision is missing or failed its gate does not serve
    by default when its FP32 sibling's passed."""
    spec = card.openset
    if not spec:
        return True
    extra = read_record(card).get("openset", [])
    entries = [*spec.get("configs", []), *(extra if isinstance(extra, list) else [])]
    sha = file_sha256(model)
    return any(isinstance(e, dict) and e.get("model_sha256") == sha and e.get("tta") == card.tta
               and e.get("gate", {}).get("passed") for e in entries)


def checks_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchcls" / "int8-checks.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


def shipped_int8_checked(card: ModelCard, entry: dict) -> bool:
    """Does this CPU give the shipped INT8 model's probe images the logits they gave on the gate machine?

    Kernels differ between CPU families (AVX2's saturating u8 x s8 sums, ARM's) and ONNX Runtime
    versions; the same logits mean the recorded gate figures hold here. Asked once per model, CPU and ONNX
    Runtime version, the answer kept in the user's cache with one line saying so (at a terminal; a
    mismatch is always said).
    """
    import onnxruntime as ort

    key = f"{entry['int8_sha256']} onnxruntime {ort.__version__} {cpu_family()} {_cpu_name()}"
    cache = checks_cache()
    try:
        checks = json.loads(cache.read_text())
        checks = checks if isinstance(checks, dict) else {}
    except (OSError, ValueError):
        checks = {}
    if isinstance(checks.get(key), dict):
        return bool(checks[key].get("ok"))
    try:
        images = np.load(shipped_probe_path(card), allow_pickle=False)
        want = np.asarray(entry["probe"]["logits"], np.float32)
        session = OnnxRuntimeBackend(shipped_int8_path(card)).session
        names = [o.name for o in session.get_outputs()]
        got = session.run(["logits" if "logits" in names else names[0]],
                          {session.get_inputs()[0].name: normalize(images, card.mean, card.std)})[0]
        off = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-12))
        ok = got.shape == want.shape and off <= PROBE_TOLERANCE and bool((got.argmax(1) == want.argmax(1)).all())
    except (OSError, ValueError, KeyError, TypeError, ModelError) as e:
        off, ok = float("nan"), False
        print(f"warning: cannot check the shipped INT8 model ({e}): running FP32", file=sys.stderr)
    checks[key] = {"ok": ok, "probe_rel_error": off}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps(checks, indent=1) + "\n")
        noted = f"noted in {cache}"
    except OSError:
        noted = "not cached: checked again next run"
    v = entry.get("validation", {})
    if ok and sys.stderr.isatty():  # news for a person at a terminal; scripts and pipes get rows only
        print(f"batchcls: this CPU ({cpu_family()}) runs the shipped INT8 model as its gate measured it "
              f"(val accuracy {-v.get('accuracy_drop_points', float('nan')):+.2f}, macro-F1 "
              f"{-v.get('f1_drop_points', float('nan')):+.2f} points vs FP32): using it; {noted}", file=sys.stderr)
    elif off == off:
        print(f"warning: the shipped INT8 model's logits here are {off:.3f} off what its gate measured: running "
              f"FP32 on this CPU ({cpu_family()}); `make engine` builds and gates INT8 for it; {noted}", file=sys.stderr)
    return ok


def onnx_metadata(path: Path) -> dict[str, str]:
    """The ONNX file's own ``metadata_props`` (class names, preprocessing, temperature when train/ wrote it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only reading, not running
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT's untyped errors for corrupt files
        raise ModelError(f"cannot load ONNX model {path}: {first_line(e)}") from e
    return dict(session.get_modelmeta().custom_metadata_map)
