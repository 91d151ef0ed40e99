"""The one small interface every on-disk layout implements, and what it hands back.

A layout answers four questions about a folder it is given (listed once):

1. :meth:`Layout.matches`: does this listing hold my layout?
2. :meth:`Layout.locate`: which steps and items are here, and which one was asked for?
3. :meth:`Layout.leaves`: the stored leaf metadata of the chosen item, never array bytes;
4. :meth:`Layout.read`: read these selected arrays onto these shardings and dtypes.

Everything above the layouts (``inspect``, ``compare``, ``restore``, the widgets) works on the
:class:`Location` and :class:`StoredLeaf` values defined here, never on files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._storage import AnyPath, Listing

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One restorable step of a ``CheckpointManager`` or ``training.Checkpointer`` root.

    Attributes:
      step: the step number.
      path: the step's folder.
      items: names of the pytree items (checkpointables) saved at this step, sorted.
      metrics: the metrics kept for this step (numbers and strings only).
      reason: why the step cannot be restored (damaged, interrupted, empty, a link that
        leads nowhere); empty for a restorable step.
    """

    step: int
    path: AnyPath
    items: tuple[str, ...]
    metrics: Mapping[str, Any]
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)  # 10^5 of them: no __dict__ each
class StoredLeaf:
    """One array as stored: its path in the saved tree (``value`` level included).

    ``key_impl`` names the PRNG implementation (``threefry2x32``) of an array that Orbax
    saved from typed JAX keys; ``shape`` and ``dtype`` are then those of the key data.
    """

    stored_path: KeyPath
    shape: tuple[int, ...]
    dtype: str
    sharding: str | None
    key_impl: str | None = None


@dataclasses.dataclass(frozen=True)
class ReadRequest:
    """Read the stored array at ``stored_path`` as ``dtype``, placed on ``sharding``.

    ``scalar_type`` is set for a Python scalar leaf (``nnx.Variable(0)``), which Orbax stores
    without a sharding. With ``host``, the array comes back as a host NumPy array in its stored
    dtype (``int64`` stays ``int64`` without ``jax_enable_x64``), and ``sharding`` is ignored.
    """

    stored_path: KeyPath
    shape: tuple[int, ...]
    dtype: str
    sharding: Any = None
    scalar_type: type | None = None
    host: bool = False


@dataclasses.dataclass(frozen=True)
class Location:
    """Where one item's arrays live, and how the user's path led there.

    Attributes:
      path: what the user passed, unchanged.
      layout: the layout that recognised it; it reads the leaves and arrays.
      kind: what the layout found, as ``inspect`` shows it (``Orbax v1 checkpoint``).
      data: the folder (or file) holding the chosen item's arrays.
      step: the chosen step, under a root of steps or in a step folder.
      item: the chosen item (checkpointable), when the checkpoint names its items.
      steps: the restorable steps of a root, ascending; empty otherwise.
      unrestorable: the root's step folders that cannot be restored, ascending, each with
        its ``reason``; they never hide the restorable ones.
      items: the items of the chosen step or checkpoint.
      custom_metadata: what the saver passed as ``custom_metadata=`` (a safetensors
        file's ``__metadata__``).
      config: a model's ``config.json`` found beside its weights.
      notes: what the user should know about how the path was read (pickles beside
        safetensors that were ignored, keys holding ``/``), one sentence each.
      layout_data: what the layout read while locating and needs again (never shown).
    """

    path: AnyPath
    layout: Layout
    kind: str
    data: AnyPath
    step: int | None = None
    item: str | None = None
    steps: tuple[StepInfo, ...] = ()
    items: tuple[str, ...] = ()
    custom_metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    config: Mapping[str, Any] | None = None
    unrestorable: tuple[StepInfo, ...] = ()
    notes: tuple[str, ...] = ()
    layout_data: Any = dataclasses.field(default=None, repr=False, compare=False)


class Layout(Protocol):
    """One on-disk layout. Instances are stateless; the registry keeps one of each."""

    name: str
    """What this layout is, e.g. ``Orbax v1 checkpoint``."""
    signature: str
    """What identifies it on disk, for the error that lists the known layouts."""

    def matches(self, listing: Listing) -> bool:
        """Whether the folder listed holds this layout; reads nothing beyond the listing."""
        ...

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        """Pick the step and item asked for.

        Raises:
          CheckpointError: a subclass naming what is missing, unfinished or damaged.
        """
        ...

    def leaves(self, location: Location) -> list[StoredLeaf]:
        """The stored leaves of ``location``'s item, from metadata only, in saved order.

        Raises:
          CorruptCheckpointError: the metadata cannot be read.
        """
        ...

    def read(self, location: Location, requests: Sequence[ReadRequest]) -> list[Any]:
        """Read exactly the requested arrays, in order, as ``jax.Array`` (or Python scalars).

        Raises:
          CorruptCheckpointError: the array data cannot be read.
        """
        ...


def read_batches(
    items: Sequence[T], limit: int, size: Callable[[T], int] | None = None
) -> list[list[T]]:
    """Consecutive groups of ``items`` of at most ``limit`` bytes each (one big array makes a
    batch of its own): the unit of one ``Layout.read`` call.

    Args:
      items: what to read, in order.
      limit: bytes per batch.
      size: the bytes of one item; by default ``item[0][0].nbytes`` (restore's
        ``((leaf, target), request)`` pairs).
    """
    measure = size if size is not None else (lambda entry: entry[0][0].nbytes)
    batches: list[list[T]] = []
    total = 0
    for entry in items:
        nbytes = measure(entry)
        if not batches or total + nbytes > limit:
            batches.append([])
            total = 0
        batches[-1].append(entry)
        total += nbytes
    return batches
