"""The supported version ranges: one source of truth, checked at import, named in the error.

A real import in a subprocess sees a Flax or Orbax that is too old or too new through a
``*.dist-info`` folder placed first on ``PYTHONPATH``, exactly as ``importlib.metadata`` finds
any installed distribution; the package must refuse with one ``ImportError`` naming both
versions and the pip command, never fail later with an ``AttributeError``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from nnx_ckpt_widgets import _versions

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_ranges() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return _parse(deps)


def _parse(lines: list[str] | tuple[str, ...]) -> dict[str, str]:
    out = {}
    for line in lines:
        name, spec = re.match(r"([A-Za-z0-9._-]+)(.*)", line).groups()  # type: ignore[union-attr]
        out[name.lower()] = _versions._ordered(spec)
    return out


def _constraints(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            package, version = line.split("==", 1)
            pins[package.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def _import_with(tmp_path: Path, fakes: dict[str, str]) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    for name, version in fakes.items():
        _fake_dist(site, name, version)
    env = {k: v for k, v in os.environ.items() if k != _versions.SKIP_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-c", "import nnx_ckpt_widgets"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_pyproject_states_a_floor_and_an_upper_bound_for_each_dependency() -> None:
    ranges = _pyproject_ranges()
    for name in ("flax", "orbax-checkpoint", "jax", "jaxlib", "numpy", "treescope", "ipywidgets"):
        assert re.fullmatch(r">=[0-9.]+,<[0-9.]+", ranges[name]), (name, ranges[name])


def test_installed_metadata_states_the_ranges_of_pyproject() -> None:
    # A stale editable install (pyproject.toml edited, package not reinstalled) fails here.
    assert _versions.requirements() == _pyproject_ranges()


def test_fallback_equals_pyproject() -> None:
    assert _parse(_versions.FALLBACK_REQUIREMENTS) == _pyproject_ranges()


def test_fallback_is_used_when_the_package_has_no_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def missing(name: str) -> list[str]:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_versions.metadata, "requires", missing)
    assert _versions.requirements() == _parse(_versions.FALLBACK_REQUIREMENTS)


def test_floor_and_newest_pins_are_inside_the_ranges() -> None:
    ranges = _pyproject_ranges()
    for constraints in ("constraints-oldest.txt", "constraints.txt"):
        pins = _constraints(constraints)
        for name, spec in ranges.items():
            assert _versions._satisfies(pins[name], spec), (constraints, name, pins[name], spec)
    oldest = _constraints("constraints-oldest.txt")
    for name, spec in ranges.items():
        floor = re.match(r">=([0-9.]+)", spec).group(1)  # type: ignore[union-attr]
        assert oldest[name] == floor, f"constraints-oldest.txt must pin {name} at its floor"


def test_this_environment_is_in_range() -> None:
    assert _versions.problems() == []


def test_environment_is_the_one_the_makefile_pinned() -> None:
    # `make unit` sets this to constraints.txt and `make test-oldest` to constraints-oldest.txt,
    # so each run proves which stack it tested.
    expected = os.environ.get("NNX_CKPT_CONSTRAINTS")
    if not expected:
        pytest.skip("NNX_CKPT_CONSTRAINTS is not set (the Makefile sets it)")
    pins = _constraints(expected)
    for name in _pyproject_ranges():
        assert metadata.version(name) == pins[name], (expected, name)


@pytest.mark.parametrize(
    ("specifier", "inside", "outside"),
    [
        (">=0.12.2,<0.13", ["0.12.2", "0.12.8", "0.12.9.dev1"], ["0.12.1", "0.13.0", "0.13.0rc1"]),
        (">=0.9.0,<0.11", ["0.9.0", "0.9.0.1", "0.10.2"], ["0.8.3", "0.11"]),
        ("~=8.0", ["8.0.0", "8.1.9"], ["7.8.5", "9.0"]),
        ("!=1.2,>=1", ["1.0", "1.3"], ["1.2.0", "0.9"]),
    ],
)
def test_specifiers(specifier: str, inside: list[str], outside: list[str]) -> None:
    assert all(_versions._satisfies(v, specifier) for v in inside)
    assert not any(_versions._satisfies(v, specifier) for v in outside)


def test_too_old_flax_and_orbax_raise_one_import_error_naming_both_versions(
    tmp_path: Path,
) -> None:
    result = _import_with(tmp_path, {"flax": "0.11.2", "orbax-checkpoint": "0.11.40"})
    assert result.returncode != 0
    assert "AttributeError" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    ranges = _versions.requirements()
    assert last == (
        "nnx_ckpt_widgets._versions.UnsupportedVersionError: nnx-ckpt-widgets supports "
        f"flax{ranges['flax']} and orbax-checkpoint{ranges['orbax-checkpoint']}, but this "
        "environment has flax 0.11.2 and orbax-checkpoint 0.11.40: run "
        f'`pip install "flax{ranges["flax"]}" "orbax-checkpoint{ranges["orbax-checkpoint"]}"` '
        "(in a notebook, `%pip install ...`, then restart the kernel or the Colab runtime)."
    )


def test_too_new_jax_is_refused_at_import(tmp_path: Path) -> None:
    upper = re.search(r"<([0-9.]+)", _versions.requirements()["jax"]).group(1)  # type: ignore[union-attr]
    result = _import_with(tmp_path, {"jax": upper + ".0"})
    assert result.returncode != 0
    assert f"this environment has jax {upper}.0:" in result.stderr
    assert "AttributeError" not in result.stderr


def test_the_suggested_pip_command_names_ranges_that_the_floor_satisfies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_versions.metadata, "version", lambda name: "0.0.1")
    with pytest.raises(ImportError) as caught:
        _versions.check()
    command = re.search(r"`pip install (.*?)`", str(caught.value)).group(1)  # type: ignore[union-attr]
    named = _parse([part.strip('"') for part in command.split()])
    assert named == _pyproject_ranges()
    oldest = _constraints("constraints-oldest.txt")
    assert all(_versions._satisfies(oldest[name], spec) for name, spec in named.items())


def test_a_missing_dependency_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version

    def version(name: str) -> str:
        if name == "treescope":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(_versions.metadata, "version", version)
    with pytest.raises(
        _versions.UnsupportedVersionError, match="this environment has no treescope"
    ):
        _versions.check()


def test_the_check_can_be_skipped(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _fake_dist(site, "flax", "0.11.2")
    code = textwrap.dedent(
        """
        import nnx_ckpt_widgets
        from importlib import metadata
        print(metadata.version("flax"))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(site), _versions.SKIP_ENV: "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.11.2"


def test_readme_table_matches_both_constraints_files_and_pyproject() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Supported versions", 1)[1].split("\n\n| package |", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines() if line.startswith("| ")]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:5]] for r in rows}
    ranges, oldest, newest = (
        _pyproject_ranges(),
        _constraints("constraints-oldest.txt"),
        _constraints("constraints.txt"),
    )
    assert set(cells) == {"Python", *ranges}
    for name, spec in ranges.items():
        assert cells[name] == [oldest[name], newest[name], f"`{spec}`"], name
    python = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert cells["Python"][0] == python.removeprefix(">=")
    assert cells["Python"][2] == f"`{python}`"
