"""`make soak`: inject faults into real `batchcls` runs and count how many were survived with nothing lost.

Each fault is one of: kill -9 at a random moment (1-3 times in a row, then --resume; or of a watch
daemon with --move-to while files arrive, then a restart), a torn last row
(a finished output cut at a random byte, as a crash mid-write leaves it, then --resume), a full disk (a
tiny tmpfs, then more room and --resume; skipped where mounting is not allowed), a second writer (run,
--resume, --overwrite, a watch daemon) while a run holds the output, a hostile tree, a tampered bundle,
rows that point outside --images, planted lock links, foreign files under OUT's name and resumes by
another model, folder or option set; and for the --embeddings sidecar: kill -9 then --resume with it (the
output and the sidecar inside the folder being classified), links planted at its names, second writers on the
output or on the sidecar; a resume by a bundle with the same ONNX but another card or open-set cut; files on a
hung FUSE mount (skipped where mounting is not allowed). Survived means: every input file has exactly one row, csv,
pandas and read_rows all parse the output, the sidecar holds exactly the ok rows' vectors, a hung file is one
error row and the run ends, and every refusal was one line naming what to do.

    python scripts/soak.py --rounds 20 --seed 16
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faults import (
    CLI,
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
    watch_kill_round,
)
from hung_mount import HungMount


class Tally:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.lost: list[str] = []
        self.hits: Counter = Counter()  # where the kills of `run` landed

    def record(self, kind: str, problems: list[str], detail: str = "") -> None:
        self.counts[kind, not problems] += 1
        if problems:
            self.lost.append(f"{kind} {detail}: {'; '.join(problems)}")

    def kinds(self) -> list[str]:
        return sorted({k for k, _ in self.counts})


def _one_line(r, want: str) -> list[str]:
    err = r.stderr.decode(errors="replace").strip()
    if r.returncode != 1 or "\n" in err or want not in err:
        return [f"expected a one-line refusal with {want!r}, got {r.returncode}: {err[:300]}"]
    return []


def kills(work: Path, tree: Path, expected: set[str], rounds: int, rng: random.Random, tally: Tally) -> None:
    for i in range(rounds):
        fmt = rng.choice(["csv", "csv", "jsonl", "parquet"])
        out = work / f"kill{i}.{fmt}"
        args = [str(tree), "--out", str(out), "--format", fmt, "--batch-size", str(rng.choice([1, 2, 8])),
                "--workers", "0", "-q"]
        hits = kill_rounds(args, rng.randint(1, 3), rng)
        tally.hits.update(hits)
        r = run_cli("run", *args, "--resume")
        problems = [] if r.returncode == 0 else [f"resume exit {r.returncode}: {r.stderr.decode()[-300:]}"]
        tally.record("kill -9 at a random moment", problems + check_output(out, expected, fmt), f"{fmt} {hits}")


def watch_kills(work: Path, rounds: int, rng: random.Random, tally: Tally) -> None:
    for i in range(rounds):
        (work / f"watch{i}").mkdir()
        tally.record("kill -9 of a watch daemon", watch_kill_round(work / f"watch{i}", rng), f"round {i}")


def torn(work: Path, tree: Path, expected: set[str], rounds: int, rng: random.Random, tally: Tally) -> None:
    for fmt in ("csv", "jsonl"):
        out = work / f"torn.{fmt}"
        args = [str(tree), "--out", str(out), "--format", fmt, "--workers", "0", "-q"]
        if run_cli("run", *args).returncode != 0:
            tally.record("torn last row", ["the first run failed"], fmt)
            continue
        for _ in range(rounds):
            cut = tear_last_rows(out, rng)
            r = run_cli("run", *args, "--resume")
            problems = [] if r.returncode == 0 else [f"resume exit {r.returncode}: {r.stderr.decode()[-300:]}"]
            tally.record("torn last row", problems + check_output(out, expected, fmt), f"{fmt} cut at {cut}")


def full_disk(work: Path, tally: Tally) -> str | None:
    names = [b"%03d a long name with a\nnewline " % i + b"n" * 150 + b".jpg" for i in range(150)]
    tree = work / "disk-in"
    expected = make_tree(tree, names=names, extras=False)
    try:
        for fmt in ("csv", "jsonl"):
            with tmpfs(work / f"disk-{fmt}", "24k") as disk:
                out = disk / f"labels.{fmt}"
                r = run_cli("run", tree, "--out", out, "--format", fmt, "--workers", "0", "--batch-size", "16")
                problems = _one_line(r, "No space left on device")
                grow(disk, "4m")
                r = run_cli("run", tree, "--out", out, "--format", fmt, "--workers", "0", "--resume")
                problems += [] if r.returncode == 0 else [f"resume exit {r.returncode}"]
                tally.record("full disk", problems + check_output(out, expected, fmt), fmt)
    except PermissionError as e:
        return str(e)
    return None


def second_writers(work: Path, tally: Tally) -> None:
    tree = work / "fifo-in"
    make_tree(tree, names=[b"a.jpg", b"b.jpg"], extras=False)
    listing, out = work / "list", work / "held.csv"
    os.mkfifo(listing)
    first = start_cli("run", "--files-from", listing, "--out", out, "--batch-size", "1", "--workers", "0", "-q")
    with open(listing, "w") as feed:
        feed.write(f"{tree / 'a.jpg'}\n")
        feed.flush()
        if not wait_for_lock(out, first.pid):
            tally.record("second writer", ["the first run never took its lock"])
        (work / "inbox").mkdir()
        for extra in (["run", tree, "--out", out, "--resume"], ["run", tree, "--out", out, "--overwrite"],
                      ["run", tree, "--out", out], ["watch", work / "inbox", "--out", out]):
            r = run_cli(*extra, timeout=120)
            tally.record("second writer", _one_line(r, f"PID {first.pid}"), " ".join(map(str, extra[:1] + extra[-1:])))
        feed.write(f"{tree / 'b.jpg'}\n")
    code = first.wait(timeout=300)
    first.stderr.close()
    tally.record("second writer", ([] if code == 0 else [f"the holder exited {code}"])
                 + check_output(out, {str(tree / "a.jpg"), str(tree / "b.jpg")}), "holder intact")


def hostile_tree(work: Path, tally: Tally) -> None:
    root = work / "hostile"
    expected = make_tree(root, names=HOSTILE)
    fd = os.open(root, os.O_RDONLY)
    for _ in range(20):  # ~5 KB of path: past PATH_MAX
        os.mkdir("p" * 250, dir_fd=fd)
        nxt = os.open("p" * 250, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
        fh.write(tiny_jpeg(2))
    os.close(fd)
    expected.add("/".join(["p" * 250] * 20 + ["deep.jpg"]))
    (root / "proc").symlink_to("/proc/self", target_is_directory=True)
    os.mkfifo(root / "fifo.jpg")
    expected |= {"proc", "fifo.jpg"}
    out = work / "hostile.csv"
    r = run_cli("run", root, "--out", out, "--workers", "0", "-q")
    tally.record("hostile tree and names", ([] if r.returncode == 0 else [f"exit {r.returncode}"])
                 + check_output(out, expected), "PATH_MAX, /proc link, FIFO, lying JPEG, 16 hostile names")


def tampered_bundles(work: Path, tree: Path, tally: Tally) -> None:
    shipped = REPO / "engines" / "simpsons"
    cases = [({"classes": [f"c{i}" for i in range(10)]}, "outputs 42 scores but its card lists 10"),
             ({"classes": [f"c{i}" for i in range(62)]}, "outputs 42 scores but its card lists 62"),
             ({"std": [0.2, 0, 0.2]}, "std values must be > 0"), ({"input_size": 0}, "input_size must be"),
             ({"temperature": "hot"}, "temperature must be")]
    for i, (changes, want) in enumerate(cases):
        bundle = work / f"bundle{i}"
        bundle.mkdir()
        card = {**json.loads((shipped / "card.json").read_text()), **changes}
        (bundle / "card.json").write_text(json.dumps(card))
        (bundle / "model.onnx").symlink_to(shipped / "model.onnx")
        out = work / f"tampered{i}.csv"
        r = run_cli("run", tree, "--out", out, "--model", bundle)
        problems = _one_line(r, want) + ([f"{out.name} was created"] if out.exists() else [])
        tally.record("tampered bundle", problems, want)


def outside_rows(work: Path, tally: Tally) -> None:
    images = work / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(tiny_jpeg(0))
    labels = work / "outside.csv"
    bad = ["../../../../etc/passwd", "/etc/shadow", "../hostile.csv", str(REPO / "README.md")]
    labels.write_text("path,label,confidence,status,error\nok.jpg,x,0.1,ok,\n" + "".join(f"{p},y,0.1,ok,\n" for p in bad))
    r = run_cli("review", labels, "--images", images, "--below", "0.5", "--to", work / "review")
    placed = sorted(str(p.relative_to(work / "review")) for p in (work / "review").rglob("*") if p.is_file())
    problems = [] if placed == ["_manifest.csv", "x/ok.jpg"] else [f"review placed {placed}"]
    problems += [] if f"{len(bad)} rows skipped" in r.stderr.decode() else ["no warning from review"]
    r = run_cli("report", labels, "--images", images, "--out", work / "r.html", "--workers", "0")
    links = re.findall(r'href="([^"]*)"', (work / "r.html").read_text()) if r.returncode == 0 else []
    problems += [f"report linked {x}" for x in links if "etc" in x or "README" in x or "hostile" in x]
    tally.record("rows pointing outside --images", problems, f"{len(bad)} rows")


def not_ours(work: Path, tally: Tally) -> None:
    """A planted lock (symlink or hard link to a file), a foreign file under OUT's name, an output written
    by another run: each refused in one line, and the file involved left byte for byte as it was."""
    images = work / "small"
    make_tree(images, names=[b"a.jpg", b"b.jpg"], extras=False)
    notes = b'my notes\n"quoted, open\nthird line\nfourth line\n'
    for i, (command, how) in enumerate((c, h) for c in ("run", "resume", "overwrite", "watch")
                                       for h in ("symlink", "hardlink")):
        out, victim = work / f"planted{i}.csv", work / f"victim{i}.txt"
        if command == "resume":
            run_cli("run", images, "--out", out, "--workers", "0", "-q")
        victim.write_bytes(notes)
        lock = out.with_name(f".{out.name}.lock")
        lock.symlink_to(victim) if how == "symlink" else os.link(victim, lock)
        flags = {"run": [], "resume": ["--resume"], "overwrite": ["--overwrite"]}.get(command)
        r = (run_cli("watch", images, "--out", out, timeout=120) if flags is None
             else run_cli("run", images, "--out", out, "--workers", "0", *flags))
        problems = _one_line(r, "not a lock batchcls made")
        tally.record("planted lock", problems + ([] if victim.read_bytes() == notes else ["its target changed"]),
                     f"{command} {how}")
    foreign = [("csv", notes), ("csv", b"path,label\nx.jpg,cat\ny.jpg,dog"),
               ("csv", b"path,label,confidence,status,error\r\nx.jpg,cat\r\n"), ("jsonl", b"hello"),
               ("jsonl", b'{"path": "x.jpg"}\n{"note": 1}')]
    for i, (fmt, data) in enumerate(foreign):
        out = work / f"foreign{i}.{fmt}"
        out.write_bytes(data)
        r = run_cli("run", images, "--out", out, "--workers", "0", "--resume")
        problems = _one_line(r, "")
        tally.record("foreign file resumed", problems + ([] if out.read_bytes() == data else ["it was changed"]),
                     repr(data[:20]))
    other = work / "other"
    make_tree(other, names=[b"b.jpg", b"a.jpg"], extras=False)
    for i, change in enumerate([[other], [images, "--tta", "flip"], [images, "--threshold", "0.3"],
                                [images, "--format", "jsonl"]]):
        out = work / f"producer{i}.csv"
        run_cli("run", images, "--out", out, "--workers", "0", "-q")
        before = out.read_bytes()
        r = run_cli("run", *change, "--out", out, "--workers", "0", "--resume")
        problems = _one_line(r, "written by another run") + ([] if out.read_bytes() == before else ["it was changed"])
        tally.record("resume by another run", problems, " ".join(map(str, change[1:])) or "another folder")


def embedding_kills(work: Path, rounds: int, rng: random.Random, tally: Tally) -> None:
    """kill -9 of `run --embeddings` at random moments, then --resume: the rows and the vectors agree exactly. The
    output and the sidecar sit inside the folder being classified: they must never get rows themselves."""
    for i in range(rounds):
        tree = work / f"emb-tree{i}"
        expected = make_tree(tree, names=HOSTILE[:8])
        out, emb = tree / "labels.csv", tree / "feats.npy"
        args = [str(tree), "--out", str(out), "--embeddings", str(emb), "--batch-size", str(rng.choice([1, 2, 4])),
                "--workers", "0", "-q"]
        hits = kill_rounds(args, rng.randint(1, 3), rng)
        r = run_cli("run", *args, "--resume")
        problems = [] if r.returncode == 0 else [f"resume exit {r.returncode}: {r.stderr.decode()[-300:]}"]
        problems += check_output(out, expected) + check_embeddings(out, emb) if r.returncode == 0 else []
        tally.record("kill -9 with --embeddings", problems, str(hits))


def embedding_links(work: Path, tally: Tally) -> None:
    images = work / "emb-small"
    make_tree(images, names=[b"a.jpg"], extras=False)
    notes = b"my notes, not vectors\n"
    for i, name in enumerate(["e.npy.partial", "e.paths.jsonl", "e.paths.jsonl.partial"]):
        for extra in ([], ["--overwrite"]):
            folder = work / f"emb-link{i}{len(extra)}"
            folder.mkdir()
            victim = folder / "victim.txt"
            victim.write_bytes(notes)
            (folder / name).symlink_to(victim)
            r = run_cli("run", images, "--out", folder / "labels.csv", "--embeddings", folder / "e.npy", "--workers",
                        "0", *extra)
            problems = _one_line(r, "is a symbolic link") + ([] if victim.read_bytes() == notes else ["its target changed"])
            tally.record("planted embeddings link", problems, f"{name} {' '.join(extra)}")


def embedding_writers(work: Path, tally: Tally) -> None:
    """While a run holds its output and its vectors file: runs on the same output, and on another output with the
    same vectors file, are refused in one line, and the holder's rows and vectors come out whole."""
    tree = work / "emb-fifo-in"
    make_tree(tree, names=[b"a.jpg", b"b.jpg"], extras=False)
    listing, out, emb = work / "emb-list", work / "emb-held.csv", work / "emb-held.npy"
    os.mkfifo(listing)
    first = start_cli("run", "--files-from", listing, "--out", out, "--embeddings", emb, "--batch-size", "1",
                      "--workers", "0", "-q")
    with open(listing, "w") as feed:
        feed.write(f"{tree / 'a.jpg'}\n")
        feed.flush()
        if not wait_for_lock(out, first.pid):
            tally.record("second writer with --embeddings", ["the first run never took its lock"])
        for other, extra in ((out, ["--resume"]), (out, ["--overwrite"]), (work / "emb-other.csv", []),
                             (work / "emb-other.csv", ["--overwrite"])):
            r = run_cli("run", tree, "--out", other, "--embeddings", emb, *extra, timeout=120)
            tally.record("second writer with --embeddings", _one_line(r, f"PID {first.pid}"),
                         f"{other.name} {' '.join(extra)}")
        feed.write(f"{tree / 'b.jpg'}\n")
    code = first.wait(timeout=300)
    first.stderr.close()
    problems = [] if code == 0 else [f"the holder exited {code}"]
    problems += check_output(out, {str(tree / "a.jpg"), str(tree / "b.jpg")}) + check_embeddings(out, emb)
    tally.record("second writer with --embeddings", problems, "holder intact")


def same_onnx_other_bundle(work: Path, tally: Tally) -> None:
    """A bundle with the shipped ONNX file but another card (temperature, TTA) or open-set cut must not add rows
    to an output of the shipped bundle."""
    shipped = REPO / "engines" / "simpsons"
    images = work / "bundle-small"
    make_tree(images, names=[b"a.jpg", b"b.jpg"], extras=False)
    card = json.loads((shipped / "card.json").read_text())
    changes = [{"temperature": card["temperature"] * 1.5}, {"tta": "none" if card.get("tta") == "flip" else "flip"}]
    moved = _move_a_cut(card.get("openset"))
    if moved is not None:
        changes.append({"openset": moved})
    for i, change in enumerate(changes):
        bundle = work / f"same-onnx{i}"
        bundle.mkdir()
        (bundle / "card.json").write_text(json.dumps({**card, **change}))
        for f in shipped.iterdir():  # the same files, byte for byte: only the card differs
            if f.name != "card.json":
                (bundle / f.name).symlink_to(f)
        out = work / f"same-onnx{i}.csv"
        (images / "b.jpg").rename(work / "b.jpg")
        run_cli("run", images, "--out", out, "--workers", "0", "-q")
        (work / "b.jpg").rename(images / "b.jpg")
        before = out.read_bytes()
        r = run_cli("run", images, "--out", out, "--model", bundle, "--workers", "0", "--resume")
        problems = _one_line(r, "written by another run") + ([] if out.read_bytes() == before else ["it was changed"])
        tally.record("resume by a same-ONNX bundle", problems, next(iter(change)))


def _move_a_cut(section: object) -> object | None:
    """A copy of an open-set section with its first ``cut`` (at any depth) doubled, whatever its layout; None
    when it has none."""
    if isinstance(section, dict):
        if isinstance(section.get("cut"), (int, float)) and not isinstance(section["cut"], bool):
            return {**section, "cut": section["cut"] * 2}
        for key, value in section.items():
            moved = _move_a_cut(value)
            if moved is not None:
                return {**section, key: moved}
    if isinstance(section, list):
        for i, value in enumerate(section):
            moved = _move_a_cut(value)
            if moved is not None:
                return [*section[:i], moved, *section[i + 1:]]
    return None


def hung_files(work: Path, tally: Tally) -> str | None:
    """Files on a FUSE mount that never answers their open or read: one error row each, the other files ok, and
    the run ends, in-process and in decode workers."""
    src = work / "hung-src"
    src.mkdir()
    good = [f"good{i:02d}.jpg" for i in range(10)]
    for i, name in enumerate([*good, "stuck.jpg", "slow.jpg"]):
        (src / name).write_bytes(tiny_jpeg(i))
    try:
        mount = HungMount(work / "hung-mnt", src, hang_open=["stuck.jpg"], hang_read=["slow.jpg"])
    except PermissionError as e:
        return str(e)
    try:
        for i, how in enumerate((["--workers", "0"], ["--workers", "2", "--batch-size", "4"])):
            out = work / f"hung{i}.csv"
            proc = subprocess.Popen([*CLI, "run", str(mount.mountpoint), "--out", str(out), *how, "-q"], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "BATCHCLS_READ_STALL_S": "3"})
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.poll() is None:
                tally.record("hung file", ["the run did not end within 120 s"], " ".join(how))
                continue
            problems = [] if proc.returncode == 0 else [f"exit {proc.returncode}"]
            problems += check_output(out, {*good, "stuck.jpg", "slow.jpg"})
            if not problems:
                from batchcls.output import read_rows

                bad = sorted(r["path"] for r in read_rows(out) if r["status"] != "ok")
                problems += [] if bad == ["slow.jpg", "stuck.jpg"] else [f"error rows for {bad}"]
            tally.record("hung file", problems, " ".join(how))
    finally:
        mount.close()  # aborts the connection: the readers it held end
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="kill -9 faults (torn rows: half as many per format)")
    ap.add_argument("--seed", type=int, default=16)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tally = Tally()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchcls-soak-") as tmp:
        work = Path(tmp)
        tree = work / "tree"
        expected = make_tree(tree, copies=2)
        kills(work, tree, expected, args.rounds, rng, tally)
        torn(work, tree, expected, max(1, args.rounds // 2), rng, tally)
        watch_kills(work, max(1, args.rounds // 5), rng, tally)
        skipped = full_disk(work, tally)
        second_writers(work, tally)
        hostile_tree(work, tally)
        tampered_bundles(work, tree, tally)
        outside_rows(work, tally)
        not_ours(work, tally)
        embedding_kills(work, max(1, args.rounds // 4), rng, tally)
        embedding_links(work, tally)
        embedding_writers(work, tally)
        same_onnx_other_bundle(work, tally)
        hung = hung_files(work, tally)
    total = sum(tally.counts.values())
    survived = sum(n for (_, ok), n in tally.counts.items() if ok)
    for kind in tally.kinds():
        print(f"  {kind:32s} {tally.counts[kind, True]:3d}/{tally.counts[kind, True] + tally.counts[kind, False]:<3d}")
    print(f"  kills of run landed: {', '.join(f'{n} {k}' for k, n in sorted(tally.hits.items()))}")
    if skipped:
        print(f"  {'full disk':32s} skipped: {skipped}")
    if hung:
        print(f"  {'hung file':32s} skipped: {hung}")
    for line in tally.lost:
        print(f"LOST: {line}")
    print(f"soak: {survived}/{total} injected faults survived with nothing lost "
          f"(seed {args.seed}, {time.monotonic() - t0:.0f} s)")
    return 0 if survived == total else 1


if __name__ == "__main__":
    sys.exit(main())
