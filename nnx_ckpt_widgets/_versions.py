"""The versions of JAX, Flax, Orbax and the rest that this package supports, checked at import.

The ranges come from the package's own metadata (``Requires-Dist``, written from
``pyproject.toml``), so ``pyproject.toml`` is the one place that states them. A Flax or Orbax
outside its range would otherwise fail much later, deep inside a restore, with an
``AttributeError``; :func:`check` turns that into one ``ImportError`` at import time that names
the installed version, the supported range and the pip command that fixes it.

The check reads distribution metadata only: it imports none of the packages it checks.
Set ``NNX_CKPT_WIDGETS_SKIP_VERSION_CHECK=1`` to skip it (for example while trying a release
that is newer than the tested range).
"""

from __future__ import annotations

import os
import re
from importlib import metadata

DISTRIBUTION = "nnx-ckpt-widgets"
SKIP_ENV = "NNX_CKPT_WIDGETS_SKIP_VERSION_CHECK"

# Used only when the package's metadata is missing (a source tree on sys.path that was never
# installed). tests/test_versions.py checks that it equals pyproject.toml's dependencies.
FALLBACK_REQUIREMENTS = (
    "flax>=0.12.2,<0.13",
    "orbax-checkpoint>=0.12.0,<0.13",
    "jax>=0.9.0,<0.11",
    "jaxlib>=0.9.0,<0.11",
    "numpy>=2.0.0,<2.5",
    "treescope>=0.1.7,<0.2",
    "ipywidgets>=8.0.0,<8.2",
    "tqdm>=4.66.0,<5",
    "zstandard>=0.22.0,<0.26",
)

_REQUIREMENT = re.compile(
    r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()]*)\)?\s*$"
)
_SPECIFIER = re.compile(r"^\s*(~=|==|!=|<=|>=|<|>)\s*([0-9][0-9A-Za-z.+!*-]*)\s*$")
_RELEASE = re.compile(r"^\s*(?:\d+!)?(\d+(?:\.\d+)*)")


class UnsupportedVersionError(ImportError):
    """An installed dependency is outside the range this package is tested with."""


def _release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version: ``"0.13.0rc1"`` -> ``(0, 13, 0)``.

    A pre-release of an upper bound therefore counts as that bound (``0.13.0rc1`` is not
    ``<0.13``), as PEP 440 says for exclusive upper bounds.
    """
    match = _RELEASE.match(version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def _compare(left: tuple[int, ...], right: tuple[int, ...]) -> int:
    width = max(len(left), len(right))
    a = left + (0,) * (width - len(left))
    b = right + (0,) * (width - len(right))
    return (a > b) - (a < b)


def _satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets a comma-separated specifier such as ``">=0.12.2,<0.13"``."""
    installed = _release(version)
    for clause in filter(None, (part.strip() for part in specifier.split(","))):
        match = _SPECIFIER.match(clause)
        if match is None:
            continue  # a form we do not model; pip has already enforced it at install time
        op, bound_text = match.groups()
        if bound_text.endswith(".*"):
            prefix = _release(bound_text[:-2])
            same = installed[: len(prefix)] == prefix
            if (op == "==" and not same) or (op == "!=" and same):
                return False
            continue
        bound = _release(bound_text)
        order = _compare(installed, bound)
        if op == "~=":
            prefix = bound[:-1]
            if order < 0 or installed[: len(prefix)] != prefix:
                return False
        elif not {
            ">=": order >= 0,
            "<=": order <= 0,
            ">": order > 0,
            "<": order < 0,
            "==": order == 0,
            "!=": order != 0,
        }[op]:
            return False
    return True


def requirements() -> dict[str, str]:
    """The supported range of every required dependency: ``{"flax": ">=0.12.2,<0.13", ...}``.

    Read from the installed package's ``Requires-Dist`` (extras such as ``[notebook]`` are left
    out); :data:`FALLBACK_REQUIREMENTS` when the package has no metadata.
    """
    try:
        lines = metadata.requires(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        lines = None
    if lines is None:
        lines = list(FALLBACK_REQUIREMENTS)
    ranges: dict[str, str] = {}
    for line in lines:
        if ";" in line:  # an extra or an environment marker
            continue
        match = _REQUIREMENT.match(line)
        if match is not None:
            ranges[match.group(1).lower().replace("_", "-")] = _ordered(match.group(2))
    return ranges


def _ordered(specifier: str) -> str:
    """Lower bounds first, as people write them: ``"<0.13,>=0.12.2"`` -> ``">=0.12.2,<0.13"``."""
    clauses = [part.strip() for part in specifier.split(",") if part.strip()]
    return ",".join(sorted(clauses, key=lambda clause: not clause.startswith(">")))


def problems() -> list[tuple[str, str | None, str]]:
    """``(name, installed version or None, supported range)`` for each dependency out of range."""
    found = []
    for name, specifier in requirements().items():
        try:
            installed: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or (specifier and not _satisfies(installed, specifier)):
            found.append((name, installed, specifier))
    return found


def message(found: list[tuple[str, str | None, str]]) -> str:
    """One sentence naming the installed versions, the supported ranges and the pip command."""
    needs = " and ".join(f"{name}{spec}" for name, _, spec in found)
    has = " and ".join(
        f"{name} {installed}" if installed else f"no {name}" for name, installed, _ in found
    )
    command = "pip install " + " ".join(f'"{name}{spec}"' for name, _, spec in found)
    return (
        f"{DISTRIBUTION} supports {needs}, but this environment has {has}: run `{command}` "
        "(in a notebook, `%pip install ...`, then restart the kernel or the Colab runtime)."
    )


def check() -> None:
    """Raise :class:`UnsupportedVersionError` if a dependency is missing or out of range.

    Raises:
        UnsupportedVersionError: one sentence naming every dependency out of range, the version
            installed, the range supported and the pip command that fixes it.
    """
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    found = problems()
    if found:
        raise UnsupportedVersionError(message(found))
