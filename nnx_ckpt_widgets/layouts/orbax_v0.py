"""Orbax v0 PyTree checkpoint: one folder, as ``ocp.StandardCheckpointer().save(path, tree)``
writes it (``_METADATA``, ``_sharding``, an OCDBT database, ``_CHECKPOINT_METADATA``)."""

from __future__ import annotations

from nnx_ckpt_widgets._storage import Listing
from nnx_ckpt_widgets.errors import CorruptCheckpointError, ItemSelectionError
from nnx_ckpt_widgets.layouts import _pytree, _steps
from nnx_ckpt_widgets.layouts.base import Location


class OrbaxV0Layout(_pytree.PyTreeReads):
    name = "Orbax v0 checkpoint"
    signature = "_METADATA, as StandardCheckpointer writes"

    def matches(self, listing: Listing) -> bool:
        if listing.is_file:
            return False
        return _pytree.is_pytree(listing.names)

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        _steps.no_step_here(listing.path, step)
        if item is not None:
            raise ItemSelectionError(
                f"Checkpoint at {listing.path} holds one unnamed tree, not named items; drop item=."
            )
        if _pytree.PYTREE_METADATA not in listing.files:
            raise CorruptCheckpointError(
                f"Checkpoint at {listing.path} is damaged: its {_pytree.PYTREE_METADATA} file "
                "is missing; restore it from a copy or save it again."
            )
        metadata = _steps.step_metadata(listing)
        _steps.check_committed(listing, metadata)
        return Location(
            path=listing.path,
            layout=self,
            kind=self.name,
            data=listing.path,
            custom_metadata=_steps.custom_metadata(metadata),
        )
