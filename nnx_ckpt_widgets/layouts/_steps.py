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

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._storage import AnyPath, Listing
from nnx_ckpt_widgets._text import clip
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ItemSelectionError,
    StorageError,
    UnknownLayoutError,
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
    # No handler names (older Orbax): an item is a subfolder that is a PyTree folder, or a
    # checkpoint in another single-checkpoint layout of the registry.
    found = []
    for name in sorted(listing.dirs - {METRICS_ITEM}):
        sub = _storage.listdir(listing.path / name)
        if sub is not None and (_pytree.is_pytree(sub.names) or _checkpoint_layout(sub)):
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
    check_finished(listing, metadata)
    items = items_of(listing, metadata)
    info = StepInfo(
        step=number, path=listing.path, items=items, metrics=read_metrics(listing, metadata)
    )
    return info, metadata


def check_finished(listing: Listing, metadata: Mapping[str, Any] | None) -> None:
    """Raise unless the save of a step folder finished (see :func:`check_committed`).

    Raises:
      IncompleteCheckpointError: the save did not finish.
    """
    if metadata is None and _storage.is_bucket(listing.path) and COMMIT_MARKER not in listing:
        # A bucket has no atomic rename: Orbax writes the step folder in place and marks it
        # finished with commit_success.txt last; a folder still without either is a save
        # that is running or was killed.
        raise IncompleteCheckpointError(
            f"Checkpoint at {listing.path} is incomplete: the save was interrupted (no commit "
            "marker); save it again or pick another checkpoint."
        )
    check_committed(listing, metadata)


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
            found = _storage.read_json(listing.path / name / STEP_METADATA, "step metadata")
        except (CorruptCheckpointError, RecursionError):
            continue
        if isinstance(found, dict):  # a damaged newest step ([1], say) must not decide
            return found
    return None


class _Hollow(CorruptCheckpointError):
    """A step-named folder that holds no checkpoint at all (empty, or other files): listed
    beside real steps, but a root of nothing else is no checkpoint root."""


@dataclasses.dataclass(frozen=True)
class _Step:
    """One step folder that looks restorable, read no further than its listing and
    ``_CHECKPOINT_METADATA``; ``inner`` is the layout of a step folder that is itself one
    checkpoint (flax's ``checkpoint_<n>/``, a ``StandardCheckpointer`` loop's ``<n>/``)."""

    info: StepInfo
    listing: Listing
    metadata: dict[str, Any] | None
    inner: Layout | None


def locate_root(layout: Layout, listing: Listing, step: int | None, item: str | None) -> Location:
    """Pick a step (the latest restorable one by default) and an item of a root of steps.

    A step folder either holds items (``default/``, ``state/``: ``CheckpointManager``,
    ``training.Checkpointer``) or is itself one checkpoint in any single-checkpoint layout
    of the registry (flax's ``save_checkpoint``, hand-written ``StandardCheckpointer`` loops).
    A step folder that is damaged, interrupted, empty or a link that leads nowhere is listed
    in ``Location.unrestorable`` with its reason and never hides the others.
    """
    root = listing.path
    found: dict[int, _Step] = {}
    bad: dict[int, tuple[AnyPath, Exception]] = {}
    unfinished = [n for n in listing.names if TMP_MARKER in n]
    names = sorted(step_candidates(listing) + _odd_entries(listing), key=_step_key)
    # Each step is a listing and a file or two: on a bucket they are read several at a time.
    for name, number, outcome in _storage.concurrently(root, lambda n: _try_step(root, n), names):
        if isinstance(outcome, _Step):
            found[number] = outcome
            bad.pop(number, None)
        elif isinstance(outcome, IncompleteCheckpointError):
            unfinished.append(name)  # like a tmp folder: never offered, named if asked for
            bad.setdefault(number, (root / name, outcome))
        elif outcome is not None and number not in found:
            bad[number] = (root / name, outcome)  # one bad step must not hide the good ones
    prefix = _root_prefix([found[n].info.path.name for n in found])
    for number in [n for n, st in found.items() if _prefix(st.info.path.name) != prefix]:
        del found[number]  # a stray checkpoint beside the steps ("notes_7"): not one of them
    for number in [n for n, (path, _) in bad.items() if _prefix(path.name) not in ("", prefix)]:
        del bad[number]
    for name in unfinished:
        tmp_number = step_number(name)
        if tmp_number is not None and tmp_number not in found and tmp_number not in bad:
            bad[tmp_number] = (
                root / name,
                IncompleteCheckpointError(
                    f"Checkpoint at {root / name} is incomplete: the save was interrupted or is "
                    "still running (Orbax tmp folder); pick another step."
                ),
            )
    order = sorted(found, reverse=True)
    if step is not None:
        order = [step] if step in found else []
    for number in order:
        chosen = found[number]
        try:
            location = _step_location(layout, root, chosen, item)
            if step is None:
                _check_tree_metadata(location)
        except (IncompleteCheckpointError, CorruptCheckpointError) as err:
            if step is not None:
                raise
            # Found damaged only now (a step folder whose own layout refuses it): the default
            # moves on to the next older step.
            del found[number]
            bad[number] = (chosen.info.path, err)
            continue
        return dataclasses.replace(
            location,
            steps=tuple(found[n].info for n in sorted(found)),
            unrestorable=_unrestorable(bad),
        )
    _no_step(root, tuple(found[n].info for n in sorted(found)), unfinished, bad, step)
    raise AssertionError("unreachable: _no_step raises")


# What writers call their step folders, preferred when two prefixes are equally common.
_USUAL_PREFIXES = ("", "checkpoint_", "step_", "ckpt_")


def _prefix(name: str) -> str:
    """``checkpoint_`` for ``checkpoint_400``; ``""`` for ``400`` or ``000400``."""
    return re.sub(r"\d+$", "", name.split(TMP_MARKER)[0].removesuffix("."))


def _root_prefix(names: list[str]) -> str | None:
    """The naming of a root's steps: the commonest prefix among them. One writer names every
    step of a root alike (Orbax's ``step_prefix``, flax's ``checkpoint_``)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[_prefix(name)] = counts.get(_prefix(name), 0) + 1
    if not counts:
        return None
    return max(
        counts,
        key=lambda p: (
            counts[p],
            p in _USUAL_PREFIXES,
            -_USUAL_PREFIXES.index(p) if p in _USUAL_PREFIXES else 0,
            p,
        ),
    )


def _step_key(name: str) -> tuple[int, str]:
    return step_number(name) or 0, name


def _odd_entries(listing: Listing) -> list[str]:
    """Entries with step names that are neither folders nor files: a symlink loop or a link
    to nothing, listed as not restorable (a bucket has no links)."""
    if _storage.is_bucket(listing.path):
        return []
    return [
        n
        for n in listing.files
        if TMP_MARKER not in n
        and step_number(n) is not None
        and not _storage.is_file(listing.path / n)
    ]


def _unrestorable(bad: Mapping[int, tuple[AnyPath, Exception]]) -> tuple[StepInfo, ...]:
    return tuple(
        StepInfo(step=n, path=path, items=(), metrics={}, reason=str(err))
        for n, (path, err) in sorted(bad.items())
    )


def _try_step(root: AnyPath, name: str) -> tuple[str, int, _Step | Exception | None]:
    """``(name, number, outcome)`` of one step folder: a :class:`_Step`, the error that keeps
    it from being offered, or None when it is not a step at all."""
    number = step_number(name)
    assert number is not None, "only step names are tried"
    path = root / name
    try:
        sub = _storage.listdir(path)
    except StorageError:
        raise  # the bucket did not answer: not a statement about this step
    except CheckpointError as err:  # a symlink loop, or a folder that cannot be listed
        return name, number, err
    if sub is None:
        if _storage.is_file(path):
            return name, number, None  # a file: another layout's (a msgpack checkpoint_<n>)
        return (
            name,
            number,
            CorruptCheckpointError(
                f"Checkpoint at {path} is damaged: it is a link that leads to no folder; remove "
                "it or pick another step."
            ),
        )
    # A prefixed name ("run_3") that holds no checkpoint is listed only when the root's steps
    # share its prefix: locate_root drops the others.
    if not sub.names:
        return (
            name,
            number,
            _Hollow(
                f"Checkpoint at {path} is damaged: the step folder is empty; pick another step or "
                "save it again."
            ),
        )
    try:
        metadata = step_metadata(sub)
    except (CorruptCheckpointError, RecursionError) as err:
        if isinstance(err, RecursionError):
            err = CorruptCheckpointError(
                f"Checkpoint at {path} is damaged: {STEP_METADATA} is nested too deeply; "
                "restore it from a copy or save it again."
            )
        return name, number, err
    inner = single_layout(sub)
    try:
        if inner is not None:
            check_finished(sub, metadata)
            info = StepInfo(step=number, path=path, items=(), metrics=read_metrics(sub, metadata))
            return name, number, _Step(info, sub, metadata, inner)
        info, metadata = read_step(sub, number, metadata)
    except (IncompleteCheckpointError, CorruptCheckpointError) as err:
        return name, number, err
    if not info.items:
        return (
            name,
            number,
            _Hollow(
                f"Checkpoint at {path} is damaged: the step folder holds no checkpoint (it holds "
                f"{_found(sub)}); pick another step or save it again."
            ),
        )
    return name, number, _Step(info, sub, metadata, None)


def _found(listing: Listing, limit: int = 4) -> str:
    names = sorted(listing.files) + sorted(d + "/" for d in listing.dirs)
    shown = ", ".join(clip(n, 40) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def single_layout(listing: Listing) -> Layout | None:
    """The registry's layout for a step folder that is itself one checkpoint, or None when the
    folder holds items (or nothing known).

    Every single-checkpoint layout of the registry is tried, so a layout added there (an
    older Orbax format, say) serves as a step folder too without a change here.
    """
    if not _pytree.is_pytree(listing.names) and items_of_quietly(listing):
        return None  # a CheckpointManager step: its items are read by read_step
    return _checkpoint_layout(listing)


def _checkpoint_layout(listing: Listing) -> Layout | None:
    """The first single-checkpoint layout of the registry that matches ``listing``."""
    # Imported here: the registry imports this module.
    from nnx_ckpt_widgets.layouts import LAYOUTS
    from nnx_ckpt_widgets.layouts.orbax_v1 import OrbaxV1Layout

    for candidate in LAYOUTS:
        if getattr(candidate, "holds_steps", False) or isinstance(candidate, OrbaxV1Layout):
            continue  # roots are not nested; a v1 step folder holds items
        if candidate.matches(listing):
            return candidate
    return None


def items_of_quietly(listing: Listing) -> bool:
    """Whether the folder names items (in ``_CHECKPOINT_METADATA``, or as subfolders that are
    checkpoints), without judging them: :func:`read_step` reports a missing one."""
    if STEP_METADATA in listing.files or V1_MARKER in listing.files:
        return True
    for name in sorted(listing.dirs - {METRICS_ITEM}):
        sub = _storage.listdir(listing.path / name)
        if sub is not None and (_pytree.is_pytree(sub.names) or _checkpoint_layout(sub)):
            return True
    return False


def _step_location(layout: Layout, root: AnyPath, chosen: _Step, item: str | None) -> Location:
    info = chosen.info
    if chosen.inner is None:
        location = pick_item(
            layout,
            root,
            layout.name,
            info.path,
            info.items,
            item,
            step=info.step,
            custom=custom_metadata(chosen.metadata),
        )
        if chosen.metadata is not None:
            return location
        # Older Orbax names no handlers: an item may be a checkpoint in another layout of the
        # registry (Orbax's format from before _METADATA), which then reads it.
        sub = _storage.listdir(location.data)
        inner = None if sub is None or _pytree.is_pytree(sub.names) else _checkpoint_layout(sub)
        if sub is None or inner is None:
            return location
        found = inner.locate(sub, None, None)
        return dataclasses.replace(
            found,
            path=root,
            kind=layout.name,
            step=info.step,
            item=location.item,
            items=location.items,
        )
    from nnx_ckpt_widgets.layouts import _unsafe

    location = chosen.inner.locate(chosen.listing, None, item)
    return dataclasses.replace(
        location,
        path=root,
        kind=f"root of step folders, each one {chosen.inner.name}",
        step=info.step,
        notes=(*location.notes, *_unsafe.ignored_notes(chosen.listing)),
    )


def _check_tree_metadata(location: Location) -> None:
    """Raise when the default step's PyTree metadata cannot be parsed, so that the default
    falls back to an older step instead of failing later in ``leaves``: one small file, read
    only for the step picked by default.

    Raises:
      CorruptCheckpointError: ``_METADATA`` is not JSON or has no ``tree_metadata`` mapping.
    """
    if not isinstance(location.layout, _pytree.PyTreeReads):
        return
    try:
        metadata = _storage.read_json(location.data / _pytree.PYTREE_METADATA, "tree metadata")
    except RecursionError as err:
        metadata = err
    except CorruptCheckpointError:
        if _pytree.before_metadata(location.data):
            return  # Orbax's layout from before _METADATA (0.2.x): its own reader checks it
        raise
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
        raise CorruptCheckpointError(
            f"Checkpoint at {location.data} is damaged: {_pytree.PYTREE_METADATA} has no "
            "tree_metadata mapping; restore it from a copy or save it again."
        )


def _no_step(
    root: AnyPath,
    steps: tuple[StepInfo, ...],
    unfinished: list[str],
    bad: Mapping[int, tuple[AnyPath, Exception]],
    step: int | None,
) -> None:
    """Raise the error for a root where ``step`` (or, with None, any step) cannot be read."""
    available = ", ".join(str(s.step) for s in steps) or "none"
    if step is None and not unfinished and all(isinstance(e, _Hollow) for _, e in bad.values()):
        raise UnknownLayoutError(
            f"No checkpoint layout recognised at {root}: its step-like folders hold no "
            "checkpoint; pass a checkpoint folder or a root of step folders."
        )
    if step is None:
        damaged = {
            n: err for n, (_, err) in bad.items() if not isinstance(err, IncompleteCheckpointError)
        }
        # Real damage names the step to repair before a folder that merely holds no checkpoint.
        real = {n: err for n, err in damaged.items() if not isinstance(err, _Hollow)}
        if real or damaged:
            raise (real or damaged)[max(real or damaged)]
        raise IncompleteCheckpointError(
            f"Checkpoint root {root} has no finished step: every save was interrupted; save again."
        )
    tmp = [name for name in unfinished if step_number(name) == step]
    if tmp:
        raise IncompleteCheckpointError(
            f"Checkpoint at {root / tmp[0]} is incomplete: the save of step {step} was "
            f"interrupted; pick another step (restorable: {available})."
        )
    if step in bad:
        raise bad[step][1]
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
