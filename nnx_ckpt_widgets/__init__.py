"""nnx-ckpt-widgets: learn, inspect and fix Flax NNX checkpoints, over Orbax.

``import nnx_ckpt_widgets`` is cheap: JAX, Flax, Orbax, treescope and ipywidgets are imported
only when a function needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from nnx_ckpt_widgets.compare import KeyStatus, LoadReport, compare
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ItemSelectionError,
)
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, StepInfo, inspect
from nnx_ckpt_widgets.restore import load, restore

try:
    __version__ = version("nnx-ckpt-widgets")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "ItemSelectionError",
    "KeyStatus",
    "LeafInfo",
    "LoadReport",
    "StepInfo",
    "__version__",
    "compare",
    "inspect",
    "load",
    "restore",
]
