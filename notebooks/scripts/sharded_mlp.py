"""The model and the reporting shared by the multi-process example scripts.

``save_sharded.py`` and ``restore_sharded.py`` import this module; so do the notebook
``05_multiprocess.ipynb`` and ``tests/test_launch.py``.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

DIM = 8

# How each kernel is split over the mesh when saving: one mesh axis name (or None: not
# split) per array dimension. On the 2 x 2 mesh ("data", "model") every device gets one
# 4 x 4 block of each kernel.
SAVE_AXES = (("data", "model"), ("model", "data"))
# A different layout for restoring on a 1-D mesh ("model",) of 4 devices: linear1 split by
# columns, linear2 by rows.
RESTORE_AXES = ((None, "model"), ("model", None))


class TwoLayerMLP(nnx.Module):
    """The guide's two-layer MLP, with a sharding annotation on each kernel.

    The annotation (``nnx.with_partitioning``) is metadata on the variable: it names mesh
    axes, not devices or processes, so the same model code runs on any mesh that has them.
    """

    def __init__(
        self,
        dim: int,
        kernel_axes: tuple[tuple[str | None, ...], ...],
        rngs: nnx.Rngs,
    ) -> None:
        init = nnx.initializers.lecun_normal()
        self.linear1 = nnx.Linear(
            dim,
            dim,
            use_bias=False,
            kernel_init=nnx.with_partitioning(init, kernel_axes[0]),
            rngs=rngs,
        )
        self.linear2 = nnx.Linear(
            dim,
            dim,
            use_bias=False,
            kernel_init=nnx.with_partitioning(init, kernel_axes[1]),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(self.linear1(x))


def checkpoint_path(outdir: str) -> epath.Path:
    """``OUTDIR/state``: a local folder, made absolute as Orbax wants, or a ``gs://`` URL.

    ``etils.epath`` is Orbax's own path type: the same script saves to a shared file system
    or to a bucket.
    """
    if "://" in outdir:
        return epath.Path(outdir) / "state"
    return epath.Path(os.path.abspath(outdir)) / "state"


def flat_arrays(state: nnx.State) -> dict[str, jax.Array]:
    """Returns the arrays of ``state`` keyed by dotted path, such as ``linear1.kernel``."""
    return {".".join(map(str, path)): leaf for path, leaf in nnx.to_flat_state(state)}


def checksums(state: nnx.State) -> dict[str, str]:
    """Returns a short SHA-256 of the bytes of each whole array of ``state``.

    Every process must call it: an array spread over processes is first gathered with
    ``multihost_utils.process_allgather``, so the hash does not depend on the layout.
    """
    result = {}
    for name, array in flat_arrays(state).items():
        if not array.is_fully_addressable:
            array = multihost_utils.process_allgather(array, tiled=True)
        data = np.ascontiguousarray(np.asarray(array))
        result[name] = hashlib.sha256(data.tobytes()).hexdigest()[:16]
    return result


def describe_shards(state: nnx.State) -> list[str]:
    """Returns one line per array: its shape and the blocks this process holds."""
    lines = []
    for name, array in flat_arrays(state).items():
        blocks = sorted(
            {_block(shard.index, array.shape) for shard in array.addressable_shards},
        )
        lines.append(f"{name} {array.shape}: this process holds {' '.join(blocks)}")
    return lines


def _block(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    """Formats a shard index such as ``[0:4, 4:8]``."""
    bounds = (part.indices(size)[:2] for part, size in zip(index, shape, strict=True))
    return "[" + ", ".join(f"{start}:{stop}" for start, stop in bounds) + "]"
