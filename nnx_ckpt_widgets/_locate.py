"""Find the pytree directory behind what the user passed: a checkpoint, a step or a manager root.

Only directory listings and small JSON files are read here. A ``CheckpointManager`` root holds
one folder per step (``0/``, ``1/``, ...), each with one folder per item (``default/``, or
``model/`` and ``optimizer/`` for a ``Composite``) and, when metrics were given, a ``metrics``
item written by Orbax's JSON handler. A save that was interrupted leaves a folder whose name
contains ``.orbax-checkpoint-tmp`` (or, on file systems without atomic rename, a step folder
with no commit marker); it is never offered as a step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnx_ckpt_widgets.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    ItemSelectionError,
)

TMP_MARKER = ".orbax-checkpoint-tmp"
PYTREE_METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
COMMIT_MARKER = "commit_success.txt"
METRICS_ITEM = "metrics"
# A step folder is "<step>", "<prefix>_<step>" (CheckpointManagerOptions.step_prefix) or
# zero-padded (step_format_fixed_length): Orbax's own step-name pattern.
_STEP_NAME = re.compile(r"^(?:.+_)?(\d+)$")
_ORBAX_FILES = (PYTREE_METADATA, STEP_METADATA, "manifest.ocdbt", "_sharding", COMMIT_MARKER)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One restorable step of a ``CheckpointManager`` root.

    Attributes:
      step: the step number.
      path: the step's folder.
      items: names of the pytree items saved at this step, sorted.
      metrics: the metrics the manager kept for this step (numbers and strings only).
    """

    step: int
    path: Path
    items: tuple[str, ...]
    metrics: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a pytree lives, and how it was reached.

    Attributes:
      path: what the user passed.
      item_dir: the folder holding the pytree's ``_METADATA``.
      step: the chosen step, when ``path`` is a manager root or a step folder.
      item: the chosen item, when the step holds named items.
      steps: the restorable steps of a manager root, ascending; empty otherwise.
      items: the items of the chosen step; empty for a plain checkpoint.
    """

    path: Path
    item_dir: Path
    step: int | None = None
    item: str | None = None
    steps: tuple[StepInfo, ...] = ()
    items: tuple[str, ...] = ()

    @property
    def latest_step(self) -> int | None:
        return self.steps[-1].step if self.steps else None


def locate(
    path: str | os.PathLike, *, step: int | None = None, item: str | None = None
) -> Location:
    """Resolve ``path`` (plus ``step`` and ``item``) to the folder of one pytree.

    Args:
      path: a checkpoint folder written by ``StandardCheckpointer``, a ``CheckpointManager``
        root, or one step folder of such a root.
      step: the step to pick under a manager root; the latest restorable one by default.
      item: the item to pick when a step holds several.

    Returns:
      The resolved :class:`Location`.

    Raises:
      CheckpointNotFoundError: nothing restorable is at ``path``.
      IncompleteCheckpointError: the save at ``path`` (or of ``step``) was interrupted.
      CorruptCheckpointError: Orbax files are there but damaged.
      ItemSelectionError: the step holds several items and ``item`` does not pick one.
      InvalidArgumentError: ``step`` was given for a single checkpoint.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointNotFoundError(
            f"No checkpoint at {root}: the path does not exist; check the spelling or the "
            "working directory."
        )
    if not root.is_dir():
        raise CheckpointNotFoundError(
            f"No checkpoint at {root}: it is a file, not a folder; pass the folder that Orbax "
            "wrote."
        )
    if TMP_MARKER in root.name:
        raise IncompleteCheckpointError(
            f"Checkpoint at {root} is incomplete: the save was interrupted (Orbax tmp folder); "
            "save it again or pick a finished checkpoint."
        )
    if (root / PYTREE_METADATA).exists():
        if step is not None:
            raise InvalidArgumentError(
                f"Checkpoint at {root} is a single checkpoint, not a CheckpointManager root; "
                "drop step= or pass the manager's root folder."
            )
        _check_committed(root)
        return Location(path=root, item_dir=root)
    entries = _listdir(root)
    if _is_step_dir(root, entries):
        return _pick_item(root, root, _read_step(root, _step_number(root.name)), (), item)
    step_names = [e for e in entries if _is_step_name(root / e)]
    tmp_names = [e for e in entries if TMP_MARKER in e]
    if step_names or tmp_names:
        steps, unfinished = [], list(tmp_names)
        damaged: dict[int, CorruptCheckpointError] = {}
        for name in sorted(step_names, key=_step_number):
            try:
                steps.append(_read_step(root / name, _step_number(name)))
            except IncompleteCheckpointError:
                unfinished.append(name)  # like a tmp folder: never offered, named if asked for
            except CorruptCheckpointError as err:
                damaged[_step_number(name)] = err  # one bad step must not hide the good ones
        return _pick_step(root, tuple(steps), unfinished, damaged, step, item)
    if any(name in entries for name in _ORBAX_FILES) or "d" in entries:
        raise CorruptCheckpointError(
            f"Checkpoint at {root} is damaged: its {PYTREE_METADATA} file is missing; restore "
            "it from a copy or save it again."
        )
    if not entries:
        raise CheckpointNotFoundError(
            f"No checkpoint at {root}: the folder is empty; save a checkpoint there first."
        )
    raise CheckpointNotFoundError(
        f"No checkpoint at {root}: the folder holds no Orbax checkpoint or step folders; pass "
        "the folder that StandardCheckpointer or CheckpointManager wrote."
    )


def _listdir(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError as err:
        raise CheckpointNotFoundError(
            f"Cannot list checkpoint folder {folder}: {err.strerror}; check its permissions."
        ) from err


def _is_step_dir(folder: Path, entries: list[str]) -> bool:
    return _step_number(folder.name) is not None and STEP_METADATA in entries


def _step_number(name: str) -> int | None:
    """``12`` for a step folder (or its tmp folder) named ``12``, ``ckpt_12`` or ``000012``."""
    match = _STEP_NAME.match(name.split(TMP_MARKER)[0].removesuffix("."))
    return int(match.group(1)) if match else None


def _is_step_name(folder: Path) -> bool:
    if TMP_MARKER in folder.name or _step_number(folder.name) is None or not folder.is_dir():
        return False
    if folder.name.isdigit():
        return True
    # A prefixed name such as "run_3" may be anything: count it only if it looks like a step.
    return (folder / STEP_METADATA).exists() and not (folder / PYTREE_METADATA).exists()


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"Checkpoint at {file.parent} is damaged: {file.name} ({what}) is not valid JSON; "
            "restore it from a copy or save it again."
        ) from err


def _check_committed(folder: Path) -> None:
    """Raise unless the save that wrote ``folder`` finished."""
    metadata_file = folder / STEP_METADATA
    if metadata_file.exists():
        metadata = _read_json(metadata_file, "step metadata")
        if not isinstance(metadata, dict):
            raise CorruptCheckpointError(
                f"Checkpoint at {folder} is damaged: {STEP_METADATA} is not a JSON object; "
                "restore it from a copy or save it again."
            )
        if metadata.get("commit_timestamp_nsecs") or (folder / COMMIT_MARKER).exists():
            return
        raise IncompleteCheckpointError(
            f"Checkpoint at {folder} is incomplete: the save was interrupted (no commit "
            "marker); save it again or pick another checkpoint."
        )


def _read_step(folder: Path, number: int) -> StepInfo:
    _check_committed(folder)
    entries = _listdir(folder)
    items = tuple(e for e in entries if (folder / e / PYTREE_METADATA).exists())
    metrics: Mapping[str, Any] = {}
    metrics_file = folder / METRICS_ITEM / METRICS_ITEM
    if metrics_file.exists():
        try:
            raw = _read_json(metrics_file, "step metrics")
        except CorruptCheckpointError:
            raw = None  # metrics only label the step; its arrays may be fine, so still offer it
        if isinstance(raw, dict):
            metrics = {str(k): v for k, v in raw.items() if _is_plain(v)}
    return StepInfo(step=number, path=folder, items=items, metrics=metrics)


def _is_plain(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    if isinstance(value, (int, str)):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _pick_step(
    root: Path,
    steps: tuple[StepInfo, ...],
    tmp_names: list[str],
    damaged: Mapping[int, CorruptCheckpointError],
    step: int | None,
    item: str | None,
) -> Location:
    available = ", ".join(str(s.step) for s in steps) or "none"
    if step is None:
        if not steps:
            if damaged:
                raise damaged[max(damaged)]
            raise IncompleteCheckpointError(
                f"Checkpoint manager at {root} has no finished step: every save was "
                "interrupted; save again."
            )
        chosen = steps[-1]
    else:
        matches = [s for s in steps if s.step == step]
        if not matches:
            if step in damaged:
                raise damaged[step]
            if any(_step_number(name) == step for name in tmp_names):
                raise IncompleteCheckpointError(
                    f"Checkpoint at {root / str(step)} is incomplete: the save of step {step} "
                    f"was interrupted; pick another step (restorable: {available})."
                )
            raise CheckpointNotFoundError(
                f"Checkpoint manager at {root} has no step {step}; pick one of: {available}."
            )
        chosen = matches[0]
    return _pick_item(root, chosen.path, chosen, steps, item)


def _pick_item(
    root: Path, step_dir: Path, chosen: StepInfo, steps: tuple[StepInfo, ...], item: str | None
) -> Location:
    items = chosen.items
    if not items:
        raise CorruptCheckpointError(
            f"Checkpoint at {step_dir} is damaged: the step holds no item with a "
            f"{PYTREE_METADATA} file; pick another step or save it again."
        )
    if item is None:
        if len(items) > 1:
            raise ItemSelectionError(
                f"Checkpoint at {step_dir} holds several items ({', '.join(items)}); pick one "
                "with item=..."
            )
        item = items[0]
    elif item not in items:
        raise ItemSelectionError(
            f"Checkpoint at {step_dir} has no item {item!r}; pick one of: {', '.join(items)}."
        )
    return Location(
        path=root,
        item_dir=step_dir / item,
        step=chosen.step,
        item=item,
        steps=steps or (chosen,),
        items=items,
    )
