"""The GPU path (batchcls/gpu.py): the nvJPEG loader's per-file fallback to the CPU decoder, error rows for a
failed batch, and the pipeline routing a CUDA backend to it. Runs on the CPU with device="cpu"; the CUDA cases
are marked ``gpu``."""
from __future__ import annotations

import numpy as np
import pytest
from backend_helpers import (
    assert_parity,
    bad_inputs,
    gpu,
    gpu_bundle,
    needs_torch,
    rows_for,
    sample_files,
)
from conftest import SAMPLES

from batchcls.backends import OnnxRuntimeBackend
from batchcls.builders.parity import MAX_CONF_DIFF, compare_rows
from batchcls.card import load_card
from batchcls.decode_stage import batched, load_images
from batchcls.infer import Classifier
from batchcls.pipeline import RunOptions, classify
from batchcls.presets import EvalPreset
from batchcls.scan import scan_dir


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])])
@needs_torch
@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_loader_falls_back_per_file(program_bundle, tmp_path, device, workers):
    """Same rows, in the same order, with the same error reasons as the CPU pipeline; the decode stage
    reads (and CPU-decodes what nvJPEG must not take) in worker processes or in-process."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    files = sorted(scan_dir(bad_inputs(tmp_path / "in")), key=lambda f: f.rel)
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files, batch_size=4)
    classifier = GpuClassifier(card, TorchBackend(card, device=device))
    got = [r for rows in classify_gpu(batched(files, 4), classifier, loader=GpuJpegLoader(card, device=device),
                                      workers=workers) for r in rows]
    assert [r["path"] for r in got] == [f.rel for f in files]
    assert [(r["status"], r["error"]) for r in got] == [(r["status"], r["error"]) for r in ref]
    assert sum(r["status"] == "error" for r in got) == 2  # corrupt + empty
    cmp = compare_rows(ref, got)
    assert cmp.agreement == 1.0 and cmp.max_conf_diff < MAX_CONF_DIFF


@needs_torch
def test_gpu_path_turns_an_inference_failure_into_error_rows(program_bundle):
    """Inference is queued a batch ahead of row building; a failure still lands on its own batch's rows."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(program_bundle)
    backend = TorchBackend(card, device="cpu")
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("the model rejected this batch")  # its own failure: OOM stops the run
        return TorchBackend.infer_images(backend, images)
    backend.infer_images = flaky
    files = sorted(scan_dir(SAMPLES), key=lambda f: f.rel)[:10]
    batches = list(classify_gpu(batched(files, 4), GpuClassifier(card, backend), workers=0,
                                loader=GpuJpegLoader(card, device="cpu")))
    assert [len(b) for b in batches] == [4, 4, 2] and calls == [4, 4, 2]
    assert [r["path"] for b in batches for r in b] == [f.rel for f in files]
    assert all(r["status"] == "ok" for r in batches[0] + batches[2])
    assert all(r["status"] == "error" and r["error"] == "inference failed: RuntimeError: the model rejected this batch"
               for r in batches[1])


@pytest.mark.gpu
@gpu
def test_pipeline_feeds_a_cuda_backend_through_nvjpeg(request):
    """pipeline.classify (what run/watch/eval call) routes a CUDA-device backend to nvJPEG, unless told not to.

    nvJPEG is another JPEG decoder, so its pixels are not Pillow's: measured on an H200 over 1,000 dataset
    images, mean |diff| 0.59 levels, 0.36% of values off by > 8 (chroma upsampling at the sharp edges of
    cartoons), top-1 identical on 1000/1000 and confidence within 0.056. The bound here is that measurement's;
    --cpu-decode gives the engine's own parity (the test above).
    """
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuJpegLoader
    from batchcls.pipeline import _on_gpu

    card = load_card(gpu_bundle(request))
    backend = TorchBackend(card, device="cuda")
    assert _on_gpu(backend) and not _on_gpu(OnnxRuntimeBackend(card.onnx_path))
    files = sample_files()
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files)
    got = [r for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=16)) for r in rows]
    cmp = compare_rows(ref, got)
    assert cmp.n == len(files) and cmp.errors == 0
    assert cmp.agreement >= 0.95 and cmp.max_conf_diff < 0.1, cmp
    loader = GpuJpegLoader(card, device="cuda")
    device_pixels = loader.load_files(files).images.permute(0, 2, 3, 1).cpu().numpy()
    diff = np.abs(device_pixels.astype(np.int16) - load_images(files, EvalPreset.from_card(card)).images.astype(np.int16))
    assert diff.mean() < 1.5 and (diff > 8).mean() < 0.02, (diff.mean(), (diff > 8).mean())
    cpu_decoded = [r for rows in classify(files, Classifier(card, backend), RunOptions(batch_size=16, gpu_decode=False))
                   for r in rows]
    assert_parity(ref, cpu_decoded, "pipeline -> cuda, --cpu-decode")
