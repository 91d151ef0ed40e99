"""The on-disk layouts this package reads, one module each, tried in order.

Each layout implements :class:`~nnx_ckpt_widgets.layouts.base.Layout`. :func:`locate` lists
the user's folder once and hands the listing to each layout in turn; the first that matches
picks the step and item. A folder that no layout matches gets an
:class:`~nnx_ckpt_widgets.errors.UnknownLayoutError` naming what is there and what is supported.
Storage (a local folder, or a bucket) sits under every layout, in :mod:`nnx_ckpt_widgets._storage`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._text import clip
from nnx_ckpt_widgets.errors import (
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    UnknownLayoutError,
)
from nnx_ckpt_widgets.layouts import _unsafe
from nnx_ckpt_widgets.layouts._steps import TMP_MARKER
from nnx_ckpt_widgets.layouts.base import (
    Layout,
    Location,
    ReadRequest,
    StepInfo,
    StoredLeaf,
    read_batches,
)
from nnx_ckpt_widgets.layouts.msgpack import MsgpackLayout
from nnx_ckpt_widgets.layouts.orbax_legacy import OrbaxLegacyLayout
from nnx_ckpt_widgets.layouts.orbax_v0 import OrbaxV0Layout
from nnx_ckpt_widgets.layouts.orbax_v0_manager import OrbaxV0ManagerLayout
from nnx_ckpt_widgets.layouts.orbax_v1 import OrbaxV1Layout
from nnx_ckpt_widgets.layouts.orbax_v1_training import OrbaxV1TrainingLayout
from nnx_ckpt_widgets.layouts.safetensors import SafetensorsLayout

__all__ = [
    "LAYOUTS",
    "Layout",
    "Location",
    "ReadRequest",
    "StepInfo",
    "StoredLeaf",
    "locate",
    "read_batches",
]

# Order matters only where two could match: an Orbax 0.2.x folder (a checkpoint file, no
# _METADATA) before the PyTree folder it also is to is_pytree; a PyTree folder first (it may
# hold a stray _CHECKPOINT_METADATA), then a v1 checkpoint or step folder, then roots of
# steps, v1 first (it is told apart by its steps' handlers, else it reads as a v0 manager
# root); a folder of
# safetensors files, then msgpack files (a Hub folder may hold both: safetensors wins). Only
# safetensors and msgpack match a file.
LAYOUTS: tuple[Layout, ...] = (
    OrbaxLegacyLayout(),
    OrbaxV0Layout(),
    OrbaxV1Layout(),
    OrbaxV1TrainingLayout(),
    OrbaxV0ManagerLayout(),
    SafetensorsLayout(),
    MsgpackLayout(),
)


def locate(
    path: str | os.PathLike[str], *, step: int | None = None, item: str | None = None
) -> Location:
    """Resolve ``path`` (plus ``step`` and ``item``) to one item's arrays.

    Args:
      path: a checkpoint folder in any supported layout, or a root of steps.
      step: the step to pick under a root of steps; the latest restorable one by default.
      item: the item (checkpointable) to pick when the checkpoint names several.

    Raises:
      CheckpointNotFoundError: nothing is at ``path``, or not the asked step or item.
      UnknownLayoutError: files are there, in no layout this package knows.
      IncompleteCheckpointError: the save at ``path`` (or of ``step``) was interrupted.
      CorruptCheckpointError: a known layout, damaged.
      UnsafeFormatError: a PyTorch pickle or an object ``.npz``, which is never loaded.
      ItemSelectionError: several items and ``item`` does not pick one.
      InvalidArgumentError: ``step`` was given for a single checkpoint.
    """
    root = _storage.as_path(path)
    with _storage.one_look():
        location = _locate(root, step, item)
    # Shown as given: "~/runs/ckpt" stays so in every header (Orbax and TensorStore get the
    # resolved path, see _storage.absolute).
    if isinstance(path, (str, Path)) and str(path).startswith("~") and location.path == root:
        location = dataclasses.replace(location, path=Path(path))
    return location


def _locate(root: _storage.AnyPath, step: int | None, item: str | None) -> Location:
    listing = _storage.listdir(root)
    if listing is None:
        if not _storage.exists(root):
            raise _storage.not_found(root)
        listing = _storage.Listing(root, frozenset(), frozenset(), is_file=True)
        for layout in LAYOUTS:
            if layout.matches(listing):
                return layout.locate(listing, step, item)
        unsafe = _unsafe.unsafe_format(root)
        if unsafe is not None:
            raise _unsafe.refuse(root, unsafe)
        raise CheckpointNotFoundError(
            f"No checkpoint at {root}: it is a file, not a folder; pass the folder that Orbax "
            "wrote, a .safetensors file or a flax .msgpack file."
        )
    if TMP_MARKER in root.name:
        raise IncompleteCheckpointError(
            f"Checkpoint at {root} is incomplete: the save was interrupted (Orbax tmp folder); "
            "save it again or pick a finished checkpoint."
        )
    for layout in LAYOUTS:
        if layout.matches(listing):
            location = layout.locate(listing, step, item)
            # Pickles beside what was read (pytorch_model.bin next to model.safetensors): say
            # they were left alone, so nobody wonders which weights were loaded.
            notes = _unsafe.ignored_notes(listing)
            if notes:
                location = dataclasses.replace(location, notes=(*location.notes, *notes))
            return location
    pickles = _unsafe.unsafe_files(listing)
    if pickles:
        name, fmt = pickles[0]
        raise _unsafe.refuse(root / name, fmt)
    if not listing.names:
        raise CheckpointNotFoundError(
            f"No checkpoint at {root}: the folder is empty; save a checkpoint there first."
        )
    raise UnknownLayoutError(
        f"No checkpoint layout recognised at {root}: it holds {_found(listing)}; the supported "
        "layouts are "
        + ", ".join(f"{layout.name} ({layout.signature})" for layout in LAYOUTS)
        + "; pass a folder in one of them."
    )


def _found(listing: _storage.Listing, limit: int = 5) -> str:
    names = sorted(listing.files) + sorted(d + "/" for d in listing.dirs)
    shown = ", ".join(clip(n, 40) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
