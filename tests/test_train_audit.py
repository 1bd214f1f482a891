"""Label audit (train/audit.py): the shipped model through ONNX Runtime on real sample images, no torch."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from PIL import Image

from train import audit
from train import data as D

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "simpsons"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def mislabelled_run(tmp_path):
    """A run folder whose val split is the 40 samples plus one unreadable file, with two images the model gets
    right given another character's label (what a scraped dataset's label noise looks like)."""
    root = tmp_path / "data"
    shutil.copytree(SAMPLES, root)
    (root / "bart_simpson" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    classes = sorted(p.name for p in root.iterdir())
    items = [[f"{c}/{f.name}", i] for i, c in enumerate(classes) for f in sorted((root / c).iterdir())]
    manifest = {"root": str(root), "classes": classes, "val": items}
    right = [r["path"] for r in audit.predict_split(manifest, "val") if r["predicted"] == r["label"]]
    relabelled = {right[0]: right[-1].split("/")[0], right[-1]: right[0].split("/")[0]}  # two classes swap
    assert relabelled[right[0]] != right[0].split("/")[0]
    manifest["val"] = [[p, classes.index(relabelled[p]) if p in relabelled else i] for p, i in items]
    run = tmp_path / "run"
    D.write_manifest(manifest, run / "split.json")
    return run, relabelled


def test_audit_lists_disputed_labels_and_carries_verdicts(mislabelled_run, tmp_path, capsys):
    run, relabelled = mislabelled_run
    audit.main(["--run", str(run)])
    sheet = run / "audit" / "val.csv"
    rows = read_csv(sheet)
    by_path = {r["path"]: r for r in rows}
    for path, label in relabelled.items():  # the label as given, and the model's (right) answer beside it
        assert by_path[path]["label"] == label and by_path[path]["predicted"] == path.split("/")[0]
    assert by_path["bart_simpson/broken.jpg"]["predicted"].startswith("<error:")
    assert all(r["predicted"] != r["label"] for r in rows)
    confidences = [float(r["confidence"]) for r in rows]
    assert confidences == sorted(confidences, reverse=True) and [int(r["rank"]) for r in rows] == list(range(len(rows)))
    pages = sorted((run / "audit").glob("val-sheet-*.png"))
    assert len(pages) == (len(rows) + 19) // 20 and Image.open(pages[0]).size[0] == 5 * 220

    # A person reviews: the swapped two are wrong labels, everything else the model's fault.
    for r in rows:
        r["verdict"] = "wrong_label" if r["path"] in relabelled else "model_error"
    reviewed = tmp_path / "reviewed.csv"
    with open(reviewed, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    capsys.readouterr()
    audit.main(["--run", str(run), "--verdicts", str(reviewed), "--no-sheets"])
    printed = capsys.readouterr().out
    assert {r["path"]: r["verdict"] for r in read_csv(sheet)} == {r["path"]: r["verdict"] for r in rows}
    n = 41
    assert "as scored" in printed and "reviewed" in printed
    last = printed.strip().splitlines()[-1].split()
    assert float(last[-1]) == pytest.approx((n - 2) / n, abs=1e-4)  # only the two wrong labels stay wrong


def test_ceilings_lift_one_verdict_at_a_time():
    rows = [{"path": "1", "label": "a", "predicted": "a"}, {"path": "2", "label": "a", "predicted": "b"},
            {"path": "3", "label": "b", "predicted": "b"}, {"path": "4", "label": "b", "predicted": "a"}]
    got = audit.ceilings(rows, {"2": "model_error", "4": "wrong_label"})
    assert [round(m, 4) for _, m, _ in got] == [0.5, 0.7333, 0.7333, 0.7333]  # F1 a: 0.8, b: 2/3
    assert [a for _, _, a in got] == [0.5, 0.75, 0.75, 0.75]
    assert audit.ceilings(rows, {})[1][1:] == (1.0, 1.0)  # unreviewed rows count as fixable: an upper bound


def test_bad_verdicts_are_one_line_errors(mislabelled_run, tmp_path):
    run, _ = mislabelled_run
    bad = tmp_path / "bad.csv"
    bad.write_text("path,verdict\nhomer_simpson/x.jpg,typo\n")
    with pytest.raises(SystemExit, match=r"bad.csv:2: unknown verdict 'typo'"):
        audit.main(["--run", str(run), "--verdicts", str(bad)])
    with pytest.raises(SystemExit, match="not found: point --run at a `make train` run folder"):
        audit.main(["--run", str(tmp_path / "nowhere")])
