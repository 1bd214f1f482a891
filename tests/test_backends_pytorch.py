"""The torch backend (model.pt2 from torch.export): agreement with ONNX Runtime on the CPU, refusal of a
missing or stale program, and (marked ``gpu``) the CUDA path with fp16 and CUDA graphs."""
from __future__ import annotations

import numpy as np
import pytest
from backend_helpers import (
    HAS_CUDA,
    SHIPPED,
    assert_parity,
    gpu,
    gpu_bundle,
    needs_torch,
    rows_for,
    sample_files,
    torch,
)
from bundles import colour_onnx, make_colour_bundle

from batchcls.backends import OnnxRuntimeBackend, load_backend
from batchcls.builders.parity import compare_rows
from batchcls.card import load_card
from batchcls.decode_stage import DecodedBatch, batched, load_images
from batchcls.errors import ModelError
from batchcls.infer import Classifier


@needs_torch
def test_torch_backend_matches_onnxruntime(program_bundle):
    from batchcls.backends.pytorch import TorchBackend

    card = load_card(program_bundle)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    ref = OnnxRuntimeBackend(card.onnx_path).infer(x)
    for kind in ("torch", "cuda"):  # one backend: --backend cuda is it with a GPU as default device
        if kind == "cuda" and not HAS_CUDA:
            continue
        backend = load_backend(card, kind)
        assert isinstance(backend, TorchBackend)
        np.testing.assert_allclose(backend.infer(x), ref, rtol=1e-2 if kind == "cuda" else 1e-5, atol=1e-2 if kind == "cuda" else 1e-5)
    for n in (1, 2, 7):  # the program's batch dimension is dynamic, 1 included
        np.testing.assert_allclose(TorchBackend(card).infer(x[:n]), ref[:n], rtol=1e-5, atol=1e-5)


@needs_torch
def test_torch_backend_refuses_a_missing_or_stale_program(tmp_path):
    bundle = make_colour_bundle(tmp_path / "colours")  # no model.pt2
    with pytest.raises(ModelError, match=r"model.pt2 is missing: .* or use --backend onnxruntime"):
        load_backend(load_card(bundle), "torch")
    bundle = make_colour_bundle(tmp_path / "retrained", program=True)
    colour_onnx(bundle / "model.onnx", gain=7.5)  # the ONNX changed after the program was exported
    with pytest.raises(ModelError, match="was not exported beside this model.onnx"):
        load_backend(load_card(bundle), "torch")


@needs_torch
def test_the_shipped_program_matches_onnxruntime_on_real_frames():
    """engines/simpsons/model.pt2 against model.onnx through the whole pipeline, on the 40 sample frames."""
    from batchcls.backends.pytorch import TorchBackend

    card = load_card(SHIPPED)
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), sample_files())
    got = rows_for(card, TorchBackend(card), sample_files())
    cmp = compare_rows(ref, got)
    assert cmp.n == 40 and cmp.agreement == 1.0 and cmp.max_conf_diff < 1e-4, cmp


@pytest.mark.slow
@needs_torch
def test_torch_backend_parity_with_onnxruntime(lite0_engines, lite0_reference):
    """model.pt2 (torch.export) against ONNX Runtime FP32 on real frames; then the GPU path's device decode and
    resize, run on the CPU here."""
    from batchcls.backends.pytorch import TorchBackend
    from batchcls.gpu import GpuClassifier, GpuJpegLoader, classify_gpu

    card = load_card(lite0_engines)
    backend = TorchBackend(card, device="cpu")
    got = rows_for(card, backend, sample_files())
    assert_parity(lite0_reference, got, "torch (model.pt2)")
    cmp = compare_rows(lite0_reference, got)
    assert cmp.agreement == 1.0 and cmp.max_conf_diff < 1e-4, cmp  # the same FP32 network, two runtimes
    got = [r for rows in classify_gpu(batched(sample_files(), 16), GpuClassifier(card, backend), workers=0,
                                      loader=GpuJpegLoader(card, device="cpu")) for r in rows]
    assert_parity(lite0_reference, got, "decode + centre crop + bicubic resize on the device (run on the CPU here)")


@pytest.mark.gpu
@gpu
def test_cuda_backend_parity(request):
    """The engine alone (fp16, channels_last, CUDA graph) on the same Pillow-decoded images: the issue's bar."""
    from batchcls.backends.pytorch import GraphedForward, TorchBackend

    card = load_card(gpu_bundle(request))
    files = sample_files()
    ref = rows_for(card, OnnxRuntimeBackend(card.onnx_path), files)
    backend = TorchBackend(card, device="cuda")
    assert backend.dtype == torch.float16 and isinstance(backend.model, GraphedForward)
    classifier = Classifier(card, backend)
    decoded = load_images(files, classifier.preset)
    got = [r for i in range(0, len(files), 7)  # 40 = 5 x 7 + a partial 5: the graph pads it
           for r in classifier.rows(DecodedBatch(decoded.files[i:i + 7], decoded.images[i:i + 7], decoded.errors[i:i + 7]))]
    assert_parity(ref, got, "cuda fp16")


@pytest.mark.gpu
@gpu
def test_cuda_graph_replay_matches_eager_for_every_batch_size(program_bundle):
    """One captured graph serves smaller (padded) and larger (split) batches with eager's numbers."""
    from batchcls.backends.pytorch import GraphedForward, TorchBackend

    card = load_card(program_bundle)
    graphed = TorchBackend(card, device="cuda", fp16=False)
    eager = TorchBackend(card, device="cuda", fp16=False, cuda_graphs=False)
    assert isinstance(graphed.model, GraphedForward) and not isinstance(eager.model, GraphedForward)
    rng = np.random.default_rng(0)
    s = card.input_size
    for n in (8, 3, 8, 19):  # capture 8, pad 3 to a 4 graph, replay 8, pad 19 to a 32 graph
        batch = rng.normal(size=(n, 3, s, s)).astype(np.float32)
        np.testing.assert_allclose(graphed.infer(batch), eager.infer(batch), rtol=1e-4, atol=1e-4)
    assert graphed.model.sizes == [4, 8, 32] and not graphed.model.failed
