"""Step folders and their items: what Orbax's v0 ``CheckpointManager``, v1's
``training.Checkpointer`` and v1's ``save_checkpointables`` have in common.

A step folder (and a v1 checkpoint) holds ``_CHECKPOINT_METADATA``, which names each item's
handler, and one subfolder per item (``default/``, ``state/``, or ``model/`` and
``optimizer/``); metrics, when kept, are a JSON item ``metrics/metrics``. A save that was
interrupted leaves a folder whose name contains ``.orbax-checkpoint-tmp`` (or, where renames
are not atomic, a folder with no commit marker); it is never offered as a step.

Each folder is listed once; per-item files are only read when an item is opened.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._storage import AnyPath, Listing
from nnx_ckpt_widgets.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ItemSelectionError,
)
from nnx_ckpt_widgets.layouts import _pytree
from nnx_ckpt_widgets.layouts.base import Layout, Location, StepInfo

TMP_MARKER = ".orbax-checkpoint-tmp"
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
V1_MARKER = "orbax.checkpoint"
METRICS_ITEM = "metrics"
# A step folder is "<step>", "<prefix>_<step>" (CheckpointManagerOptions.step_prefix) or
# zero-padded (step_format_fixed_length): Orbax's own step-name pattern.
_STEP_NAME = re.compile(r"^(?:.+_)?(\d+)$")
# Handlers whose item is an Orbax PyTree folder (v0 and v1 spellings).
_PYTREE_HANDLERS = ("StandardCheckpointHandler", "PyTreeCheckpointHandler", "PyTreeHandler")
_V1_HANDLERS = ".experimental.v1."


def step_number(name: str) -> int | None:
    """``12`` for a step folder (or its tmp folder) named ``12``, ``ckpt_12`` or ``000012``."""
    match = _STEP_NAME.match(name.split(TMP_MARKER)[0].removesuffix("."))
    return int(match.group(1)) if match else None


def step_metadata(listing: Listing) -> dict[str, Any] | None:
    """The folder's ``_CHECKPOINT_METADATA``, or None when it has none.

    Raises:
      CorruptCheckpointError: the file is not a JSON object.
    """
    if STEP_METADATA not in listing.files:
        return None
    metadata = _storage.read_json(listing.path / STEP_METADATA, "step metadata")
    if not isinstance(metadata, dict):
        raise CorruptCheckpointError(
            f"Checkpoint at {listing.path} is damaged: {STEP_METADATA} is not a JSON object; "
            "restore it from a copy or save it again."
        )
    return metadata


def check_committed(listing: Listing, metadata: Mapping[str, Any] | None) -> None:
    """Raise unless the save that wrote the folder finished.

    Orbax marks a finished save by the commit time in ``_CHECKPOINT_METADATA`` and, where a
    rename is not atomic (buckets), by ``commit_success.txt``; either one is enough, as for
    Orbax's own loaders.
    """
    if metadata is None:
        return
    if metadata.get("commit_timestamp_nsecs") or COMMIT_MARKER in listing.files:
        return
    raise IncompleteCheckpointError(
        f"Checkpoint at {listing.path} is incomplete: the save was interrupted (no commit "
        "marker); save it again or pick another checkpoint."
    )


def uses_v1(metadata: Mapping[str, Any] | None) -> bool:
    """Whether the items were written by Orbax v1's handlers."""
    handlers = (metadata or {}).get("item_handlers")
    names = handlers.values() if isinstance(handlers, dict) else [handlers]
    return any(isinstance(h, str) and _V1_HANDLERS in h for h in names)


def custom_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    raw = (metadata or {}).get("custom_metadata")
    return dict(raw) if isinstance(raw, dict) else {}


def items_of(listing: Listing, metadata: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The PyTree items of a step folder or v1 checkpoint, sorted.

    ``_CHECKPOINT_METADATA`` names each item's handler; an item it names whose folder is gone
    is damage, not absence.

    Raises:
      CorruptCheckpointError: an item named in the metadata has no folder.
    """
    handlers = (metadata or {}).get("item_handlers")
    if isinstance(handlers, dict):
        named = [
            name
            for name, handler in handlers.items()
            if isinstance(name, str) and _is_pytree_handler(name, handler)
        ]
        gone = [name for name in named if name not in listing.dirs]
        if gone:
            raise CorruptCheckpointError(
                f"Checkpoint at {listing.path} is damaged: its item {gone[0]!r}, named in "
                f"{STEP_METADATA}, has no folder; restore it from a copy or save it again."
            )
        return tuple(sorted(named))
    # No handler names (older Orbax): an item is a subfolder that is a PyTree folder.
    found = []
    for name in sorted(listing.dirs - {METRICS_ITEM}):
        sub = _storage.listdir(listing.path / name)
        if sub is not None and _pytree.is_pytree(sub.names):
            found.append(name)
    return tuple(found)


def _is_pytree_handler(name: str, handler: object) -> bool:
    if handler is None:  # a handler Orbax could not name: a PyTree unless it is the metrics
        return name != METRICS_ITEM
    return isinstance(handler, str) and handler.endswith(_PYTREE_HANDLERS)


def read_metrics(listing: Listing, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metrics kept for a step: numbers and strings only, never anything executable."""
    raw: Any = None
    if METRICS_ITEM in listing.dirs:
        try:
            raw = _storage.read_json(listing.path / METRICS_ITEM / METRICS_ITEM, "step metrics")
        except CorruptCheckpointError:
            raw = None  # metrics only label the step; its arrays may be fine, so offer it
    if not isinstance(raw, dict):
        raw = (metadata or {}).get("metrics")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if _is_plain(v)}


def _is_plain(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def read_step(
    listing: Listing, number: int, metadata: dict[str, Any] | None = None
) -> tuple[StepInfo, dict[str, Any] | None]:
    """One step folder, checked to be finished (``metadata``: its metadata, if read already).

    Raises:
      IncompleteCheckpointError: the step's save did not finish.
      CorruptCheckpointError: its metadata is damaged or an item folder is missing.
    """
    if metadata is None:
        metadata = step_metadata(listing)
    if metadata is None and _storage.is_bucket(listing.path) and COMMIT_MARKER not in listing:
        # A bucket has no atomic rename: Orbax writes the step folder in place and marks it
        # finished with commit_success.txt last; a folder still without either is a save
        # that is running or was killed.
        raise IncompleteCheckpointError(
            f"Checkpoint at {listing.path} is incomplete: the save was interrupted (no commit "
            "marker); save it again or pick another checkpoint."
        )
    check_committed(listing, metadata)
    items = items_of(listing, metadata)
    info = StepInfo(
        step=number, path=listing.path, items=items, metrics=read_metrics(listing, metadata)
    )
    return info, metadata


def step_candidates(listing: Listing) -> list[str]:
    """Subfolders whose names are step names (finished or not)."""
    return [d for d in listing.dirs if TMP_MARKER not in d and step_number(d) is not None]


def has_steps(listing: Listing) -> bool:
    return bool(step_candidates(listing)) or any(TMP_MARKER in n for n in listing.names)


def newest_step_metadata(listing: Listing) -> dict[str, Any] | None:
    """``_CHECKPOINT_METADATA`` of the newest step, to tell v0 roots from v1 ones; None when
    it cannot be read (then the root reads as v0, which restores the same way)."""
    for name in sorted(step_candidates(listing), key=lambda n: step_number(n) or 0, reverse=True):
        try:
            return _storage.read_json(listing.path / name / STEP_METADATA, "step metadata")
        except CorruptCheckpointError:
            continue
    return None


def locate_root(layout: Layout, listing: Listing, step: int | None, item: str | None) -> Location:
    """Pick a step (the latest by default) and an item of a root of step folders."""
    root = listing.path
    steps: list[StepInfo] = []
    custom: dict[int, dict[str, Any]] = {}
    unfinished = [n for n in listing.names if TMP_MARKER in n]
    damaged: dict[int, CorruptCheckpointError] = {}
    names = sorted(step_candidates(listing), key=lambda n: step_number(n) or 0)
    # Each step is a listing and a file or two: on a bucket they are read several at a time.
    for name, number, outcome in _storage.concurrently(root, lambda n: _try_step(root, n), names):
        if isinstance(outcome, IncompleteCheckpointError):
            unfinished.append(name)  # like a tmp folder: never offered, named if asked for
        elif isinstance(outcome, CorruptCheckpointError):
            damaged[number] = outcome  # one bad step must not hide the good ones
        elif outcome is not None:
            info, metadata = outcome
            steps.append(info)
            custom[number] = custom_metadata(metadata)
    chosen = _pick_step(root, tuple(steps), unfinished, damaged, step)
    return pick_item(
        layout,
        listing.path,
        layout.name,
        chosen.path,
        chosen.items,
        item,
        step=chosen.step,
        steps=tuple(steps),
        custom=custom.get(chosen.step, {}),
    )


def _try_step(root: AnyPath, name: str) -> tuple[str, int, Any]:
    """``(name, number, outcome)`` of one step folder: its ``(StepInfo, metadata)``, the
    error that keeps it from being offered, or None when it is not a step at all."""
    number = step_number(name)
    assert number is not None, "only step names are tried"
    sub = _storage.listdir(root / name)
    if sub is None:
        return name, number, None
    if STEP_METADATA not in sub.files and not name.isdigit():
        return name, number, None  # a prefixed name such as "run_3" may be anything: not a step
    try:
        return name, number, read_step(sub, number)
    except (IncompleteCheckpointError, CorruptCheckpointError) as err:
        return name, number, err


def _pick_step(
    root: AnyPath,
    steps: tuple[StepInfo, ...],
    unfinished: list[str],
    damaged: Mapping[int, CorruptCheckpointError],
    step: int | None,
) -> StepInfo:
    available = ", ".join(str(s.step) for s in steps) or "none"
    if step is None:
        if steps:
            return steps[-1]
        if damaged:
            raise damaged[max(damaged)]
        raise IncompleteCheckpointError(
            f"Checkpoint root {root} has no finished step: every save was interrupted; save again."
        )
    for candidate in steps:
        if candidate.step == step:
            return candidate
    if step in damaged:
        raise damaged[step]
    tmp = [name for name in unfinished if step_number(name) == step]
    if tmp:
        raise IncompleteCheckpointError(
            f"Checkpoint at {root / tmp[0]} is incomplete: the save of step {step} was "
            f"interrupted; pick another step (restorable: {available})."
        )
    raise CheckpointNotFoundError(
        f"Checkpoint root {root} has no step {step}; pick one of: {available}."
    )


def pick_item(
    layout: Layout,
    path: AnyPath,
    kind: str,
    folder: AnyPath,
    items: tuple[str, ...],
    item: str | None,
    *,
    step: int | None = None,
    steps: tuple[StepInfo, ...] = (),
    custom: Mapping[str, Any] | None = None,
) -> Location:
    """The Location of one item of a step folder or v1 checkpoint.

    Raises:
      CorruptCheckpointError: the folder holds no item at all.
      ItemSelectionError: several items and ``item`` does not pick one of them.
    """
    if not items:
        raise CorruptCheckpointError(
            f"Checkpoint at {folder} is damaged: it holds no item with a "
            f"{_pytree.PYTREE_METADATA} file; pick another step or save it again."
        )
    if item is None:
        if len(items) > 1:
            raise ItemSelectionError(
                f"Checkpoint at {folder} holds several items ({', '.join(items)}); pick one "
                "with item=..."
            )
        item = items[0]
    elif item not in items:
        raise ItemSelectionError(
            f"Checkpoint at {folder} has no item {item!r}; pick one of: {', '.join(items)}."
        )
    return Location(
        path=path,
        layout=layout,
        kind=kind,
        data=folder / item,
        step=step,
        item=item,
        steps=steps,
        items=items,
        custom_metadata=dict(custom or {}),
    )


def no_step_here(path: AnyPath, step: int | None) -> None:
    """Refuse ``step=`` for a checkpoint that is not a root of steps."""
    if step is not None:
        raise InvalidArgumentError(
            f"Checkpoint at {path} is a single checkpoint, not a root of steps; drop step= or "
            "pass the root folder (CheckpointManager or training.Checkpointer)."
        )
