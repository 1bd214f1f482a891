"""Build a TensorRT plan from the bundle's ONNX, and record what it is tied to.

The plan runs only on the GPU model and TensorRT version that built it, so ``model.plan.json`` beside it
records those facts (``batchcls.backends.tensorrt`` checks them before running it). Written against the
TensorRT 10 Python API (the only major ``check_tensorrt_version`` accepts): explicit batch is the only mode
(``create_network(0)``), FP16 comes from the builder flag, and an FP16 plan that can't be built is an error,
never an FP32 plan.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from batchcls.backends.record import onnx_sha256
from batchcls.backends.tensorrt import (
    INSTALL_HINT,
    TESTED_TENSORRT_MAJOR,
    GpuFacts,
    check_tensorrt_version,
    current_facts,
    meta_path,
    output_names,
    plan_path,
)
from batchcls.card import ModelCard
from batchcls.errors import ModelError
from batchcls.fsutil import atomic_write

DEFAULT_MAX_BATCH = 256


def profile_shapes(input_dims: Sequence[int], input_size: int, max_batch: int = DEFAULT_MAX_BATCH,
                   opt_batch: int | None = None) -> dict[str, tuple[int, int, int, int]]:
    """The optimization profile (min, opt, max) for the network input's NCHW dims.

    Batch is dynamic from 1 (so the last partial batch needs no padding) to ``max_batch``;
    ``opt`` defaults to half of max, the chunk size ``TensorRTBackend.infer`` runs at.
    Dynamic spatial dims are fixed to the card's input size.
    """
    dims = [int(d) for d in input_dims]
    if len(dims) != 4:
        raise ModelError(f"TensorRT plans need an NCHW image input, the ONNX input has shape {dims}")
    if dims[0] != -1:
        raise ModelError(f"the ONNX input has a fixed batch of {dims[0]}: re-export it with a dynamic batch dimension")
    if max_batch < 1:
        raise ModelError(f"--max-batch must be >= 1, got {max_batch}")
    c = dims[1] if dims[1] > 0 else 3
    h, w = (d if d > 0 else input_size for d in dims[2:])
    if (h, w) != (input_size, input_size):
        raise ModelError(f"the ONNX input is {h}x{w} but the card says input_size {input_size}: re-export the bundle")
    opt = min(max(1, opt_batch if opt_batch else max_batch // 2), max_batch)
    return {"min": (1, c, h, w), "opt": (opt, c, h, w), "max": (max_batch, c, h, w)}


def fp16_flag(trt, builder, fp16: bool, gpu_name: str):
    """The builder flag that allows FP16 kernels, or None when an FP32 plan was asked for (``--no-fp16``).

    Asked for FP16 and unable to give it, the build stops and says why: a plan silently built in FP32 runs
    at a fraction of the speed it was built for. TensorRT 11 has no FP16 flag (its networks are strongly
    typed: precision comes from the ONNX), which ``check_tensorrt_version`` already refuses; this is the
    second line of that defence.
    """
    if not fp16:
        return None
    flag = getattr(trt.BuilderFlag, "FP16", None)
    if flag is None:
        raise ModelError(f"TensorRT {trt.__version__} has no FP16 builder flag: install TensorRT "
                         f"{TESTED_TENSORRT_MAJOR}.x ({INSTALL_HINT}), or build an FP32 plan with --no-fp16")
    if not getattr(builder, "platform_has_fast_fp16", True):
        raise ModelError(f"{gpu_name} has no fast FP16 kernels in TensorRT {trt.__version__}: build an FP32 plan "
                         "with --no-fp16")
    return flag


def timing_cache_path(card: ModelCard, facts: GpuFacts) -> Path:
    """One timing cache per GPU model and TensorRT version: tactic timings are only valid there."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in facts.gpu_name).strip("-").lower()
    assert card.bundle_dir is not None
    return card.bundle_dir / f"timing.{slug}.trt{facts.tensorrt_version}.cache"


def build_plan(card: ModelCard, *, fp16: bool = True, max_batch: int = DEFAULT_MAX_BATCH,
               opt_batch: int | None = None, workspace_gib: float = 4.0,
               log: Callable[[str], None] = print) -> Path:
    """ONNX -> serialized plan + metadata + timing cache, through the TensorRT Python API."""
    facts = current_facts()
    if facts is None:
        raise ModelError(f"building a TensorRT plan needs an NVIDIA GPU and the tensorrt package: {INSTALL_HINT}")
    import tensorrt as trt

    check_tensorrt_version(trt.__version__)
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(card.onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {card.onnx_path}: {errors}")
    inp = network.get_input(0)
    shapes = profile_shapes(tuple(inp.shape), card.input_size, max_batch, opt_batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    flag = fp16_flag(trt, builder, fp16, facts.gpu_name)
    use_fp16 = flag is not None
    if use_fp16:
        config.set_flag(flag)
    cache_file = timing_cache_path(card, facts)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log(f"building TensorRT plan for {facts.gpu_name}: batch {shapes['min'][0]}..{shapes['max'][0]} "
        f"(opt {shapes['opt'][0]}), {'FP16' if use_fp16 else 'FP32'}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError("TensorRT failed to build the plan (see its log above): try a smaller --max-batch")
    plan = plan_path(card)
    atomic_write(plan, bytes(serialized))
    atomic_write(cache_file, bytes(config.get_timing_cache().serialize()))
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    meta = {**asdict(facts), "fp16": use_fp16, "input_name": inp.name, "output_name": output_names(outputs)[0],
            "output_names": outputs,
            "profile": {k: list(v) for k, v in shapes.items()}, "source_onnx": card.onnx,
            "source_sha256": onnx_sha256(card), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "build_seconds": round(time.perf_counter() - start, 1)}
    atomic_write(meta_path(card), json.dumps(meta, indent=2) + "\n")
    log(f"wrote {plan} ({plan.stat().st_size / 2**20:.1f} MiB) in {meta['build_seconds']}s")
    return plan
