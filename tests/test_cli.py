"""The command line's own rules: one definition per shared option, defaults shown from the library's constants,
one line per error, and the same answer from every command to the same mistake."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import SAMPLES

from batchcls.cli import cli
from batchcls.errors import first_line


def _commands() -> dict[str, click.Command]:
    out = {}
    for name, cmd in cli.commands.items():
        out[name] = cmd
        if isinstance(cmd, click.Group):
            out.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
    return out


def _option(cmd: click.Command, flag: str) -> click.Option | None:
    return next((p for p in cmd.params if isinstance(p, click.Option) and flag in p.opts), None)


EVERY = ("run", "eval", "watch")


@pytest.mark.parametrize("flag, commands", [
    *((flag, EVERY) for flag in ("--model", "--backend", "--device", "--batch-size", "--workers", "--tta", "--quiet")),
    ("--top-k", ("run", "watch")), ("--threshold", ("run", "watch")),  # eval's --top-k scores, it writes no rows
])
def test_a_shared_option_means_the_same_everywhere(flag, commands):
    """run, eval and watch take the same option from one definition: same type, default and help."""
    found = {name: opt for name, cmd in _commands().items() if name in commands
             if (opt := _option(cmd, flag)) is not None}
    assert set(found) == set(commands), f"{flag} is on {sorted(found)} only"
    shapes = {name: (repr(o.type), o.default, o.help if flag != "--quiet" else None) for name, o in found.items()}
    assert len(set(shapes.values())) == 1, shapes


HELP_WITH = """
import sys
import batchcls.decode, batchcls.pipeline
batchcls.pipeline.CPU_BATCH, batchcls.pipeline.GPU_BATCH, batchcls.decode.DEFAULT_MAX_PIXELS = 7, 9, 123457
from batchcls.cli import cli
cli([sys.argv[1], "--help"], prog_name="batchcls")
"""


@pytest.mark.parametrize("command", ["run", "eval", "watch"])
def test_help_shows_the_defaults_the_library_uses(command):
    """Change the library's constants and the help text follows: no second copy of a default."""
    out = subprocess.run([sys.executable, "-c", HELP_WITH, command], capture_output=True, text=True).stdout
    flat = " ".join(out.split())
    assert "Default: 7, 9 on a GPU" in flat, out
    if command == "run":
        assert "default: 123457" in flat and "89478485" not in flat, out


def test_first_line_of_an_exception():
    assert first_line(RuntimeError("CUDA error: out of memory\n  at frame 1\n  at frame 2")) == \
        "RuntimeError: CUDA error: out of memory"
    assert first_line(ValueError("\n  leading blank lines\nrest")) == "ValueError: leading blank lines"
    assert first_line(KeyError()) == "KeyError"


def test_eval_and_report_use_one_threshold_list():
    from batchcls import evaluate, metrics
    from batchcls.report import page

    assert page.REVIEW_THRESHOLDS is metrics.REVIEW_THRESHOLDS is evaluate.REVIEW_THRESHOLDS


def batchcls_proc(*args, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchcls.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def labels_csv(tmp_path) -> Path:
    """A real run's output over four sample frames, under tmp_path/images."""
    images = tmp_path / "images"
    images.mkdir()
    for src in sorted(SAMPLES.glob("*/*.jpg"))[:4]:
        (images / f"{src.parent.name}-{src.name}").write_bytes(src.read_bytes())
    out = tmp_path / "labels.csv"
    r = batchcls_proc("run", images, "--out", out, "-q")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("argv, named", [
    (["run", "{missing}", "--out", "{tmp}/o.csv"], "{missing} does not exist"),
    (["run", "{images}", "{missing}", "--out", "{tmp}/o.csv"], "{missing} does not exist"),
    (["eval", "{missing}"], "{missing} does not exist"),
    (["eval", "{labels}"], "{labels} is not a folder"),
    (["watch", "{missing}", "--out", "{tmp}/o.csv"], "{missing} does not exist"),
    (["report", "{missing}", "--out", "{tmp}/r.html"], "{missing} does not exist"),
    (["report", "{labels}", "--images", "{missing}", "--out", "{tmp}/r.html"], "--images {missing} does not exist"),
    (["review", "{missing}", "--below", "0.5", "--to", "{tmp}/rv"], "{missing} does not exist"),
    (["review", "{labels}", "--images", "{missing}", "--below", "0.5", "--to", "{tmp}/rv"],
     "--images {missing} does not exist"),
    (["engine", "build", "--val-dir", "{missing}"], "--val-dir {missing} does not exist"),
])
def test_a_missing_input_is_one_line_and_exit_1_in_every_command(labels_csv, tmp_path, argv, named):
    values = {"missing": tmp_path / "nope", "tmp": tmp_path, "labels": labels_csv, "images": tmp_path / "images"}
    r = batchcls_proc(*(a.format(**values) for a in argv), cwd=tmp_path)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: "), r.stderr
    assert named.format(**values) in r.stderr and "Usage:" not in r.stderr
    assert not list(tmp_path.glob("o.csv*")) and not (tmp_path / "r.html").exists() and not (tmp_path / "rv").exists()


@pytest.mark.parametrize("command", ["report", "review"])
def test_report_and_review_that_find_no_image_say_so_and_fail(labels_csv, tmp_path, command):
    """Run from another folder without --images: not a silent success over placeholders."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    extra = ["--out", tmp_path / "r.html"] if command == "report" else ["--below", "1.0", "--to", tmp_path / "rv"]
    r = batchcls_proc(command, labels_csv, *extra, cwd=elsewhere)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "none of the 4 images" in r.stderr and "pass --images" in r.stderr, r.stderr
    r = batchcls_proc(command, labels_csv, "--images", tmp_path / "images", *extra, cwd=elsewhere)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("argv, says", [
    (["run", "{images}", "--out", "{tmp}/o.csv", "--open-set-cut", "nan"], "--open-set-cut"),
    (["run", "{images}", "--out", "{tmp}/o.csv", "--threshold", "nan"], "--threshold"),
    (["run", "{images}", "--out", "{tmp}/o.csv", "--no-open-set", "--open-set-cut", "0.3"], "--no-open-set"),
    (["eval", "{images}", "--no-open-set", "--open-set-cut", "0.3"], "--no-open-set"),
    (["watch", "{images}", "--out", "{tmp}/o.csv", "--no-open-set", "--open-set-cut", "0.3"], "--no-open-set"),
    (["run", "{images}", "--out", "{tmp}/o.csv", "--batch-size", "4096"], "lower --batch-size"),
    (["eval", "{images}", "--batch-size", "1025"], "lower --batch-size"),
    (["run", "--out", "{tmp}/o.csv"], "give SOURCE"),
    (["review", "{labels}", "--to", "{tmp}/rv"], "--below"),
    (["review", "{labels}", "--below", "nan", "--unknown", "--to", "{tmp}/rv"], "--below"),
])
def test_wrong_usage_is_one_line_and_exit_2(labels_csv, tmp_path, argv, says):
    """A value that cannot mean anything (NaN, a cut for a decision turned off, a batch past the cap, no SOURCE)
    is wrong usage: exit 2 and one line, before any file is read or written."""
    values = {"tmp": tmp_path, "labels": labels_csv, "images": tmp_path / "images"}
    r = batchcls_proc(*(a.format(**values) for a in argv), cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and says in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.glob("o.csv*")) and not (tmp_path / "rv").exists()


def test_the_batch_size_cap_is_documented_and_the_cap_itself_is_accepted(colour_images, colour_bundle, tmp_path):
    from click.testing import CliRunner

    from batchcls.cli import MAX_BATCH

    assert f"at most {MAX_BATCH}" in " ".join(CliRunner().invoke(cli, ["run", "--help"]).output.split())
    assert f"at most {MAX_BATCH}" in (Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    r = CliRunner().invoke(cli, ["run", str(colour_images), "--out", str(tmp_path / "o.csv"), "--model",
                                 str(colour_bundle), "--batch-size", str(MAX_BATCH), "-q"])
    assert r.exit_code == 0, r.output
