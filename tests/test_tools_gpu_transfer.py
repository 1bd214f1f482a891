"""The GPU recipe's transport, on CPU: data pieces there and the bundle back, sizes and checksums checked."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gpu_train as G
import pytest
from conftest import REPO, SAMPLES

from train import data as D

KIB = 1024


def _flip_a_byte(path: Path, at: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def packed(tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(bytes(range(256)) * 600)  # 150 KB, over a part: stands in for the ImageNet state_dict
    split = D.make_split(SAMPLES, seed=1337, log=lambda *_: None)
    return tmp_path, G.pack(SAMPLES, tmp_path / "pack", 96 * KIB, weights=weights, split=split)


def test_parts_fit_their_limit_and_come_together_there_call_by_call(packed):
    tmp, index = packed
    parts = index["parts"]
    assert len(parts) >= 4 and all(p["bytes"] <= 96 * KIB for p in parts)
    assert sum(p["bytes"] for p in parts) == index["bytes"]
    # the device: each call brings data.json and one part; the machine keeps them between calls
    there = tmp / "there"
    (there / "pack").mkdir(parents=True)
    shutil.copy(tmp / "pack" / "data.json", there / "pack")
    for i, p in enumerate(parts):
        shutil.copy(tmp / "pack" / p["name"], there / "pack")
        assert G.unpack(there / "pack", there / "data") == [q["name"] for q in parts[i + 1:]]
    assert G.unpack(there / "pack", there / "data", complete=True) == []
    assert not list((there / "pack").glob("data.tar.*"))  # the disk holds the images once
    for f in SAMPLES.rglob("*.jpg"):
        assert (there / "data" / "train" / f.relative_to(SAMPLES)).read_bytes() == f.read_bytes()
    assert (there / "data" / "weights" / "w.pt").read_bytes() == (tmp / "w.pt").read_bytes()
    assert G.unpack(there / "pack", there / "data", complete=True) == []  # a rerun (resume) finds it done
    # the split made there lists the same files as the one made here, though its root differs
    assert G.check_split(there / "pack", there / "data" / "train", there / "split.json", 1337)
    assert json.loads((there / "split.json").read_text())["root"] != str(SAMPLES)


def test_a_damaged_or_missing_part_is_named(packed):
    tmp, index = packed
    second = tmp / "pack" / index["parts"][1]["name"]
    _flip_a_byte(second, at=100)
    with pytest.raises(G.PackError, match=f"part {second} does not match its sha256"):
        G.unpack(tmp / "pack", tmp / "data")  # named by the call that carried it, before the last one
    second.unlink()
    with pytest.raises(G.PackError, match=f"parts not here yet: {second.name}"):
        G.unpack(tmp / "pack", tmp / "data", complete=True)
    assert not (tmp / "data" / "train").exists()


def test_a_split_of_other_files_is_refused(packed, tmp_path):
    tmp, _ = packed
    other = tmp_path / "other"
    shutil.copytree(SAMPLES, other)
    next(other.glob("lisa_simpson/*.jpg")).unlink()
    with pytest.raises(G.PackError, match="splits the images differently"):
        G.check_split(tmp / "pack", other, tmp_path / "split.json", 1337)


def test_bundle_parts_round_trip_and_too_many_parts_are_refused(tmp_path):
    bundle = tmp_path / "export"
    bundle.mkdir()
    blob = bytes(range(256)) * 400  # 100 KB
    (bundle / "model.onnx").write_bytes(blob)
    (bundle / "card.json").write_text('{"name": "simpsons"}')
    index = G.cut([("export", bundle)], tmp_path / "out", "bundle", 40 * KIB, max_parts=G.RETURN_FILES)
    assert len(index["parts"]) == 3 and all(p["bytes"] <= 40 * KIB for p in index["parts"])
    got = G.join(tmp_path / "out", "bundle", tmp_path / "back")
    assert got == [tmp_path / "back" / "export"] and (got[0] / "model.onnx").read_bytes() == blob
    _flip_a_byte(tmp_path / "out" / "bundle.tar.001", at=10)
    with pytest.raises(G.PackError, match="bundle.tar.001 does not match its sha256"):
        G.join(tmp_path / "out", "bundle", tmp_path / "back2")
    # more parts than a device call brings back: refused there, before any part is written
    with pytest.raises(G.PackError, match="over the 8 files"):
        G.cut([("export", bundle)], tmp_path / "out2", "bundle", 10 * KIB, max_parts=G.RETURN_FILES)
    assert not (tmp_path / "out2").exists() or not list((tmp_path / "out2").glob("bundle.tar.*"))


def test_cli_pack_prints_one_device_call_per_part(tmp_path):
    r = subprocess.run([sys.executable, "tools/gpu-transfer/gpu_train.py", "pack", "--data", str(SAMPLES), "--out",
                        str(tmp_path / "pack"), "--max-mib", "0.15", "--weights", ""],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    index = json.loads((tmp_path / "pack" / "data.json").read_text())
    calls = [line for line in r.stdout.splitlines() if line.startswith("device call")]
    assert len(calls) == len(index["parts"]) >= 2 and calls[-1].endswith("bash tools/gpu-transfer/gpu_train.sh")
    assert index["split_lists_sha256"] and index["weights"] is None


@pytest.mark.slow
def test_the_device_script_runs_end_to_end_on_cpu_at_tiny_size(tmp_path):
    """tools/gpu-transfer/gpu_train.sh as the device runs it (pieces carried, unpack, split check, train, export, parts),
    on CPU with the sample images and a 1-epoch 64 px recipe; then the parts are joined back here."""
    gpu = tmp_path / "gpu"
    weights = tmp_path / "w.pt"
    import torch

    from train.models import offline_state_dict
    torch.save(offline_state_dict("efficientnet_lite0"), weights)
    G.pack(SAMPLES, gpu / "pack", 8 << 20, weights=weights, split=D.make_split(SAMPLES, seed=1337, log=lambda *_: None))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"input_size": 64, "start_size": 0, "epochs": 1, "batch_size": 8, "num_workers": 0,
                                  "device": "cpu", "amp": True, "patience": 0, "resume": True, "progress": False}))
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "GPU_DIR": str(gpu), "RECIPE": str(recipe),
           "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "tools/gpu-transfer/gpu_train.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "has the packed split's lists" in r.stdout and "split-out:" in r.stdout
    back = tmp_path / "out" / "bundle"
    assert len(list(back.iterdir())) <= G.RETURN_FILES and all(f.stat().st_size <= G.RETURN_LIMIT for f in back.iterdir())
    export, report = G.join(back, "bundle", tmp_path / "here")
    card = json.loads((export / "card.json").read_text())
    assert card["input_size"] == 64 and card["training"]["weights"] in ("raw", "ema")
    assert (report / "results.md").is_file() and (report / "metrics_ema.json").is_file()
    assert "val NLL" in (report / "train.log").read_text()
