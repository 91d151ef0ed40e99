"""Orbax v0 ``CheckpointManager`` root, and any other root of step folders.

A ``CheckpointManager`` writes one folder per step (``0/``, ``ckpt_10/``, ``000010/``), each
with one folder per item (``default/``, or ``model/`` and ``optimizer/`` for a ``Composite``)
and, when metrics were given, a JSON ``metrics`` item. flax's
``flax.training.checkpoints.save_checkpoint`` (``checkpoint_<n>/``) and hand-written loops
(``StandardCheckpointer().save(root / f"{step}", state)``, ``step_<n>/``) write step folders
that are each one plain checkpoint; :func:`~nnx_ckpt_widgets.layouts._steps.locate_root`
reads both kinds.
"""

from __future__ import annotations

from nnx_ckpt_widgets._storage import Listing
from nnx_ckpt_widgets.layouts import _pytree, _steps
from nnx_ckpt_widgets.layouts.base import Location


class OrbaxV0ManagerLayout(_pytree.PyTreeReads):
    name = "CheckpointManager root"
    signature = "step folders such as 10/, step_10/ or checkpoint_10/"
    # A root of steps: never tried as the checkpoint inside one step folder.
    holds_steps = True

    def matches(self, listing: Listing) -> bool:
        if listing.is_file:
            return False
        return _steps.has_steps(listing)

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        return _steps.locate_root(self, listing, step, item)
