"""The wheel and its dependencies: what it holds, that the declared dependencies are what the code imports, and
that a missing extra is a one-line hint. Installing the wheel into a fresh venv (from PyPI) and running it from
outside the checkout is scripts/wheel_check.sh, which CI runs."""
import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
FIRST_PARTY = {"batchcls", "train", "bundles", "conftest", "lite0_bundle", "terminal"}


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


CORE = {_name(r) for r in PYPROJECT["dependencies"]}
EXTRAS = {extra: {_name(r) for r in reqs} for extra, reqs in PYPROJECT["optional-dependencies"].items()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built offline (this venv's setuptools) from a copy of the files git knows, as CI builds it."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source, target = REPO / rel, src / rel
        if not os.path.lexists(source):  # deleted in the working tree, not yet committed
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, capture_output=True)
    return next(dist.glob("batchcls-*.whl"))


def test_the_wheel_holds_batchcls_and_the_shipped_model_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"batchcls", next(n for n in names if ".dist-info/" in n).split("/")[0]}
    bundle = sorted(n for n in names if n.startswith("batchcls/bundles/"))
    shipped = [f"batchcls/bundles/simpsons/{f}" for f in ("shipped-int8-probe.npy", "shipped-int8.json",
                                                          "shipped-int8.onnx") if (REPO / "engines/simpsons" / f).is_file()]
    decisions = [f"batchcls/bundles/simpsons/{p.name}" for p in (REPO / "engines/simpsons").glob("openset-*.npz")]
    assert decisions  # one statistics file per served configuration
    assert bundle == sorted(["batchcls/bundles/simpsons/card.json", "batchcls/bundles/simpsons/model.onnx",
                             *decisions, *shipped])
    with zipfile.ZipFile(wheel) as z:
        for name in bundle:  # the very files of engines/simpsons, not a stale copy
            assert z.read(name) == (REPO / "engines" / "simpsons" / Path(name).name).read_bytes()
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "batchcls").rglob("*.py")}
    assert modules <= set(names), sorted(modules - set(names))
    assert wheel.stat().st_size < 32 * 2**20  # the models (FP32 ~13 MB, INT8 ~4 MB), decisions, code; no model.pt2


def test_wheel_metadata_lists_the_declared_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    core = {_name(r) for r in requires if "extra ==" not in r}
    assert core == CORE and "pandas" not in core and "torch" not in core
    assert {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")} \
        == {"train", "engine", "tensorrt", "ray", "parquet", "dev"}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in FIRST_PARTY}


def _dist(module: str) -> str:
    dists = importlib.metadata.packages_distributions().get(module, [module])  # tensorrt: not installed here
    return dists[0].lower().replace("_", "-")


def test_every_import_is_declared_and_every_core_dependency_is_used():
    files = sorted((REPO / "batchcls").rglob("*.py")) + sorted((REPO / "jobs").glob("*.py")) \
        + sorted((REPO / "train").rglob("*.py"))
    used_by_batchcls: set[str] = set()
    for f in files:
        dists = {_dist(m) for m in _imports(f)}
        if f.is_relative_to(REPO / "batchcls"):
            used_by_batchcls |= dists
        # one extra on top of the core must give a file everything it imports
        fits = [e for e, deps in EXTRAS.items() if dists <= CORE | deps]
        assert dists <= CORE or fits, f"{f.relative_to(REPO)} imports {sorted(dists - CORE)}, which no extra installs"
    assert CORE <= used_by_batchcls, f"core dependencies nothing in batchcls/ imports: {sorted(CORE - used_by_batchcls)}"


def test_each_extra_covers_its_commands():
    assert {"onnx", "ml-dtypes", "sympy"} <= EXTRAS["engine"]  # onnxruntime.quantization imports the last two
    assert {"tensorrt", "torch", "torchvision"} <= EXTRAS["tensorrt"]  # nvJPEG decodes through torchvision
    assert "pyarrow" in EXTRAS["parquet"]
    ray = next(Requirement(r) for r in PYPROJECT["optional-dependencies"]["ray"] if _name(r) == "ray")
    assert {"data", "client", "default"} <= ray.extras  # --engine ray, --address ray://, jobs/ray_submit.py
    assert "pyyaml" in EXTRAS["ray"]


def run_without(modules: list[str], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``modules`` fails, as if not installed."""
    block = f"import sys\nfor m in {modules!r}: sys.modules[m] = None\n"
    return subprocess.run([sys.executable, "-c", block + code], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_engine_build_without_the_engine_extra_is_a_one_line_hint(colour_bundle, tmp_path):
    code = "from batchcls.cli import main\nsys.argv = ['batchcls', 'engine', 'build', '--target', 'cpu', " \
           f"'--model', {str(colour_bundle)!r}]\nmain()"
    r = run_without(["onnx"], code, tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "Error: building CPU engines needs onnx: pip install 'batchcls[engine]'"]


@pytest.mark.parametrize("missing", ["ray", "yaml"])
def test_ray_submit_without_the_ray_extra_is_a_one_line_hint(missing, tmp_path):
    code = f"import runpy\nsys.argv = ['ray_submit.py', '--address', 'http://head:8265']\n" \
           f"runpy.run_path({str(REPO / 'jobs' / 'ray_submit.py')!r}, run_name='__main__')"
    r = run_without([missing, "ray.job_submission"] if missing == "ray" else [missing], code, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "pip install 'batchcls[ray]'" in lines[0], r.stderr


def test_parquet_without_pyarrow_is_a_one_line_hint(colour_images, colour_bundle, tmp_path):
    code = "from batchcls.cli import main\nsys.argv = ['batchcls', 'run', " \
           f"{str(colour_images)!r}, '--out', 'x.parquet', '--format', 'parquet', '--model', {str(colour_bundle)!r}]\nmain()"
    r = run_without(["pyarrow"], code, tmp_path)
    lines = r.stderr.strip().splitlines()  # the hint follows how this copy was installed (batchcls/extras.py)
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error: --format parquet needs pyarrow")
    assert "[parquet]'" in lines[0] or "pip install pyarrow" in lines[0], lines


def _make_n(venv: Path, *args: str) -> str:
    """The commands ``make run`` would run with this venv (-n: printed, not run)."""
    return subprocess.run(["make", "-n", "run", f"VENV={venv}", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_run_installs_only_when_pyproject_changed(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    assert "pip install" in _make_n(venv)  # never installed
    (venv / ".installed").touch()  # what the install recipe does last
    assert "pip install" not in _make_n(venv) and "batchcls run" in _make_n(venv)
    assert "pip install" in _make_n(venv, "-W", "pyproject.toml")  # pyproject.toml newer than the install


def test_build_outputs_are_ignored():
    for path in ("dist/batchcls-0.1.0-py3-none-any.whl", "build/lib/batchcls/api.py", "batchcls.egg-info/PKG-INFO"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path
