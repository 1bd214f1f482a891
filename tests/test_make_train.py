"""`make train DATA=folder` for any folder: a new bundle named after it, never over an existing one."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, SAMPLES

from train.pipeline import bundle_name, check_target, install


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _make(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DATA", None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_make_train_needs_a_data_folder():
    r = _make("train")
    assert r.returncode == 2
    assert "make train needs DATA=<a folder of class folders>" in r.stderr


@pytest.mark.parametrize("how", ["folder named simpsons", "NAME=simpsons"])
def test_make_train_without_export_never_touches_the_shipped_bundle(tmp_path, how):
    """The default destination is engines/<name>; engines/simpsons exists, so the run refuses before any work."""
    data = tmp_path / ("simpsons" if how.startswith("folder") else "drawings")
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for p in sorted((SAMPLES / "bart_simpson").glob("*.jpg"))[:3]:
            (data / cls / p.name).write_bytes(p.read_bytes())
    shipped = REPO / "engines" / "simpsons"
    before = _tree_digest(shipped)
    r = _make("train", f"DATA={data}", *(["NAME=simpsons"] if how.startswith("NAME") else []), "BUDGET=1",
              f"RUN={tmp_path / 'run'}")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: engines/simpsons already holds a bundle, and this run would replace it: pass "
                     "NAME=<another name> (--name) or EXPORT=<folder> (--export), or OVERWRITE=1 "
                     "(--overwrite-bundle) to replace it"], r.stderr
    assert _tree_digest(shipped) == before
    assert not (REPO / "engines" / ".simpsons.partial").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("folder, name, expected", [
    ("/data/birds", None, "birds"),
    ("/data/birds/train", None, "birds"),  # a generic last folder names nothing: its parent does
    ("/data/my drawings", None, "my-drawings"),
    ("/data/Vögel", None, "Vögel"),
    ("/data/birds", "birds v2", "birds-v2"),
    ("/data/x", "../../etc", "etc"),  # a name is a folder name, never a path
])
def test_the_bundle_is_named_after_the_data_folder(folder, name, expected):
    assert bundle_name(folder, name) == expected


def test_an_existing_bundle_is_replaced_only_when_asked_and_only_at_the_end(tmp_path):
    target = tmp_path / "engines" / "birds"
    check_target(target, False)  # nothing there: fine
    target.mkdir(parents=True)
    check_target(target, False)  # an empty folder: fine
    (target / "card.json").write_text("{}")
    (target / "stale.npz").write_text("old")
    with pytest.raises(ValueError, match="already holds a bundle"):
        check_target(target, False)
    logs = []
    check_target(target, True, logs.append)
    assert "replaced at the end" in logs[0]
    staging = tmp_path / "engines" / ".birds.partial"
    staging.mkdir()
    (staging / "card.json").write_text('{"new": 1}')
    install(staging, target)
    assert sorted(p.name for p in target.iterdir()) == ["card.json"]  # nothing of the old bundle is left
    assert not staging.exists() and not list(target.parent.glob(".birds*"))
