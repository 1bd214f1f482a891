"""Fault injection against real `batchcls` processes with the shipped model on tiny sample frames.

kill -9 at random moments, torn last rows, a full disk (a tiny tmpfs, where mounting is allowed), two
writers on one output, hostile trees, names and rows, tampered bundles. After each fault the next
command must give every file exactly one row in a file csv, pandas and read_rows all parse.
Seed: $BATCHCLS_FAULT_SEED (default 16), printed on failure.
"""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from faults import (
    HOSTILE,
    REPO,
    check_embeddings,
    check_output,
    grow,
    kill_rounds,
    make_tree,
    run_cli,
    start_cli,
    tear_last_rows,
    tiny_jpeg,
    tmpfs,
    wait_for_lock,
)
from procs import nested

from batchcls.errors import OutputError

SEED = int(os.environ.get("BATCHCLS_FAULT_SEED", "16"))
SHIPPED = REPO / "engines" / "simpsons"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile") / "in"
    return root, make_tree(root, copies=2)


def _one_line(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    assert "Traceback" not in text and text.count("\n") == 0, text
    return text


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_kill_9_at_random_moments_then_resume_gives_each_file_once(tree, tmp_path, fmt):
    root, expected = tree
    out = tmp_path / f"labels.{fmt}"
    rng = random.Random(SEED)
    args = [str(root), "--out", str(out), "--format", fmt, "--batch-size", "1", "--workers", "0", "-q"]
    hits = kill_rounds(args, rounds=5, rng=rng)
    r = run_cli("run", *args, "--resume")
    assert r.returncode == 0, (SEED, hits, r.stderr)
    assert check_output(out, expected, fmt) == [], (SEED, hits)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_torn_last_row_is_repaired_exactly(tree, tmp_path, fmt):
    root, expected = tree
    out = tmp_path / f"labels.{fmt}"
    args = [str(root), "--out", str(out), "--format", fmt, "--workers", "0", "-q"]
    assert run_cli("run", *args).returncode == 0
    rng = random.Random(SEED)
    for _ in range(3):
        cut = tear_last_rows(out, rng)
        r = run_cli("run", *args, "--resume")
        assert r.returncode == 0, (SEED, cut, r.stderr)
        assert check_output(out, expected, fmt) == [], (SEED, cut)


def test_a_torn_parquet_partial_is_repaired_exactly(tree, tmp_path):
    pytest.importorskip("pyarrow")
    root, expected = tree
    staged, out = tmp_path / "staged.jsonl", tmp_path / "labels.parquet"
    assert run_cli("run", root, "--out", staged, "--format", "jsonl", "--workers", "0", "-q").returncode == 0
    tear_last_rows(staged, random.Random(SEED))  # a parquet run's partial is JSON lines: the same bytes
    os.replace(tmp_path / "staged.jsonl.partial", tmp_path / "labels.parquet.partial")
    r = run_cli("run", root, "--out", out, "--format", "parquet", "--workers", "0", "--resume")
    assert r.returncode == 0, r.stderr
    assert check_output(out, expected, "parquet") == []


def test_a_cut_inside_a_quoted_newline_is_redone(tree, tmp_path):
    root, expected = tree
    out = tmp_path / "labels.csv"
    assert run_cli("run", root, "--out", out, "--workers", "0", "-q").returncode == 0
    data = out.read_bytes()
    at = data.index(b"new\nline.jpg") + 4  # just past the newline inside the quoted name
    out.unlink()
    out.with_name("labels.csv.partial").write_bytes(data[:at])
    r = run_cli("run", root, "--out", out, "--workers", "0", "--resume")
    assert r.returncode == 0, r.stderr
    assert check_output(out, expected) == []


def test_a_full_disk_stops_with_one_line_and_resume_finishes(tmp_path):
    root = tmp_path / "in"
    names = [b"%03d long name with a\nnewline " % i + b"n" * 150 + b".jpg" for i in range(150)]
    expected = make_tree(root, names=names, extras=False)
    try:
        with tmpfs(tmp_path / "disk", "24k") as disk:
            out = disk / "labels.csv"
            r = run_cli("run", root, "--out", out, "--workers", "0", "--batch-size", "16")
            assert r.returncode == 1 and "No space left on device" in _one_line(r.stderr)
            assert out.with_name("labels.csv.partial").exists()
            grow(disk, "4m")
            r = run_cli("run", root, "--out", out, "--workers", "0", "--resume")
            assert r.returncode == 0, r.stderr
            assert check_output(out, expected) == []
    except PermissionError as e:
        pytest.skip(str(e))


def test_a_second_writer_is_refused_while_the_first_finishes(tmp_path):
    root = tmp_path / "in"
    make_tree(root, names=[b"a.jpg", b"b.jpg", b"c.jpg"], extras=False)
    listing = tmp_path / "list"
    os.mkfifo(listing)  # the first run reads its file list from here: it holds its lock until we close it
    out = tmp_path / "labels.csv"
    first = start_cli("run", "--files-from", listing, "--out", out, "--batch-size", "1", "--workers", "0", "-q")
    try:
        with open(listing, "w") as feed:
            feed.write(f"{root / 'a.jpg'}\n")
            feed.flush()
            assert wait_for_lock(out, first.pid), "the first run never took its lock"
            for extra in (["--resume"], ["--overwrite"], []):
                r = run_cli("run", root, "--out", out, "-q", *extra)
                line = _one_line(r.stderr)
                assert r.returncode == 1 and f"another batchcls process (PID {first.pid})" in line, line
            (tmp_path / "inbox").mkdir()
            r = run_cli("watch", tmp_path / "inbox", "--out", out, timeout=120)  # a daemon on the same ledger
            assert r.returncode == 1 and f"PID {first.pid}" in r.stderr.decode(errors="replace"), r.stderr
            feed.write(f"{root / 'b.jpg'}\n{root / 'c.jpg'}\n")
    finally:
        code = first.wait(timeout=300)
        err = first.stderr.read()
        first.stderr.close()
    assert code == 0, err
    assert check_output(out, {str(root / n) for n in ("a.jpg", "b.jpg", "c.jpg")}) == []


def test_a_failed_start_leaves_no_file_and_does_not_block_the_fixed_command(tree, tmp_path):
    root, expected = tree
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    out = out_dir / "labels.csv"
    r = run_cli("run", tmp_path / "mistyped", "--out", out)
    assert r.returncode == 1 and "does not exist" in _one_line(r.stderr)
    bad = tmp_path / "bad-bundle"
    bad.mkdir()
    (bad / "card.json").write_text("{}")
    assert run_cli("run", root, "--out", out, "--model", bad).returncode == 1
    assert list(out_dir.iterdir()) == []
    r = run_cli("run", root, "--out", out, "--workers", "0", "-q")
    assert r.returncode == 0, r.stderr
    assert check_output(out, expected) == []


def _deep(root: Path, name: str, depth: int) -> str:
    return "/".join(nested(root, name, depth, "deep.jpg", tiny_jpeg(3)))


def test_a_hostile_tree_gives_every_file_a_row_and_the_run_goes_on(tmp_path):
    from test_scan import unprivileged

    root = tmp_path / "in"
    expected = make_tree(root, names=HOSTILE[:4])
    long_rel = _deep(root, "p" * 250, 20)  # ~5 KB: past PATH_MAX
    try:
        deep_rel = _deep(root, "n", sys.getrecursionlimit() + 200)
        (root / "locked").mkdir()
        (root / "locked" / "hidden.jpg").write_bytes(tiny_jpeg(1))
        (root / "locked").chmod(0)
        (root / "proc").symlink_to("/proc/self", target_is_directory=True)
        os.mkfifo(root / "fifo.jpg")
        (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
        out = tmp_path / "labels.csv"
        preexec = unprivileged(["true"])[:-1]
        r = run_cli("run", root, "--out", out, "--workers", "0", "-q", preexec=preexec)
        assert r.returncode == 0, r.stderr
        expected |= {long_rel, deep_rel, "locked", "proc", "fifo.jpg", "dangling.jpg"}
        assert check_output(out, expected) == []
        from batchcls.output import read_rows
        rows = {x["path"]: x for x in read_rows(out)}
        assert rows[long_rel]["status"] == rows[deep_rel]["status"] == "ok"
        assert rows["locked"]["error"] == "cannot list folder: Permission denied"
        assert "pseudo-filesystem" in rows["proc"]["error"]
        assert rows["fifo.jpg"]["error"] == "not a regular file"
        assert "truncated" in rows["lie 9000x9000.jpg"]["error"]
        r = run_cli("run", root, "--out", out, "--workers", "0", "--resume", preexec=preexec)
        assert r.returncode == 0 and "classified 0 files" in r.stderr.decode(), r.stderr  # the resume can finish
    finally:
        (root / "locked").chmod(0o755)
        subprocess.run(["rm", "-rf", str(root / "n")], check=False)  # pytest's clean-up would recurse on it


def test_non_utf8_names_in_parquet_and_report(tmp_path):
    pytest.importorskip("pyarrow")
    root = tmp_path / "in"
    expected = make_tree(root, copies=2)
    out = tmp_path / "labels.parquet"
    assert run_cli("run", root, "--out", out, "--format", "parquet", "--workers", "0", "-q").returncode == 0
    (root / "copy001\nsub" / "added later.jpg").write_bytes(tiny_jpeg(5))
    r = run_cli("run", root, "--out", out, "--format", "parquet", "--workers", "0", "--resume")
    assert r.returncode == 0 and "classified 1 files" in r.stderr.decode(), r.stderr
    assert check_output(out, expected | {"copy001\nsub/added later.jpg"}, "parquet") == []
    r = run_cli("report", out, "--images", root, "--out", tmp_path / "report.html", "--workers", "0")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_bytes().decode("utf-8")  # valid UTF-8 whatever the names
    assert "%FF%FE%20not%20utf8.jpg" in page  # the link holds the file's real bytes


def test_review_and_report_only_read_inside_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(tiny_jpeg(0))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(tiny_jpeg(1))
    labels = tmp_path / "labels.csv"
    rows = [("ok.jpg", "bart_simpson"), ("../secret.jpg", "../../escape"), (str(secret), "homer_simpson"),
            ("../../../../etc/passwd", "lisa_simpson"), ("/etc/shadow", "lisa_simpson")]
    labels.write_text("path,label,confidence,status,error\n" + "".join(f"{p},{lbl},0.1,ok,\n" for p, lbl in rows))
    to = tmp_path / "review"
    r = run_cli("review", labels, "--images", images, "--below", "0.5", "--to", to, "--errors")
    assert r.returncode == 0, r.stderr
    assert "4 rows skipped because their path points outside" in r.stderr.decode()
    placed = sorted(str(p.relative_to(to)) for p in to.rglob("*") if p.is_file())
    assert placed == ["_manifest.csv", "bart_simpson/ok.jpg"]
    assert not (tmp_path / "escape").exists()
    r = run_cli("report", labels, "--images", images, "--out", tmp_path / "r.html", "--workers", "0")
    assert r.returncode == 0 and "4 rows point outside" in r.stderr.decode(), r.stderr
    page = (tmp_path / "r.html").read_text().replace("<wbr>", "")
    links = re.findall(r'href="([^"]*)"', page)
    assert page.count("<img") == 1 and "etc/passwd" in page  # listed as text, without a picture
    assert not [x for x in links if "secret" in x or "etc" in x], links


def _bundle(tmp_path: Path, **changes) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    card = json.loads((SHIPPED / "card.json").read_text())
    card.update(changes)
    (bundle / "card.json").write_text(json.dumps(card))
    (bundle / "model.onnx").symlink_to(SHIPPED / "model.onnx")
    return bundle


@pytest.mark.parametrize("changes, message", [
    ({"classes": [f"c{i}" for i in range(10)]}, "outputs 42 scores but its card lists 10 classes"),
    ({"classes": [f"c{i}" for i in range(62)]}, "outputs 42 scores but its card lists 62 classes"),
    ({"std": [0.2, 0.0, 0.2]}, "std values must be > 0"),
    ({"input_size": 0}, "input_size must be a whole number"),
    ({"mean": {"r": 0.5}}, "mean needs 3 numbers"),
])
def test_a_tampered_bundle_is_refused_in_one_line_before_any_row(tmp_path, changes, message):
    images = tmp_path / "images"
    make_tree(images, names=HOSTILE[:2], extras=False)
    out = tmp_path / "labels.csv"
    r = run_cli("run", images, "--out", out, "--model", _bundle(tmp_path, **changes))
    assert r.returncode == 1 and message in _one_line(r.stderr)
    assert not out.exists() and not out.with_name("labels.csv.partial").exists()


def test_review_never_writes_through_a_link_out_of_its_folder(tmp_path):
    images, to, elsewhere = tmp_path / "images", tmp_path / "review", tmp_path / "elsewhere"
    for d in (images, to, elsewhere):
        d.mkdir()
    (images / "a.jpg").write_bytes(tiny_jpeg(0))
    (to / "bart_simpson").symlink_to(elsewhere, target_is_directory=True)  # planted before the review
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,confidence,status,error\na.jpg,bart_simpson,0.1,ok,\n")
    r = run_cli("review", labels, "--images", images, "--below", "0.5", "--to", to)
    assert r.returncode == 1 and "leads outside" in _one_line(r.stderr)
    assert list(elsewhere.iterdir()) == []


# --- the watch daemon: its ledger, its moves, names used twice -------------------------------------

from test_watch import daemon, has_rows, inbox, jpeg, rows, wait_for  # noqa: E402, F401 - fixtures too


def test_a_name_used_again_is_labelled_not_filed_under_the_old_row(inbox, tmp_path, daemon):
    out, sorted_ = tmp_path / "labels.csv", tmp_path / "sorted"
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    with daemon(inbox, move_to=str(sorted_)) as w:
        wait_for(lambda: (sorted_ / "red" / "a.jpg").is_file(), "the first a.jpg filed")
        (inbox / "a.jpg").write_bytes(jpeg("green"))  # while the daemon runs
        wait_for(lambda: (sorted_ / "green" / "a.jpg").is_file(), "the second a.jpg labelled and filed")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    (inbox / "a.jpg").write_bytes(jpeg("blue"))  # while it is down: found by the catch-up on restart
    with daemon(inbox, move_to=str(sorted_)) as w:
        wait_for(lambda: (sorted_ / "blue" / "a.jpg").is_file(), "the third a.jpg labelled on restart")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert [(r["path"], r["label"]) for r in rows(out)] == [("a.jpg", "red"), ("a.jpg", "green"), ("a.jpg", "blue")]
    assert sorted(p.name for p in sorted_.rglob("*.jpg")) == ["a.jpg"] * 3 and list(inbox.iterdir()) == []


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_ledger_deleted_or_replaced_under_the_daemon_stops_it_loudly(inbox, tmp_path, daemon, how):
    out = tmp_path / "labels.csv"
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    with pytest.raises(OutputError, match="deleted or replaced"):
        with daemon(inbox) as w:
            wait_for(has_rows(out, "a.jpg"), "the first row")
            if how == "deleted":
                out.unlink()
            else:
                (tmp_path / "new.csv").write_text("path,label,confidence,status,error\r\n")
                os.replace(tmp_path / "new.csv", out)
            (inbox / "b.jpg").write_bytes(jpeg("green"))
            wait_for(lambda: w.failed, "the daemon to stop")
    assert (inbox / "b.jpg").exists()  # not labelled into a lost file: still here for the next start


def test_two_daemons_on_one_ledger_the_second_is_refused(inbox, tmp_path, daemon):
    with daemon(inbox):
        r = run_cli("watch", inbox, "--out", tmp_path / "labels.csv", timeout=120)
        assert r.returncode == 1 and f"another batchcls process (PID {os.getpid()})" in _one_line(r.stderr)


def test_moves_stay_inside_move_to_and_folders_never_move(inbox, tmp_path, daemon):
    sorted_, failed, elsewhere = tmp_path / "sorted", tmp_path / "failed", tmp_path / "elsewhere"
    for d in (sorted_, elsewhere):
        d.mkdir()
    (sorted_ / "red").symlink_to(elsewhere, target_is_directory=True)  # planted: would lead out of MOVE_TO
    (inbox / "a.jpg").write_bytes(jpeg("red"))
    (inbox / "b.jpg").write_bytes(jpeg("green"))
    (inbox / "proc").symlink_to("/proc/self", target_is_directory=True)
    with daemon(inbox, move_to=str(sorted_), errors_to=str(failed)) as w:
        wait_for(has_rows(tmp_path / "labels.csv", "a.jpg", "b.jpg", "proc"), "the rows")
        wait_for(lambda: not w.waiting(), "nothing left waiting")
    assert list(elsewhere.iterdir()) == [] and (inbox / "a.jpg").is_file()  # refused, logged, kept
    assert (sorted_ / "green" / "b.jpg").is_file()
    assert (inbox / "proc").is_symlink() and list(failed.iterdir()) == []  # a link to a folder never moves


# --- files that are not ours: planted links, foreign files under OUT's name ------------------------

NOTES = b'my notes\n"quoted, open\nthird line\nfourth line\n'


def _untouched(path: Path, data: bytes) -> None:
    assert path.read_bytes() == data, f"{path} was changed"


@pytest.mark.parametrize("how", ["symlink", "hardlink"])
@pytest.mark.parametrize("command", ["run", "resume", "overwrite", "watch"])
def test_a_planted_lock_is_refused_and_the_file_it_names_is_untouched(tmp_path, command, how):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    out, victim = tmp_path / "labels.csv", tmp_path / "victim.txt"
    if command == "resume":
        assert run_cli("run", images, "--out", out, "--workers", "0", "-q").returncode == 0
    victim.write_bytes(NOTES)
    lock = tmp_path / ".labels.csv.lock"
    lock.symlink_to(victim) if how == "symlink" else os.link(victim, lock)
    flags = {"run": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}
    if command == "watch":
        r = run_cli("watch", images, "--out", out, timeout=120)
    else:
        r = run_cli("run", images, "--out", out, "--workers", "0", *flags[command])
    assert r.returncode == 1 and "not a lock batchcls made" in _one_line(r.stderr), r.stderr
    _untouched(victim, NOTES)


@pytest.mark.parametrize("name, data", [
    ("labels.csv", NOTES),  # a notes file under the output's name
    ("labels.csv", b"path,label\nx.jpg,cat\ny.jpg,dog"),  # somebody's CSV without a final newline
    ("labels.csv", b"path,label,confidence,status,error\r\nx.jpg,cat\r\n"),  # our header, then foreign rows
    ("labels.jsonl", b'{"path": "x.jpg"}\n{"note": 1}'),
    ("labels.jsonl", b"hello"),
])
@pytest.mark.parametrize("command", ["resume", "watch"])
def test_resume_checks_before_it_repairs_and_leaves_a_foreign_file_whole(tmp_path, name, data, command):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    out = tmp_path / name
    out.write_bytes(data)
    fmt = ["--format", name.rpartition(".")[2]]
    if command == "watch":
        r = run_cli("watch", images, "--out", out, *fmt, timeout=120)
    else:
        r = run_cli("run", images, "--out", out, *fmt, "--workers", "0", "--resume")
    assert r.returncode == 1, r.stderr
    line = _one_line(r.stderr)
    assert "is not a batchcls output" in line or "has columns" in line, line
    _untouched(out, data)


def test_a_symlinked_out_is_continued_only_when_it_names_a_batchcls_output(tmp_path):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg", b"b.jpg"], extras=False)
    real, out, victim = tmp_path / "real.csv", tmp_path / "labels.csv", tmp_path / "victim.txt"
    victim.write_bytes(NOTES)
    out.symlink_to(victim)
    r = run_cli("run", images, "--out", out, "--workers", "0", "--resume")
    assert r.returncode == 1 and "is a symbolic link to" in _one_line(r.stderr)
    _untouched(victim, NOTES)
    out.unlink()
    partial = tmp_path / "labels.csv.partial"
    partial.symlink_to(victim)  # a run (no --resume) would append to it; --resume must not repair it
    for extra in ([], ["--resume"]):
        r = run_cli("run", images, "--out", out, "--workers", "0", *extra)
        assert r.returncode == 1, r.stderr
        _one_line(r.stderr)
        _untouched(victim, NOTES)
    partial.unlink()
    (images / "b.jpg").rename(tmp_path / "b.jpg")
    assert run_cli("run", images, "--out", real, "--workers", "0", "-q").returncode == 0
    (tmp_path / "b.jpg").rename(images / "b.jpg")
    out.symlink_to(real)  # a link to our own output: --resume continues that file
    r = run_cli("run", images, "--out", out, "--workers", "0", "--resume")
    assert r.returncode == 0 and "classified 1 files" in r.stderr.decode(), r.stderr
    assert out.is_symlink() and check_output(real, {"a.jpg", "b.jpg"}) == []


# --- an output knows what produced it --------------------------------------------------------------

def _two_folders(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "first", tmp_path / "second"
    make_tree(first, names=[b"a.jpg", b"b.jpg"], extras=False)
    make_tree(second, names=[b"b.jpg", b"a.jpg", b"c.jpg"], extras=False)  # same names, other pictures
    return first, second


@pytest.mark.parametrize("change, what", [
    ("model", "model sha256"),
    ("folder", "input"),
    ("threshold", "threshold 0.5, now 0.6"),
    ("tta", "tta None, now flip"),
    ("format", "--format csv, now jsonl"),
    ("watch-model", "model sha256"),
])
def test_a_resume_by_another_run_is_refused_naming_what_differs(tmp_path, colour_bundle, change, what):
    first, second = _two_folders(tmp_path)
    out = tmp_path / "labels.csv"
    base = ["--threshold", "0.5"] if change == "threshold" else []
    assert run_cli("run", first, "--out", out, "--workers", "0", "-q", *base).returncode == 0
    before = out.read_bytes()
    if change == "watch-model":
        r = run_cli("watch", first, "--out", out, "--model", colour_bundle, timeout=120)
    else:
        args = {"model": [first, "--model", colour_bundle], "folder": [second],
                "threshold": [first, "--threshold", "0.6"], "tta": [first, "--tta", "flip"],
                "format": [first, "--format", "jsonl"]}[change]
        r = run_cli("run", *args, "--out", out, "--workers", "0", "--resume")
    line = _one_line(r.stderr)
    hint = "new --out" if change == "watch-model" else "--overwrite"  # watch has no --overwrite to advise
    assert r.returncode == 1 and "written by another run" in line and what in line and hint in line, line
    _untouched(out, before)


def test_an_output_without_provenance_resumes_and_gets_it(tmp_path):
    from batchcls.output import meta_path

    first, _ = _two_folders(tmp_path)
    out = tmp_path / "labels.csv"
    assert run_cli("run", first, "--out", out, "--workers", "0", "-q").returncode == 0
    meta = meta_path(out)
    recorded = json.loads(meta.read_text())
    assert recorded["model_sha256"] == json.loads((SHIPPED / "card.json").read_text())["onnx_sha256"]
    assert recorded["input"] == str(first.resolve()) and recorded["format"] == "csv"
    assert "batch_size" not in recorded["options"] and recorded["options"]["top_k"] == 1
    meta.unlink()  # as an output written before provenance was recorded
    (first / "c.jpg").write_bytes(tiny_jpeg(7))
    r = run_cli("run", first, "--out", out, "--workers", "0", "--resume")
    assert r.returncode == 0 and "classified 1 files" in r.stderr.decode(), r.stderr
    assert json.loads(meta.read_text()) == recorded
    assert check_output(out, {"a.jpg", "b.jpg", "c.jpg"}) == []


def test_a_file_changed_since_its_row_is_reported_on_resume(tmp_path):
    first, _ = _two_folders(tmp_path)
    out = tmp_path / "labels.csv"
    assert run_cli("run", first, "--out", out, "--workers", "0", "-q").returncode == 0
    (first / "a.jpg").write_bytes(tiny_jpeg(9))  # replaced after its row was written
    r = run_cli("run", first, "--out", out, "--workers", "0", "--resume", "-q")
    err = r.stderr.decode()
    assert r.returncode == 0 and "1 file changed since its row was written (e.g. 'a.jpg')" in err, err
    assert "--overwrite" in err and check_output(out, {"a.jpg", "b.jpg"}) == []
    r = run_cli("run", first, "--out", out, "--workers", "0", "--resume", "-q")
    assert "1 file changed" in r.stderr.decode()  # its row is still the old file's: said again
    assert run_cli("run", first, "--out", out, "--workers", "0", "--overwrite", "-q").returncode == 0
    r = run_cli("run", first, "--out", out, "--workers", "0", "--resume", "-q")
    assert r.returncode == 0 and r.stderr == b"", r.stderr  # relabelled: nothing to say


# --- --out and --format: inferred, or wrong usage in one line ----------------------------------------

def _usage_error(r: subprocess.CompletedProcess) -> str:
    """Exit 2 (wrong usage), click's usage block, no traceback; returns the error line."""
    text = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "Traceback" not in text, (r.returncode, text)
    return [line for line in text.splitlines() if line.startswith("Error:")][0]


@pytest.mark.parametrize("args, message", [
    (["--out", ""], "--out is empty"),
    (["--out", "-", "--format", "parquet"], "parquet can't be streamed to stdout"),
    (["--out", "-", "--resume"], "needs a file, not stdout"),
    (["--out", "{tmp}/labels.txt"], "name it *.csv, *.jsonl, *.parquet, or pass --format"),
])
def test_an_output_that_cannot_work_is_wrong_usage_in_one_line(tmp_path, args, message):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    r = run_cli("run", images, *[a.format(tmp=tmp_path) for a in args], "--workers", "0")
    assert message in _usage_error(r) and r.stdout == b""  # nothing streamed in another format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_the_format_comes_from_the_extension(tmp_path):
    pytest.importorskip("pyarrow")
    images = tmp_path / "images"
    expected = make_tree(images, names=HOSTILE[:3], extras=False)
    for fmt in ("csv", "jsonl", "parquet"):
        out = tmp_path / f"labels.{fmt}"
        r = run_cli("run", images, "--out", out, "--workers", "0", "-q")
        assert r.returncode == 0, r.stderr
        assert check_output(out, expected, fmt) == [], fmt
    assert (tmp_path / "labels.parquet").read_bytes()[:4] == b"PAR1"
    assert (tmp_path / "labels.jsonl").read_bytes().startswith(b'{"path": ')
    out = tmp_path / "labels.data"  # any name, with --format
    assert run_cli("run", images, "--out", out, "--format", "jsonl", "--workers", "0", "-q").returncode == 0
    assert out.read_bytes().startswith(b'{"path": ')


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_resume_in_another_format_is_one_line_and_leaves_the_file(tmp_path, fmt):
    from batchcls.output import meta_path

    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    out = tmp_path / "labels.csv"
    assert run_cli("run", images, "--out", out, "--workers", "0", "-q").returncode == 0
    meta_path(out).unlink()  # an output from before provenance: its bytes are the only witness
    before = out.read_bytes()
    r = run_cli("run", images, "--out", out, "--format", fmt, "--workers", "0", "--resume")
    line = _one_line(r.stderr)
    assert r.returncode == 1 and "is not a batchcls output" in line, line
    _untouched(out, before)


# --- the --embeddings sidecar: one transaction with the rows ---------------------------------------

@pytest.mark.parametrize("name", ["emb.npy.partial", "emb.paths.jsonl", "emb.paths.jsonl.partial"])
@pytest.mark.parametrize("extra", [[], ["--overwrite"]], ids=["run", "overwrite"])
def test_a_planted_link_at_a_sidecar_name_is_refused_and_its_target_untouched(tmp_path, name, extra):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(NOTES)
    (tmp_path / name).symlink_to(victim)
    r = run_cli("run", images, "--out", tmp_path / "labels.csv", "--embeddings", tmp_path / "emb.npy",
                "--workers", "0", *extra)
    assert r.returncode == 1 and "is a symbolic link" in _one_line(r.stderr), r.stderr
    _untouched(victim, NOTES)
    assert not (tmp_path / "labels.csv").exists() and not (tmp_path / "labels.csv.partial").exists()


def test_runs_refused_by_a_lock_leave_the_first_runs_vectors_whole(tmp_path):
    """A second run on the same --out (refused by the output's lock) or on another --out with the same
    --embeddings (refused by the vectors' own lock) touches nothing of the first run's."""
    root = tmp_path / "in"
    make_tree(root, names=[b"a.jpg", b"b.jpg", b"c.jpg"], extras=False)
    listing = tmp_path / "list"
    os.mkfifo(listing)  # the first run reads its file list from here: it holds its locks until we close it
    out, emb = tmp_path / "labels.csv", tmp_path / "emb.npy"
    first = start_cli("run", "--files-from", listing, "--out", out, "--embeddings", emb, "--batch-size", "1",
                      "--workers", "0", "-q")
    try:
        with open(listing, "w") as feed:
            feed.write(f"{root / 'a.jpg'}\n")
            feed.flush()
            assert wait_for_lock(out, first.pid), "the first run never took its lock"
            for other, extra, what in [(out, ["--resume"], out), (out, ["--overwrite"], out), (out, [], out),
                                       (tmp_path / "other.csv", [], emb),
                                       (tmp_path / "other.csv", ["--overwrite"], emb)]:
                r = run_cli("run", root, "--out", other, "--embeddings", emb, "-q", *extra)
                line = _one_line(r.stderr)
                assert r.returncode == 1 and f"{what} is being written by another batchcls process (PID {first.pid})" \
                    in line, line
            assert not (tmp_path / "other.csv").exists() and not (tmp_path / "other.csv.partial").exists()
            feed.write(f"{root / 'b.jpg'}\n{root / 'c.jpg'}\n")
    finally:
        code = first.wait(timeout=300)
        err = first.stderr.read()
        first.stderr.close()
    assert code == 0, err
    assert check_output(out, {str(root / n) for n in ("a.jpg", "b.jpg", "c.jpg")}) == []
    assert check_embeddings(out, emb) == []


@pytest.mark.parametrize("out", ["feats.paths.jsonl", "feats.npy"])
def test_an_output_colliding_with_the_sidecar_is_refused_in_one_line(tmp_path, out):
    images = tmp_path / "images"
    make_tree(images, names=[b"a.jpg"], extras=False)
    r = run_cli("run", images, "--out", tmp_path / out, "--format", "jsonl", "--embeddings", tmp_path / "feats.npy",
                "--workers", "0")
    assert r.returncode == 1 and "choose names apart" in _one_line(r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_kill_9_then_resume_with_embeddings_in_the_source_folder(tmp_path):
    """--resume --embeddings works: after kill -9 at random moments the vectors match the rows exactly; the run's
    own files (OUT, the sidecar, their partial files) sit in the folder it classifies and never get a row."""
    root = tmp_path / "in"
    expected = make_tree(root, names=HOSTILE[:6])
    out, emb = root / "labels.csv", root / "feats.npy"
    args = [str(root), "--out", str(out), "--embeddings", str(emb), "--batch-size", "1", "--workers", "0", "-q"]
    hits = kill_rounds(args, rounds=4, rng=random.Random(SEED))
    r = run_cli("run", *args, "--resume")
    assert r.returncode == 0, (SEED, hits, r.stderr)
    assert check_output(out, expected) == [], (SEED, hits)
    assert check_embeddings(out, emb) == [], (SEED, hits)
    r = run_cli("run", *args, "--overwrite")  # the finished sidecar in the folder is skipped too
    assert r.returncode == 0 and check_output(out, expected) == [] and check_embeddings(out, emb) == []
