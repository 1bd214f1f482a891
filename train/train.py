"""Fine-tune one classifier. Reads top to bottom in the order it runs (after nanoGPT).

    python -m train.train --model efficientnet_lite0 --data ../shared/data/simpsons/train --out_dir runs/x
    python -m train.train --config cfg.json --epochs 3          # JSON first, then flags
    torchrun --nproc_per_node=2 -m train.train ...             # DDP: nccl on CUDA, gloo on CPU

The resolved config is saved as config.json next to the checkpoints and inside every checkpoint.
TrainConfig's defaults ARE the shipped Lite0 recipe (train.pipeline.RECIPES only lists how other models differ).

Model selection and early stopping use validation NLL at the temperature fitted on validation (what the shipped,
calibrated probabilities score), not macro-F1: NLL sums over all ~3,100 val images, while macro-F1 over classes
with 1-2 val images moves by a third of a class's F1 per image and can pick the wrong epoch. Val
accuracy and macro-F1 are logged beside it. With ``ema_decay`` > 0 an exponential moving average of the weights
(timm's ModelEmaV3) is scored each epoch beside the raw weights; ckpt_best_raw.pt / ckpt_best_ema.pt hold the
best of each, ckpt_best.pt the better of the two (its "weights" key says which).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from batchcls.fsutil import atomic_path
from batchcls.metrics import macro_f1
from batchcls.scan import scan_dir
from train import data as D
from train import models
from train.degrade import Degrade
from train.metrics import fit_temperature, nll
from train.presets import BatchAugment, EvalTransform, cache_preset, cache_side, preprocessing_card
from train.teacher import teacher_targets


@dataclass
class TrainConfig:
    # data
    data: str = ""  # folder of <class>/<image> folders; only read to create the split if it is missing
    split: str = ""  # split manifest JSON; "" = <out_dir>/split.json, created from `data` if absent
    seed: int = 1337  # seeds the split, the sampler, augmentation and the head init
    train_subset: int = 0  # train on a fixed seeded subset of this many images (0 = all); the search uses it
    val_subset: int = 0  # validate on a fixed seeded subset of this many images (0 = all); the search uses it
    sampler: str = "sqrt"  # class balance: "sqrt" (weight 1/sqrt(count)), "inverse" (1/count) or "none"
    # model
    model: str = "efficientnet_lite0"  # one of train.models.MODELS
    pretrained: str = "offline"  # offline | hub | none | path to a state_dict/checkpoint
    input_size: int = 128  # square input side in px (the card's input_size); frames are ~120x160; 144 tied on val, slower
    start_size: int = 96  # progressive resizing: first epoch at this side, growing to input_size (0 = off)
    # optimisation
    epochs: int = 9  # passes over the (sampled) train split
    max_steps: int = 0  # hard cap on optimizer steps in total (0 = none); for smoke runs
    batch_size: int = 64  # global batch, split evenly across DDP ranks
    lr: float = 3e-3  # peak AdamW learning rate of the one-cycle schedule (the search's lite0 winner)
    weight_decay: float = 0.05  # AdamW decoupled weight decay (not on biases / norm weights)
    warmup_pct: float = 0.1  # fraction of all steps spent warming up to lr, then cosine down
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    head_epochs: float = 0.0  # head-only stage length in epochs (may be fractional), then all layers train
    freeze_backbone: str = "auto"  # "auto" (= yes for vgg16 on CPU), "yes" (head only throughout), "no"
    freeze_stages: int = 3  # stem + this many first stages never train (0 = none): CPU speed, little accuracy
    patience: int = 2  # early stop after this many epochs without a lower val NLL (raw or EMA); 0 = never
    ema_decay: float = 0.998  # per-step EMA of the weights, scored beside them (0 = off); 0.998 ~ last 500 steps
    epochs_this_run: int = 0  # stop this invocation after N epochs (0 = all); continue later with --resume
    # robustness: what users send, foreign images, one pass (docs/results.md)
    degrade: float = 0.0  # share of train images degraded as users' tools do (train.degrade.Degrade); 0 = off
    oe_dir: str = ""  # folder of foreign images for outlier exposure (Hendrycks et al. 2019); "" = off
    oe_batch: int = 16  # foreign images added to every batch of the training frames when oe_dir is set
    oe_weight: float = 0.5  # weight of their cross-entropy to the uniform distribution over the classes
    teacher: str = ""  # bundle whose flip-averaged probabilities on the clean frame are soft targets; "" = off
    distill_weight: float = 0.5  # share of the frames' loss given to the teacher's soft targets (rest: labels)
    # system
    out_dir: str = "runs/train/model"  # checkpoints, config.json, split.json (if created here)
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 2  # decode processes: building the pixel cache, validation loading
    cache_dir: str = ""  # where the decoded train pixels live; "" = <split manifest folder>/cache
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU and tensor cores
    amp: bool = False  # autocast switch (bf16); one code path either way
    resume: bool = False  # continue from <out_dir>/ckpt_last.pt if there is one (architecture from the checkpoint)
    progress: bool = True  # tqdm progress bar (stderr)


RUN_LOCAL = ("resume", "progress", "num_workers", "device", "epochs_this_run", "out_dir", "cache_dir")  # not restored on resume


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Every TrainConfig field as a --flag (defaults None, so an unset flag keeps the JSON/default value)."""
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="JSON file of TrainConfig overrides, applied before the flags")
    for f in fields(TrainConfig):
        kind = {"bool": _bool, "int": int, "float": float}.get(f.type, str)
        p.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default: {f.default})")
    return p


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def resolve_config(argv: list[str] | None = None) -> TrainConfig:
    args = get_args_parser().parse_args(argv)
    values = {}
    if args.config:
        values = json.loads(Path(args.config).read_text())
        unknown = set(values) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise SystemExit(f"{args.config}: unknown keys {sorted(unknown)}; valid: {[f.name for f in fields(TrainConfig)]}")
    values.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    return TrainConfig(**values)


def atomic_save(obj, path: Path) -> None:
    with atomic_path(path) as tmp:  # a kill mid-write never corrupts the previous checkpoint
        torch.save(obj, tmp)


@torch.inference_mode()
def predict(model, loader, device, *, channels_last: bool, autocast, progress: bool = False, desc: str = "eval"):
    """All logits and labels of a loader (model in eval mode), plus the seconds spent."""
    model.eval()
    logits, labels = [], []
    t0 = time.time()
    for x, y in tqdm(loader, desc=desc, disable=not progress, mininterval=10, leave=False):
        x = x.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        with autocast:
            logits.append(model(x).float().cpu())
        labels.append(y)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), time.time() - t0


def val_scores(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """The selection criterion (NLL at the temperature fitted on these logits) and what is reported beside it."""
    t = fit_temperature(logits, labels)
    pred = logits.argmax(1)
    return {"nll": nll(logits, labels, t), "nll_raw": nll(logits, labels), "temperature": t,
            "acc": float((pred == labels).mean()), "macro_f1": macro_f1(labels, pred, num_classes)}


def set_backbone_trainable(model, name: str, trainable: bool, frozen_stages: int = 0) -> None:
    """Head-only (False) or all layers (True); the stem + ``frozen_stages`` first stages stay frozen either way."""
    head_params = {id(p) for p in models.head(name, model).parameters()}
    for p in model.parameters():
        p.requires_grad_(trainable or id(p) in head_params)
    for layer in models.early_layers(name, model, frozen_stages):
        layer.requires_grad_(False)


def epoch_input_size(epoch: int, cfg: TrainConfig) -> int:
    """Progressive resizing (as in FFCV's ResNet recipes): the first half of the epochs grow from
    ``start_size`` in 16 px steps (a 96 px epoch costs ~0.55 of a 128 px one here), the second half train at
    ``input_size``, the size that is served, so BatchNorm statistics and the head end up fitted to it."""
    ramp = cfg.epochs - math.ceil(cfg.epochs / 2)  # epochs below full size; 0 for 1-epoch runs (the search)
    if not cfg.start_size or cfg.start_size >= cfg.input_size or epoch >= ramp:
        return cfg.input_size
    size = cfg.start_size + (cfg.input_size - cfg.start_size) * epoch / ramp
    return min(cfg.input_size, int(round(size / 16)) * 16)


def schedule_cost(cfg: TrainConfig) -> float:
    """Training compute of the whole schedule in full-size epochs (pixels ~ cost)."""
    return sum((epoch_input_size(e, cfg) / cfg.input_size) ** 2 for e in range(cfg.epochs))


@dataclass
class Runtime:
    """Where this process trains: DDP rank and world, device, autocast, rank-0-only logging, the run folder."""
    ddp: bool
    rank: int
    world: int
    use_cuda: bool
    device: torch.device
    master: bool
    say: Callable
    autocast: torch.autocast
    out: Path


@dataclass
class Data:
    """The split and what is read from it: train pixels (cached) and labels, the sampler, the val loader."""
    split_path: Path
    split_sha: str
    classes: list[str]
    card: object  # the preprocessing card every transform and the exported bundle share
    train_items: list
    train_pixels: np.ndarray
    train_labels: torch.Tensor
    augment: BatchAugment
    val_ds: D.ImageDataset
    sampler: D.WeightedShardSampler
    per_rank_batch: int
    val_loader: DataLoader
    degrade: Degrade | None = None  # users' degradations before the geometric augmentation
    oe_pixels: np.ndarray | None = None  # foreign images (outlier exposure), cached like the train pixels
    teacher_probs: torch.Tensor | None = None  # soft targets per train image (distillation)


@dataclass
class Schedule:
    """Optimizer, one-cycle schedule and loss, with the step counts they are sized for."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    criterion: torch.nn.Module
    steps_per_epoch: int
    total_steps: int
    head_steps: int  # optimizer steps of the head-only stage


@dataclass
class Progress:
    """What a checkpoint carries forward: counters, best scores per weights, and the per-epoch history."""
    start_epoch: int = 0
    step: int = 0
    train_time: float = 0.0
    train_seen: int = 0
    train_pixels_seen: float = 0.0  # in full-size images
    best: dict = field(default_factory=dict)  # per weights ("raw", "ema"): lowest val NLL and its epoch
    history: list = field(default_factory=list)  # one row per epoch: loss, speed, and val scores of each weights


def rank_device(use_cuda: bool, local_rank: int) -> torch.device:
    """This rank's device, made the current CUDA device before anything touches CUDA: NCCL, the caching
    allocator and every bare ``.cuda()`` / ``device="cuda"`` use the current device, so without it all ranks
    of a node would create contexts and buffers on GPU 0."""
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def setup(cfg: TrainConfig, log) -> Runtime:
    """Derived setup: DDP, device, seeds, threads."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = rank_device(use_cuda, local_rank)
    if ddp:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    master = rank == 0
    say = log if master else (lambda *a, **k: None)  # rank-0-only logging
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the CPU cores
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    amp_dtype = torch.bfloat16
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp)
    out = Path(cfg.out_dir)
    if master:
        out.mkdir(parents=True, exist_ok=True)
    return Runtime(ddp, rank, world, use_cuda, device, master, say, autocast, out)


def load_resume(cfg: TrainConfig, rt: Runtime) -> dict | None:
    """The last checkpoint when resuming; the architecture and schedule then come from it, not from flags."""
    out, say = rt.out, rt.say
    if not cfg.resume:
        return None
    path = next((out / n for n in ("ckpt_last.pt", "ckpt_portable.pt") if (out / n).is_file()), None)
    if path is None:
        say(f"resume: no {out / 'ckpt_last.pt'} (or ckpt_portable.pt) yet, starting from the beginning")
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("portable"):  # half-precision weights from another machine: the optimizer starts afresh
        say(f"resume: {path} is a portable checkpoint: weights restored, optimizer moments start at zero")
    for k, v in ckpt["config"].items():
        if k not in RUN_LOCAL:  # the run continues exactly as configured, schedule included
            setattr(cfg, k, v)
    say(f"resuming from {path} after epoch {ckpt['epoch']}")
    return ckpt


def load_data(cfg: TrainConfig, rt: Runtime, ckpt: dict | None, log) -> Data:
    """The split manifest is the only source of file lists; rank 0 writes it and the pixel cache first."""
    say = rt.say
    split_path = Path(cfg.split or rt.out / "split.json")
    if not split_path.is_file() and not cfg.data:
        raise SystemExit(f"no split manifest at {split_path}: pass --data <folder> to create one")
    if rt.master and not split_path.is_file():
        D.write_manifest(D.make_split(cfg.data, seed=cfg.seed, log=say), split_path)
    if rt.ddp:
        # Unconditional: other ranks wait for rank 0's manifest. A barrier taken only "if the file is missing"
        # raced: a rank that looked after rank 0 had written it skipped the barrier, and every later collective
        # paired with the wrong one (rank 0 waited at the cache barrier, rank 1 inside DDP's init).
        dist.barrier()
    cfg.split = str(split_path)
    manifest, split_sha = D.load_manifest(split_path)
    if ckpt is not None and ckpt["split_sha256"] != split_sha:
        raise SystemExit(f"split manifest {split_path} changed since the checkpoint was written")
    classes = manifest["classes"]
    card = preprocessing_card(architecture=cfg.model, classes=classes, input_size=cfg.input_size,
                              **models.data_config(cfg.model))
    train_items = D.seeded_subset(manifest["train"], cfg.train_subset, cfg.seed)
    # Train images are decoded once into uint8 pixels (rank 0 builds, the others map the same file) and
    # augmented a batch at a time on the training device; validation reads files exactly as the runtime.
    cache_dir = cfg.cache_dir or split_path.parent / "cache"
    preset = cache_preset(card, cache_side(card))
    if rt.master:
        D.pixel_cache(manifest["root"], train_items, preset, cache_dir, workers=cfg.num_workers, log=say)
    if rt.ddp:
        dist.barrier()
    train_pixels = D.pixel_cache(manifest["root"], train_items, preset, cache_dir, workers=0)
    train_labels = torch.tensor([y for _, y in train_items])
    augment = BatchAugment(card)
    val_ds = D.ImageDataset(manifest["root"], D.seeded_subset(manifest["val"], cfg.val_subset, cfg.seed),
                            EvalTransform(card))
    weights = D.class_weights([y for _, y in train_items], len(classes), cfg.sampler)
    sampler = D.WeightedShardSampler(weights, len(train_items), seed=cfg.seed, rank=rt.rank, world_size=rt.world)
    per_rank_batch = max(1, cfg.batch_size // rt.world)
    loader_kw = dict(num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0, pin_memory=rt.use_cuda)
    val_loader = DataLoader(val_ds, batch_size=2 * per_rank_batch, shuffle=False, **loader_kw)
    log(f"[rank {rt.rank}/{rt.world}] {rt.device} ready: {len(sampler)} samples/epoch on this rank, batch {per_rank_batch}")
    data = Data(split_path, split_sha, classes, card, train_items, train_pixels, train_labels, augment, val_ds,
                sampler, per_rank_batch, val_loader)
    return robustness(cfg, rt, data, preset, cache_dir, ckpt, say)


def robustness(cfg: TrainConfig, rt: Runtime, data: Data, preset, cache_dir, ckpt: dict | None, say) -> Data:
    """The optional robustness inputs: the degradation, the foreign images' pixels, the teacher's soft targets."""
    if cfg.degrade:
        data.degrade = Degrade(cfg.degrade)
    if cfg.oe_dir:
        oe_items = [[f.rel, -1] for f in sorted(scan_dir(cfg.oe_dir, recursive=True), key=lambda f: f.rel)
                    if not f.rel.endswith((".csv", ".md", ".txt"))]
        if not oe_items:
            raise FileNotFoundError(f"no foreign images under {cfg.oe_dir} (oe_dir): build them with "
                                    "`python scripts/build_foreign.py DIR`")
        if rt.master:
            D.pixel_cache(cfg.oe_dir, oe_items, preset, cache_dir, workers=cfg.num_workers, log=say)
        if rt.ddp:
            dist.barrier()
        data.oe_pixels = D.pixel_cache(cfg.oe_dir, oe_items, preset, cache_dir, workers=0)
        say(f"outlier exposure: {len(oe_items)} foreign images from {cfg.oe_dir}, {cfg.oe_batch} per batch, "
            f"weight {cfg.oe_weight}")
    if cfg.teacher and ckpt is not None and ckpt.get("teacher_probs") is not None:
        data.teacher_probs = ckpt["teacher_probs"].float()  # the run's own teacher, wherever it resumes
    elif cfg.teacher:
        data.teacher_probs = torch.from_numpy(teacher_targets(cfg.teacher, data.train_pixels, data.classes,
                                                              cache_dir, log=say))
        say(f"distillation: soft targets of {cfg.teacher} (flip-averaged), weight {cfg.distill_weight}")
    return data


def build_model(cfg: TrainConfig, rt: Runtime, classes: list[str], ckpt: dict | None):
    """The network (weights from the checkpoint when resuming), its EMA copy, and whether the backbone is frozen."""
    freeze = cfg.freeze_backbone == "yes" or (cfg.freeze_backbone == "auto" and cfg.model == "vgg16" and not rt.use_cuda)
    model = models.create_model(cfg.model, len(classes), pretrained="none" if ckpt else cfg.pretrained, classes=classes)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.to(rt.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    # Before DDP, so DDP never registers the frozen layers (their BN statistics still adapt in train mode).
    set_backbone_trainable(model, cfg.model, not freeze, cfg.freeze_stages)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None  # the first update copies the weights
    if ema is not None and ckpt is not None:
        ema.module.load_state_dict(ckpt["ema"])
    return model, ema, freeze


def build_schedule(cfg: TrainConfig, model, n_samples: int, per_rank_batch: int, freeze: bool) -> Schedule:
    """AdamW (no decay on biases and norm weights) under a one-cycle schedule over full batches only."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = max(1, n_samples // per_rank_batch)  # full batches only
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    head_steps = total_steps if freeze else int(cfg.head_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total_steps, 1),
                                                    pct_start=cfg.warmup_pct, anneal_strategy="cos")
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    return Schedule(optimizer, scheduler, criterion, steps_per_epoch, total_steps, head_steps)


def restore_progress(cfg: TrainConfig, rt: Runtime, sched: Schedule, ckpt: dict | None, with_ema: bool) -> Progress:
    """Fresh counters, or the checkpoint's: optimizer, schedule, counters, best scores and the RNG go on."""
    progress = Progress(best={w: {"nll": math.inf, "epoch": -1} for w in (["raw", "ema"] if with_ema else ["raw"])})
    if ckpt is not None:
        if "optimizer" in ckpt:
            sched.optimizer.load_state_dict(ckpt["optimizer"])
        sched.scheduler.load_state_dict(ckpt["scheduler"])
        progress.start_epoch = cfg.epochs if ckpt["finished"] else ckpt["epoch"] + 1  # a finished run trains no more
        progress.step, progress.best, progress.history = ckpt["step"], ckpt["best"], ckpt["history"]
        progress.train_time = ckpt["train_time_s"]
        progress.train_seen, progress.train_pixels_seen = ckpt["train_seen"], ckpt["train_pixels_seen"]
        torch.set_rng_state(ckpt["rng"])  # dropout / drop-path go on as if never interrupted
        if ckpt["finished"]:
            rt.say(f"{rt.out / 'ckpt_last.pt'} is a finished run: nothing left to train")
    return progress


def train_one_epoch(epoch: int, cfg: TrainConfig, rt: Runtime, data: Data, model, ddp_model, ema, sched: Schedule,
                    progress: Progress) -> tuple[int, float, float, int]:
    """One pass over the sampled train split; returns images seen on this rank, their summed loss, the seconds
    taken and the input size trained at. ``progress.step`` counts on."""
    data.sampler.set_epoch(epoch)
    order = torch.tensor(list(data.sampler))
    per_rank_batch = data.per_rank_batch
    batches = [order[i * per_rank_batch:(i + 1) * per_rank_batch] for i in range(sched.steps_per_epoch)]
    generator = torch.Generator(rt.device).manual_seed(cfg.seed * 100_003 + epoch * rt.world + rt.rank)  # resumable
    rng = np.random.default_rng(cfg.seed * 100_003 + epoch * rt.world + rt.rank)  # degradations, foreign picks
    ddp_model.train()
    t0, seen, loss_sum = time.time(), 0, 0.0
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (rt.master and cfg.progress),
               mininterval=5 if sys.stderr.isatty() else 60)
    size = epoch_input_size(epoch, cfg)
    for idx in bar:
        if progress.step < sched.head_steps:
            set_backbone_trainable(model, cfg.model, False, cfg.freeze_stages)
        elif progress.step == sched.head_steps:
            set_backbone_trainable(model, cfg.model, True, cfg.freeze_stages)  # stage 2: all but the frozen stem
        idx = np.sort(idx.numpy())  # sorted: sequential memmap reads (the order within a batch is moot)
        x = images(data.train_pixels[idx], data, rng, generator, rt.device, size)
        n = x.shape[0]
        if data.oe_pixels is not None:  # foreign images ride along in the same forward pass (and BatchNorm)
            pick = np.sort(rng.choice(len(data.oe_pixels), min(cfg.oe_batch, len(data.oe_pixels)), replace=False))
            x = torch.cat([x, images(data.oe_pixels[pick], data, rng, generator, rt.device, size)])
        y = data.train_labels[idx].to(rt.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        with rt.autocast:
            logits = ddp_model(x).float()
            loss = sched.criterion(logits[:n], y)
            if data.teacher_probs is not None:  # the teacher's answer on the clean frame, for the degraded one
                soft = data.teacher_probs[idx].to(rt.device)
                distill = -(soft * F.log_softmax(logits[:n], 1)).sum(1).mean()
                loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * distill
            if n < logits.shape[0]:  # outlier exposure: foreign images towards the uniform distribution
                loss = loss + cfg.oe_weight * -F.log_softmax(logits[n:], 1).mean(1).mean()
        sched.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sched.optimizer.step()
        sched.scheduler.step()
        progress.step += 1
        if ema is not None:
            ema.update(model, step=progress.step)
        seen += n
        loss_sum += loss.item() * n  # .item() syncs; cheap next to a CPU step
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{sched.scheduler.get_last_lr()[0]:.2e}",
                        ips=f"{seen * rt.world / (time.time() - t0):.0f}", refresh=False)  # bar prints at mininterval
        if progress.step >= sched.total_steps:
            break
    return seen, loss_sum, time.time() - t0, size


def images(pixels: np.ndarray, data: Data, rng: np.random.Generator, generator: torch.Generator,
           device: torch.device, size: int) -> torch.Tensor:
    """Cached uint8 pixels -> the network's augmented input: users' degradations, then the geometric ones."""
    if data.degrade is not None:
        pixels = data.degrade(pixels, rng)
    return data.augment(torch.from_numpy(np.ascontiguousarray(pixels)).to(device, non_blocking=True), generator,
                        size=size)


def evaluate(nets: dict, weights: list[str], cfg: TrainConfig, rt: Runtime, data: Data) -> dict:
    """Val scores of each weights ("raw", "ema"). Every rank evaluates the full val split, so all ranks take the
    same early-stopping decision."""
    scores = {}
    for w in weights:
        logits, labels, _ = predict(nets[w], data.val_loader, rt.device, channels_last=cfg.channels_last,
                                    autocast=rt.autocast)
        scores[w] = val_scores(logits, labels, len(data.classes))
    return scores


def save_checkpoints(epoch: int, cfg: TrainConfig, rt: Runtime, data: Data, model, ema, sched: Schedule,
                     progress: Progress, nets: dict, scores: dict, improved: list[str], winner: str,
                     new_overall: bool, finished: bool) -> None:
    """Rank 0 only: ckpt_last.pt (everything a resume needs), ckpt_best_<weights>.pt for each improved weights,
    ckpt_best.pt when the overall best changed, and history.json."""
    out = rt.out
    common = {"epoch": epoch, "step": progress.step, "train_time_s": progress.train_time, "config": asdict(cfg),
              "model_args": {"name": cfg.model, "num_classes": len(data.classes)}, "classes": data.classes,
              "card": data.card.to_dict(), "split_sha256": data.split_sha}
    atomic_save({**common, "model": model.state_dict(), "ema": ema.module.state_dict() if ema else None,
                 "optimizer": sched.optimizer.state_dict(), "scheduler": sched.scheduler.state_dict(),
                 "best": progress.best, "history": progress.history, "finished": finished,
                 "train_seen": progress.train_seen, "train_pixels_seen": progress.train_pixels_seen,
                 "rng": torch.get_rng_state(), "teacher_probs": data.teacher_probs}, out / "ckpt_last.pt")
    # What another machine needs to go on (commit it): the weights in half precision, no optimizer moments.
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    half_ema = {k: v.half() if v.is_floating_point() else v for k, v in ema.module.state_dict().items()} if ema else None
    atomic_save({**common, "model": half, "ema": half_ema, "scheduler": sched.scheduler.state_dict(),
                 "best": progress.best, "history": progress.history, "finished": finished,
                 "train_seen": progress.train_seen, "train_pixels_seen": progress.train_pixels_seen,
                 "rng": torch.get_rng_state(), "portable": True,
                 "teacher_probs": None if data.teacher_probs is None else data.teacher_probs.half()},
                out / "ckpt_portable.pt")
    for w in improved:  # weights only: what evaluate/export and --pretrained read
        snap = {**common, "model": nets[w].state_dict(), "weights": w, "val": scores[w],
                "best_val_nll": scores[w]["nll"], "best_val_f1": scores[w]["macro_f1"]}
        atomic_save(snap, out / f"ckpt_best_{w}.pt")
        if new_overall and w == winner:
            atomic_save(snap, out / "ckpt_best.pt")
    (out / "history.json").write_text(json.dumps(progress.history, indent=1) + "\n")


def main(cfg: TrainConfig, log=print) -> dict:
    rt = setup(cfg, log)
    say, world, out = rt.say, rt.world, rt.out
    ckpt = load_resume(cfg, rt)
    data = load_data(cfg, rt, ckpt, log)
    model, ema, freeze = build_model(cfg, rt, data.classes, ckpt)
    sched = build_schedule(cfg, model, len(data.sampler), data.per_rank_batch, freeze)
    progress = restore_progress(cfg, rt, sched, ckpt, with_ema=ema is not None)
    best = progress.best
    # Unused-parameter search is only needed while the backbone sits out the head-only stage.
    ddp_model = DDP(model, find_unused_parameters=0 < sched.head_steps < sched.total_steps) if rt.ddp else model
    n_params = sum(p.numel() for p in model.parameters())
    if rt.master:
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    say(f"model {cfg.model} ({n_params / 1e6:.2f} M params, weights: {cfg.pretrained}), input {cfg.input_size}px, "
        f"{sched.steps_per_epoch} steps/epoch x {cfg.epochs} epochs = {sched.total_steps} steps, head-only for "
        f"{sched.head_steps}, frozen: stem + {cfg.freeze_stages} stages, sampler {cfg.sampler}, "
        f"train {len(data.train_items)} / val {len(data.val_ds)} images")

    # --- the loop: train an epoch, evaluate, checkpoint, maybe stop -----------------------------------
    for epoch in range(progress.start_epoch, cfg.epochs):
        if progress.step >= sched.total_steps:
            break
        seen, loss_sum, epoch_time, size = train_one_epoch(epoch, cfg, rt, data, model, ddp_model, ema, sched, progress)
        progress.train_time += epoch_time
        progress.train_seen += seen * world
        progress.train_pixels_seen += seen * world * (size / cfg.input_size) ** 2  # in full-size images
        nets = {"raw": model, "ema": ema.module if ema else None}
        scores = evaluate(nets, list(best), cfg, rt, data)
        improved = [w for w in best if scores[w]["nll"] < best[w]["nll"]]
        before = min(b["nll"] for b in best.values())
        for w in improved:
            best[w] = {"nll": scores[w]["nll"], "epoch": epoch, **{k: scores[w][k] for k in ("acc", "macro_f1")}}
        winner = min(best, key=lambda w: best[w]["nll"])
        new_overall = best[winner]["nll"] < before  # then the winner is one of this epoch's weights
        progress.history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "size": size,
                                 "train_images_per_s": seen * world / epoch_time, "minutes": epoch_time / 60,
                                 **{w: scores[w] for w in best}})
        best_epoch = max(b["epoch"] for b in best.values())
        stale = cfg.patience > 0 and epoch - best_epoch >= cfg.patience
        finished = stale or progress.step >= sched.total_steps or epoch + 1 >= cfg.epochs
        if rt.master:
            save_checkpoints(epoch, cfg, rt, data, model, ema, sched, progress, nets, scores, improved, winner,
                             new_overall, finished)
        marks = f" *best {winner}, saved" if new_overall else ""
        say(f"epoch {epoch + 1}/{cfg.epochs} | loss {loss_sum / max(seen, 1):.4f} | "
            + " | ".join(f"{w} val NLL {scores[w]['nll']:.4f} acc {scores[w]['acc']:.4f} macro-F1 "
                         f"{scores[w]['macro_f1']:.4f}" for w in best)
            + f"{marks} | {seen * world / epoch_time:.1f} img/s | "
            f"{epoch_time / 60:.1f} min{f' at {size}px' if size != cfg.input_size else ''}")
        if stale:
            say(f"early stop: no lower val NLL for {cfg.patience} epochs")
            break
        if cfg.epochs_this_run and epoch + 1 - progress.start_epoch >= cfg.epochs_this_run and not finished:
            say(f"stopping after {cfg.epochs_this_run} epoch(s) this run: continue with --resume true")
            break

    if rt.ddp:
        dist.barrier()
        dist.destroy_process_group()
    winner = min(best, key=lambda w: best[w]["nll"])
    return {"best_val_nll": best[winner]["nll"], "best_val_f1": best[winner].get("macro_f1", -1.0),
            "best_epoch": best[winner]["epoch"] + 1, "weights": winner, "ckpt": str(out / "ckpt_best.pt"),
            "ckpts": {w: str(out / f"ckpt_best_{w}.pt") for w in best}, "history": progress.history,
            "train_time_s": progress.train_time, "params": n_params, "split_sha256": data.split_sha,
            "train_images_per_s": progress.train_seen / max(progress.train_time, 1e-9),
            "full_size_images_per_s": progress.train_pixels_seen / max(progress.train_time, 1e-9)}  # speed at input_size


if __name__ == "__main__":
    try:
        summary = main(resolve_config())
    except (models.WeightsError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
