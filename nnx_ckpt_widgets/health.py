"""``check_steps``: walk the steps of a training run and find where it went bad.

For each saved step: which arrays hold NaN or Inf, and how far the weights moved since the
step before (``||b - a|| / ||a||`` over every array that changed). A step is good when its
arrays are all finite and its move is in line with the moves before it; the report names the
first step that is not, and the last good step before it: the one to resume from. Each pair of
neighbouring steps is read as :func:`nnx_ckpt_widgets.diff` reads it, a bounded batch at a
time; nothing is written anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Iterator
from typing import Any

from nnx_ckpt_widgets._text import clip, plural, table
from nnx_ckpt_widgets._values import ProgressArg, select_leaves
from nnx_ckpt_widgets.diff import diff_infos
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.metadata import inspect
from nnx_ckpt_widgets.stats import info_where, number, stats_of, which_arrays

__all__ = ["StepHealth", "StepsReport", "check_steps"]

# A step whose move is more than this many times the median move of the good steps before it
# is out of line. Healthy training moves a little less each time; a learning-rate spike moves
# the weights by orders of magnitude more (notebook 11: 1e13 against 0.05).
DEFAULT_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class StepHealth:
    """One step of a run.

    Attributes:
      step: the step number.
      arrays: how many arrays were read.
      with_nan, with_inf: keys of the arrays holding NaN / ±Inf, in saved order.
      change: ``||b - a|| / ||a||`` from the step before, over the arrays that changed (float
        arrays of one shape and dtype on both steps); None for the first step, or when either
        step holds NaN or Inf.
      baseline: the median change of the good steps before this one (None when there are none).
      in_line: the change is at most ``factor`` times ``baseline`` (True when there is no
        baseline to hold it to).
    """

    step: int
    arrays: int
    with_nan: tuple[str, ...] = ()
    with_inf: tuple[str, ...] = ()
    change: float | None = None
    baseline: float | None = None
    in_line: bool = True

    @property
    def finite(self) -> bool:
        return not self.with_nan and not self.with_inf

    @property
    def good(self) -> bool:
        """All arrays finite and the move in line with the steps before."""
        return self.finite and self.in_line

    def verdict(self) -> str:
        """``ok``, ``NaN in all 4 arrays``, ``moved 2e+14 × the median before``."""
        parts = []
        for label, keys in (("NaN", self.with_nan), ("Inf", self.with_inf)):
            if keys:
                parts.append(f"{label} in {which_arrays(keys, self.arrays)}")
        if not self.in_line and self.change is not None and self.baseline:
            parts.append(f"moved {number(self.change / self.baseline, 2)} × the median before")
        return "; ".join(parts) or "ok"


@dataclasses.dataclass(frozen=True)
class StepsReport:
    """Every step of a run, one :class:`StepHealth` each, in step order.

    ``first_nan`` is the earliest step holding NaN: first in time. Within one step nothing
    says which array went bad first, so its arrays are listed in saved order.
    """

    path: str
    steps: tuple[StepHealth, ...]
    item: str | None = None
    select: str | None = None
    factor: float = DEFAULT_FACTOR

    def __iter__(self) -> Iterator[StepHealth]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, step: int) -> StepHealth:
        for entry in self.steps:
            if entry.step == step:
                return entry
        raise KeyError(step)

    @property
    def first_nan(self) -> int | None:
        """The earliest step whose arrays hold NaN."""
        return next((s.step for s in self.steps if s.with_nan), None)

    @property
    def first_inf(self) -> int | None:
        return next((s.step for s in self.steps if s.with_inf), None)

    @property
    def first_bad(self) -> int | None:
        """The earliest step that is not good: NaN or Inf, or a move out of line."""
        return next((s.step for s in self.steps if not s.good), None)

    @property
    def last_good(self) -> int | None:
        """The latest good step before :attr:`first_bad` (the latest step when all are good):
        the step to resume from. None when even the first step is bad."""
        good = None
        for entry in self.steps:
            if not entry.good:
                break
            good = entry.step
        return good

    def summary(self) -> str:
        """One line: the last good step, the first bad one and why, and the first NaN."""
        n = plural(len(self.steps), "step")
        if self.first_bad is None:
            return f"{n}: all finite, every move in line; last good step {self.last_good}."
        bad = self[self.first_bad]
        parts = [f"{n}: last good step {self.last_good}" if self.last_good is not None else n]
        parts.append(f"first bad step {bad.step} ({bad.verdict()})")
        if self.first_nan is not None and self.first_nan != bad.step:
            parts.append(f"first NaN at step {self.first_nan}")
        return "; ".join(parts) + "."

    def rows(self, digits: int = 3) -> list[tuple[str, ...]]:
        rows: list[tuple[str, ...]] = [("step", "NaN", "Inf", "change", "median before", "")]
        for s in self.steps:
            rows.append(
                (
                    str(s.step),
                    str(len(s.with_nan)),
                    str(len(s.with_inf)),
                    "-" if s.change is None else number(s.change, digits),
                    "-" if s.baseline is None else number(s.baseline, digits),
                    s.verdict(),
                )
            )
        return rows

    def text(self, digits: int = 3) -> str:
        where = f"{self.path}" + (f", item {self.item!r}" if self.item is not None else "")
        lines = [f"Steps of {where}", self.summary()]
        if self.select is not None:
            lines.append(f"select: {clip(self.select, 80)}")
        lines.append("")
        lines.extend(table(self.rows(digits), right=(0, 1, 2, 3, 4)))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from nnx_ckpt_widgets.render import BOX_STYLE, esc, values_table_html

        rows = self.rows()
        body = values_table_html(rows, lambda row: row[5] != "ok")
        return (
            f'<div class="nnx-ckpt-steps" style="{BOX_STYLE}">'
            f"<b>Steps of {esc(self.path)}</b><br>{esc(self.summary())}{body}</div>"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "item": self.item,
            "select": self.select,
            "factor": self.factor,
            "summary": self.summary(),
            "first_nan": self.first_nan,
            "first_inf": self.first_inf,
            "first_bad": self.first_bad,
            "last_good": self.last_good,
            "steps": [
                {
                    "step": s.step,
                    "with_nan": list(s.with_nan),
                    "with_inf": list(s.with_inf),
                    "change": s.change,
                    "baseline": s.baseline,
                    "in_line": s.in_line,
                    "good": s.good,
                }
                for s in self.steps
            ],
        }


def check_steps(
    path: str | os.PathLike,
    *,
    item: str | None = None,
    select: str | None = None,
    factor: float = DEFAULT_FACTOR,
    progress: ProgressArg = None,
) -> StepsReport:
    """Walk every step of a run: NaN and Inf in each, and how far each moved from the one before.

    Args:
      path: a root of steps (``CheckpointManager``, ``training.Checkpointer``).
      item: the item to read when the steps hold several (e.g. ``"model"``).
      select: a regex searched in each key: only the arrays it matches are read.
      factor: a step whose change is more than ``factor`` times the median change of the good
        steps before it is out of line.
      progress: as for :func:`nnx_ckpt_widgets.stats`, for each pair of steps read.

    Returns:
      A :class:`StepsReport`: ``first_nan`` (first in time), ``first_bad`` and ``last_good``.

    Raises:
      InvalidArgumentError: ``path`` is not a root of steps, ``factor`` is not above 1, or
        ``select`` is not a valid regex.
      CheckpointError: a step cannot be found or read.
    """
    if not isinstance(factor, (int, float)) or not factor > 1:
        raise InvalidArgumentError(
            f"factor must be a number above 1 (how many times the usual change is too much), "
            f"got {factor!r}."
        )
    first = inspect(path, item=item)
    if len(first.steps) == 0:
        raise InvalidArgumentError(
            f"check_steps needs a root of steps, and {first.path} is one checkpoint; pass the "
            "folder the training run saved its steps into."
        )
    infos = [
        first if s.step == first.step else inspect(path, step=s.step, item=item)
        for s in first.steps
    ]
    entries: list[StepHealth] = []
    moves: list[float] = []  # the changes of the steps before the first bad one
    previous = None
    for info in infos:
        assert info.step is not None
        if previous is None:
            # The first step has nothing to move from: its NaN and Inf counts alone.
            leaves, _ = select_leaves(list(info.leaves.values()), select, info_where(info))
            first_stats = stats_of(info, leaves, progress=progress)
            entries.append(
                StepHealth(
                    step=info.step,
                    arrays=len(first_stats.entries),
                    with_nan=tuple(first_stats.with_nan),
                    with_inf=tuple(first_stats.with_inf),
                )
            )
            previous = info
            continue
        report = diff_infos(previous, info, select=select, progress=progress)
        change = report.relative_change
        baseline = statistics.median(moves) if moves else None
        # A move that cannot be measured (NaN or Inf on a side) is not in line.
        in_line = change is not None and (baseline is None or change <= factor * baseline)
        entry = StepHealth(
            step=info.step,
            arrays=len(report.compared),
            with_nan=tuple(e.key for e in report.compared if e.diff and e.diff.nan_b),
            with_inf=tuple(e.key for e in report.compared if e.diff and e.diff.inf_b),
            change=change,
            baseline=baseline,
            in_line=in_line,
        )
        entries.append(entry)
        if change is not None and all(e.good for e in entries):
            moves.append(change)
        previous = info
    return StepsReport(
        path=str(first.path), steps=tuple(entries), item=item, select=select, factor=factor
    )
