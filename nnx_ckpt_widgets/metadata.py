"""``inspect``: what a checkpoint holds, from its metadata only, never its array bytes."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from functools import cached_property
from typing import Any, Literal

from nnx_ckpt_widgets import _keypaths, _storage, _untrusted
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._storage import AnyPath
from nnx_ckpt_widgets._untrusted import no_gc
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.layouts import Location, StepInfo, StoredLeaf, locate

__all__ = ["CheckpointInfo", "LeafInfo", "StepInfo", "inspect"]

Format = Literal["nnx.State", "pure dict"]
STATE_FORMAT: Format = "nnx.State"
PURE_DICT_FORMAT: Format = "pure dict"


@dataclasses.dataclass(frozen=True, slots=True)  # 10^5 of them: no __dict__ each
class LeafInfo:
    """One array of a checkpoint.

    Attributes:
      path: the key path as reports spell it: ``('linear1', 'kernel')``, with the ``value``
        level of a saved ``nnx.State`` removed.
      stored_path: the key path as stored, ``value`` level included.
      shape: the array's shape.
      dtype: the dtype's name, e.g. ``float32``.
      sharding: a short spelling of the saved sharding, when the checkpoint recorded one.
      key_impl: the PRNG implementation when Orbax saved this array from typed JAX keys;
        ``shape`` and ``dtype`` are then those of the key data.
    """

    path: KeyPath
    stored_path: KeyPath
    shape: tuple[int, ...]
    dtype: str
    sharding: str | None = None
    key_impl: str | None = None

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the array takes in memory."""
        return self.size * _untrusted.itemsize(self.dtype)

    @property
    def name(self) -> str:
        return _keypaths.join(self.path)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect` found.

    Attributes:
      path: the path that was inspected, as given (a URL stays a URL).
      item_dir: the folder (or file) holding the arrays that were read.
      format: ``"nnx.State"`` or ``"pure dict"``.
      leaves: the arrays, by key path, in saved order.
      step: the step read, under a root of steps (``CheckpointManager``,
        ``training.Checkpointer``) or in one step folder.
      item: the item (checkpointable) read, when the checkpoint names its items.
      steps: the restorable steps of a root, ascending, with their metrics.
      items: the items of the step or checkpoint.
      layout: what was found on disk, e.g. ``Orbax v1 checkpoint``.
      custom_metadata: what the saver passed as ``custom_metadata=``; for safetensors, the
        files' ``__metadata__``.
      config: a Hugging Face ``config.json`` found beside safetensors weights.
      unrestorable: the root's step folders that cannot be restored (damaged, interrupted,
        empty), each with its ``reason``.
      notes: what to know about how the checkpoint was read (pickle files beside safetensors
        that were ignored, keys holding ``/``), one sentence each.
      location: where the arrays live, for :func:`restore` to read them without looking
        the checkpoint up again.
    """

    path: AnyPath
    item_dir: AnyPath
    format: Format
    leaves: Mapping[KeyPath, LeafInfo]
    step: int | None = None
    item: str | None = None
    steps: tuple[StepInfo, ...] = ()
    items: tuple[str, ...] = ()
    layout: str = ""
    custom_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    unrestorable: tuple[StepInfo, ...] = ()
    notes: tuple[str, ...] = ()
    location: Location | None = dataclasses.field(default=None, repr=False, compare=False)

    def located(self) -> Location:
        """Where the arrays live, for reading them.

        Raises:
          InvalidArgumentError: this info was built by hand, not by :func:`inspect`.
        """
        if self.location is None:
            raise InvalidArgumentError(
                f"The CheckpointInfo of {self.path} was not made by inspect(); pass the path."
            )
        return self.location

    @property
    def num_params(self) -> int:
        """Total number of elements over all arrays."""
        return self.totals[()][0]

    @property
    def nbytes(self) -> int:
        """Total bytes over all arrays."""
        return self.totals[()][1]

    @cached_property
    def rng_paths(self) -> frozenset[KeyPath]:
        """The arrays that are RNG state, not parameters: typed PRNG keys (Orbax records their
        ``key_impl``) and the ``count`` saved beside each, as an ``nnx.Rngs`` stream has."""
        streams = {leaf.path[:-1] for leaf in self.leaves.values() if leaf.key_impl is not None}
        return frozenset(
            path
            for path, leaf in self.leaves.items()
            if leaf.key_impl is not None or (path[:-1] in streams and path[-1:] == ("count",))
        )

    @cached_property
    def rng_totals(self) -> dict[KeyPath, int]:
        """Elements of RNG state under every subtree that holds some (see :attr:`rng_paths`),
        so counts of parameters can leave them out."""
        totals: dict[KeyPath, int] = {}
        for path in self.rng_paths:
            size = self.leaves[path].size
            for depth in range(len(path)):
                totals[path[:depth]] = totals.get(path[:depth], 0) + size
        return totals

    @cached_property
    def totals(self) -> dict[KeyPath, tuple[int, int]]:
        """``(num_params, nbytes)`` of every subtree, keyed by its path; ``()`` is the root."""
        # Each leaf into its parent, then each parent into its ancestors: a layer's arrays
        # share one parent, so the prefixes are walked once a layer, not once an array.
        parents: dict[KeyPath, list[int]] = {}
        for leaf in self.leaves.values():
            entry = parents.get(parent := leaf.path[:-1])
            if entry is None:
                entry = parents[parent] = [0, 0]
            entry[0] += leaf.size
            entry[1] += leaf.nbytes
        totals: dict[KeyPath, list[int]] = {(): [0, 0]}
        for parent, (size, nbytes) in parents.items():
            for depth in range(len(parent) + 1):
                entry = totals.setdefault(parent[:depth], [0, 0])
                entry[0] += size
                entry[1] += nbytes
        return {path: (n, b) for path, (n, b) in totals.items()}

    def best_step(self, metric: str, mode: Literal["min", "max"] = "min") -> int | None:
        """The step whose ``metric`` is lowest (``mode="min"``) or highest, as Orbax's
        ``best_fn``/``best_mode`` would pick it; None when no step recorded that metric.

        Raises:
          InvalidArgumentError: ``mode`` is neither ``"min"`` nor ``"max"``.
        """
        if mode not in ("min", "max"):
            raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}.")
        scored = [
            (s.metrics[metric], s.step)
            for s in self.steps
            if isinstance(s.metrics.get(metric), (int, float))
        ]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda pair: pair[0])[1]

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the CLI's ``--json``): paths as text, leaves as a list."""
        return {
            "path": str(self.path),
            "layout": self.layout,
            "format": self.format,
            "step": self.step,
            "item": self.item,
            "steps": [
                {"step": s.step, "items": list(s.items), "metrics": dict(s.metrics)}
                for s in self.steps
            ],
            "unrestorable_steps": [
                {"step": s.step, "path": str(s.path), "reason": s.reason} for s in self.unrestorable
            ],
            "notes": list(self.notes),
            "items": list(self.items),
            "custom_metadata": dict(self.custom_metadata),
            "config": dict(self.config) if self.config is not None else None,
            "arrays": len(self.leaves),
            "params": self.num_params,
            "bytes": self.nbytes,
            "leaves": [
                {
                    "key": leaf.name,
                    "shape": list(leaf.shape),
                    "dtype": leaf.dtype,
                    "bytes": leaf.nbytes,
                    "sharding": leaf.sharding,
                }
                for leaf in self.leaves.values()
            ],
        }

    def subtree(self, prefix: KeyPath) -> dict[KeyPath, LeafInfo]:
        """The leaves under ``prefix``."""
        prefix = _keypaths.to_keypath(prefix)
        return {p: leaf for p, leaf in self.leaves.items() if p[: len(prefix)] == prefix}

    def __iter__(self) -> Iterator[LeafInfo]:
        return iter(self.leaves.values())

    def __len__(self) -> int:
        return len(self.leaves)

    def __str__(self) -> str:
        from nnx_ckpt_widgets import render

        return render.info_text(self)

    def _repr_html_(self) -> str:
        from nnx_ckpt_widgets import render

        return render.info_html(self)


def inspect(
    path: str | os.PathLike, *, step: int | None = None, item: str | None = None
) -> CheckpointInfo:
    """Read what a checkpoint holds from its metadata, without reading any array bytes.

    Args:
      path: a checkpoint (an ``nnx.State`` or a pure dict) written by Orbax v0's
        ``StandardCheckpointer`` or v1's ``ocp.v1.save`` / ``save_checkpointables``, a root
        of steps (``CheckpointManager``, ``training.Checkpointer``), or one step folder;
        local, or in a bucket as a ``gs://`` URL or an ``etils.epath.Path``.
      step: under a root of steps, the step to read; the latest restorable one by default.
      item: the item (checkpointable) to read when there are several (e.g. ``"model"``).

    Returns:
      A :class:`CheckpointInfo`; ``str()`` of it is a summary table.

    Raises:
      CheckpointError: a subclass naming the path and the problem, e.g.
        ``CheckpointNotFoundError`` or ``CorruptCheckpointError``.
    """
    # One look at the checkpoint: a small file that locating it read (the default step's
    # _METADATA, checked to be intact) is not fetched again to read its leaves.
    with _storage.spelled_as_given(path), _storage.one_look():
        location = locate(path, step=step, item=item)
        with no_gc():  # a million LeafInfo objects and no cycles: see _untrusted.no_gc
            return info_from_location(location)


def info_from_location(location: Location) -> CheckpointInfo:
    stored = location.layout.leaves(location)
    fmt = detect_format(stored)
    leaves = {}
    for leaf in stored:
        logical = leaf.stored_path[:-1] if fmt == STATE_FORMAT else leaf.stored_path
        leaves[logical] = LeafInfo(
            logical, leaf.stored_path, leaf.shape, leaf.dtype, leaf.sharding, leaf.key_impl
        )
    return CheckpointInfo(
        path=location.path,
        item_dir=location.data,
        format=fmt,
        leaves=leaves,
        step=location.step,
        item=location.item,
        steps=location.steps,
        items=location.items,
        layout=location.kind,
        custom_metadata=location.custom_metadata,
        config=location.config,
        unrestorable=location.unrestorable,
        notes=location.notes,
        location=location,
    )


def detect_format(stored: list[StoredLeaf]) -> Format:
    """``nnx.State`` when every leaf sits under a ``value`` level, else ``pure dict``."""
    if _keypaths.has_variable_level(leaf.stored_path for leaf in stored):
        return STATE_FORMAT
    return PURE_DICT_FORMAT
