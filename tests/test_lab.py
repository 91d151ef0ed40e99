"""``make lab``: the tutorials run in a git-ignored working copy, so opening one never rewrites
the tracked notebooks that nbval checks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def test_make_lab_serves_a_copy_of_the_notebooks(tmp_path):
    copy = tmp_path / "lab"
    subprocess.run(["make", "-s", f"LAB_DIR={copy}", f"{copy}/.copied"], cwd=REPO, check=True)
    notebooks = REPO / "notebooks"
    for name in ("*.ipynb", "zh/*.ipynb", "scripts/*.py"):
        assert sorted(p.relative_to(copy) for p in copy.glob(name)) == sorted(
            p.relative_to(notebooks) for p in notebooks.glob(name)
        )
    assert (copy / "01_save.ipynb").read_bytes() == (notebooks / "01_save.ipynb").read_bytes()
    # zh/scripts is a relative link to ../scripts: it must still resolve inside the copy.
    assert (copy / "zh" / "scripts" / "save_sharded.py").is_file()
    # An edit in the copy is kept by the next `make lab`; `make lab-reset` replaces it.
    (copy / "01_save.ipynb").write_text("edited")
    subprocess.run(["make", "-s", f"LAB_DIR={copy}", f"{copy}/.copied"], cwd=REPO, check=True)
    assert (copy / "01_save.ipynb").read_text() == "edited"
    subprocess.run(["make", "-s", f"LAB_DIR={copy}", "lab-reset"], cwd=REPO, check=True)
    assert (copy / "01_save.ipynb").read_bytes() == (notebooks / "01_save.ipynb").read_bytes()


def test_make_lab_runs_jupyterlab_on_the_copy_without_a_browser():
    plan = subprocess.run(
        ["make", "-n", "lab"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    assert "--notebook-dir=lab " in plan and "--no-browser" in plan
    if (REPO / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", "-q", "lab/01_save.ipynb"], cwd=REPO)
        assert ignored.returncode == 0, "lab/ must be git-ignored"
