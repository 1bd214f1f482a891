"""What every engine build shares: the `engine` commands' help, the row comparison that judges parity, and
a checkout left clean by a build (everything it writes is ignored)."""
from __future__ import annotations

import shutil

import pytest
from backend_helpers import (
    H200,
)
from conftest import REPO

from batchcls.backends.record import int8_path, opt_path
from batchcls.backends.tensorrt import (
    meta_path,
    plan_path,
)
from batchcls.builders.parity import compare_rows
from batchcls.card import load_card
from batchcls.cli import cli


def test_engine_commands_have_help_and_example():
    group = cli.commands["engine"]
    for cmd in [group, *group.commands.values()]:
        assert "Example:" in cmd.help
        assert all(p.help for p in cmd.params if hasattr(p, "help") and p.name != "help")


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_make_engine_leaves_git_status_clean():
    """Everything a build writes into the shipped bundle is machine-specific: ignored, never committed."""
    import subprocess

    from batchcls.backends.record import record_path
    from batchcls.builders.tensorrt import timing_cache_path

    card = load_card(REPO / "engines" / "simpsons")
    written = [record_path(card), opt_path(card), int8_path(card), plan_path(card), meta_path(card),
               timing_cache_path(card, H200)]
    rel = [str(p.resolve().relative_to(REPO)) for p in written]
    ignored = subprocess.run(["git", "check-ignore", *rel], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(rel)
    tracked = subprocess.run(["git", "ls-files", *rel], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == []


def test_compare_rows_counts_agreement_and_f1():
    ref = [{"path": "a", "label": "x", "confidence": 0.9, "status": "ok"},
           {"path": "b", "label": "y", "confidence": 0.8, "status": "ok"},
           {"path": "c", "label": "", "confidence": "", "status": "error"}]
    cand = [{**ref[0], "confidence": 0.89}, {**ref[1], "label": "x", "confidence": 0.6}, ref[2]]
    cmp = compare_rows(ref, cand, {"a": "x", "b": "y", "c": "y"})
    assert (cmp.n, cmp.errors, cmp.agreement) == (2, 1, 0.5)
    assert cmp.max_conf_diff == pytest.approx(0.2)
    assert cmp.macro_f1_ref > cmp.macro_f1_candidate and not cmp.parity_ok
