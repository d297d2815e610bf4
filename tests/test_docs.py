"""The Sphinx docs (API reference from docstrings, the tutorial) build with warnings as errors."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         str(ROOT / "docs"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tutorial = (tmp_path / "tutorial.html").read_text()
    # The tutorial shows the tested example and the checker call, not a copy of them.
    assert "feddyn" in tutorial and "check_algorithm" in tutorial
    assert "local_training" in (tmp_path / "api" / "kit.html").read_text()
