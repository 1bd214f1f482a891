"""The command line: each command parses its options, builds a typed config and calls the library.

ONNX Runtime, torch and Ray load inside the commands that use them, so ``--help`` stays quick; the options'
defaults and choices are the library's own constants (its modules bring numpy and Pillow, not a runtime).
"""
from __future__ import annotations

import errno
import os
import stat
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import TypeVar

import click

from batchcls.backends import BACKENDS
from batchcls.decode import DEFAULT_MAX_PIXELS
from batchcls.errors import BatchclsError, InputError, OutputError
from batchcls.infer import TTA_MODES
from batchcls.output import FORMATS, output_format
from batchcls.pipeline import CPU_BATCH, GPU_BATCH, RunOptions
from batchcls.report import THUMB_SIZE
from batchcls.watch.config import WATCH_FORMATS, WatchConfig

F = TypeVar("F", bound=Callable)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_ROW_ERRORS, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for `cat` killed by SIGPIPE


def _quiet_broken_pipe() -> None:
    """The reader of our stdout went away (`| head`): stop quietly, as cat does.

    stdout is pointed at /dev/null so the interpreter's final flush can't raise again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(EXIT_BROKEN_PIPE)


class Group(click.Group):
    """Turns library errors into one line (what went wrong, what to do; exit 1), and wrong usage too (exit 2,
    instead of click's usage block); --verbose adds the traceback of a library error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # one line, as every other error: what is wrong, where the options are
            where = e.ctx.command_path if e.ctx is not None else ctx.command_path
            click.echo(f"Error: {e.format_message()} (`{where} --help` lists the options)", err=True)
            sys.exit(EXIT_USAGE)
        except BrokenPipeError:
            _quiet_broken_pipe()
        except KeyboardInterrupt:  # eval, report, review, info: nothing half-written to keep
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (BatchclsError, OSError) as e:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            click.echo(f"Error: {e}", err=True)
            sys.exit(EXIT_FAILURE)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Print tracebacks for errors.")
@click.version_option(package_name="batchcls")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """Classify folders of images with a trained model bundle.

    Example: batchcls run ./images --out labels.csv
    """
    ctx.obj = {"verbose": verbose}


class Existing(click.Path):
    """A file or folder the command reads. One that is missing (or of the wrong kind) is the same error in
    every command: one line and exit 1, as for any input that can't be used; click's usage block and exit 2
    stay for a command line that is wrong in itself."""

    def __init__(self, what: str, *, file_okay: bool = True, dir_okay: bool = True) -> None:
        super().__init__(file_okay=file_okay, dir_okay=dir_okay)
        self.what = what

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if ctx is not None and ctx.resilient_parsing:  # shell completion: nothing to check yet
            return path
        named = f"{param.opts[0]} {path}" if isinstance(param, click.Option) else path
        try:
            is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise InputError(f"{named} does not exist: give an existing {self.what}") from None
            raise InputError(f"cannot read {named}: {e.strerror}") from None
        if is_dir and not self.dir_okay:
            raise InputError(f"{named} is a folder: give a {self.what}")
        if not is_dir and not self.file_okay:
            raise InputError(f"{named} is not a folder: give a {self.what}")
        return path


class Fraction(click.ParamType):
    """A number from 0 to 1 (a confidence, a known_score). NaN is refused: every comparison with it is false, so
    a NaN threshold would silently select nothing."""

    name = "0..1"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and 0.0 <= value <= 1.0:
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number: give one from 0 to 1", param, ctx)
        if not 0.0 <= number <= 1.0:  # NaN fails this too
            self.fail(f"{value} is not a number from 0 to 1", param, ctx)
        return number


# The most images per inference batch. Decoded images, their tensors and the window of batches decoded ahead all
# grow with it, and past a few hundred images a batch gains no speed on any backend (docs/engines.md).
MAX_BATCH = 1024


class BatchSize(click.ParamType):
    """Images per batch, 1 to ``MAX_BATCH``; the refusal says which way to go."""

    name = "integer"

    def convert(self, value, param, ctx):
        n = click.INT.convert(value, param, ctx)
        if n < 1:
            self.fail(f"{n}: a batch holds at least 1 image", param, ctx)
        if n > MAX_BATCH:
            self.fail(f"{n} is more than {MAX_BATCH} images: memory grows with the batch; lower --batch-size",
                      param, ctx)
        return n


def options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several options as one decorator, listed in the order --help shows them (sqlite-utils' ``output_options``)."""
    def apply(fn: F) -> F:
        for decorate in reversed(decorators):
            fn = decorate(fn)
        return fn
    return apply


# Each option shared by several commands has one definition here, and its default comes from the library
# constant that the code behind it uses, so help text and behaviour cannot drift apart.
model_option = click.option("--model", type=click.Path(), default=None,
                            help="Model bundle folder (card.json + ONNX). Default: the shipped model.")
backend_option = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                              help="Inference backend; auto: TensorRT plan, else CUDA, else CPU "
                                   "(INT8 if `make engine` kept it).")
device_option = click.option("--device", default=None,
                             help="cpu, cuda or cuda:N. Default: the backend's (a GPU for tensorrt/cuda, and for auto "
                                  "when there is one; else cpu); cpu keeps auto off the GPU.")
model_options = options(model_option, backend_option, device_option)

batch_options = options(
    click.option("--batch-size", type=BatchSize(), default=None,
                 help=f"Images per inference batch, at most {MAX_BATCH}. Default: {CPU_BATCH}, {GPU_BATCH} on a GPU."),
    click.option("--workers", type=click.IntRange(0), default=None,
                 help="Decode processes (0 = decode in-process). Default: one per core."),
)

tta_option = click.option("--tta", type=click.Choice(list(TTA_MODES)), default=None,
                          help="Test-time augmentation: flip averages each image's probabilities with its mirror's "
                               "(2x the inference), none turns it off. Default: the model card's choice, made on "
                               "validation (docs/results.md has its gain and cost).")
top_k_option = click.option("--top-k", type=click.IntRange(1, 100), default=1, show_default=True,
                            help="Also write the next K-1 labels and confidences.")
threshold_option = click.option("--threshold", type=Fraction(), default=None,
                                help="Label rows below this confidence as 'unknown'; the model's own top label stays "
                                     "in a model_label column.")
open_set_options = options(
    click.option("--open-set/--no-open-set", default=True, show_default=True,
                 help="Label images that show none of the model's classes 'unknown' (known_score and model_label "
                      "columns); --no-open-set gives the plain top class."),
    click.option("--open-set-cut", type=Fraction(), default=None,
                 help="Move the open-set operating point: 'unknown' below this known_score (0-1: the share of real "
                      "validation frames scoring lower). Default: the model card's cut."),
)
# What each row holds, for the commands that write rows (run, watch): the home of any further row setting.
row_options = options(top_k_option, threshold_option, tta_option, open_set_options)


def _open_set(open_set: bool, open_set_cut: float | None) -> None:
    """--open-set-cut moves the decision that --no-open-set turns off: both at once is a contradiction."""
    if not open_set and open_set_cut is not None:
        raise click.UsageError("--open-set-cut moves the open-set decision, which --no-open-set turns off: pass one")


def recursive_option(help: str) -> Callable[[F], F]:
    return click.option("--recursive/--no-recursive", default=True, show_default=True, help=help)


def format_option(choices: Iterable[str], help: str, *, stdout: bool = False) -> Callable[[F], F]:
    suffixes = ", ".join(FORMATS[c].suffix for c in choices)
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=None,
                        help=f"{help} Default: from --out's extension ({suffixes}){'; csv for -' if stdout else ''}.")


def _needs(extra: str, module: str) -> None:
    """Refuse, before any work, an option whose extra is not installed: one line saying what to install."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        from batchcls.extras import install_hint

        raise OutputError(f"--format {extra} needs {module}, which is not installed: {install_hint(extra, module)}")


def _output_format(out: str, fmt: str | None, *, resume: bool) -> str:
    """--format, or the one --out's extension names; what can't work as asked is wrong usage (exit 2)."""
    try:
        return output_format(out, fmt, resume=resume)
    except OutputError as e:
        raise click.UsageError(str(e)) from None


def quiet_option(help: str) -> Callable[[F], F]:
    return click.option("--quiet", "-q", is_flag=True, help=help)


@cli.command()
@click.argument("source", nargs=-1, type=Existing("folder or image file"))
@click.option("--out", "-o", required=True, help="Output file, or '-' for stdout.")
@model_options
@click.option("--files-from", type=click.Path(allow_dash=True), help="Read paths to classify, one per line ('-' = stdin).")
@recursive_option("Descend into sub-folders.")
@format_option(FORMATS, "Output format.", stdout=True)
@batch_options
@click.option("--cpu-decode", is_flag=True, help="With a GPU backend, decode with Pillow instead of nvJPEG: slower, but the CPU path's exact pixels (nvJPEG moves confidences by up to ~0.06).")
@row_options
@click.option("--probs", is_flag=True, help="Also write every class's probability (prob_<class> columns), e.g. for cleanlab or FiftyOne.")
@click.option("--embeddings", type=click.Path(dir_okay=False), default=None, help="Also write each ok row's penultimate-layer vector to this .npy file (float16, row order; paths in FILE.paths.jsonl beside it).")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True, help="Refuse an image whose decoded bytes pass this many 8-bit RGB pixels (3 bytes each; alpha and 16-bit count more); above Pillow's own limit it raises that too.")
@click.option("--resume", is_flag=True, help="Continue an interrupted (or earlier) run, skipping files already in --out.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--strict", is_flag=True, help=f"Exit with status {EXIT_ROW_ERRORS} if any file could not be classified.")
@quiet_option("No progress bar or summary.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="Run here, or on Ray Data across a cluster (needs the ray extra).")
@click.option("--address", default=None, help="With --engine ray: 'auto' or 'ray://HEAD:10001'. Default: $RAY_ADDRESS, else Ray on this machine.")
def run(source, out, model, backend, device, files_from, recursive, fmt, batch_size, workers, cpu_decode, top_k,
        threshold, tta, open_set, open_set_cut, probs, embeddings, max_pixels, resume, overwrite, strict, quiet,
        engine, address) -> None:
    """Classify every image in each SOURCE (folders and files, e.g. a shell glob) and write one row per file.

    Rows follow the order of the SOURCEs; a file named twice gets one row. The path column is relative to
    the folder for one folder, and to the common parent folder of several SOURCEs.

    Example: batchcls run ./images --out labels.csv --top-k 3
    """
    from batchcls.runner import Interrupted, RunJob, describe, run_job, served_cut, warnings

    if not source and files_from is None:
        raise click.UsageError("give SOURCE (folders or image files) or --files-from LIST: there is nothing to classify")
    _open_set(open_set, open_set_cut)
    fmt = _output_format(out, fmt, resume=resume)
    if fmt == "parquet":
        _needs("parquet", "pyarrow")
    options = RunOptions(batch_size=batch_size, workers=workers, top_k=top_k, threshold=threshold, probs=probs,
                         max_pixels=max_pixels, gpu_decode=not cpu_decode, tta=tta, open_set=open_set,
                         open_set_cut=open_set_cut, embeddings=bool(embeddings))
    if embeddings and engine == "ray":
        raise click.UsageError("--embeddings runs with --engine local only")
    job = RunJob(source=source or None, out=out, model=model, backend=backend, device=device, recursive=recursive,
                 files_from=files_from, fmt=fmt, resume=resume, overwrite=overwrite, quiet=quiet, options=options,
                 embeddings=embeddings)
    if address and engine != "ray":
        raise click.UsageError("--address only applies with --engine ray")
    if source and files_from:
        raise click.UsageError("give SOURCE or --files-from, not both")
    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite contradict each other: --resume continues OUT, "
                               "--overwrite replaces it; pass one")
    try:
        if engine == "ray":
            from batchcls.ray_runner import run_ray_job
            summary = run_ray_job(job, address=address)
        else:
            summary = run_job(job)
    except Interrupted as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    for line in warnings(summary, job):
        click.echo(line, err=True)
    if not quiet:
        click.echo(describe(summary, out, cut=served_cut(job, summary), threshold=threshold), err=True)
    if strict and summary.errors:
        sys.exit(EXIT_ROW_ERRORS)


@cli.command()
@model_option
@click.option("--json", "as_json", is_flag=True, help="The whole model card and the ONNX file's own metadata, as JSON.")
def info(model, as_json) -> None:
    """Summarise a bundle: model, classes, input and preprocessing, metrics, open-set point.

    Example: batchcls info --model engines/simpsons
    """
    import json

    from batchcls.card import load_card
    from batchcls.info import summary

    card = load_card(model)
    if not as_json:
        click.echo(summary(card))
        return
    from batchcls.backends.onnxruntime import onnx_metadata

    meta = onnx_metadata(card.onnx_path)  # what the file alone tells other runtimes (train/export.py writes it)
    click.echo(json.dumps({"bundle": str(card.bundle_dir), **card.to_dict(), "onnx_metadata": meta}, indent=2))


@cli.command("eval")
@click.argument("labelled_dir", type=Existing("folder of images", file_okay=False))
@click.option("--labels", type=Existing("CSV of path,label rows", dir_okay=False), default=None,
              help="A CSV of path,label rows (paths relative to LABELLED_DIR), for a flat folder of test images. "
                   "Default: LABELLED_DIR/<class>/<image>.")
@model_options
@batch_options
@click.option("--top-k", type=click.IntRange(1, 100), default=1, show_default=True,
              help="Also report top-K accuracy: the true class among the K most probable (e.g. 5).")
@tta_option
@open_set_options
@quiet_option("No progress bar.")
def evaluate(labelled_dir, labels, model, backend, device, batch_size, workers, top_k, tta, open_set, open_set_cut,
             quiet) -> None:
    """Score a model on LABELLED_DIR/<class>/* (or a flat folder and --labels CSV): accuracy, F1, per-class table.

    Example: batchcls eval samples/simpsons --top-k 5
    """
    from batchcls.evaluate import evaluate_folder, format_report

    _open_set(open_set, open_set_cut)
    report = evaluate_folder(labelled_dir, model=model, backend=backend, device=device, labels=labels, quiet=quiet,
                             options=RunOptions(batch_size=batch_size, workers=workers, top_k=top_k, tta=tta,
                                                open_set=open_set, open_set_cut=open_set_cut))
    click.echo(format_report(report))


# --- engine commands ---
@cli.group()
def engine() -> None:
    """Build faster engines for a model bundle: a TensorRT plan on NVIDIA GPUs, INT8/optimized ONNX on CPU.

    Example: batchcls engine build --model engines/simpsons
    """


@engine.command("build")
@model_option
@click.option("--target", type=click.Choice(["auto", "tensorrt", "cpu"]), default="auto", show_default=True, help="auto: TensorRT when the tensorrt package and a GPU are here, else CPU engines.")
@click.option("--fp16/--no-fp16", default=True, show_default=True, help="TensorRT: allow FP16 kernels.")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=256, show_default=True, help="TensorRT: largest batch the plan accepts (profile min 1, opt half of this).")
@click.option("--val-dir", type=Existing("labelled folder", file_okay=False), default=None, help="CPU: labelled DIR/<class>/* that decides whether INT8 is kept. Default: the card's split manifest (val).")
@click.option("--calib-dir", type=Existing("folder of images", file_okay=False), default=None, help="CPU: images to calibrate INT8 on. Default: the card's split manifest (train).")
@click.option("--calib-images", type=click.IntRange(1), default=300, show_default=True, help="CPU: how many calibration images to use.")
@click.option("--ship", is_flag=True, default=False, help="CPU: build the INT8 model the bundle ships to every machine (shipped-int8.onnx: 7-bit weights, the same logits on AVX2 and VNNI), gated on the val images and recorded with a probe that each new CPU checks at load.")
def engine_build(model, target, fp16, max_batch, val_dir, calib_dir, calib_images, ship) -> None:
    """Build the fastest engine this machine allows and store it beside the bundle's card.

    Example: batchcls engine build --model engines/simpsons --val-dir data/val
    """
    from batchcls.builders import build_engines

    if ship and target == "tensorrt":
        raise click.UsageError("--ship builds the CPU INT8 model: use it with --target cpu")
    built = build_engines(model, target="cpu" if ship else target, fp16=fp16, max_batch=max_batch, val_dir=val_dir,
                          calib_dir=calib_dir, calib_images=calib_images, ship=ship,
                          log=lambda m: click.echo(m, err=True))
    click.echo(f"built {'shipped INT8' if ship else built} engine; `batchcls run` picks it up with --backend auto",
               err=True)


@cli.command("watch")
@click.argument("folder", type=Existing("folder to watch", file_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="Ledger CSV/JSONL: rows are appended as files are labelled; a restart continues it.")
@model_options
@format_option(WATCH_FORMATS, "Output format (parquet can't be appended live).")
@click.option("--polling", is_flag=True, help="Poll the folder instead of inotify: for network mounts, where events don't arrive.")
@click.option("--stable-seconds", type=click.FloatRange(0.1), default=WatchConfig.stable_s, show_default=True, help="Without a close event (--polling, catch-up): ready once size and mtime held this long.")
@batch_options
@click.option("--max-wait", type=click.FloatRange(0), default=WatchConfig.max_wait_s, show_default=True, help="Seconds a partial batch waits for more arrivals.")
@click.option("--move-to", type=click.Path(file_okay=False), help="Move labelled files to DIR/<label>/ (same filesystem; never overwrites).")
@click.option("--errors-to", type=click.Path(file_okay=False), help="Move files that could not be classified to DIR/.")
@recursive_option("Watch sub-folders too.")
@row_options
@quiet_option("Log warnings only, not one line per batch.")
def watch(folder, out, model, backend, device, fmt, polling, stable_seconds, batch_size, workers, max_wait, move_to,
          errors_to, recursive, top_k, threshold, tta, open_set, open_set_cut, quiet) -> None:
    """Label images as they arrive in FOLDER until SIGINT/SIGTERM; a restart catches up first.

    Example: batchcls watch ./inbox --out labels.csv --move-to ./sorted
    """
    from batchcls.watch import log_to_stderr
    from batchcls.watch import watch as watch_folder

    _open_set(open_set, open_set_cut)
    log_to_stderr(quiet)
    fmt = _output_format(out, fmt, resume=True)  # the ledger is always continued
    options = RunOptions(batch_size=batch_size, workers=workers, top_k=top_k, threshold=threshold, tta=tta,
                         open_set=open_set, open_set_cut=open_set_cut)
    watch_folder(WatchConfig(folder=folder, out=out, model=model, backend=backend, device=device, fmt=fmt,
                             recursive=recursive, polling=polling, stable_s=stable_seconds, max_wait_s=max_wait,
                             move_to=move_to, errors_to=errors_to, options=options))


images_option = click.option("--images", type=Existing("folder (the SOURCE given to batchcls run)", file_okay=False),
                             default=None,
                             help="Folder the paths in LABELS are relative to: the SOURCE given to run (for several "
                                  "SOURCEs, their common parent folder). Default: current folder.")


@cli.command()
@click.argument("labels", type=Existing("labels file (the output of batchcls run)", dir_okay=False))
@images_option
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="HTML file to write (replaced each run); thumbnails are cached in <name>_files/ beside it.")
@click.option("--thumb-size", type=click.IntRange(32, 1024), default=THUMB_SIZE, show_default=True, help="Thumbnail size in pixels.")
@click.option("--workers", type=click.IntRange(0), default=None, help="Thumbnail processes (0 = in-process). Default: one per core.")
def report(labels, images, out, thumb_size, workers) -> None:
    """Write a self-contained HTML page of LABELS (a run's output): summary, one section per label, errors.

    Example: batchcls report labels.csv --images ./images --out report.html
    """
    from batchcls.report import build_report, describe

    summary = build_report(labels, out, images=images, thumb_size=thumb_size, workers=workers, progress=True)
    click.echo(describe(summary, images), err=True)


@cli.command()
@click.argument("labels", type=Existing("labels file (the output of batchcls run)", dir_okay=False))
@images_option
@click.option("--below", type=Fraction(), default=None, help="Select rows whose confidence is under this (not needed with --unknown or --errors alone).")
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to fill as <to>/<predicted label>/<image>.")
@click.option("--link", type=click.Choice(["symlink", "hardlink"]), default=None, help="Link instead of copying the images.")
@click.option("--errors", is_flag=True, help="Also place the images of error rows in <to>/_errors/.")
@click.option("--unknown", is_flag=True, help="Also place every row labelled 'unknown' (none of the classes) in <to>/unknown/, whatever its confidence.")
def review(labels, images, below, to, link, errors, unknown) -> None:
    """Copy the images a person should check into folders named after their predicted label.

    Move wrong ones to the right folder; the result is laid out like training data (<class>/<image>).

    Example: batchcls review labels.csv --images ./images --below 0.9 --to review/
    """
    if below is None and not (unknown or errors):
        raise click.UsageError("give --below T (rows under a confidence), --unknown or --errors: nothing is selected")
    from batchcls.review import describe
    from batchcls.review import review as review_rows

    summary = review_rows(labels, to, below=below, images=images, link=link, errors=errors, unknown=unknown)
    click.echo(describe(summary, images), err=True)


def main() -> None:
    cli(prog_name="batchcls")


if __name__ == "__main__":
    main()
