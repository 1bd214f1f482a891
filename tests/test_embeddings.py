"""The ``--embeddings`` sidecar as one member of the output's transaction (``RowWriter``): opened after the
locks, never through a link, appended before the rows, finished with them, kept and cut back with them on resume.
Real files in tmp_path, rows made here (no model), so every case is exact."""
import os

import numpy as np
import pytest

from batchcls.embeddings import read_embeddings
from batchcls.errors import OutputError
from batchcls.output import RowWriter, columns_for, read_rows
from batchcls.output.embeddings import HEADER_BYTES, paths_file

DIM = 6
NOTES = b"my notes, not vectors\n"


def rows(names: list[str], *, start: int = 0) -> list[dict]:
    """One row per name; a name starting with 'bad' is an error row (no vector)."""
    out = []
    for i, n in enumerate(names, start):
        ok = not n.startswith("bad")
        out.append({"path": n, "label": "red" if ok else "", "confidence": 0.5 if ok else None,
                    "status": "ok" if ok else "error", "error": "" if ok else "corrupt image",
                    "embedding": np.full(DIM, i, np.float32) if ok else None})
    return out


def writer(tmp_path, **kw) -> RowWriter:
    kw.setdefault("fmt", "csv")
    out = kw.pop("out", tmp_path / f"labels.{kw['fmt']}")
    return RowWriter(str(out), columns=columns_for(1), embeddings=kw.pop("emb", tmp_path / "emb.npy"),
                     embedding_dim=DIM, **kw)


def check_pair(tmp_path, out, emb) -> list[str]:
    """The sidecar holds exactly the output's ok rows, in order, each its own vector (row i: all i)."""
    vectors, paths = read_embeddings(emb)
    ok = [r["path"] for r in read_rows(out) if r["status"] == "ok"]
    assert paths == ok
    assert vectors.shape == (len(ok), DIM) and vectors.dtype == np.float16
    return paths


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_vectors_finish_with_the_rows_and_a_resume_continues_both(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out, emb = tmp_path / f"labels.{fmt}", tmp_path / "emb.npy"
    w = writer(tmp_path, fmt=fmt)
    w.write(rows(["a.jpg", "bad.jpg", "new\nline.jpg"]))
    w.write(rows(["c.jpg"], start=3))
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["emb.npy", "emb.paths.jsonl", out.name])
    assert check_pair(tmp_path, out, emb) == ["a.jpg", "new\nline.jpg", "c.jpg"]
    w = writer(tmp_path, fmt=fmt, resume=True)  # a finished output and its finished sidecar, continued
    assert w.done == {"a.jpg", "bad.jpg", "new\nline.jpg", "c.jpg"}
    w.write(rows(["d.jpg"], start=4))
    w.close()
    vectors, paths = read_embeddings(emb)
    assert check_pair(tmp_path, out, emb) == ["a.jpg", "new\nline.jpg", "c.jpg", "d.jpg"]
    assert [int(v[0]) for v in vectors] == [0, 2, 3, 4]


def test_a_cut_run_keeps_its_vectors_and_resume_cuts_them_to_the_rows(tmp_path):
    out, emb = tmp_path / "labels.csv", tmp_path / "emb.npy"
    w = writer(tmp_path)
    w.write(rows(["a.jpg", "b.jpg"]))
    w.vectors.add(rows(["c.jpg"], start=2))  # a crash after the vectors of the next batch, before its rows
    w.close(complete=False)
    with open(tmp_path / "emb.npy.partial", "ab") as fh:
        fh.write(b"\x01\x02\x03")  # and inside a vector
    with open(tmp_path / "emb.paths.jsonl.partial", "ab") as fh:
        fh.write(b'"d.j')  # and inside a path
    assert not emb.exists() and (tmp_path / "labels.csv.partial").exists()
    w = writer(tmp_path, resume=True)
    assert w.done == {"a.jpg", "b.jpg"}
    assert os.path.getsize(tmp_path / "emb.npy.partial") == HEADER_BYTES + 2 * DIM * 2  # cut to the two rows
    w.write(rows(["c.jpg", "bad.jpg"], start=2))
    w.close()
    assert check_pair(tmp_path, out, emb) == ["a.jpg", "b.jpg", "c.jpg"]


def test_a_crash_between_the_sidecars_rename_and_outs_is_finished_by_resume(tmp_path):
    out, emb = tmp_path / "labels.csv", tmp_path / "emb.npy"
    w = writer(tmp_path)
    w.write(rows(["a.jpg"]))
    w.fh.close()
    w.fh = None
    w.vectors.close(complete=True)  # the sidecar is in place, OUT is still OUT.partial
    w._release()
    assert emb.exists() and not out.exists()
    w = writer(tmp_path, resume=True)
    w.write(rows(["b.jpg"], start=1))
    w.close()
    assert check_pair(tmp_path, out, emb) == ["a.jpg", "b.jpg"]


def test_a_failed_start_creates_no_file(tmp_path):
    (tmp_path / "labels.csv").write_bytes(b"path,label,confidence,status,error\r\n")
    with pytest.raises(OutputError, match="already exists"):
        writer(tmp_path)  # OUT exists, no --resume: refused before anything of the sidecar is made
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]
    w = writer(tmp_path, out=tmp_path / "other.csv")
    w.abandon()  # a run that failed before its first row
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


@pytest.mark.parametrize("name", ["emb.npy", "emb.npy.partial", "emb.paths.jsonl", "emb.paths.jsonl.partial"])
@pytest.mark.parametrize("mode", ["run", "resume", "overwrite"])
def test_a_planted_link_at_any_sidecar_name_is_refused_and_its_target_untouched(tmp_path, name, mode):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(NOTES)
    if mode == "resume":
        w = writer(tmp_path)
        w.write(rows(["a.jpg"]))
        w.close()
        os.unlink(tmp_path / name) if os.path.lexists(tmp_path / name) else None
    (tmp_path / name).symlink_to(victim)
    with pytest.raises(OutputError, match="symbolic link"):
        w = writer(tmp_path, resume=mode == "resume", overwrite=mode == "overwrite")
        w.write(rows(["b.jpg"]))
        w.close()
    assert victim.read_bytes() == NOTES
    assert not (tmp_path / ".emb.npy.lock").exists() and not (tmp_path / ".labels.csv.lock").exists()


def test_a_writer_refused_by_the_outputs_lock_leaves_the_vectors_alone(tmp_path):
    first = writer(tmp_path)
    first.write(rows(["a.jpg"]))
    before = (tmp_path / "emb.npy.partial").read_bytes()
    for kw in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(OutputError, match=f"another batchcls process \\(PID {os.getpid()}\\)"):
            writer(tmp_path, **kw)
    assert (tmp_path / "emb.npy.partial").read_bytes() == before
    first.write(rows(["b.jpg"], start=1))
    first.close()
    assert check_pair(tmp_path, tmp_path / "labels.csv", tmp_path / "emb.npy") == ["a.jpg", "b.jpg"]


def test_two_outputs_never_share_one_vectors_file(tmp_path):
    first = writer(tmp_path)
    first.write(rows(["a.jpg"]))
    with pytest.raises(OutputError, match=r"emb\.npy is being written by another batchcls process.*--embeddings"):
        writer(tmp_path, out=tmp_path / "other.csv", overwrite=True)
    assert not (tmp_path / "other.csv").exists() and not (tmp_path / ".other.csv.lock").exists()
    first.close()
    assert check_pair(tmp_path, tmp_path / "labels.csv", tmp_path / "emb.npy") == ["a.jpg"]


@pytest.mark.parametrize("out", ["feats.paths.jsonl", "feats.npy", "feats.npy.partial", ".feats.npy.lock"])
def test_an_output_named_like_a_sidecar_file_is_refused(tmp_path, out):
    with pytest.raises(OutputError, match="choose names apart"):
        RowWriter(str(tmp_path / out), fmt="jsonl", columns=columns_for(1), embeddings=tmp_path / "feats.npy")
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_vectors_that_do_not_match_the_rows(tmp_path):
    w = writer(tmp_path)
    w.write(rows(["a.jpg", "b.jpg"]))
    w.close(complete=False)
    data = (tmp_path / "emb.npy.partial").read_bytes()
    (tmp_path / "emb.npy.partial").write_bytes(data[:HEADER_BYTES + DIM * 2])  # one vector of two
    before = (tmp_path / "labels.csv.partial").read_bytes()
    with pytest.raises(OutputError, match="vectors for 1 of its 2 ok rows"):
        writer(tmp_path, resume=True)
    assert (tmp_path / "labels.csv.partial").read_bytes() == before  # refused: nothing was cut
    (tmp_path / "emb.npy.partial").unlink()
    (tmp_path / "emb.paths.jsonl.partial").unlink()
    with pytest.raises(OutputError, match="emb.npy is missing"):
        writer(tmp_path, resume=True)


def test_an_existing_vectors_file_is_never_taken_without_its_rows(tmp_path):
    paths_file(tmp_path / "emb.npy").write_bytes(NOTES)
    for kw in ({}, {"resume": True}):  # --resume of an output that does not exist starts afresh: not over these
        with pytest.raises(OutputError, match="already exists: pass --overwrite"):
            writer(tmp_path, **kw)
    assert paths_file(tmp_path / "emb.npy").read_bytes() == NOTES
    w = writer(tmp_path, overwrite=True)
    w.write(rows(["a.jpg"]))
    w.close()
    assert check_pair(tmp_path, tmp_path / "labels.csv", tmp_path / "emb.npy") == ["a.jpg"]


def test_stdout_rows_with_a_vectors_file(tmp_path, capsys):
    w = RowWriter("-", columns=columns_for(1), embeddings=tmp_path / "emb.npy", embedding_dim=DIM)
    w.write(rows(["a.jpg", "bad.jpg"]))
    w.close()
    assert capsys.readouterr().out.count("\n") == 3
    vectors, paths = read_embeddings(tmp_path / "emb.npy")
    assert paths == ["a.jpg"] and vectors.shape == (1, DIM)
    assert not (tmp_path / ".emb.npy.lock").exists()


def test_own_files_are_every_name_of_the_transaction(tmp_path):
    w = writer(tmp_path)
    assert sorted(os.path.basename(p) for p in w.own_files()) == sorted(
        ["labels.csv", "labels.csv.partial", "emb.npy", "emb.npy.partial", "emb.paths.jsonl",
         "emb.paths.jsonl.partial"])
    w.close()
