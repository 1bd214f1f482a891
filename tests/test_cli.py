"""The command line's own rules: one definition per shared option, defaults shown from the library's constants,
one line per error, and the same answer from every command to the same mistake."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest

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


@pytest.mark.parametrize("flag", ["--model", "--backend", "--device", "--batch-size", "--workers", "--tta",
                                  "--top-k", "--threshold", "--quiet"])
def test_a_shared_option_means_the_same_everywhere(flag):
    """run, eval and watch take the same option from one definition: same type, default and help."""
    found = {name: opt for name, cmd in _commands().items() if name in ("run", "eval", "watch")
             if (opt := _option(cmd, flag)) is not None}
    assert len(found) >= 2, f"{flag} is on {sorted(found)} only"
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
    from batchcls import evaluate, metrics, report

    assert report.REVIEW_THRESHOLDS is metrics.REVIEW_THRESHOLDS is evaluate.REVIEW_THRESHOLDS
