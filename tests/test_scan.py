"""The walk over real trees: order, depth, PATH_MAX, unreadable folders and links into pseudo-filesystems."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from procs import nested

from batchcls.decode import decode_image
from batchcls.fsutil import open_long
from batchcls.scan import scan_dir

SAMPLE = sorted((Path(__file__).resolve().parent.parent / "samples" / "simpsons").glob("*/*.jpg"))[0]


def _chain(root: Path, name: str, depth: int) -> list[str]:
    return nested(root, name, depth, "bottom.jpg", SAMPLE.read_bytes())


def unprivileged(argv: list[str]) -> list[str]:
    """argv run without the power to read what permissions forbid (root ignores chmod 000 otherwise)."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: can't make a folder unreadable")
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv]
    if subprocess.run(cmd[:-len(argv)] + ["true"], capture_output=True).returncode != 0:
        pytest.skip("setpriv can't drop capabilities here")
    return cmd


def test_order_is_sorted_depth_first(tmp_path):
    for rel in ["b/z.jpg", "b/a/x.jpg", "a.jpg", "c.jpg", ".hidden.jpg", "b/.git/x"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert [f.rel for f in scan_dir(tmp_path)] == ["a.jpg", "b/a/x.jpg", "b/z.jpg", "c.jpg"]
    assert [f.rel for f in scan_dir(tmp_path, recursive=False)] == ["a.jpg", "c.jpg"]


def test_a_tree_deeper_than_the_recursion_limit(tmp_path):
    depth = sys.getrecursionlimit() + 500
    try:
        parts = _chain(tmp_path, "n", depth)
        files = list(scan_dir(tmp_path))
        assert [f.rel for f in files] == ["/".join(parts)]
    finally:  # pytest's own clean-up of old tmp dirs recurses and would fail on this tree later
        subprocess.run(["rm", "-rf", str(tmp_path / "n")], check=False)


def test_paths_past_path_max_are_listed_and_decodable(tmp_path):
    parts = _chain(tmp_path, "d" * 250, 20)  # ~5 KB of path
    (tmp_path / "top.jpg").write_bytes(SAMPLE.read_bytes())
    files = list(scan_dir(tmp_path))
    assert [f.rel for f in files] == ["/".join(parts), "top.jpg"]
    assert len(os.fsencode(files[0].path)) > 4096 and not files[0].error
    assert decode_image(files[0].path).size == decode_image(SAMPLE).size  # opened through folder fds
    fd = open_long(files[0].path, os.O_RDONLY)
    os.close(fd)


def test_links_into_proc_sys_dev_are_not_followed(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    for name, target in [("self", "/proc/self"), ("sys", "/sys"), ("dev", "/dev"), ("shm", "/dev/shm")]:
        if os.path.isdir(target):
            (tmp_path / name).symlink_to(target, target_is_directory=True)
    elsewhere = tmp_path.parent / f"{tmp_path.name}-other"
    elsewhere.mkdir()
    (elsewhere / "b.jpg").write_bytes(b"x")
    (tmp_path / "other").symlink_to(elsewhere, target_is_directory=True)
    files = {f.rel: f.error for f in scan_dir(tmp_path)}
    assert files.pop("a.jpg") == "" and files.pop("other/b.jpg") == ""
    assert files and all("pseudo-filesystem" in e and "/" not in rel for rel, e in files.items()), files


def test_a_loop_ends_and_a_second_route_is_listed_once(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jpg").write_bytes(b"x")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "again").symlink_to(tmp_path / "sub", target_is_directory=True)
    assert [f.rel for f in scan_dir(tmp_path)] == ["again/a.jpg"]  # the first route in name order wins


LIST = "import sys; from batchcls.scan import scan_dir\nfor f in scan_dir(sys.argv[1]): print(repr((f.rel, f.error)))"


def test_an_unreadable_folder_is_one_error_entry_and_the_walk_goes_on(tmp_path):
    for rel in ["a.jpg", "locked/x.jpg", "locked/deeper/y.jpg", "z/z.jpg"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "locked").chmod(0)
    try:
        r = subprocess.run(unprivileged([sys.executable, "-c", LIST, str(tmp_path)]),
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    finally:
        (tmp_path / "locked").chmod(0o755)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [repr(("a.jpg", "")), repr(("locked", "cannot list folder: Permission denied")),
                                     repr(("z/z.jpg", ""))]


def test_non_utf8_names_are_listed_with_their_bytes(tmp_path):
    raw = os.fsencode(tmp_path) + b"/\xff\xfename.jpg"
    with open(raw, "wb") as fh:
        fh.write(SAMPLE.read_bytes())
    (f,) = scan_dir(tmp_path)
    assert os.fsencode(f.rel) == b"\xff\xfename.jpg"
    assert decode_image(f.path).mode == "RGB"


def _jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(SAMPLE.read_bytes())
    return path


def test_one_file_under_several_spellings_is_listed_once(tmp_path, monkeypatch):
    """x, ./x, /abs/x and d/../x name one file: one entry, under the first spelling. A symlinked folder's
    '..' is where the link points, so d2/../x there is another file, and a link under its own name is too."""
    from batchcls.scan import scan

    _jpeg(tmp_path / "x.jpg")
    (tmp_path / "d").mkdir()
    _jpeg(tmp_path / "elsewhere" / "x.jpg")
    (tmp_path / "elsewhere" / "sub").mkdir()
    (tmp_path / "d2").symlink_to(tmp_path / "elsewhere" / "sub", target_is_directory=True)
    (tmp_path / "link.jpg").symlink_to(tmp_path / "x.jpg")
    monkeypatch.chdir(tmp_path)
    spellings = ["x.jpg", "./x.jpg", str(tmp_path / "x.jpg"), "d/../x.jpg", "d2/../x.jpg", "link.jpg", "./d/../x.jpg"]
    got = [(f.path, f.rel) for f in scan(spellings)]
    assert got == [("x.jpg", "x.jpg"), ("d2/../x.jpg", "elsewhere/x.jpg"), ("link.jpg", "link.jpg")]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(spellings) + "\n")
    assert [f.rel for f in scan(None, files_from=str(listing))] == ["x.jpg", "d2/../x.jpg", "link.jpg"]


def test_several_sources_in_order_keyed_from_their_common_parent(tmp_path, monkeypatch):
    from batchcls.scan import scan

    for rel in ["imgs/b.jpg", "imgs/a.jpg", "imgs/sub/c.jpg", "imgs/sub/d.jpg", "more/e.jpg"]:
        _jpeg(tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    # a shell glob of files: keyed as the folder itself would key them
    assert [f.rel for f in scan(["imgs/b.jpg", "imgs/a.jpg"])] == ["b.jpg", "a.jpg"]
    assert [f.rel for f in scan("imgs")][:2] == ["a.jpg", "b.jpg"]
    # folders and files mixed, in argument order; a file inside a folder already walked is not listed again
    got = [(f.path, f.rel) for f in scan(["imgs/sub", "more", "imgs/a.jpg", "imgs/sub/c.jpg"])]
    assert got == [("imgs/sub/c.jpg", "imgs/sub/c.jpg"), ("imgs/sub/d.jpg", "imgs/sub/d.jpg"),
                   ("more/e.jpg", "more/e.jpg"), ("imgs/a.jpg", "imgs/a.jpg")]
    # a folder and one inside it: the inner one's files come once, under the outer walk's keys
    assert [f.rel for f in scan(["imgs", "imgs/sub"])] == ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg"]


def test_a_missing_source_among_several_is_refused(tmp_path):
    from batchcls.errors import InputError
    from batchcls.scan import scan

    _jpeg(tmp_path / "a.jpg")
    with pytest.raises(InputError, match=r"nope\.jpg does not exist"):
        list(scan([tmp_path / "a.jpg", tmp_path / "nope.jpg"]))


def test_count_is_what_scan_lists_less_what_is_skipped(tmp_path):
    import threading

    from batchcls.scan import count, scan

    for rel in ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg"]:
        _jpeg(tmp_path / rel)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path}/a.jpg\n{tmp_path}/./a.jpg\n{tmp_path}/sub/c.jpg\n")
    assert count(tmp_path) == len(list(scan(tmp_path))) == 5  # list.txt is a file of the folder too
    assert count(tmp_path, skip={"a.jpg", "sub/c.jpg"}, exclude=[listing]) == 2
    assert count([tmp_path / "sub", tmp_path / "sub/c.jpg"]) == 2
    assert count(None, files_from=str(listing)) == 2
    assert count(None, files_from="-") is None  # stdin can be read once only: it is the run's
    stop = threading.Event()
    stop.set()
    assert count(tmp_path, stop=stop) is None
