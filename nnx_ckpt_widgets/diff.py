"""``diff``: how two checkpoints, or two steps of one run, differ array by array.

For each array both hold with one shape and dtype: ``||a - b|| / ||a||``, the largest absolute
difference, whether the two are bit for bit the same, and whether NaN or Inf appeared. Arrays
on one side only, or changed in shape or dtype, are listed as :func:`nnx_ckpt_widgets.compare`
lists a model's keys. Both sides are read in lockstep, in bounded batches, as many at once as
``max_memory`` allows, so memory stays within it; nothing is written anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets._text import clip, plural, shape_text, table, where
from nnx_ckpt_widgets._values import (
    ArrayDiff,
    MemoryArg,
    ProgressArg,
    array_diff,
    call_progress,
    iter_arrays,
    plan_reads,
    progress_callback,
    select_leaves,
)
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect
from nnx_ckpt_widgets.stats import fold_entries, number

__all__ = ["LARGE_CHANGE", "ArrayDiff", "DiffEntry", "DiffReport", "diff", "diff_infos"]

# A relative change ||a - b|| / ||a|| over this is flagged (red in HTML, named in the summary):
# a training step moves weights by a small fraction of their norm, a blow-up by orders of
# magnitude (notebook 11's learning-rate spike: 1e13). An array that starts at zeros has an
# infinite relative change and is not flagged: there is no size to compare with.
LARGE_CHANGE = 100.0

DiffStatus = Literal["compared", "only in a", "only in b", "shape mismatch", "dtype mismatch"]
_ORDER: tuple[DiffStatus, ...] = (
    "shape mismatch",
    "dtype mismatch",
    "only in a",
    "only in b",
    "compared",
)


@dataclasses.dataclass(frozen=True)
class DiffEntry:
    """One key of either side.

    Attributes:
      key: ``layers/0/kernel``.
      status: ``compared``, ``only in a``, ``only in b``, ``shape mismatch`` or
        ``dtype mismatch``.
      a, b: the array on each side, where it exists.
      diff: for a compared key, how the values differ.
    """

    key: str
    status: DiffStatus
    a: LeafInfo | None = None
    b: LeafInfo | None = None
    diff: ArrayDiff | None = None

    @property
    def detail(self) -> str:
        a, b = self.a, self.b
        if self.status == "only in a" and a is not None:
            return f"{shape_text(a.shape)} {a.dtype}"
        if self.status == "only in b" and b is not None:
            return f"{shape_text(b.shape)} {b.dtype}"
        if self.status == "shape mismatch" and a is not None and b is not None:
            return f"a {shape_text(a.shape)} vs b {shape_text(b.shape)}"
        if self.status == "dtype mismatch" and a is not None and b is not None:
            return f"a {a.dtype} vs b {b.dtype}"
        d = self.diff
        if d is None:
            return ""
        return f"{shape_text(d.shape)} {d.dtype}"


@dataclasses.dataclass(frozen=True)
class DiffReport:
    """Every key of two checkpoints, one :class:`DiffEntry` each, in ``a``'s saved order and
    then ``b``'s new keys.

    ``str()`` is a table with repeated layers folded and a one-line summary on top
    (:meth:`summary`); ``_repr_html_`` is the same, escaped.
    """

    a: str
    b: str
    entries: tuple[DiffEntry, ...]
    select: str | None = None

    def _keys(self, status: DiffStatus) -> list[str]:
        return [e.key for e in self.entries if e.status == status]

    @property
    def compared(self) -> list[DiffEntry]:
        return [e for e in self.entries if e.diff is not None]

    @property
    def unchanged(self) -> list[str]:
        """Keys whose arrays are bit for bit the same."""
        return [e.key for e in self.compared if e.diff is not None and e.diff.identical]

    @property
    def changed(self) -> list[str]:
        return [e.key for e in self.compared if e.diff is not None and not e.diff.identical]

    @property
    def nan_appeared(self) -> list[str]:
        """Keys where ``b`` holds NaN and ``a`` held none, in saved order."""
        return [e.key for e in self.compared if e.diff is not None and e.diff.nan_appeared]

    @property
    def inf_appeared(self) -> list[str]:
        return [e.key for e in self.compared if e.diff is not None and e.diff.inf_appeared]

    @property
    def nonfinite_b(self) -> list[str]:
        """Keys where ``b`` holds NaN or Inf (appeared or not)."""
        return [
            e.key for e in self.compared if e.diff is not None and (e.diff.nan_b or e.diff.inf_b)
        ]

    @property
    def largest_change(self) -> ArrayDiff | None:
        """The changed array whose finite relative change is the largest, if any."""
        finite = [
            e.diff
            for e in self.compared
            if e.diff is not None
            and not e.diff.identical
            and e.diff.rel_change is not None
            and math.isfinite(e.diff.rel_change)
        ]
        return max(finite, key=lambda d: d.rel_change or 0.0, default=None)

    @property
    def relative_change(self) -> float | None:
        """``||b - a|| / ||a||`` over every array compared, pooled as one vector (PRNG keys
        aside): how far the whole checkpoint moved. None when nothing was compared, or when a
        side holds NaN or Inf."""
        diffs = [e.diff for e in self.compared if e.diff is not None]
        if not diffs or any(d.nan_a or d.nan_b or d.inf_a or d.inf_b for d in diffs):
            return None
        # Pooled sums of squares, not a merge of the ratios: an array that starts at zeros
        # (a bias) has an infinite ratio of its own but adds only its move to the whole.
        aa = dd = 0.0
        for d in diffs:
            if not d.identical and d.norm_a is not None and d.norm_diff is not None:
                aa += d.norm_a**2
                dd += d.norm_diff**2
        if dd == 0.0:
            return 0.0
        return math.sqrt(dd / aa) if aa else math.inf

    @property
    def large_changes(self) -> list[str]:
        """Keys whose relative change ``||a - b|| / ||a||`` is finite and over
        :data:`LARGE_CHANGE`: the array moved by more than a hundred times its own size."""
        return [
            e.key
            for e in self.compared
            if e.diff is not None
            and e.diff.rel_change is not None
            and math.isfinite(e.diff.rel_change)
            and e.diff.rel_change > LARGE_CHANGE
        ]

    @property
    def ok(self) -> bool:
        """No NaN or Inf in ``b`` and no relative change over :data:`LARGE_CHANGE`: what the
        browser colours as fine rather than as a warning."""
        return not self.nonfinite_b and not self.large_changes

    @property
    def only_in_a(self) -> list[str]:
        return self._keys("only in a")

    @property
    def only_in_b(self) -> list[str]:
        return self._keys("only in b")

    @property
    def shape_mismatched(self) -> list[str]:
        return self._keys("shape mismatch")

    @property
    def dtype_mismatched(self) -> list[str]:
        return self._keys("dtype mismatch")

    @property
    def identical(self) -> bool:
        """Every key on both sides, every array bit for bit the same."""
        return bool(self.entries) and all(
            e.diff is not None and e.diff.identical for e in self.entries
        )

    def summary(self) -> str:
        """What matters, in one line: ``NaN appeared in 2 of 48 arrays: layers/{17..18}/kernel;
        3 of 48 arrays unchanged: layers/{0..2}/kernel (frozen?)``.

        Arrays are named in saved order: a diff of two steps cannot tell which array went bad
        first between them (:func:`nnx_ckpt_widgets.check_steps` finds the first step).
        """
        compared = self.compared
        sides = [
            f"{len(keys)} {label}"
            for label, keys in (
                ("only in a", self.only_in_a),
                ("only in b", self.only_in_b),
                ("changed shape", self.shape_mismatched),
                ("changed dtype", self.dtype_mismatched),
            )
            if keys
        ]
        if not compared:
            if not self.entries:
                return "Both sides are empty: nothing to compare."
            return "Nothing in common: " + ", ".join(sides) + "; no array could be compared."
        parts = []
        n = len(compared)
        for label, keys in (("NaN", self.nan_appeared), ("Inf", self.inf_appeared)):
            if keys:
                named = clip(keys[0], 60) if len(keys) == 1 else _keypaths.preview(keys)
                count = "" if len(keys) == 1 else f"{len(keys)} of {plural(n, 'array')}: "
                parts.append(f"{label} appeared in {count}{named}")
        unchanged = self.unchanged
        the = "the array compared" if n == 1 else f"all {n:,} arrays compared"
        if len(unchanged) == n:
            parts.append(f"{the} {'is' if n == 1 else 'are'} bit-identical")
        elif unchanged:
            parts.append(
                f"{len(unchanged)} of {n} arrays unchanged: "
                f"{_keypaths.preview(unchanged)} (frozen?)"
            )
        else:
            parts.append(f"{the} changed")
        top = self.largest_change
        if top is not None and top.rel_change is not None:
            text = f"largest relative change {number(top.rel_change, 3)} ({clip(top.key, 60)})"
            if top.rel_change > LARGE_CHANGE:
                text += f", over {LARGE_CHANGE:g}: the weights blew up"
            parts.append(text)
        if sides:
            parts.append(", ".join(sides))
        return "; ".join(parts) + "."

    def groups(self) -> list[tuple[str, list[DiffEntry]]]:
        rows = []
        for status in _ORDER:
            chosen = [e for e in self.entries if e.status == status]
            rows.extend(fold_entries(chosen, _signature))
        return rows

    def rows(self, digits: int = 3) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = [
            ("status", "key", "detail", "rel change", "max abs diff", "note")
        ]
        for pattern, group in self.groups():
            first = group[0]
            count = f"{len(group)} × " if len(group) > 1 else ""
            if first.diff is None:
                rows.append((first.status, clip(pattern), count + first.detail, "", "", ""))
                continue
            diffs = [e.diff for e in group if e.diff is not None]
            rel, max_abs = _merged_change(diffs)
            note = _note(group)
            status = "unchanged" if first.diff.identical else "changed"
            rows.append(
                (
                    status,
                    clip(pattern),
                    count + first.detail,
                    number(rel, digits) if not first.diff.identical else "0",
                    number(max_abs, digits) if not first.diff.identical else "0",
                    note,
                )
            )
        return rows

    def text(self, digits: int = 3) -> str:
        lines = [f"Diff of {self.a}", f"   and {self.b}", self.summary()]
        if self.select is not None:
            lines.append(f"select: {clip(self.select, 80)}")
        if self.entries:
            lines.append("")
            lines.extend(table(self.rows(digits), right=(3, 4)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return diff_html(self)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the CLI's ``--json``); NaN and Inf figures become None."""

        def leaf(info: LeafInfo | None) -> dict[str, Any] | None:
            if info is None:
                return None
            return {"shape": list(info.shape), "dtype": info.dtype}

        def clean(d: ArrayDiff | None) -> dict[str, Any] | None:
            if d is None:
                return None
            return {
                k: None if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in d.as_dict().items()
            }

        return {
            "a": self.a,
            "b": self.b,
            "select": self.select,
            "summary": self.summary(),
            "identical": self.identical,
            "unchanged": self.unchanged,
            "changed": self.changed,
            "nan_appeared": self.nan_appeared,
            "inf_appeared": self.inf_appeared,
            "nonfinite_b": self.nonfinite_b,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "shape_mismatched": self.shape_mismatched,
            "dtype_mismatched": self.dtype_mismatched,
            "entries": [
                {
                    "key": e.key,
                    "status": e.status,
                    "a": leaf(e.a),
                    "b": leaf(e.b),
                    "diff": clean(e.diff),
                }
                for e in self.entries
            ],
        }


def _signature(entry: DiffEntry) -> tuple:
    d = entry.diff
    if d is None:
        return (entry.detail,)
    return (d.shape, d.dtype, d.identical, d.nan_b > 0, d.inf_b > 0, d.nan_a > 0, d.inf_a > 0)


def _merged_change(diffs: Sequence[ArrayDiff]) -> tuple[float | None, float | None]:
    """``||a - b|| / ||a||`` and the max abs difference over a folded group."""
    if any(d.rel_change is None for d in diffs):
        return None, None
    if len(diffs) == 1:
        return diffs[0].rel_change, diffs[0].max_abs
    if any(d.norm_a is None or d.norm_diff is None for d in diffs):
        return math.nan, math.nan
    aa = sum((d.norm_a or 0.0) ** 2 for d in diffs)
    dd = sum((d.norm_diff or 0.0) ** 2 for d in diffs)
    if any(not math.isfinite(d.rel_change or 0.0) for d in diffs):
        rel = math.nan
    else:
        rel = math.sqrt(dd / aa) if aa else (math.inf if dd else 0.0)
    max_abs = max((d.max_abs or 0.0) for d in diffs)
    return rel, max_abs


def _note(group: Sequence[DiffEntry]) -> str:
    d = group[0].diff
    assert d is not None
    notes = []
    if d.nan_b:
        notes.append("NaN in both" if d.nan_a else "NaN appeared")
    elif d.nan_a:
        notes.append("NaN gone")
    if d.inf_b:
        notes.append("Inf in both" if d.inf_a else "Inf appeared")
    elif d.inf_a:
        notes.append("Inf gone")
    bad = sum(e.diff.nan_b + e.diff.inf_b for e in group if e.diff is not None)
    if bad:
        notes.append(f"{bad:,} non-finite in b")
    rel = [e.diff.rel_change for e in group if e.diff is not None and e.diff.rel_change]
    if any(math.isfinite(r) and r > LARGE_CHANGE for r in rel):
        notes.append(f"change over {LARGE_CHANGE:g}")
    return ", ".join(notes)


def diff(
    a: str | os.PathLike,
    b: str | os.PathLike | None = None,
    *,
    steps: tuple[int | None, int | None] | None = None,
    item: str | tuple[str | None, str | None] | None = None,
    select: str | None = None,
    progress: ProgressArg = None,
    max_memory: MemoryArg = None,
) -> DiffReport:
    """Compare the values of two checkpoints, or of two steps of one root, array by array.

    Args:
      a: a checkpoint, or a root of steps (``CheckpointManager``, ``training.Checkpointer``).
      b: the other checkpoint; leave it out to compare two steps of ``a``.
      steps: ``(step_a, step_b)``: with ``b`` left out, two steps of the root ``a``
        (``diff(root, steps=(100, 200))``); with ``b``, the step of each side (None: latest).
      item: the item (checkpointable) to read on both sides, when they hold several; or a
        pair ``(item_a, item_b)``, e.g. ``(None, "model")`` to compare a plain checkpoint
        with the ``model`` item of a training run's step.
      select: a regex searched in each key: only the arrays it matches are read.
      progress: as for :func:`nnx_ckpt_widgets.stats`.
      max_memory: as for :func:`nnx_ckpt_widgets.stats`, shared by the two sides: each gets
        half.

    Returns:
      A :class:`DiffReport`; ``str()`` of it starts with a one-line summary.

    Raises:
      InvalidArgumentError: neither ``b`` nor ``steps`` is given, ``steps`` or a tuple ``item``
        is not a pair, ``select`` is not a valid regex, or ``max_memory`` is not a size or is
        too small for the largest array.
      CheckpointError: a checkpoint cannot be found or read.
    """
    if steps is not None and (not isinstance(steps, (tuple, list)) or len(steps) != 2):
        raise InvalidArgumentError(
            f"steps must be a pair (step_a, step_b) such as (100, 200), got {steps!r}."
        )
    if b is None and steps is None:
        raise InvalidArgumentError(
            f"diff({str(a)!r}) needs a second side: pass another checkpoint, diff(a, b), or two "
            "steps of a root, diff(root, steps=(100, 200))."
        )
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise InvalidArgumentError(
                f"item must be a name or a pair (item_a, item_b) such as (None, 'model'), got "
                f"{item!r}."
            )
        item_a, item_b = item
    else:
        item_a = item_b = item
    step_a, step_b = steps if steps is not None else (None, None)
    info_a = inspect(a, step=step_a, item=item_a)
    info_b = inspect(b if b is not None else a, step=step_b, item=item_b)
    return diff_infos(info_a, info_b, select=select, progress=progress, max_memory=max_memory)


def diff_infos(
    info_a: CheckpointInfo,
    info_b: CheckpointInfo,
    *,
    select: str | None = None,
    keys: Sequence[str] | None = None,
    progress: ProgressArg = None,
    max_memory: MemoryArg = None,
) -> DiffReport:
    """The diff of two inspected checkpoints (what :func:`diff` and the browser call).

    Args:
      keys: only these keys (the browser's selected subtree); ``select`` applies after.
      select, progress, max_memory: as for :func:`diff`.
    """
    where_a = where(info_a.path, info_a.step, info_a.item)
    where_b = where(info_b.path, info_b.step, info_b.item)
    leaves_a = list(info_a.leaves.values())
    leaves_b = list(info_b.leaves.values())
    if keys is not None:
        wanted = set(keys)
        leaves_a = [leaf for leaf in leaves_a if leaf.name in wanted]
        leaves_b = [leaf for leaf in leaves_b if leaf.name in wanted]
    if select is not None:
        # Validate the pattern once; matching nothing on one side is a diff, not an error.
        select_leaves([], select, where_a)
        import re

        pattern = re.compile(select)
        leaves_a = [leaf for leaf in leaves_a if pattern.search(leaf.name)]
        leaves_b = [leaf for leaf in leaves_b if pattern.search(leaf.name)]
    by_b = {leaf.name: leaf for leaf in leaves_b}
    names_a = {leaf.name for leaf in leaves_a}
    plan: list[DiffEntry] = []
    pairs: list[tuple[LeafInfo, LeafInfo]] = []
    for leaf in leaves_a:
        other = by_b.get(leaf.name)
        if other is None:
            plan.append(DiffEntry(leaf.name, "only in a", a=leaf))
        elif other.shape != leaf.shape:
            plan.append(DiffEntry(leaf.name, "shape mismatch", a=leaf, b=other))
        elif other.dtype != leaf.dtype:
            plan.append(DiffEntry(leaf.name, "dtype mismatch", a=leaf, b=other))
        else:
            plan.append(DiffEntry(leaf.name, "compared", a=leaf, b=other))
            pairs.append((leaf, other))
    plan.extend(
        DiffEntry(leaf.name, "only in b", b=leaf) for leaf in leaves_b if leaf.name not in names_a
    )
    results = dict(_compare(info_a, info_b, pairs, progress, max_memory))
    entries = tuple(
        dataclasses.replace(e, diff=results[e.key]) if e.status == "compared" else e for e in plan
    )
    return DiffReport(a=where_a, b=where_b, entries=entries, select=select)


def _compare(
    info_a: CheckpointInfo,
    info_b: CheckpointInfo,
    pairs: list[tuple[LeafInfo, LeafInfo]],
    progress: ProgressArg,
    max_memory: MemoryArg = None,
) -> Iterator[tuple[str, ArrayDiff]]:
    if not pairs:
        return
    loc_a, loc_b = info_a.location, info_b.location
    if loc_a is None or loc_b is None:
        raise InvalidArgumentError("diff_infos needs CheckpointInfo made by inspect().")
    where_a = where(info_a.path, info_a.step, info_a.item)
    where_b = where(info_b.path, info_b.step, info_b.item)
    # Paired arrays have one shape and dtype, so one plan fits both sides: the one that
    # holds more per read (a side whose layout streams its arrays holds less).
    sides = ((0, where_a, loc_a), (1, where_b, loc_b))
    plan = min(
        (
            plan_reads(
                [pair[n] for pair in pairs], max_memory, what="diff", where=w, sides=2, location=loc
            )
            for n, w, loc in sides
        ),
        key=lambda p: (p.reads_in_flight, -p.hold),
    )
    callback, close = progress_callback(progress, "diff")
    done = {"a": (0, 0), "b": (0, 0)}

    def side(name: str):
        if callback is None:
            return None

        def report(n: int, total: int, reads_in_flight: int = 1) -> None:
            done[name] = (n, total)
            both = (done["a"][0] + done["b"][0], done["a"][1] + done["b"][1])
            call_progress(callback, *both, 2 * reads_in_flight)

        return report

    try:
        arrays_a = iter_arrays(
            loc_a, [a for a, _ in pairs], progress=side("a"), where=where_a, plan=plan
        )
        arrays_b = iter_arrays(
            loc_b, [b for _, b in pairs], progress=side("b"), where=where_b, plan=plan
        )
        for (leaf, va), (_, vb) in zip(arrays_a, arrays_b, strict=True):
            yield leaf.name, array_diff(leaf.name, va, vb, keys=leaf.key_impl is not None)
            del va, vb
    finally:
        close()


def diff_html(report: DiffReport, digits: int = 3) -> str:
    """The diff as an escaped HTML table."""
    from nnx_ckpt_widgets.render import BOX_STYLE, esc, values_table_html

    table = values_table_html(
        report.rows(digits),
        lambda row: (
            "appeared" in row[5]
            or "change over" in row[5]
            or row[0] in ("shape mismatch", "dtype mismatch")
        ),
        align="left",
    )
    select = f"<br>select: {esc(report.select)}" if report.select is not None else ""
    return (
        f'<div class="nnx-ckpt-diff" style="{BOX_STYLE}">'
        f"<b>Diff of {esc(report.a)}</b><br><b>and {esc(report.b)}</b><br>"
        f"{esc(report.summary())}{select}"
        f"{table}</div>"
    )
