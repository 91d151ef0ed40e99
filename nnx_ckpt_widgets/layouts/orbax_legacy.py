"""Orbax's PyTree folder from before ``_METADATA`` (Orbax 0.2.x, T5X-era code, flax 0.7's
``save_checkpoint``): a ``checkpoint`` msgpack file holding the tree, and one zarr folder per
array (``params.dense.kernel/.zarray``), or, with ``SaveArgs(aggregate=True)``, every array
inline in the msgpack file.

The ``checkpoint`` file is the flax msgpack format (:mod:`.msgpack` walks and validates it);
an array kept in a zarr folder appears there as the string ``PLACEHOLDER://<name>``, and its
shape and dtype come from that folder's ``.zarray`` header. Orbax 0.12.8 still restores the
whole folder (``PyTreeCheckpointer().restore``) but has no metadata for it and no partial
restore, so arrays are read one by one through Orbax's own type handlers (the zarr ones) and
flax's msgpack decoder (the inline ones): a restore of a few arrays reads only those.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Sequence
from typing import Any

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._storage import AnyPath, Listing
from nnx_ckpt_widgets._text import clip
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CorruptCheckpointError,
    ItemSelectionError,
    ResourceExhaustedError,
    UnknownLayoutError,
)
from nnx_ckpt_widgets.layouts import _pytree, _steps, msgpack
from nnx_ckpt_widgets.layouts.base import Location, ReadRequest, StoredLeaf

TREE_FILE = "checkpoint"


def is_legacy(names: frozenset[str]) -> bool:
    """Whether a folder holding ``names`` is an Orbax PyTree folder from before ``_METADATA``.

    TensorFlow also names a file ``checkpoint`` (its index of ``ckpt-<n>.index`` and
    ``.data-*`` files): such a folder is not one."""
    return (
        TREE_FILE in names
        and _pytree.PYTREE_METADATA not in names
        and not any(n in names for n in _pytree.OCDBT_FILES)
        and not any(n.endswith(".index") or ".data-" in n for n in names)
    )


def is_legacy_folder(folder: AnyPath) -> bool:
    listing = _storage.listdir(folder)
    return listing is not None and TREE_FILE in listing.files and is_legacy(listing.names)


def read_entries(folder: AnyPath) -> list[msgpack.Entry]:
    """The leaves of a legacy folder: inline ones from the msgpack file, zarr ones with the
    shape and dtype of their ``.zarray`` header (read concurrently on a bucket).

    Raises:
      CorruptCheckpointError: the tree file or a zarr header is damaged or missing.
    """
    entries = msgpack.read_index(folder / TREE_FILE)

    def header(entry: msgpack.Entry) -> msgpack.Entry:
        if entry.kind != "placeholder":
            return entry
        name = entry.name.removeprefix(msgpack.PLACEHOLDER)
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CorruptCheckpointError(
                f"Checkpoint at {folder} is damaged: its {TREE_FILE} file names the array "
                f"folder {clip(name, 60)!r}, which is not a folder beside it; restore it from a "
                "copy or save it again."
            )
        raw = _storage.read_json(folder / name / ".zarray", "zarr header")
        try:
            shape = tuple(int(n) for n in raw["shape"])
            dtype = _pytree.dtype_name(raw["dtype"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptCheckpointError(
                f"Checkpoint at {folder} is damaged: {name}/.zarray has no shape and dtype; "
                "restore it from a copy or save it again."
            ) from err
        return msgpack.Entry(entry.path, "zarr", shape, dtype, folder, 0, 0, name)

    return _storage.concurrently(folder, header, entries)


def read_leaves(folder: AnyPath) -> list[StoredLeaf]:
    return msgpack.leaves_of(read_entries(folder))


def read_arrays(folder: AnyPath, requests: Sequence[ReadRequest]) -> list[Any]:
    """The requested arrays: zarr ones through Orbax's type handlers, inline ones through
    flax's msgpack decoder.

    Raises:
      CorruptCheckpointError: Orbax, TensorStore or the decoder cannot read the data.
    """
    if not requests:
        return []
    entries = read_entries(folder)
    by_path = {e.path: e for e in entries}
    out: list[Any] = [None] * len(requests)
    inline = [i for i, r in enumerate(requests) if by_path[r.stored_path].kind != "zarr"]
    zarr = [i for i, r in enumerate(requests) if by_path[r.stored_path].kind == "zarr"]
    values = msgpack.read_entries(folder, entries, [requests[i] for i in inline])
    for i, value in zip(inline, values, strict=True):
        out[i] = value
    if zarr:
        names = [by_path[requests[i].stored_path].name for i in zarr]
        read = _read_zarr(folder, names, [requests[i] for i in zarr])
        for i, value in zip(zarr, read, strict=True):
            out[i] = value
    return out


def _read_zarr(folder: AnyPath, names: list[str], requests: list[ReadRequest]) -> list[Any]:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    parent = _storage.absolute(folder)
    if _storage.is_local(parent):
        from etils import epath

        parent = epath.Path(parent)
    handlers = ocp.type_handlers

    async def read_all() -> list[Any]:
        jobs = []
        for name, request in zip(names, requests, strict=True):
            info = handlers.ParamInfo(name=name, parent_dir=parent, is_ocdbt_checkpoint=False)
            if request.host or request.scalar_type is not None:
                handler = handlers.get_type_handler(np.ndarray)
                args: Any = ocp.RestoreArgs(restore_type=np.ndarray, dtype=request.dtype)
            else:
                sharding = request.sharding or jax.sharding.SingleDeviceSharding(
                    jax.local_devices()[0]
                )
                handler = handlers.get_type_handler(jax.Array)
                args = ocp.ArrayRestoreArgs(
                    sharding=sharding, dtype=request.dtype, global_shape=request.shape
                )
            jobs.append(handler.deserialize([info], [args]))
        return [value for got in await asyncio.gather(*jobs) for value in got]

    def run() -> list[Any]:
        # Its own thread and event loop: a notebook's kernel already runs one in this thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, read_all()).result()

    try:
        values = _storage.guarded(folder, run)
    except CheckpointError:
        raise
    except MemoryError as err:  # the machine, not the checkpoint
        raise ResourceExhaustedError(
            f"Ran out of memory reading {len(names)} arrays of {folder}; the target was left "
            "unchanged, restore fewer arrays at a time."
        ) from err
    except Exception as err:  # Orbax and TensorStore raise many types for damaged data
        raise CorruptCheckpointError(
            f"Checkpoint at {folder} could not be read: {_pytree.reason(err)}; the target was "
            "left unchanged, restore the checkpoint from a copy or save it again."
        ) from err
    out = []
    for value, request in zip(values, requests, strict=True):
        if request.scalar_type is not None:
            value = request.scalar_type(np.asarray(value).item())
        out.append(value)
    return out


class OrbaxLegacyLayout:
    name = "Orbax checkpoint (before _METADATA)"
    signature = "a checkpoint file and zarr folders, as Orbax 0.2 and flax 0.7 write"

    def matches(self, listing: Listing) -> bool:
        return not listing.is_file and TREE_FILE in listing.files and is_legacy(listing.names)

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        _steps.no_step_here(listing.path, step)
        if item is not None:
            raise ItemSelectionError(
                f"Checkpoint at {listing.path} holds one unnamed tree, not named items; drop item=."
            )
        if not msgpack.is_msgpack_map(listing.path / TREE_FILE):
            raise UnknownLayoutError(
                f"No checkpoint layout recognised at {listing.path}: its {TREE_FILE} file is not "
                "the msgpack tree Orbax 0.2 writes; pass a checkpoint folder."
            )
        return Location(path=listing.path, layout=self, kind=self.name, data=listing.path)

    def leaves(self, location: Location) -> list[StoredLeaf]:
        return read_leaves(location.data)

    def read(self, location: Location, requests: Sequence[ReadRequest]) -> list[Any]:
        return read_arrays(location.data, requests)
