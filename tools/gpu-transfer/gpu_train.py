"""Bring the training data to a lent GPU machine in pieces the device tool carries, and the bundle back.

The device tool moves at most 64 MiB a call, the working tree that travels included (~30 MiB here, mostly the
shipped bundle), and brings back at most 8 files of <= 16 MiB. So both ways one tar stream is cut into numbered
parts with a JSON index (sha256 of every part and of the whole):

    python tools/gpu-transfer/gpu_train.py pack --data ../shared/data/simpsons/train   # here -> runs/gpu/pack/data.tar.NNN
    # then one device call per part, back to back (the machine keeps files only while warm, ~30 s after a call):
    #   carry=["runs/gpu/pack/data.json", "runs/gpu/pack/data.tar.000"], command="python3 tools/gpu-transfer/gpu_train.py unpack"
    #   ... and with the last part: command="bash tools/gpu-transfer/gpu_train.sh"  (unpack, train, export, parts to $OUT)
    python tools/gpu-transfer/gpu_train.py join <fetched>/bundle --out runs/gpu       # here: check and unpack what came back

Each call checks the parts it finds against the index, so a part damaged on the way is named at once (carry it
again); the last one checks the whole and extracts it. The data parts hold the class folders' files as they are,
plus the ImageNet weights (the bare machine has no package for them; their 1000-class head is left out) and
the hash of the split made here, which the machine there must reproduce.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

MIB = 1 << 20
TOOL_LIMIT = 64 * MIB  # what one device call carries, the travelling working tree included
RETURN_LIMIT = 16 * MIB  # each file brought back from $OUT
RETURN_FILES = 8  # files brought back from $OUT, all together
REPO = Path(__file__).resolve().parents[2]


class PackError(RuntimeError):
    pass


def travelling_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree a device call sends: tracked files and untracked files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         capture_output=True, check=True).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def cut(members: list[tuple[str, Path]], out: Path, name: str, part_bytes: int, *, max_parts: int = 0,
        extra: dict | None = None) -> dict:
    """Tar ``members`` ([(name in the tar, file or folder)]) into ONE stream cut into <name>.tar.NNN parts of at
    most ``part_bytes``, indexed in <name>.json. ``max_parts`` (0 = any) is checked before a part is written."""
    out.mkdir(parents=True, exist_ok=True)
    stream = out / f"{name}.tar.tmp"
    with tarfile.open(stream, "w", format=tarfile.PAX_FORMAT) as tar:
        for arcname, path in members:
            tar.add(path, arcname=arcname)
    size = stream.stat().st_size
    n = -(-size // part_bytes)
    if max_parts and n + 1 > max_parts:
        stream.unlink()
        raise PackError(f"{size / MIB:.1f} MiB needs {n} parts of {part_bytes / MIB:.1f} MiB + the index, over the "
                        f"{max_parts} files a device call brings back")
    for old in out.glob(f"{name}.tar.[0-9]*"):
        old.unlink()
    whole, parts = hashlib.sha256(), []
    with open(stream, "rb") as f:
        for i in range(n):
            chunk = f.read(part_bytes)
            whole.update(chunk)
            (out / f"{name}.tar.{i:03d}").write_bytes(chunk)
            parts.append({"name": f"{name}.tar.{i:03d}", "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    stream.unlink()
    index = {"bytes": size, "sha256": whole.hexdigest(), "part_bytes": part_bytes, "parts": parts,
             "members": [a for a, _ in members], **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def check_parts(parts_dir: Path, name: str) -> tuple[dict, list[str]]:
    """(index, names of the parts not here yet); raises on a part here that does not match its sha256."""
    index = json.loads((parts_dir / f"{name}.json").read_text())
    missing = []
    for p in index["parts"]:
        f = parts_dir / p["name"]
        if not f.is_file():
            missing.append(p["name"])
        elif f.stat().st_size != p["bytes"] or _sha256(f) != p["sha256"]:
            raise PackError(f"part {f} does not match its sha256 in {name}.json: carry (or fetch) it again")
    return index, missing


def join(parts_dir: Path, name: str, out: Path) -> list[Path]:
    """Check every part, reassemble, check the whole, extract into ``out``; returns the extracted members."""
    index, missing = check_parts(parts_dir, name)
    if missing:
        raise PackError(f"parts not here yet: {', '.join(missing)}")
    whole = hashlib.sha256()
    stream = parts_dir / f"{name}.tar.tmp"
    with open(stream, "wb") as f:
        for p in index["parts"]:
            chunk = (parts_dir / p["name"]).read_bytes()
            whole.update(chunk)
            f.write(chunk)
    if whole.hexdigest() != index["sha256"]:
        stream.unlink()
        raise PackError(f"the parts in {parts_dir} reassemble to something else than {name}.json describes")
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(stream) as tar:
        tar.extractall(out, filter="data")
    stream.unlink()
    return [out / m for m in index["members"]]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def split_lists_sha256(manifest: dict) -> str:
    """What must be equal on both machines: the classes and every split's files (the root path may differ)."""
    keep = [manifest[k] for k in ("classes", "train", "val", "test", "duplicates")]
    return hashlib.sha256(json.dumps(keep).encode()).hexdigest()


def pack(data: Path, out: Path, part_bytes: int, *, weights: Path | None = None, split: dict | None = None) -> dict:
    """The class folders under ``data`` (as train/) and ``weights`` (as weights/<name>) into data.tar.NNN parts."""
    if not data.is_dir() or not any(data.iterdir()):
        raise PackError(f"no class folders under {data}: pass --data <folder of class folders>")
    members = [("train", data)] + ([(f"weights/{weights.name}", weights)] if weights else [])
    return cut(members, out, "data", part_bytes,
               extra={"split_lists_sha256": split_lists_sha256(split) if split else None,
                      "weights": f"weights/{weights.name}" if weights else None})


def unpack(pack_dir: Path, into: Path, *, complete: bool = False) -> list[str]:
    """There: check the parts carried so far; with ``complete``, join them all into ``into`` (once).
    Returns the parts still missing."""
    marker = into / ".unpacked"
    index, missing = check_parts(pack_dir, "data")
    if marker.is_file() and marker.read_text().strip() == index["sha256"]:
        return []
    if complete:
        join(pack_dir, "data", into)
        marker.write_text(index["sha256"] + "\n")
        for p in index["parts"]:
            (pack_dir / p["name"]).unlink()  # the disk holds the images once
    return missing


def check_split(pack_dir: Path, data: Path, split_path: Path, seed: int) -> str:
    """There: make the split (unless it exists) and check its lists equal the ones packed here."""
    from train import data as D
    if not split_path.is_file():
        D.write_manifest(D.make_split(data, seed=seed), split_path)
    manifest, _ = D.load_manifest(split_path)
    want = json.loads((pack_dir / "data.json").read_text())["split_lists_sha256"]
    got = split_lists_sha256(manifest)
    if want and got != want:
        raise PackError(f"{split_path} splits the images differently from the machine that packed them "
                        f"({got[:12]}... vs {want[:12]}...): the unpacked data is not the packed data")
    return got


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="here: the data (and ImageNet weights) into parts a device call carries")
    a.add_argument("--data", required=True, help="folder of <class>/<image> folders")
    a.add_argument("--out", default="runs/gpu/pack")
    a.add_argument("--max-mib", type=float, default=0,
                   help="part size; 0 = what a call carries beside this working tree (64 MiB - tree - 1 MiB)")
    a.add_argument("--weights", default="efficientnet_lite0",
                   help="model whose offline ImageNet weights ride along as a state_dict ('' = none)")
    a = sub.add_parser("unpack", help="there: check the parts carried so far; --all: join and extract them")
    a.add_argument("--pack", default="runs/gpu/pack")
    a.add_argument("--into", default="runs/gpu/data")
    a.add_argument("--all", action="store_true", help="every part must be here: extract the data")
    a = sub.add_parser("split", help="there: make the split and check it equals the one packed here")
    a.add_argument("--pack", default="runs/gpu/pack")
    a.add_argument("--data", default="runs/gpu/data/train")
    a.add_argument("--out", default="runs/gpu/run/split.json")
    a = sub.add_parser("split-out", help="there: folders -> <= 15 MiB parts + bundle.json (for $OUT)")
    a.add_argument("folders", nargs="+")
    a.add_argument("--out", required=True)
    a = sub.add_parser("join", help="here: check and reassemble the parts a device call brought back")
    a.add_argument("parts")
    a.add_argument("--out", default="runs/gpu")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from train.train import TrainConfig
    try:
        if args.cmd == "pack":
            part = int(args.max_mib * MIB)
            if not part:
                part = TOOL_LIMIT - travelling_bytes() - MIB
                if part < 2 * MIB:
                    raise PackError(f"only {part / MIB:.1f} MiB a call is left beside the working tree: "
                                    f"make it smaller (untracked files travel too)")
            from train import data as D
            split = D.make_split(args.data, seed=TrainConfig.seed, log=lambda *_: None)
            weights = None
            if args.weights:
                import torch

                from train import models
                sd = models.offline_state_dict(args.weights)
                head = set(models._head_keys(args.weights, models.create_model(args.weights, 1, pretrained="none")))
                weights = Path(args.out).parent / f"{args.weights}-imagenet.pt"
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.save({k: v for k, v in sd.items() if k not in head}, weights)  # a fresh head is trained
            index = pack(Path(args.data), Path(args.out), part, weights=weights, split=split)
            n = len(index["parts"])
            print(f"pack: {args.data}{' + ' + weights.name if weights else ''} -> {n} parts of <= {part / MIB:.1f} MiB "
                  f"({index['bytes'] / MIB:.0f} MiB) in {args.out}")
            for i, piece in enumerate(index["parts"]):
                print(f"device call {i + 1}/{n}: carry {args.out}/data.json {args.out}/{piece['name']}; command: "
                      f"{'bash tools/gpu-transfer/gpu_train.sh' if i == n - 1 else 'python3 tools/gpu-transfer/gpu_train.py unpack'}")
        elif args.cmd == "unpack":
            missing = unpack(Path(args.pack), Path(args.into), complete=args.all)
            print(f"unpack: {'data in ' + args.into if args.all else 'parts check out'}"
                  f"{'; still to carry: ' + ', '.join(missing) if missing and not args.all else ''}")
        elif args.cmd == "split":
            got = check_split(Path(args.pack), Path(args.data), Path(args.out), TrainConfig.seed)
            print(f"split: {args.out} has the packed split's lists (sha256 {got[:12]}...)")
        elif args.cmd == "split-out":
            folders = [Path(f) for f in args.folders]
            index = cut([(f.name, f) for f in folders], Path(args.out), "bundle", 15 * MIB, max_parts=RETURN_FILES)
            print(f"split-out: {index['bytes'] / MIB:.1f} MiB in {len(index['parts'])} parts -> {args.out}")
        else:
            for f in join(Path(args.parts), "bundle", Path(args.out)):
                print(f"join: {f}")
    except (PackError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
