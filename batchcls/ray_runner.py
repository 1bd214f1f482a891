"""Scale-out: ``batchcls run --engine ray`` as Ray Data adapters over the pipeline's batch functions.

scan (driver) -> ``pipeline.load_images`` in Ray tasks -> ``Classifier.rows`` in a model actor pool
(one actor per GPU, CPU actors otherwise) -> rows stream back to the driver in input order (Ray Data's
``preserve_order``) and go through the same job loop (``runner.run_job``) as a local run, so the output is
the same file.

``import ray`` happens only inside functions: the local path never imports Ray.

The model bundle reaches the workers through Ray's object store: the driver reads the bundle's files
once and ``ray.put``s them; every actor unpacks them into a private temp folder and loads from there.
No shared filesystem is needed, and all workers run exactly the model the driver validated.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from batchcls.backends import load_backend
from batchcls.card import CARD_FILE, ModelCard, load_card
from batchcls.errors import BatchclsError, first_line
from batchcls.pipeline import Classifier, DecodedBatch, RunSummary, load_images
from batchcls.presets import EvalPreset
from batchcls.runner import Loaded, RunJob, Stage, run_job
from batchcls.scan import InputFile

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # s3://, gs://, hdfs://, file:// ... (whatever pyarrow.fs reads)


class RayRunError(BatchclsError):
    """Ray is missing or unreachable, or the cluster cannot run the job."""


def _b(text: str) -> bytes:
    # Paths may hold undecodable bytes (surrogateescape, like the local runner); Arrow strings must be UTF-8.
    return text.encode("utf-8", "surrogateescape")


def _s(raw: Any) -> str:
    return bytes(raw).decode("utf-8", "surrogateescape")


# --- stage 1: decode + preprocess, as stateless Ray tasks ---------------------------------------


def _fetch_remote(files: list[InputFile], folder: str) -> tuple[list[InputFile | None], list[str | None]]:
    """Copy URI inputs to local temp files (decode_image reads paths); a failed fetch is that file's error."""
    local: list[InputFile | None] = []
    errors: list[str | None] = []
    for i, f in enumerate(files):
        if not _URI.match(f.rel):
            local.append(f)
            errors.append(None)
            continue
        try:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(f.rel)
            target = os.path.join(folder, str(i))
            with fs.open_input_stream(path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            local.append(InputFile(target, f.rel))
            errors.append(None)
        except FileNotFoundError:
            local.append(None)
            errors.append("file not found (deleted or moved after scanning)")
        except Exception as e:  # any filesystem failure is this file's error row, not the job's
            local.append(None)
            errors.append(f"cannot fetch: {first_line(e)}")
    return local, errors


def decode_batch(batch: dict[str, np.ndarray], *, preset: EvalPreset, max_pixels: int) -> dict[str, np.ndarray]:
    """Ray task: ``pipeline.load_images`` on one batch.

    A failed file keeps its place (an all-zero image, ok=False and its reason), so the model actor
    can rebuild the exact DecodedBatch and write its error row.
    """
    files = [InputFile(_s(p), _s(r)) for p, r in zip(batch["path"], batch["rel"])]
    with tempfile.TemporaryDirectory(prefix="batchcls-fetch-") as tmp:
        local, fetch_errors = _fetch_remote(files, tmp)
        decoded = load_images([f for f in local if f is not None], preset, max_pixels)
    decode_errors = iter(decoded.errors)
    errors = [fetch_err if f is None else next(decode_errors) for f, fetch_err in zip(local, fetch_errors)]
    ok = np.array([e is None for e in errors], dtype=bool)
    s = preset.input_size
    images = np.zeros((len(files), s, s, 3), np.uint8)
    images[ok] = decoded.images
    return {"idx": batch["idx"], "path": batch["path"], "rel": batch["rel"], "ok": ok, "image": images,
            "error": np.array([_b(e or "") for e in errors], dtype=object)}


# --- stage 2: inference, in a pool of stateful actors ---------------------------------------------


def bundle_files(card: ModelCard) -> dict[str, bytes]:
    """The bundle as {relative name: bytes}, with card.json being exactly the card the driver validated."""
    root = card.bundle_dir
    assert root is not None, "card was not loaded from a bundle"
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    files[CARD_FILE] = (json.dumps(card.to_dict(), indent=2) + "\n").encode()
    return files


class ModelActor:
    """Ray actor: unpacks the bundle and loads card + backend once, then turns decoded batches into rows."""

    def __init__(self, bundle: Any, *, backend: str | None, device: str | None, threads: int | None,
                 row_args: dict, tta: str | None = None) -> None:
        import ray

        files = ray.get(bundle) if isinstance(bundle, ray.ObjectRef) else bundle
        self._folder = tempfile.TemporaryDirectory(prefix="batchcls-bundle-")  # removed when the actor exits
        for name, data in files.items():
            target = Path(self._folder.name, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        card = load_card(self._folder.name)
        self.classifier = Classifier(card, load_backend(card, backend, device=device, threads=threads), tta=tta,
                                     open_set=row_args.get("open_set", True))
        self.row_args = row_args

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        files = [InputFile(_s(p), _s(r)) for p, r in zip(batch["path"], batch["rel"])]
        ok = batch["ok"].astype(bool)
        errors = [None if good else _s(e) for good, e in zip(ok, batch["error"])]
        decoded = DecodedBatch(files, np.ascontiguousarray(batch["image"][ok]), errors)
        rows = self.classifier.rows(decoded, **self.row_args)
        # JSON carries each row exactly as Classifier.rows made it: '' vs float cells, extra top-k keys,
        # undecodable path bytes (as \udcxx escapes) all survive Arrow unchanged.
        return {"idx": batch["idx"], "row": np.array([json.dumps(r) for r in rows], dtype=object)}


# --- driver --------------------------------------------------------------------------------------


def _import_ray():  # returns the ray module
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting: clusters may be air-gapped
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayRunError("--engine ray needs Ray Data: pip install 'batchcls[ray]'") from None
    return ray


def connect(address: str | None) -> bool:
    """Join the running Ray session or cluster, or start Ray on this machine; True when we started it.

    address None: $RAY_ADDRESS if set (as inside a submitted Ray job), else a new local Ray.
    'auto': the cluster this machine belongs to. 'ray://head:10001': Ray Client from off the cluster.
    """
    ray = _import_ray()
    if ray.is_initialized():  # a test, notebook or job driver already holds a session: use it, leave it up
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a throw-away local Ray needs no web UI
    if address and address.startswith("ray://"):
        # The driver runs off-cluster, so the workers can't import batchcls from here: ship the package.
        kwargs["runtime_env"] = {"py_modules": [str(Path(__file__).resolve().parent)]}
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError... Ray is not specific here
        raise RayRunError(f"cannot connect to Ray at {address or os.environ.get('RAY_ADDRESS', 'a new local instance')}"
                             f" ({first_line(e)}): check --address, or start a cluster with `ray start --head`") from None
    return True


class _RayDataSettings:
    """Rows in input order (Ray Data's ``preserve_order``), its per-run INFO logs and progress bars off (the
    job loop draws one bar for both runners); ``restore()`` puts all of it back."""

    def __init__(self, ray) -> None:  # ray module
        self.ctx = ray.data.DataContext.get_current()
        self.logger = logging.getLogger("ray.data")
        self.saved = (self.ctx.execution_options.preserve_order, self.ctx.enable_progress_bars,
                      self.ctx.print_on_execution_start, self.logger.level)
        self.ctx.execution_options.preserve_order = True
        self.ctx.enable_progress_bars, self.ctx.print_on_execution_start = False, False
        # ERROR, not WARNING: turning the bars off makes Ray Data warn that they are off.
        self.logger.setLevel(logging.ERROR)

    def restore(self) -> None:
        order, self.ctx.enable_progress_bars, self.ctx.print_on_execution_start, level = self.saved
        self.ctx.execution_options.preserve_order = order
        self.logger.setLevel(level)


def _classify(ray, files: list[InputFile], card: ModelCard, job: RunJob,  # ray module
              actors: int | None) -> Iterator[list[dict]]:
    """Rows for ``files`` in input order, batch by batch, computed on the cluster."""
    resources = ray.cluster_resources()
    cpus, gpus = max(1, int(resources.get("CPU", 1))), int(resources.get("GPU", 0))
    on_gpu = (job.device or ("cuda" if gpus else "cpu")).startswith("cuda")
    if on_gpu and not gpus:
        raise RayRunError("--device cuda but the Ray cluster has no GPUs: add GPU nodes or use --device cpu")
    # One actor per GPU; on CPU half the cores run the model (1 ORT thread each), the rest decode.
    pool = actors or (gpus if on_gpu else max(1, cpus // 2))
    # Decode may use every CPU: Ray only runs a task where a CPU is free. Sizing it unlike the actor
    # pool also keeps Ray Data from fusing decode into the actors, so the two stages scale apart.
    options = job.options
    blocks = max(1, math.ceil(len(files) / options.batch()))  # one input block per batch
    decode_tasks = min(options.workers or cpus, blocks)
    bundle = ray.put(bundle_files(card))  # kept referenced here until the run ends
    items = [{"idx": i, "path": _b(f.path), "rel": _b(f.rel)} for i, f in enumerate(files)]
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(decode_batch, fn_kwargs={"preset": EvalPreset.from_card(card), "max_pixels": options.max_pixels},
                        batch_size=options.batch(), batch_format="numpy", num_cpus=1, concurrency=decode_tasks)
    ds = ds.map_batches(ModelActor, batch_size=options.batch(), batch_format="numpy",
                        fn_constructor_kwargs={"bundle": bundle, "backend": job.backend,
                                               # Ray sets CUDA_VISIBLE_DEVICES per actor: "cuda" is its own GPU.
                                               # On CPU, None picks the backend exactly as a local run would.
                                               "device": "cuda" if on_gpu else job.device,
                                               "threads": None if on_gpu else 1,
                                               "row_args": options.row_args(), "tta": options.tta},
                        concurrency=pool, num_cpus=1, num_gpus=1 if on_gpu else 0)
    done = 0
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):  # in input order: preserve_order
        idx = [int(i) for i in out["idx"]]
        if idx != list(range(done, done + len(idx))):
            raise RayRunError(f"Ray returned rows out of input order after {done} files: rerun with --resume")
        done += len(idx)
        yield [json.loads(row) for row in out["row"]]
    if done != len(files):
        raise RayRunError(f"Ray returned rows for {done} of {len(files)} files: rerun with --resume to finish")


def ray_stage(job: RunJob, *, address: str | None = None, actors: int | None = None) -> Stage:
    """The Ray Data stages as a job-loop stage: Ray is imported before the output is touched and joined
    (or started) when the first file is due; a Ray failure is one line and the rows so far are kept."""

    def build(card: ModelCard) -> Loaded:
        ray = _import_ray()

        def classify(files: Iterable[InputFile]) -> Iterator[list[dict]]:
            files = list(files)
            started = connect(address)
            settings = _RayDataSettings(ray)
            rows = 0
            try:
                for batch in _classify(ray, files, card, job, actors) if files else ():
                    rows += len(batch)
                    yield batch
            except BatchclsError:
                raise
            except Exception as e:  # a Ray failure (actor died, task error): say so in one line
                cause = getattr(e, "cause", None)
                if isinstance(cause, BatchclsError):  # e.g. the actor could not load the model
                    raise cause from e
                raise RayRunError(f"the Ray job failed after {rows} rows ({first_line(e)}): "
                                  "fix the cause and rerun with --resume; --verbose shows the traceback") from e
            finally:
                settings.restore()
                if started:
                    ray.shutdown()

        return Loaded(classify)  # each actor picks its model file on its own machine: not recorded

    return build


def run_ray_job(job: RunJob, *, address: str | None = None, actors: int | None = None) -> RunSummary:
    """``batchcls run --engine ray``: ``runner.run_job`` with the Ray stages, so the same rows and file.

    ``job.options.workers`` caps concurrent decode tasks (default: one per cluster CPU); ``actors``
    sizes the model pool (default: one per GPU, else half the CPUs).
    """
    return run_job(job, ray_stage(job, address=address, actors=actors))
