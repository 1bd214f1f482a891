"""`python -m train` (what `make train` runs) where the train extra is not installed: one line naming it."""
import subprocess
import sys

from conftest import REPO


def test_training_without_the_train_extra_says_what_to_install(tmp_path):
    # -S: no site-packages, so neither torch nor the rest of the extra is importable, as after `make run`
    r = subprocess.run([sys.executable, "-S", "-m", "train", "--data", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "torch" in r.stderr and "pip install -e '.[train]'" in r.stderr and "make install-dev" in r.stderr
