"""The GPU path on a GPU: each test would catch one of the defects a line-by-line read found before any GPU
user did, and fails only when the code is wrong. All are marked ``gpu`` and skip without CUDA; the TensorRT
ones also skip, with the reason, where the tensorrt package is missing. ``scripts/gpu_check.sh`` runs them
on a lent machine.

The model is the shipped bundle (engines/simpsons, or $BATCHCLS_TEST_BUNDLE); the reference is always the
CPU path: ONNX Runtime FP32 on Pillow-decoded images. Rows are compared as ``tests/route_parity.py`` says:
every error row identical, reason included; the network's own label (``model_label``) the same except at a
near tie; the top-1 confidence within MAX_CONF_DIFF (0.02) with ``--cpu-decode`` (the same pixels, fp16 on
the GPU) and within NVJPEG_CONF_DIFF (0.08) with nvJPEG (another decoder's pixels; its largest measured drift
was 0.056); the open-set decision the same wherever the reference's known_score is clear of the cut.
With $BATCHCLS_GPU_REPORT set to a folder, the row comparisons are written there as JSON for the script's table.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SAMPLES
from hostile_jpegs import hostile_bytes, mixed_folder
from route_parity import BAND_NVJPEG, BAND_SAME_PIXELS, NVJPEG_CONF_DIFF, compare_routes

from batchcls.backends import OnnxRuntimeBackend, load_backend
from batchcls.builders.parity import MAX_CONF_DIFF
from batchcls.card import load_card
from batchcls.errors import GpuFailure, ModelError
from batchcls.infer import Classifier
from batchcls.pipeline import RunOptions, classify
from batchcls.scan import scan_dir

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    torch = None
    HAS_CUDA = False

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU with a CUDA build of torch")]

TRT_MISSING = "TensorRT is not installed here (pip install 'batchcls[tensorrt]')"


def bundle_dir() -> Path:
    for candidate in (os.environ.get("BATCHCLS_TEST_BUNDLE"), REPO / "engines" / "simpsons"):
        if candidate and (Path(candidate) / "model.pt2").is_file():
            return Path(candidate)
    pytest.skip("no bundle with model.pt2 (engines/simpsons or $BATCHCLS_TEST_BUNDLE)")


@pytest.fixture(scope="module")
def card():
    return load_card(bundle_dir())


@pytest.fixture(scope="module")
def cuda_backend(card):
    from batchcls.backends.pytorch import TorchBackend

    return TorchBackend(card, device="cuda")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """1,024 distinct frames with the hostile JPEGs inside (two 512-image batches)."""
    return mixed_folder(tmp_path_factory.mktemp("gpu") / "in", 1024, every=97, vary=True)


@pytest.fixture(scope="module")
def files(folder):
    return sorted(scan_dir(folder), key=lambda f: f.rel)


@pytest.fixture(scope="module")
def cpu_rows(card, files):
    return run_rows(card, OnnxRuntimeBackend(card.onnx_path), files, batch_size=64, workers=2)


def run_rows(card, backend, files, *, batch_size=512, workers=2, tta=None, gpu_decode=True,
             open_set=True) -> list[dict]:
    """Rows through the pipeline, with every class's probability (what the comparison reads)."""
    options = RunOptions(batch_size=batch_size, workers=workers, tta=tta, gpu_decode=gpu_decode, probs=True,
                         open_set=open_set)
    return [r for rows in classify(files, Classifier(card, backend, tta=tta, open_set=open_set), options)
            for r in rows]


def decision_cut(card, tta=None) -> float | None:
    """The cut the reference's rows were decided with (None: no decision in the bundle)."""
    decision = Classifier(card, OnnxRuntimeBackend(card.onnx_path), tta=tta).open_set
    return None if decision is None else decision.cut


def assert_same_rows(card, ref, got, what: str, *, nvjpeg: bool, tta=None, open_set: bool = True) -> None:
    """``got`` holds to ``ref`` as tests/route_parity.py says; nvJPEG's pixels get its wider tolerances."""
    cmp = compare_routes(ref, got, card.classes, conf_diff=NVJPEG_CONF_DIFF if nvjpeg else MAX_CONF_DIFF,
                         band=BAND_NVJPEG if nvjpeg else BAND_SAME_PIXELS,
                         cut=decision_cut(card, tta) if open_set else None, what=what)
    report = os.environ.get("BATCHCLS_GPU_REPORT")
    if report:
        Path(report).mkdir(parents=True, exist_ok=True)
        (Path(report) / f"rows-{what}.json").write_text(json.dumps(cmp.to_dict()))
    assert not cmp.problems, f"{what}: " + "; ".join(cmp.problems[:10])


def sample_batch(card, n: int, seed: int = 0) -> np.ndarray:
    """``n`` normalised real frames (cycled), float32 NCHW, as the CPU path feeds a backend."""
    from batchcls.decode_stage import load_images
    from batchcls.presets import EvalPreset, normalize

    frames = sorted(scan_dir(SAMPLES), key=lambda f: f.rel)
    images = load_images(frames, EvalPreset.from_card(card)).images
    order = np.random.default_rng(seed).permutation(np.arange(n) % len(images))
    return normalize(images[order], card.mean, card.std)


def ort_logits(card, x: np.ndarray) -> np.ndarray:
    return OnnxRuntimeBackend(card.onnx_path).infer(x)


def assert_same_logits(got: np.ndarray, ref: np.ndarray, atol: float = 0.1) -> None:
    """fp16 logits of the same inputs: within ``atol``, and the same top-1 except at a near tie (the
    reference's top two closer than 2 x atol, which that much drift may turn over)."""
    assert got.shape == ref.shape and np.abs(got - ref).max() < atol, np.abs(got - ref).max()
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] >= 2 * atol
    assert (got.argmax(1) == ref.argmax(1))[clear].all()


# --- CUDA graphs -------------------------------------------------------------------------------------

def test_the_graph_is_captured_at_the_runs_batch_size(card, cuda_backend):
    """The model check sends one image first; the 512-image batch must then run a 512 graph, not replay
    the one-image graph 512 times."""
    from batchcls.backends.pytorch import GraphedForward

    graphed = cuda_backend.model
    assert isinstance(graphed, GraphedForward)
    Classifier(card, cuda_backend)
    x = sample_batch(card, 512)
    got = cuda_backend.infer(x)
    assert 512 in graphed.sizes and graphed.sizes == sorted(set(graphed.sizes)), graphed.sizes
    assert_same_logits(got, ort_logits(card, x))


def test_small_and_odd_batches_pad_to_their_own_graphs(card, cuda_backend):
    x = sample_batch(card, 7)
    ref = ort_logits(card, x)
    for n in (1, 2, 3, 5, 7):
        np.testing.assert_allclose(cuda_backend.infer(x[:n]), ref[:n], atol=0.1)
    assert {1, 2, 4, 8} <= set(cuda_backend.model.sizes)


# --- the same folder on the CPU and the GPU ----------------------------------------------------------

def test_same_rows_on_cpu_and_gpu_through_nvjpeg(card, cuda_backend, files, cpu_rows):
    assert_same_rows(card, cpu_rows, run_rows(card, cuda_backend, files), "cuda-nvjpeg", nvjpeg=True)


def test_same_rows_on_cpu_and_gpu_with_cpu_decode(card, cuda_backend, files, cpu_rows):
    assert_same_rows(card, cpu_rows, run_rows(card, cuda_backend, files, gpu_decode=False), "cuda-cpu-decode",
                     nvjpeg=False)


def test_hostile_jpegs_inside_a_512_batch(card, cuda_backend, files, cpu_rows):
    """Progressive, CMYK, a lying header and corrupt data with an end marker, in one nvJPEG batch: their
    rows are the CPU path's, and the bad ones cost a few halvings, not 512 single decodes."""
    from batchcls.gpu import GpuJpegLoader

    first = files[:512]
    loader = GpuJpegLoader(card, device="cuda")
    batch = loader.load_files(first)
    bad = [i for i, e in enumerate(batch.errors) if e]
    assert [batch.errors[i] for i in bad] == [r["error"] for r in cpu_rows[:512] if r["status"] == "error"]
    assert len(bad) == 2 and any(e.startswith("truncated image: the header promises 9000x9000") for e in batch.errors if e)
    assert loader.decode_calls <= 1 + 2 * 9, loader.decode_calls
    assert batch.images.shape == (510, 3, card.input_size, card.input_size) and batch.images.is_cuda


def test_a_lying_header_never_reaches_the_gpu_allocator(card, tmp_path):
    from batchcls.gpu import GpuJpegLoader

    (tmp_path / "liar.jpg").write_bytes(hostile_bytes("lying_header"))
    loader = GpuJpegLoader(card, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    batch = loader.load_files(list(scan_dir(tmp_path)))
    assert batch.errors[0].startswith("truncated image") and loader.decode_calls == 0
    assert torch.cuda.max_memory_allocated() - before < 16 * 2**20  # 9000x9000 RGB would be 243 MB


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_each_tta_on_the_gpu_matches_the_cpu(card, cuda_backend, files, tta):
    """Both modes the card may serve: one view, and the image with its mirror (made on the device)."""
    part = files[:256]
    ref = run_rows(card, OnnxRuntimeBackend(card.onnx_path), part, batch_size=64, tta=tta)
    assert_same_rows(card, ref, run_rows(card, cuda_backend, part, batch_size=128, tta=tta), f"cuda-nvjpeg-tta-{tta}",
                     nvjpeg=True, tta=tta)


def test_embeddings_on_the_nvjpeg_route_without_the_decision(card, cuda_backend, files):
    """--embeddings with the decision off: the GPU route fetches the features anyway; each vector points
    where the CPU path's does (nvJPEG's pixels, fp16)."""
    part = files[:64]
    options = RunOptions(batch_size=32, workers=0, open_set=False, embeddings=True)
    ref = [r for rows in classify(part, Classifier(card, OnnxRuntimeBackend(card.onnx_path), open_set=False), options)
           for r in rows]
    got = [r for rows in classify(part, Classifier(card, cuda_backend, open_set=False), options) for r in rows]
    assert [(r["path"], r["status"]) for r in got] == [(r["path"], r["status"]) for r in ref]
    for r, g in zip(ref, got):
        if r["status"] != "ok":
            assert g["embedding"] is None
            continue
        a, b = r["embedding"], g["embedding"]
        assert a.shape == b.shape and float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.99, r["path"]


def test_uint8_normalised_on_the_gpu_equals_float32_from_the_host(card, cuda_backend):
    """``embed_uint8`` (what --cpu-decode, watch and the API can send: uint8, mirrored and normalised on the
    GPU) gives the host path's logits and features: the same arithmetic, the same fp16 network."""
    from batchcls.decode_stage import load_images
    from batchcls.presets import EvalPreset, normalize

    frames = sorted(scan_dir(SAMPLES), key=lambda f: f.rel)[:16]
    images = load_images(frames, EvalPreset.from_card(card)).images
    for views in (1, 2):
        host = np.concatenate([images, images[:, :, ::-1]]) if views == 2 else images
        ref_logits, ref_features = cuda_backend.embed(normalize(host, card.mean, card.std))
        logits, features = cuda_backend.embed_uint8(images, views=views, features=True)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-2)
        assert (features is None) == (ref_features is None)
        if features is not None:
            np.testing.assert_allclose(features, ref_features, atol=1e-2)


class _SlowBackend:
    """A stand-in GPU backend: one long kernel per batch (``torch.cuda._sleep``), zero logits after it."""

    name = "slow"

    def __init__(self, card, cycles: int) -> None:
        self.device = torch.device("cuda")
        self.classes, self.cycles = card.num_classes, cycles
        self.has_features = False

    def infer(self, batch: np.ndarray) -> np.ndarray:  # the model check
        return np.zeros((len(batch), self.classes), np.float32)

    def infer_images(self, images: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)
        return torch.zeros((len(images), self.classes), device=self.device)


def test_collecting_a_batch_does_not_wait_for_the_next_batchs_inference(card):
    """classify_gpu launches batch k, then collects batch k-1: that collection must wait for k-1's copy back
    only, not for batch k's inference queued after it (a copy on the caller's stream would)."""
    from batchcls.gpu import GpuClassifier

    classifier = GpuClassifier(card, _SlowBackend(card, cycles=200_000_000), tta="none", open_set=False)
    images = torch.zeros((8, 3, card.input_size, card.input_size), dtype=torch.uint8, device="cuda")
    for _ in range(3):  # warm: the pinned host buffers are allocated, then reused
        first, second = classifier.launch(images), classifier.launch(images)
        first(), second()
    t = time.perf_counter()
    classifier.launch(images)()
    one_batch = time.perf_counter() - t
    first = classifier.launch(images)
    torch.cuda.synchronize()
    second = classifier.launch(images)  # its kernel now keeps the GPU busy for one_batch
    t = time.perf_counter()
    first()
    waited = time.perf_counter() - t
    second()
    assert one_batch > 0.02 and waited < one_batch / 4, (waited, one_batch)


# --- failures that must stop a run -------------------------------------------------------------------

def test_out_of_memory_stops_the_run_in_one_line_and_the_backend_survives(card):
    from batchcls.backends.pytorch import TorchBackend

    backend = TorchBackend(card, device="cuda")
    classifier = Classifier(card, backend)
    frames = sorted(scan_dir(SAMPLES), key=lambda f: f.rel)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_allocated() + 256 * 2**20)
                                                   / torch.cuda.get_device_properties(0).total_memory))
    try:
        with pytest.raises(GpuFailure, match="ran out of memory") as e:
            list(classify(frames * 103, classifier, RunOptions(batch_size=4096, workers=0)))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "\n" not in str(e.value) and "--batch-size" in str(e.value)
    rows = [r for rows in classify(frames, classifier, RunOptions(batch_size=64, workers=0)) for r in rows]
    assert len(rows) == len(frames) and all(r["status"] == "ok" for r in rows)


def test_a_sticky_cuda_error_stops_the_run_in_one_line(card):
    """A device-side assert poisons the CUDA context: every later batch fails. Run in its own process."""
    code = f"""
import numpy as np, torch
from batchcls.card import load_card
from batchcls.backends.pytorch import TorchBackend
from batchcls.errors import GpuFailure
card = load_card({str(card.bundle_dir)!r})
b = TorchBackend(card, device="cuda")
x = np.zeros((2, 3, card.input_size, card.input_size), np.float32)
b.infer(x)
t = torch.zeros(2, device="cuda")
try:
    t[torch.tensor([5], device="cuda")] = 1
    torch.cuda.synchronize()
except Exception as e:
    pass
try:
    b.infer(x)
    print("NO FAILURE")
except GpuFailure as e:
    print("GpuFailure:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith(("GpuFailure:", "NO FAILURE"))]
    assert len(lines) == 1 and lines[0].startswith("GpuFailure: cuda is in a CUDA error state"), out.stdout + out.stderr


# --- threads -----------------------------------------------------------------------------------------

def _four_threads(backend, card, size: int = 64) -> None:
    """Four threads, each its own frames in batches of one size (so they share one CUDA graph, or the
    TensorRT slots), 10 calls each: every answer is its own batch's. Without the lock around a graph's
    shared buffers, threads read each other's logits (tests/test_gpu_path.py shows the check catching it)."""
    batches = [sample_batch(card, size, seed=k) for k in range(4)]
    expect = [backend.infer(b) for b in batches]
    graphs = list(getattr(backend.model, "sizes", [])) if hasattr(backend, "model") else []
    wrong: list[str] = []

    def work(k: int) -> None:
        for _ in range(10):
            got = backend.infer(batches[k])
            if got.shape != expect[k].shape or np.abs(got - expect[k]).max() > 1e-2:
                wrong.append(f"thread {k}")
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads) and wrong == []
    if graphs:  # the threads replayed the one graph captured for the expected answers
        assert backend.model.sizes == graphs and size in graphs


def test_four_threads_on_the_cuda_backend(card):
    from batchcls.backends.pytorch import TorchBackend

    _four_threads(TorchBackend(card, device="cuda"), card)


# --- the second output -------------------------------------------------------------------------------

def test_cuda_embed_matches_onnxruntime(card, cuda_backend):
    import onnxruntime as ort

    x = sample_batch(card, 32)
    logits, features = cuda_backend.embed(x)
    session = ort.InferenceSession(str(card.onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    ref = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))
    assert np.abs(logits - ref[names[0]]).max() < 0.1
    if "features" in ref:
        assert features is not None and features.shape == ref["features"].shape
        cos = (features * ref["features"]).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(ref["features"], axis=1))
        assert cos.min() > 0.999
    else:
        assert features is None


# --- ONNX Runtime and training on a GPU machine ------------------------------------------------------

def test_onnxruntime_on_cuda_runs_on_the_gpu_or_says_why(card):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ModelError, match="onnxruntime has no CUDA provider here"):
            load_backend(card, "onnxruntime", device="cuda")
        return
    backend = load_backend(card, "onnxruntime", device=f"cuda:{torch.cuda.device_count() - 1}")
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    options = backend.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["device_id"] == str(torch.cuda.device_count() - 1)


def test_each_training_rank_makes_its_gpu_current():
    from train.train import rank_device

    last = torch.cuda.device_count() - 1
    try:
        assert rank_device(True, last) == torch.device("cuda", last) and torch.cuda.current_device() == last
    finally:
        torch.cuda.set_device(0)


# --- TensorRT ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory, card) -> Path:
    pytest.importorskip("tensorrt", reason=TRT_MISSING)
    from batchcls.builders.tensorrt import build_plan

    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(card.bundle_dir, bundle, ignore=shutil.ignore_patterns("*.plan", "*.plan.json", "*.cache"))
    build_plan(load_card(bundle), max_batch=16, log=lambda m: None)
    return bundle


@pytest.fixture(scope="module")
def trt_backend(trt_bundle):
    from batchcls.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(load_card(trt_bundle))


def test_tensorrt_plan_is_fp16_and_tested_major(trt_bundle):
    import tensorrt as trt

    from batchcls.backends.tensorrt import TESTED_TENSORRT_MAJOR, meta_path

    meta = json.loads(meta_path(load_card(trt_bundle)).read_text())
    assert meta["fp16"] is True and int(trt.__version__.split(".")[0]) == TESTED_TENSORRT_MAJOR
    assert meta["profile"]["max"][0] == 16 and meta["output_name"] in meta["output_names"]


@pytest.fixture(scope="module")
def cpu_rows_without_decision(card, files):
    """The reference for a plan: the open-set statistics describe the FP32 ONNX, not a plan
    (``TensorRTBackend.decision_model``), so plans are compared on the network alone."""
    return run_rows(card, OnnxRuntimeBackend(card.onnx_path), files, batch_size=64, workers=2, open_set=False)


def test_tensorrt_infer_parity_double_buffered(trt_bundle, trt_backend, files, cpu_rows_without_decision):
    """infer() (what --cpu-decode, watch and the API call) on Pillow's pixels, the same the reference saw: the
    strict bar. 512-image batches through a plan of at most 16, in chunks alternating between the two slots."""
    card = load_card(trt_bundle)
    assert_same_rows(card, cpu_rows_without_decision, run_rows(card, trt_backend, files, gpu_decode=False,
                                                               open_set=False),
                     "tensorrt-cpu-decode", nvjpeg=False, open_set=False)


def test_tensorrt_nvjpeg_parity(trt_bundle, trt_backend, files, cpu_rows_without_decision):
    card = load_card(trt_bundle)
    assert_same_rows(card, cpu_rows_without_decision, run_rows(card, trt_backend, files, open_set=False),
                     "tensorrt-nvjpeg", nvjpeg=True, open_set=False)


def test_tensorrt_names_the_plan_as_its_decision_model(trt_bundle, trt_backend):
    assert trt_backend.decision_model == "model.plan" and trt_backend.precision == "fp16"
    assert trt_backend.has_features == ("features" in trt_backend.outputs)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 37, 100])
def test_tensorrt_batches_larger_than_the_plans_maximum(trt_bundle, trt_backend, n):
    """Chunks of at most 16 rows; every chunk's addresses 256-byte aligned (42 classes x 2 bytes x 16 rows
    is not a multiple of 256), on both entry points."""
    card = load_card(trt_bundle)
    x = sample_batch(card, n)
    ref = ort_logits(card, x)
    np.testing.assert_allclose(trt_backend.infer(x), ref, atol=0.1)
    on_device = trt_backend.infer_device(torch.from_numpy(x).cuda()).cpu().numpy()
    np.testing.assert_allclose(on_device, ref, atol=0.1)


def test_four_threads_on_the_tensorrt_backend(trt_bundle, trt_backend):
    _four_threads(trt_backend, load_card(trt_bundle))


def test_tensorrt_embed_binds_outputs_by_name(trt_bundle, trt_backend, cuda_backend):
    card = load_card(trt_bundle)
    x = sample_batch(card, 40)
    logits, features = trt_backend.embed(x)
    ref_logits, ref_features = cuda_backend.embed(x)
    assert np.abs(logits - ref_logits).max() < 0.1
    assert (features is None) == (ref_features is None)
    if features is not None:
        assert features.shape == ref_features.shape and np.abs(features - ref_features).max() < 0.1


def test_tensorrt_enqueues_on_its_own_streams(trt_backend):
    from batchcls.backends.tensorrt import stream_handle

    for slot in trt_backend.slots:
        assert stream_handle(slot.stream) not in (0, 1, 2)
        assert slot.context is not None
