"""The GPU path's rules that hold without a GPU: what reaches nvJPEG (the CPU path's header and size guards,
shared), how CUDA graphs are sized, what TensorRT is handed (tested major, aligned addresses, own streams,
outputs by name), out-of-memory stopping a run, ONNX Runtime's CUDA provider, decode workers without torch.

The nvJPEG loader and the torch backend run here with device="cpu" (torchvision's CPU decoder stands in
for nvJPEG, and trusts headers the same way). tests/test_gpu_cuda.py holds the same checks on a GPU.
"""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLES
from hostile_jpegs import HOSTILE, hostile_bytes, mixed_folder
from PIL import Image

from batchcls.backends.onnxruntime import OnnxRuntimeBackend, check_providers, providers_for
from batchcls.backends.tensorrt import (
    TESTED_TENSORRT_MAJOR,
    TRT_ALIGNMENT,
    aligned,
    binding,
    check_tensorrt_version,
    output_names,
    stream_handle,
)
from batchcls.card import load_card
from batchcls.cli import cli
from batchcls.decode_stage import batched, load_images
from batchcls.errors import GpuFailure, ModelError
from batchcls.gpu_read import nvjpeg_may_take, read_batch
from batchcls.infer import Classifier
from batchcls.pipeline import RunOptions, classify
from batchcls.presets import EvalPreset
from batchcls.scan import scan_dir

torch = pytest.importorskip("torch")


def cpu_rows(card, files, batch_size=8, tta=None) -> list[dict]:
    return [r for rows in classify(files, Classifier(card, OnnxRuntimeBackend(card.onnx_path), tta=tta),
                                   RunOptions(batch_size=batch_size, workers=0, tta=tta)) for r in rows]


def gpu_path_rows(card, files, batch_size=8, workers=0, loader=None) -> list[dict]:
    """The nvJPEG route (classify_gpu) with device='cpu'."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    loader = loader or GpuJpegLoader(card, device="cpu")
    return [r for rows in classify_gpu(batched(files, batch_size), GpuClassifier(card, TorchBackend(card)),
                                       loader=loader, workers=workers) for r in rows]


@pytest.fixture(scope="module")
def program_bundle(tmp_path_factory) -> Path:
    from bundles import make_colour_bundle

    return make_colour_bundle(tmp_path_factory.mktemp("program") / "colours", program=True)


# --- what reaches the GPU decoder --------------------------------------------------------------------

def test_a_tiny_file_claiming_9000x9000_is_an_error_row_on_both_paths(program_bundle, tmp_path):
    """The header guard runs before the GPU decoder, and is the CPU path's own (decode.check_header)."""
    card = load_card(program_bundle)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "liar.jpg").write_bytes(hostile_bytes("lying_header"))
    (folder / "ok.jpg").write_bytes(Path(sorted(SAMPLES.glob("*/*.jpg"))[0]).read_bytes())
    files = sorted(scan_dir(folder), key=lambda f: f.rel)
    data = (folder / "liar.jpg").read_bytes()
    assert len(data) < 20_000 and not nvjpeg_may_take(data)  # the guard the loader's readers call
    assert nvjpeg_may_take((folder / "ok.jpg").read_bytes())
    cpu, gpu = cpu_rows(card, files), gpu_path_rows(card, files)
    assert [(r["path"], r["status"]) for r in cpu] == [("liar.jpg", "error"), ("ok.jpg", "ok")]
    assert cpu[0]["error"].startswith("truncated image: the header promises 9000x9000 pixels")
    assert [(r["status"], r["error"]) for r in gpu] == [(r["status"], r["error"]) for r in cpu]


def test_max_pixels_is_checked_before_the_gpu_decoder(program_bundle, tmp_path):
    card = load_card(program_bundle)
    path = tmp_path / "big.jpg"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(path)
    data = path.read_bytes()
    assert nvjpeg_may_take(data) and not nvjpeg_may_take(data, max_pixels=300 * 200 - 1)
    preset = EvalPreset.from_card(card)
    files = list(scan_dir(tmp_path))
    raw = read_batch(files, preset, max_pixels=300 * 200 - 1)
    cpu = load_images(files, preset, max_pixels=300 * 200 - 1)
    assert raw.blobs == [None] and raw.errors == cpu.errors and "over the limit of 59999 pixels" in raw.errors[0]


@pytest.mark.parametrize("kind", HOSTILE)
def test_which_hostile_jpegs_the_gpu_decoder_may_take(kind):
    """Progressive is plain JPEG to nvJPEG; CMYK is converted by Pillow (as on the CPU path); the lying
    header is refused from the header; the corrupt file passes the header checks and is refused by the
    decoder itself (the next test)."""
    expect = {"progressive": True, "cmyk": False, "lying_header": False, "corrupt_with_eoi": True}[kind]
    assert nvjpeg_may_take(hostile_bytes(kind)) is expect


@pytest.mark.parametrize("workers", [0, 2])
def test_hostile_jpegs_get_the_cpu_paths_rows_on_the_gpu_route(program_bundle, tmp_path, workers):
    card = load_card(program_bundle)
    files = sorted(scan_dir(mixed_folder(tmp_path / "in", 40, every=9)), key=lambda f: f.rel)
    cpu, gpu = cpu_rows(card, files), gpu_path_rows(card, files, batch_size=16, workers=workers)
    assert [r["path"] for r in gpu] == [f.rel for f in files]
    assert [(r["status"], r["error"]) for r in gpu] == [(r["status"], r["error"]) for r in cpu]
    assert sum(r["status"] == "error" for r in cpu) == 2  # the lying header and the corrupt data
    assert [r["label"] for r in gpu] == [r["label"] for r in cpu]


def test_one_bad_jpeg_does_not_decode_its_batch_file_by_file(program_bundle, tmp_path):
    from batchcls.gpu import GpuJpegLoader

    card = load_card(program_bundle)
    files = sorted(scan_dir(mixed_folder(tmp_path / "in", 64, every=200)), key=lambda f: f.rel)
    (tmp_path / "in" / "00031.jpg").write_bytes(hostile_bytes("corrupt_with_eoi"))
    loader = GpuJpegLoader(card, device="cpu")
    batch = loader.load_files(files)
    assert [i for i, e in enumerate(batch.errors) if e] == [31] and len(batch.images) == 63
    assert loader.decode_calls <= 1 + 2 * 6  # the batch, then both halves down to the bad file: <= 2 log2(64)


def test_decode_halving_finds_every_bad_item():
    from batchcls.gpu import decode_halving

    calls = []

    def decode(items):
        calls.append(len(items))
        if any(x < 0 for x in items):
            raise RuntimeError("nvjpeg: bad data")
        return [x * 10 for x in items]
    items = list(range(32))
    items[5], items[20] = -1, -2
    assert decode_halving(items, decode, torch.device("cpu")) == [None if x < 0 else x * 10 for x in items]
    assert len(calls) < 32 and calls[0] == 32


def test_decode_halving_stops_on_out_of_memory_instead_of_splitting():
    from batchcls.gpu import decode_halving

    calls = []

    def decode(items):
        calls.append(len(items))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(GpuFailure, match="ran out of memory"):
        decode_halving(list(range(16)), decode, torch.device("cpu"))
    assert calls == [16]


def test_decode_workers_do_not_import_torch():
    """The readers' module pickled into every decode worker: importing torch there costs seconds each."""
    code = ("import sys; from batchcls.gpu_read import read_batch; from batchcls.card import load_card; "
            "from batchcls.presets import EvalPreset; from batchcls.scan import scan_dir; "
            f"files = sorted(scan_dir({str(SAMPLES)!r}), key=lambda f: f.rel)[:4]; "
            "raw = read_batch(files, EvalPreset.from_card(load_card())); "
            "print(sum(b is not None for b in raw.blobs), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["4", "False"]


# --- CUDA graph sizes --------------------------------------------------------------------------------

def test_graphs_are_sized_by_the_batch_not_by_the_first_call():
    """check_against_model sends one image first; a 512-image batch must replay a 512 graph, once."""
    from batchcls.backends.pytorch import graph_batch, graph_chunks

    assert graph_chunks(1) == [(0, 1, 1)]
    assert graph_chunks(512) == [(0, 512, 512)]
    assert graph_chunks(7) == [(0, 7, 8)] and graph_chunks(300) == [(0, 300, 512)]
    assert graph_chunks(2500, 1024) == [(0, 1024, 1024), (1024, 2048, 1024), (2048, 2500, 512)]
    assert [graph_batch(n) for n in (1, 2, 3, 64, 65, 1024, 5000)] == [1, 2, 4, 64, 128, 1024, 1024]
    with pytest.raises(ValueError):
        graph_batch(0)


# --- the torch backend's second output ---------------------------------------------------------------

def _two_output_program(folder: Path) -> None:
    """model.pt2 returning (logits, features) as train/export writes it for an embedding model."""
    import hashlib

    from train.export import export_program

    class WithFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(3) * 3)
                self.fc.bias.zero_()

        def forward(self, x):
            features = x.mean(dim=(2, 3))
            return self.fc(features), features
    sha = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    export_program(WithFeatures(), 32, folder / "model.pt2", source_onnx_sha256=sha)


def test_torch_backend_embed_handles_one_and_two_outputs(program_bundle, tmp_path):
    import shutil

    from batchcls.backends.pytorch import TorchBackend

    card = load_card(program_bundle)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    one = TorchBackend(card)
    logits, features = one.embed(x)
    assert features is None and np.allclose(logits, one.infer(x))
    two_dir = tmp_path / "two"
    shutil.copytree(program_bundle, two_dir)
    _two_output_program(two_dir)
    two = TorchBackend(load_card(two_dir))
    logits2, features2 = two.embed(x)
    assert np.allclose(logits2, logits, atol=1e-5) and features2.shape == (5, 3)
    assert np.allclose(features2, x.mean(axis=(2, 3)), atol=1e-5)
    assert np.allclose(two.infer(x), logits, atol=1e-5)
    assert Classifier(load_card(two_dir), two).probabilities(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 3)


# --- out of memory and CUDA error states stop the run ------------------------------------------------

@pytest.mark.parametrize("error, stops", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB"), "ran out of memory"),
    (RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ..."),
     "CUDA error state"),
    (RuntimeError("CUDA error: device-side assert triggered"), "CUDA error state"),
    (RuntimeError("nvjpegDecodeBatchedPhaseOne failed: 3"), None),  # a bad file, not the device
    (ValueError("the model rejected this batch"), None),
])
def test_which_failures_stop_a_gpu_run(error, stops):
    from batchcls.backends.device import gpu_failure

    failure = gpu_failure(error, "cuda:0")
    if stops is None:
        assert failure is None
    else:
        msg = str(failure)
        assert stops in msg and "\n" not in msg and msg.startswith("cuda:0 ") and "--resume" in msg


class _RunsOutOfMemory(torch.nn.Module):
    """Wraps the colour program: its third forward (the second batch of a run) raises CUDA's OOM."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:  # 1: the model check, 2: the first batch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.inner(x)


def test_out_of_memory_stops_the_run_and_resume_finishes_it(program_bundle, tmp_path, monkeypatch):
    """One line, a failing exit, only complete batches in OUT.partial, and --resume does the rest: the
    batch that ran out of memory is not written as error rows that resume would skip."""
    import batchcls.backends.pytorch as pt

    folder = mixed_folder(tmp_path / "in", 12, every=1000)
    out = tmp_path / "labels.csv"
    args = ["run", str(folder), "--out", str(out), "--model", str(program_bundle), "--backend", "torch",
            "--batch-size", "4", "--workers", "0"]
    real = pt.load_program
    monkeypatch.setattr(pt, "load_program", lambda card: _RunsOutOfMemory(real(card)))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [
        "Error: cpu ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB): the run stopped; rerun "
        "with a smaller --batch-size and --resume (the rows written so far are kept)"]
    partial = (tmp_path / "labels.csv.partial").read_text().splitlines()
    assert len(partial) == 1 + 4 and all(",ok," in line for line in partial[1:]) and not out.exists()
    monkeypatch.setattr(pt, "load_program", real)
    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    rows = out.read_text().splitlines()[1:]
    assert len(rows) == 12 and all(",ok," in line for line in rows)


def test_out_of_memory_on_the_nvjpeg_route_stops_it(program_bundle, tmp_path):
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    backend = TorchBackend(card)
    backend.model = _RunsOutOfMemory(backend.model)
    classifier = GpuClassifier(card, backend)  # call 1: the model check
    files = sorted(scan_dir(mixed_folder(tmp_path / "in", 12, every=1000)), key=lambda f: f.rel)
    got = classify_gpu(batched(files, 4), classifier, loader=GpuJpegLoader(card, device="cpu"), workers=0)
    first = next(got)
    assert len(first) == 4 and all(r["status"] == "ok" for r in first)
    with pytest.raises(GpuFailure, match="ran out of memory"):
        next(got)


# --- TensorRT's rules --------------------------------------------------------------------------------

def test_tensorrt_major_is_bounded_where_it_is_installed_and_where_it_runs():
    import tomllib

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tensorrt"]
    trt_req = next(r for r in extra if r.startswith("tensorrt"))
    assert trt_req == f"tensorrt>={TESTED_TENSORRT_MAJOR}.0,<{TESTED_TENSORRT_MAJOR + 1}"
    check_tensorrt_version("10.9.0.34")
    with pytest.raises(ModelError, match=r"TensorRT 11.0.1 is installed, batchcls is tested with TensorRT 10.x: "
                                         r"pip install 'batchcls\[tensorrt\]'"):
        check_tensorrt_version("11.0.1")


def test_fp16_is_never_silently_dropped():
    from batchcls.builders.tensorrt import fp16_flag

    trt10 = types.SimpleNamespace(__version__="10.9.0.34", BuilderFlag=types.SimpleNamespace(FP16="fp16"))
    trt11 = types.SimpleNamespace(__version__="11.0.1", BuilderFlag=types.SimpleNamespace())
    fast, slow = types.SimpleNamespace(platform_has_fast_fp16=True), types.SimpleNamespace(platform_has_fast_fp16=False)
    assert fp16_flag(trt10, fast, True, "NVIDIA H200") == "fp16"
    assert fp16_flag(trt10, slow, False, "NVIDIA H200") is None  # --no-fp16: FP32 asked for
    with pytest.raises(ModelError, match="TensorRT 11.0.1 has no FP16 builder flag: install TensorRT 10.x"):
        fp16_flag(trt11, fast, True, "NVIDIA H200")
    with pytest.raises(ModelError, match="NVIDIA GT 710 has no fast FP16 kernels .*--no-fp16"):
        fp16_flag(trt10, slow, True, "NVIDIA GT 710")


def _aligned_view(nbytes: int, offset: int, dtype=torch.float16) -> torch.Tensor:
    """A CPU tensor whose address is ``offset`` bytes past a 256-byte boundary."""
    raw = torch.empty(nbytes + 2 * TRT_ALIGNMENT, dtype=torch.uint8)
    start = (-raw.data_ptr()) % TRT_ALIGNMENT + offset
    return raw[start:start + nbytes].view(dtype)


@pytest.mark.parametrize("rows, classes, max_batch", [(37, 42, 16), (100, 3, 16), (512, 8, 256)])
def test_slices_handed_to_tensorrt_are_aligned(rows, classes, max_batch):
    out = _aligned_view(rows * classes * 2, 0).reshape(rows, classes)
    staging = _aligned_view(max_batch * classes * 2, 0).reshape(max_batch, classes)
    for a in range(0, rows, max_batch):
        view = out[a:a + max_batch]
        bound = binding(view, staging)
        assert aligned(bound.data_ptr()) and len(bound) == len(view)
        assert (bound.data_ptr() == view.data_ptr()) == aligned(view.data_ptr())
    assert not aligned(out[16:].data_ptr()) or (16 * classes * 2) % TRT_ALIGNMENT == 0
    with pytest.raises(ModelError, match="not 256-byte aligned"):
        binding(out[1:], _aligned_view(64, 2).reshape(1, 32))


def test_tensorrt_never_enqueues_on_a_default_stream():
    for handle in (0, 1, 2):
        with pytest.raises(ValueError, match="default CUDA stream"):
            stream_handle(types.SimpleNamespace(cuda_stream=handle))
    assert stream_handle(types.SimpleNamespace(cuda_stream=0x7F00AB00)) == 0x7F00AB00


def test_tensorrt_outputs_are_bound_by_name():
    assert output_names(["logits"]) == ("logits", None)
    assert output_names(["features", "logits"]) == ("logits", "features")
    assert output_names(["output_0"]) == ("output_0", None)
    with pytest.raises(ModelError, match="no output"):
        output_names([])


def test_a_none_execution_context_is_an_error_not_a_crash_later():
    from batchcls.backends.tensorrt import _Slot

    engine = types.SimpleNamespace(create_execution_context=lambda: None)
    with pytest.raises(GpuFailure, match="could not create an execution context on cuda:0"):
        _Slot(engine, torch, "cuda:0", (4, 3, 8, 8), {"logits": (4, 3)}, torch.float16, {"logits": torch.float16})


# --- ONNX Runtime on CUDA ----------------------------------------------------------------------------

def test_onnxruntime_cuda_honours_the_device_and_never_falls_back_silently():
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    assert providers_for("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert providers_for("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    check_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    check_providers("cpu", ["CPUExecutionProvider"])
    with pytest.raises(ModelError, match="onnxruntime could not start its CUDA provider on cuda:1"):
        check_providers("cuda:1", ["CPUExecutionProvider"])


# --- training -----------------------------------------------------------------------------------------

def test_each_rank_uses_its_own_gpu(monkeypatch):
    from train.train import rank_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert rank_device(False, 3) == torch.device("cpu") and chosen == []
    assert rank_device(True, 3) == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]


# --- the GPU route's rows: features, order, work on the device ---------------------------------------

@pytest.fixture(scope="module")
def two_output_bundle(program_bundle, tmp_path_factory) -> Path:
    """The colour bundle whose model.pt2 also returns ``features`` (no open-set decision in it)."""
    import shutil

    folder = tmp_path_factory.mktemp("two") / "colours"
    shutil.copytree(program_bundle, folder)
    _two_output_program(folder)
    return folder


def _route_files(tmp_path: Path) -> list:
    """Nine sample frames and an empty file: three batches of four, one row of them an error."""
    folder = mixed_folder(tmp_path / "in", 9, every=1000)
    (folder / "00004b.jpg").write_bytes(b"")
    return sorted(scan_dir(folder), key=lambda f: f.rel)


@pytest.mark.parametrize("tta", ["none", "flip"])
@pytest.mark.parametrize("open_set", [False, True])
def test_embeddings_on_the_gpu_route_without_a_decision(two_output_bundle, tmp_path, tta, open_set):
    """--embeddings when no open-set decision asks for features (turned off, or none in the bundle): the
    GPU route must still fetch them, and every ok row carries the vector the CPU route gives."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(two_output_bundle)
    assert not card.openset
    files = _route_files(tmp_path)
    options = RunOptions(batch_size=4, workers=0, tta=tta, open_set=open_set, embeddings=True)
    backend = TorchBackend(card)
    ref = [r for rows in classify(files, Classifier(card, backend, tta=tta), options) for r in rows]
    got = [r for rows in classify_gpu(batched(files, 4), GpuClassifier(card, backend, tta=tta, open_set=open_set),
                                      loader=GpuJpegLoader(card, device="cpu"), workers=0,
                                      row_args=options.row_args()) for r in rows]
    assert [(r["path"], r["status"], r["error"]) for r in got] == [(r["path"], r["status"], r["error"]) for r in ref]
    for r, g in zip(ref, got):
        if r["status"] == "ok":  # torchvision's decoder and the device resize stand in for nvJPEG: not Pillow's pixels
            assert g["embedding"].dtype == np.float32 and g["embedding"].shape == (3,)
            np.testing.assert_allclose(g["embedding"], r["embedding"], atol=0.05)
        else:
            assert g["embedding"] is None


def test_embeddings_of_a_model_without_features_are_refused_in_one_line(program_bundle, tmp_path):
    """A one-output program says so (``has_features``) instead of a TypeError on the first ok row."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    backend = TorchBackend(card)
    assert backend.has_features is False and backend.decision_model == "model.onnx"
    options = RunOptions(batch_size=4, workers=0, embeddings=True)
    with pytest.raises(ModelError, match="has no 'features' output, which embeddings need"):
        list(classify_gpu(batched(_route_files(tmp_path), 4), GpuClassifier(card, backend),
                          loader=GpuJpegLoader(card, device="cpu"), workers=0, row_args=options.row_args()))


def test_the_torch_backend_knows_its_outputs_and_its_decision_model(two_output_bundle):
    from batchcls.backends.pytorch import TorchBackend, load_program, output_count

    card = load_card(two_output_bundle)
    assert output_count(load_program(card)) == 2 and output_count(torch.nn.Identity()) is None
    backend = TorchBackend(card)
    assert backend.has_features is True and backend.decision_model == card.onnx == "model.onnx"


def test_the_tensorrt_plans_precision_is_read_from_its_metadata():
    from batchcls.backends.tensorrt import plan_precision

    assert plan_precision({"fp16": True}) == "fp16"
    assert plan_precision({"fp16": False}) == plan_precision({}) == "fp32"


def test_the_gpu_route_collects_a_batch_after_launching_the_next(program_bundle, tmp_path, monkeypatch):
    """Batch k is launched (its copy back queued with it) before batch k-1 is collected, and every file gets
    exactly one row, in order, an unreadable one included. On the CPU the order is what can be checked;
    tests/test_gpu_cuda.py checks that the host does not wait for batch k's inference."""
    import batchcls.gpu as gpu
    from batchcls.backends.pytorch import TorchBackend

    card = load_card(program_bundle)
    classifier = gpu.GpuClassifier(card, TorchBackend(card), tta="flip")
    events: list[tuple[str, int]] = []
    launched = [0]

    class RecordedCopy(gpu.HostCopy):
        def __init__(self, tensors, device) -> None:
            events.append(("copy", launched[0]))
            super().__init__(tensors, device)

    real_launch = classifier.launch

    def launch(images, **kw):
        k = launched[0]
        events.append(("launch", k))
        collect = real_launch(images, **kw)
        launched[0] += 1

        def recorded():
            events.append(("collect", k))
            return collect()
        return recorded
    monkeypatch.setattr(gpu, "HostCopy", RecordedCopy)
    classifier.launch = launch
    files = _route_files(tmp_path)
    batches = list(gpu.classify_gpu(batched(files, 4), classifier, loader=gpu.GpuJpegLoader(card, device="cpu"),
                                    workers=0))
    assert events == [("launch", 0), ("copy", 0), ("launch", 1), ("copy", 1), ("collect", 0),
                      ("launch", 2), ("copy", 2), ("collect", 1), ("collect", 2)]
    assert [len(b) for b in batches] == [4, 4, 2]
    rows = [r for b in batches for r in b]
    assert [r["path"] for r in rows] == [f.rel for f in files]
    assert [r["status"] for r in rows].count("error") == 1 and rows[5]["path"] == "00004b.jpg"
    ref = cpu_rows(card, files, batch_size=4, tta="flip")
    assert [r["label"] for r in rows] == [r["label"] for r in ref]
    assert all(abs(r["confidence"] - c["confidence"]) < 0.02 for r, c in zip(rows, ref) if r["status"] == "ok")


@pytest.mark.parametrize("views", [1, 2])
def test_uint8_in_normalised_and_mirrored_on_the_device_equals_the_host_path(two_output_bundle, views):
    """``embed_uint8`` (uint8 up, mirror and normalisation where the model runs) gives what the host path
    gives from float32: the same arithmetic (``presets.normalization``), in the same view order."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.presets import normalize

    card = load_card(two_output_bundle)
    backend = TorchBackend(card)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    host = np.concatenate([images, images[:, :, ::-1]]) if views == 2 else images
    ref_logits, ref_features = backend.embed(normalize(host, card.mean, card.std))
    logits, features = backend.embed_uint8(images, views=views, features=True)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(features, ref_features, rtol=1e-6, atol=1e-6)
    only_logits, none = backend.embed_uint8(images, views=views)
    assert none is None and np.allclose(only_logits, ref_logits, atol=1e-6) and len(only_logits) == 5 * views


# --- CUDA graphs shared by threads -------------------------------------------------------------------

class _SlowGraph:
    """A CPU stand-in for a captured graph: ``replay`` lets other threads run between reading ``static_in``
    and writing ``static_out``, as a GPU replay does while another thread could copy in its own batch."""

    def __init__(self, model, like, size, memory_format) -> None:
        self.model = model
        self.static_in = torch.zeros((size, *like.shape[1:]), dtype=like.dtype)
        self.static_out = tuple(o.clone() for o in self.model(self.static_in))

    def replay(self) -> None:
        import time

        time.sleep(0.001)
        for o, new in zip(self.static_out, self.model(self.static_in)):
            o.copy_(new)
        time.sleep(0.001)


def _threads_sharing_one_graph(forward, model, size: int = 6, threads: int = 4, calls: int = 10) -> list[str]:
    """``threads`` threads, each its own batch of the same ``size`` (so one graph serves them all), ``calls``
    calls each: the answers that were another thread's."""
    import threading

    batches = [torch.randn(size, 4, generator=torch.Generator().manual_seed(k)) for k in range(threads)]
    expect = [model(b)[0] for b in batches]
    wrong: list[str] = []

    def work(k: int) -> None:
        for _ in range(calls):
            if not torch.allclose(forward(batches[k])[0], expect[k]):
                wrong.append(f"thread {k}")
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in pool)
    return wrong


def test_threads_sharing_one_graph_get_their_own_answers_and_the_check_sees_a_missing_lock():
    """GraphedForward's lock, with the CPU stand-in: threads of one batch size share one graph's buffers.
    Without the lock the same check sees answers swapped between threads, so it can fail."""
    import contextlib

    from batchcls.backends.pytorch import GraphedForward

    def model(x):
        return (x * 2 + 1, x.sum(1, keepdim=True))
    graphed = GraphedForward(model, capture=_SlowGraph)
    assert _threads_sharing_one_graph(graphed, model) == [] and graphed.sizes == [8]
    unlocked = GraphedForward(model, capture=_SlowGraph)
    unlocked.lock = contextlib.nullcontext()
    assert _threads_sharing_one_graph(unlocked, model) != []


# --- how the GPU tests compare rows (tests/route_parity.py) ------------------------------------------

def _row(path, probs, known=None, cut=0.01, status="ok", error=""):
    classes = ["a", "b", "c"]
    label = classes[int(np.argmax(probs))]
    row = {"path": path, "status": status, "error": error, "label": label, "confidence": max(probs),
           **{f"prob_{c}": p for c, p in zip(classes, probs)}}
    if known is not None:
        row.update(model_label=label, known_score=known, label="unknown" if known < cut else label)
    return row


@pytest.mark.parametrize("got, problem", [
    (_row("x", [0.70, 0.20, 0.10], 0.50), None),
    (_row("x", [0.65, 0.25, 0.10], 0.40), None),  # drift within the tolerance
    (_row("x", [0.60, 0.30, 0.10], 0.50), "top-1 confidence 0.7000 -> 0.6000"),
    (_row("x", [0.20, 0.70, 0.10], 0.50), "a (0.700, next 0.200) -> b"),  # a clear top-1 turned over
    (_row("x", [0.70, 0.20, 0.10], 0.005), "turned the decision over"),  # 0.5 is far from the cut 0.01
    (_row("x", [0.70, 0.20, 0.10], 0.50, status="error", error="truncated"), "the error rows differ"),
])
def test_route_comparison_fails_only_past_the_tolerances(got, problem):
    from route_parity import compare_routes

    ref = [_row("x", [0.70, 0.20, 0.10], 0.50)]
    cmp = compare_routes(ref, [got], ["a", "b", "c"], conf_diff=0.08, band=0.01, cut=0.01, what="t")
    assert (cmp.problems == []) if problem is None else any(problem in p for p in cmp.problems), cmp.problems


def test_route_comparison_allows_a_near_tie_and_a_near_cut_to_go_either_way():
    from route_parity import compare_routes

    ref = [_row("tie", [0.46, 0.44, 0.10], 0.50), _row("cut", [0.70, 0.20, 0.10], 0.012),
           _row("far", [0.90, 0.05, 0.05], 0.0, cut=0.05)]
    got = [_row("tie", [0.44, 0.46, 0.10], 0.50), _row("cut", [0.70, 0.20, 0.10], 0.008),
           _row("far", [0.90, 0.05, 0.05], 0.0, cut=0.05)]
    cmp = compare_routes(ref, got, ["a", "b", "c"], conf_diff=0.08, band=0.01, cut=0.01, what="t")
    assert cmp.problems == [] and cmp.near_tie_flips == 1 and cmp.decisions_near_cut_differ == 1
    assert cmp.decisions_compared == 1 and cmp.agreement == pytest.approx(2 / 3)
    assert cmp.max_known_diff == pytest.approx(0.004)
