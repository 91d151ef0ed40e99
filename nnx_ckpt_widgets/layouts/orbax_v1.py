"""Orbax v1 checkpoint: ``ocp.v1.save(path, tree)`` or ``save_checkpointables(path, {...})``.

The folder holds an empty ``orbax.checkpoint`` marker, ``_CHECKPOINT_METADATA`` (with each
checkpointable's handler and any ``custom_metadata=``), ``commit_success.txt``, and one Orbax
PyTree folder per checkpointable: ``state/`` for ``ocp.v1.save`` (``pytree/`` before Orbax
0.12), or ``model/``, ``optimizer/``... One step folder of a ``CheckpointManager`` or of a
``training.Checkpointer`` root has the same shape without the marker; it is read here too, with
its step number taken from its name.
"""

from __future__ import annotations

from nnx_ckpt_widgets._storage import Listing
from nnx_ckpt_widgets.errors import CorruptCheckpointError
from nnx_ckpt_widgets.layouts import _pytree, _steps
from nnx_ckpt_widgets.layouts.base import Location, StepInfo

STEP_FOLDER = "step folder"


class OrbaxV1Layout(_pytree.PyTreeReads):
    name = "Orbax v1 checkpoint"
    signature = "an orbax.checkpoint marker, as ocp.v1.save writes"

    def matches(self, listing: Listing) -> bool:
        if listing.is_file:
            return False
        if _steps.V1_MARKER in listing.files:
            return True
        return _steps.STEP_METADATA in listing.files and not _pytree.is_pytree(listing.names)

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        metadata = _steps.step_metadata(listing)
        marked = _steps.V1_MARKER in listing.files
        if metadata is None:
            raise CorruptCheckpointError(
                f"Checkpoint at {listing.path} is damaged: it has the {_steps.V1_MARKER} marker "
                f"but no {_steps.STEP_METADATA} file; restore it from a copy or save it again."
            )
        number = None if marked else _steps.step_number(listing.path.name)
        if step is not None and step != number:
            _steps.no_step_here(listing.path, step)
        steps: tuple[StepInfo, ...] = ()
        if number is not None:
            info, _ = _steps.read_step(listing, number, metadata)
            items, steps = info.items, (info,)
        else:
            _steps.check_committed(listing, metadata)
            items = _steps.items_of(listing, metadata)
        kind = self.name
        if number is not None:
            api = "training.Checkpointer" if _steps.uses_v1(metadata) else "CheckpointManager"
            kind = f"{api} {STEP_FOLDER}"
        return _steps.pick_item(
            self,
            listing.path,
            kind,
            listing.path,
            items,
            item,
            step=number,
            steps=steps,
            custom=_steps.custom_metadata(metadata),
        )
