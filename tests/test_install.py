"""Installing this package leaves an in-range JAX, Flax, Orbax and NumPy alone.

The notebooks' first cell runs ``pip install`` (no ``-U``) on a runtime that may already hold
JAX and Flax. This asks pip itself, with ``pip install --dry-run --report``, what it would
change in the environment running the tests: the newest pins under ``make unit``, the floor
pins under ``make test-oldest``. It runs offline: ``--no-index`` plus a folder of stand-in
wheels, one newer in-range release of each core package, so that pip does see something it
could upgrade to. A control run with ``--upgrade --upgrade-strategy eager`` must pick those
stand-ins, which shows they were visible; the plain install must pick none of them.

Every notebook's first code cell is the canonical cell in ``tests/install_cell.ipy``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from nnx_ckpt_widgets import _versions

ROOT = Path(__file__).resolve().parents[1]
CELL = ROOT / "tests" / "install_cell.ipy"
CORE = ("jax", "jaxlib", "flax", "orbax-checkpoint", "numpy")


def _newer_in_range(name: str) -> str:
    installed = metadata.version(name)
    release = list(_versions._release(installed))
    release[-1] += 1000
    newer = ".".join(map(str, release))
    assert _versions._satisfies(newer, _versions.requirements()[name]), (name, newer)
    return newer


def _stand_in_wheel(folder: Path, name: str, version: str) -> None:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")


def _source_copy(tmp_path: Path) -> Path:
    # A copy, so that building the package's metadata writes nothing into the repository.
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "nnx_ckpt_widgets",
        src / "nnx_ckpt_widgets",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return src


def _dry_run(tmp_path: Path, src: Path, wheels: Path, *extra: str) -> dict[str, str]:
    report = tmp_path / f"report{len(extra)}.json"
    # pip's own configuration (an index, extra find-links) must not leak in: this is offline.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "--no-index",
            "--find-links",
            str(wheels),
            "--no-build-isolation",
            "--disable-pip-version-check",
            *extra,
            str(src),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    tmp_path = tmp_path_factory.mktemp("install")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    newer = {name: _newer_in_range(name) for name in CORE}
    for name, version in newer.items():
        _stand_in_wheel(wheels, name, version)
    return tmp_path, wheels, newer


def test_pip_install_changes_no_installed_core_package(
    stand_ins: tuple[Path, Path, dict[str, str]],
) -> None:
    tmp_path, wheels, _ = stand_ins
    src = _source_copy(tmp_path / "plain")
    changes = _dry_run(tmp_path, src, wheels)
    assert set(changes) == {"nnx-ckpt-widgets"}, changes


def test_the_stand_ins_are_visible_to_pip(stand_ins: tuple[Path, Path, dict[str, str]]) -> None:
    # The control: asked to upgrade everything, pip takes every stand-in.
    tmp_path, wheels, newer = stand_ins
    src = _source_copy(tmp_path / "eager")
    changes = _dry_run(tmp_path, src, wheels, "--upgrade", "--upgrade-strategy", "eager")
    assert {name: changes.get(name) for name in CORE} == newer


def test_every_notebook_opens_with_the_canonical_install_cell() -> None:
    canonical = CELL.read_text().rstrip("\n")
    # The English notebooks and their generated twins (notebooks/zh/, built by make zh).
    notebooks = sorted(
        path
        for path in (ROOT / "notebooks").rglob("*.ipynb")
        if ".ipynb_checkpoints" not in path.parts
    )
    assert notebooks
    for path in notebooks:
        cells = json.loads(path.read_text())["cells"]
        first = next(cell for cell in cells if cell["cell_type"] == "code")
        source = "".join(first["source"]) if isinstance(first["source"], list) else first["source"]
        assert source == canonical, (
            f"{path.relative_to(ROOT)}: the first code cell must be tests/install_cell.ipy, "
            "byte for byte"
        )
        assert first["outputs"] == [], (
            f"{path.relative_to(ROOT)}: the install cell stores no output"
        )


def test_install_cell_names_the_core_packages_the_tests_check() -> None:
    text = CELL.read_text()
    assert f"_core = {CORE!r}".replace("'", '"') in text
    assert "%pip install -q" in text and " -U" not in text and "--upgrade" not in text
