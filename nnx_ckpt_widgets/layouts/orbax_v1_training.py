"""Orbax v1 ``training.Checkpointer`` root: ``root/<step>/state/`` plus ``root/<step>/metrics``.

On disk it is a ``CheckpointManager`` root (v1's Checkpointer wraps it) whose steps name v1
handlers in ``_CHECKPOINT_METADATA``; that is how it is told apart, from the newest step.
"""

from __future__ import annotations

from nnx_ckpt_widgets._storage import Listing
from nnx_ckpt_widgets.layouts import _pytree, _steps
from nnx_ckpt_widgets.layouts.base import Location


class OrbaxV1TrainingLayout(_pytree.PyTreeReads):
    name = "training.Checkpointer root"
    signature = "step folders of Orbax v1 items"
    # A root of steps: never tried as the checkpoint inside one step folder.
    holds_steps = True

    def matches(self, listing: Listing) -> bool:
        if listing.is_file:
            return False
        return _steps.has_steps(listing) and _steps.uses_v1(_steps.newest_step_metadata(listing))

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        return _steps.locate_root(self, listing, step, item)
