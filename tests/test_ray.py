"""`batchcls run --engine ray` on a real local Ray cluster: same rows as the local runner, no mocks.

One Ray session serves the whole module (starting Ray takes seconds); the CLI joins it in-process,
and one test drives it from a separate process through --address. Skipped only where the ray extra
is not installed; CI installs it.
"""
import csv
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES

from batchcls.cli import cli
from batchcls.output import read_rows

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the ray extra is not installed: pip install 'batchcls[ray]'")
RAW_NAME = b"caf\xe9.jpg"  # not UTF-8: the runner keeps such names byte-exact (surrogateescape)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs; yields its address for out-of-process drivers."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Real Simpsons JPEGs in class sub-folders plus every kind of bad file, and awkward names."""
    root = tmp_path_factory.mktemp("mixed")
    for cls_dir in sorted(SAMPLES.iterdir())[:4]:
        (root / cls_dir.name).mkdir()
        for jpg in sorted(cls_dir.glob("*.jpg"))[:3]:
            shutil.copy(jpg, root / cls_dir.name / jpg.name)
    first = sorted(SAMPLES.glob("*/*.jpg"))[0]
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    (root / "truncated.jpg").write_bytes(first.read_bytes()[:1500])
    shutil.copy(first, root / "=HYPERLINK(1).jpg")  # formula-looking name: CSV escaping must match
    shutil.copy(first, os.path.join(os.fsencode(root), RAW_NAME))
    return root


def raw_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.reader(fh))


def assert_same_output(ray_csv: Path, local_csv: Path) -> None:
    """Every cell identical as written (escaping included), confidences within 1e-5."""
    ray_rows, local_rows = raw_csv(ray_csv), raw_csv(local_csv)
    assert ray_rows[0] == local_rows[0]
    header = ray_rows[0]
    assert [r[0] for r in ray_rows] == [r[0] for r in local_rows]
    for got, want in zip(ray_rows[1:], local_rows[1:]):
        for col, g, w in zip(header, got, want):
            if col.startswith(("confidence", "prob_")) and g and w:
                assert abs(float(g) - float(w)) <= 1e-5, (got, want)
            else:
                assert g == w, (col, got, want)


@needs_ray
def test_ray_run_matches_local_run(ray_cluster, mixed_folder, colour_bundle, tmp_path):
    local, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    opts = ["--top-k", "2", "--threshold", "0.9", "--probs"]  # every column a row can have
    r = invoke("run", mixed_folder, "--out", local, "--model", colour_bundle, *opts, "--workers", "0")
    assert r.exit_code == 0, r.output
    r = invoke("run", mixed_folder, "--out", ray_out, "--model", colour_bundle, *opts,
               "--engine", "ray", "--batch-size", "5")
    assert r.exit_code == 0, r.output
    assert "classified 17 files (3 errors)" in r.output
    assert_same_output(ray_out, local)
    rows = {row["path"]: row for row in read_rows(ray_out)}
    assert len(rows) == 17  # exactly one row per file, bad ones included
    assert rows["empty.jpg"]["error"] == "empty file (0 bytes)"
    assert rows["notes.txt"]["status"] == rows["truncated.jpg"]["status"] == "error"
    assert rows[RAW_NAME.decode("utf-8", "surrogateescape")]["status"] == "ok"
    assert rows["=HYPERLINK(1).jpg"]["status"] == "ok"
    assert not Path(str(ray_out) + ".partial").exists()


@needs_ray
def test_ray_reads_uri_lists_and_writes_parquet(ray_cluster, mixed_folder, colour_bundle, tmp_path):
    good = sorted(mixed_folder.glob("*/*.jpg"))[:2]
    uris = [p.as_uri() for p in good] + [(tmp_path / "gone.jpg").as_uri()]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(uris) + "\n")
    out = tmp_path / "labels.parquet"
    r = invoke("run", "--files-from", listing, "--out", out, "--model", colour_bundle, "--engine", "ray",
               "--format", "parquet", "--strict")
    assert r.exit_code == 3, r.output  # --strict: one file could not be read
    rows = read_rows(out)
    assert [x["path"] for x in rows] == uris
    assert [x["status"] for x in rows] == ["ok", "ok", "error"]
    assert rows[2]["error"] == "file not found (deleted or moved after scanning)"
    for p, row in zip(good, rows):  # same answers as the local runner on the same file
        want = read_rows(_local_one(p, colour_bundle, tmp_path))[0]
        assert row["label"] == want["label"] and abs(row["confidence"] - float(want["confidence"])) <= 1e-5


def _local_one(path: Path, bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / f"one-{path.name}.csv"
    assert invoke("run", path, "--out", out, "--model", bundle, "--workers", "0").exit_code == 0
    return out


@needs_ray
def test_ray_resume_adds_only_new_files(ray_cluster, colour_images, colour_bundle, tmp_path):
    out = tmp_path / "labels.csv"
    assert invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--engine", "ray").exit_code == 0
    shutil.copy(colour_images / "a_red.jpg", colour_images / "sub" / "d_red.jpg")
    r = invoke("run", colour_images, "--out", out, "--model", colour_bundle, "--engine", "ray", "--resume")
    assert r.exit_code == 0, r.output
    assert "classified 1 files" in r.output
    assert [(x["path"], x["label"]) for x in read_rows(out)] == [
        ("a_red.jpg", "red"), ("b_green.png", "green"), ("sub/c_blue.jpg", "blue"), ("sub/d_red.jpg", "red")]


@needs_ray
def test_cli_process_joins_cluster_by_address(ray_cluster, mixed_folder, colour_bundle, tmp_path):
    """A separate `batchcls` process, as a user or a Ray job would start it, on the running cluster."""
    local, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert invoke("run", mixed_folder, "--out", local, "--model", colour_bundle, "--workers", "0").exit_code == 0
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-m", "batchcls.cli", "run", str(mixed_folder), "--out", str(ray_out),
                        "--model", str(colour_bundle), "--engine", "ray", "--address", ray_cluster],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "classified 17 files (3 errors)" in p.stderr
    assert_same_output(ray_out, local)


@needs_ray
@pytest.mark.parametrize("args, message", [
    (["--device", "cuda"], "the Ray cluster has no GPUs"),
    (["--model", "/nonexistent/bundle"], "no model bundle at /nonexistent/bundle"),
])
def test_ray_errors_are_one_line(ray_cluster, colour_images, colour_bundle, tmp_path, args, message):
    r = invoke("run", colour_images, "--out", tmp_path / "x.csv", "--model", colour_bundle, "--engine", "ray", *args)
    assert r.exit_code == 1
    assert message in r.output and "Traceback" not in r.output
    assert not list(tmp_path.glob("x.csv*"))  # nothing to resume, so no stray x.csv.partial


def test_address_needs_ray_engine(colour_images, colour_bundle, tmp_path):
    r = invoke("run", colour_images, "--out", tmp_path / "x.csv", "--model", colour_bundle, "--address", "auto")
    assert r.exit_code == 2 and "--address only applies with --engine ray" in r.output


def test_local_path_never_imports_ray(colour_images, colour_bundle, tmp_path):
    code = ("import sys; from click.testing import CliRunner; from batchcls.cli import cli; "
            f"r = CliRunner().invoke(cli, ['run', {str(colour_images)!r}, '--out', {str(tmp_path / 'o.csv')!r}, "
            f"'--model', {str(colour_bundle)!r}, '--workers', '0']); "
            "assert r.exit_code == 0, r.output; assert 'ray' not in sys.modules, 'local run imported ray'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


@needs_ray
def test_job_spec_runs_our_cli_with_a_valid_runtime_env(tmp_path):
    """jobs/ray-job.yaml: its entrypoint parses as `batchcls run --engine ray`, its runtime env is valid."""
    from ray.runtime_env import RuntimeEnv

    repo = Path(__file__).resolve().parent.parent
    loader = importlib.util.spec_from_file_location("ray_submit", repo / "jobs" / "ray_submit.py")
    ray_submit = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(ray_submit)
    spec = ray_submit.load_spec()
    args = shlex.split(spec["entrypoint"])
    assert args[:4] == ["python", "-m", "batchcls.cli", "run"]
    # click checks every option and value, SOURCE's existence included: the head node's shared mount is a
    # stand-in folder here
    mount = tmp_path / "shared"
    (mount / "images").mkdir(parents=True)
    args = [a.replace("/mnt/shared", str(mount)) for a in args]
    ctx = cli.commands["run"].make_context("run", args[4:])
    assert ctx.params["engine"] == "ray" and ctx.params["address"] == "auto" and ctx.params["resume"]
    env = RuntimeEnv(**spec["runtime_env"])
    assert Path(env["working_dir"]) == repo
    assert (repo / "batchcls" / "ray_runner.py").is_file()  # what the workers import from working_dir
