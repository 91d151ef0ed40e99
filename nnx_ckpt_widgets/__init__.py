"""nnx-ckpt-widgets: learn, inspect and fix Flax NNX checkpoints, over Orbax.

``import nnx_ckpt_widgets`` is cheap: JAX, Flax, Orbax, treescope and ipywidgets are imported
only when a function needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from nnx_ckpt_widgets import _versions
from nnx_ckpt_widgets.compare import KeyStatus, LoadReport, compare
from nnx_ckpt_widgets.convert import ConvertedKey, ConvertPlan, convert
from nnx_ckpt_widgets.diff import LARGE_CHANGE, ArrayDiff, DiffEntry, DiffReport, diff
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ItemSelectionError,
    ResourceExhaustedError,
    ShardingMismatchError,
    StorageError,
    TargetError,
    TransformError,
    UnknownLayoutError,
    UnsafeFormatError,
)
from nnx_ckpt_widgets.health import StepHealth, StepsReport, check_steps
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, StepInfo, inspect
from nnx_ckpt_widgets.plan import PlannedKey, Refusal, RestoreOptions, RestorePlan
from nnx_ckpt_widgets.restore import apply_plan, apply_report, load, restore
from nnx_ckpt_widgets.stats import ArrayStats, StatsReport, stats

# The modules above import no JAX, Flax or Orbax, so this runs before any of them could fail
# deep inside with an AttributeError: a dependency out of the tested range is one ImportError.
_versions.check()

if TYPE_CHECKING:
    from nnx_ckpt_widgets.widgets import CheckpointBrowser, SideBySide, compare_states

# The widgets import ipywidgets and treescope: they load on first use, not with the package.
_LAZY = {
    "CheckpointBrowser": "nnx_ckpt_widgets.widgets",
    "SideBySide": "nnx_ckpt_widgets.widgets",
    "compare_states": "nnx_ckpt_widgets.widgets",
}

try:
    __version__ = version("nnx-ckpt-widgets")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "LARGE_CHANGE",
    "ArrayDiff",
    "ArrayStats",
    "CheckpointBrowser",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConvertPlan",
    "ConvertedKey",
    "CorruptCheckpointError",
    "DiffEntry",
    "DiffReport",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "ItemSelectionError",
    "KeyStatus",
    "LeafInfo",
    "LoadReport",
    "PlannedKey",
    "Refusal",
    "ResourceExhaustedError",
    "RestoreOptions",
    "RestorePlan",
    "ShardingMismatchError",
    "SideBySide",
    "StatsReport",
    "StepHealth",
    "StepInfo",
    "StepsReport",
    "StorageError",
    "TargetError",
    "TransformError",
    "UnknownLayoutError",
    "UnsafeFormatError",
    "__version__",
    "apply_plan",
    "apply_report",
    "check_steps",
    "compare",
    "compare_states",
    "convert",
    "diff",
    "inspect",
    "load",
    "restore",
    "stats",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
