"""``stats``: what the values of a checkpoint's arrays look like, and where NaN and Inf are.

Only the selected arrays are read, through the layout's partial read, in bounded batches onto
host memory; the statistics themselves are :mod:`nnx_ckpt_widgets._values`'. Nothing is
written anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets._text import clip, human_bytes, plural, shape_text, table, where
from nnx_ckpt_widgets._values import (
    ArrayStats,
    MemoryArg,
    ProgressArg,
    array_stats,
    iter_arrays,
    plan_reads,
    progress_callback,
    select_leaves,
)
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect

__all__ = ["ArrayStats", "StatsReport", "stats", "stats_of"]


@dataclasses.dataclass(frozen=True)
class StatsReport:
    """The statistics of a checkpoint's (selected) arrays, one :class:`ArrayStats` each.

    ``str()`` is a table with repeated layers folded (``layers/{0..47}/kernel``) and a line for
    each group that holds NaN or Inf; ``_repr_html_`` is the same, escaped.
    """

    path: str
    entries: tuple[ArrayStats, ...]
    step: int | None = None
    item: str | None = None
    layout: str = ""
    select: str | None = None
    skipped: int = 0  # arrays not selected
    nbytes: int = 0  # bytes read

    def __getitem__(self, key: str) -> ArrayStats:
        for entry in self.entries:
            if entry.key == key:
                return entry
        raise KeyError(key)

    def __iter__(self) -> Iterator[ArrayStats]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def with_nan(self) -> list[str]:
        """Keys of the arrays holding NaN, in saved order."""
        return [e.key for e in self.entries if e.nan]

    @property
    def with_inf(self) -> list[str]:
        """Keys of the arrays holding +Inf or -Inf, in saved order."""
        return [e.key for e in self.entries if e.posinf or e.neginf]

    @property
    def ok(self) -> bool:
        """No NaN and no Inf in any array read."""
        return not any(e.nonfinite for e in self.entries)

    @property
    def where(self) -> str:
        return where(self.path, self.step, self.item)

    def summary(self) -> str:
        """One line: how many arrays, and which hold NaN or Inf (in saved order: one step's
        arrays carry no order in time, so none is called the first)."""
        read = f"{plural(len(self.entries), 'array')} ({human_bytes(self.nbytes)})"
        if self.skipped:
            read += f", {self.skipped} not selected"
        if self.ok:
            return f"{read}: no NaN or Inf."
        parts = []
        for label, keys in (("NaN", self.with_nan), ("Inf", self.with_inf)):
            if keys:
                parts.append(f"{label} in {which_arrays(keys, len(self.entries))}")
        return f"{read}: " + "; ".join(parts) + "."

    def groups(self) -> list[tuple[str, list[ArrayStats]]]:
        """Rows of the table: repeated layers of one shape, dtype and kind fold together."""
        return fold_entries(self.entries, lambda e: (e.shape, e.dtype, e.kind))

    def findings(self) -> list[str]:
        """One line per row holding NaN or Inf: ``layers/{0..47}/kernel: 2 with NaN
        (layers/17, layers/18)``."""
        lines = []
        for pattern, group in self.groups():
            bad = [e for e in group if e.nonfinite]
            if not bad:
                continue
            if len(group) == 1:
                lines.append(f"{clip(pattern)}: {_counts(bad[0])}")
                continue
            parts = []
            for label, members in (
                ("NaN", [e for e in bad if e.nan]),
                ("Inf", [e for e in bad if e.posinf or e.neginf]),
            ):
                if members:
                    names = member_names([e.key for e in group], [e.key for e in members])
                    parts.append(f"{len(members)} with {label} ({names})")
            lines.append(f"{clip(pattern)}: " + ", ".join(parts))
        return lines

    def rows(self, digits: int = 4) -> list[tuple[str, ...]]:
        header = ("key", "shape", "dtype", "min", "max", "mean", "std", "norm", "nan", "inf")
        rows: list[tuple[str, ...]] = [(*header, "zero frac")]
        for pattern, group in self.groups():
            row = merge(group)
            count = f"{len(group)} × " if len(group) > 1 else ""
            rows.append(
                (
                    clip(pattern),
                    count + shape_text(row.shape),
                    clip(row.dtype, 24),
                    *_number_cells(row, digits),
                )
            )
        return rows

    def text(self, digits: int = 4) -> str:
        """The table, numbers to ``digits`` significant digits."""
        lines = [f"Values of {self.where}", self.summary()]
        if self.select is not None:
            lines.append(f"select: {clip(self.select, 80)}")
        if self.entries:
            lines.append("")
            lines.extend(table(self.rows(digits), right=range(3, 11)))
        findings = self.findings()
        if findings:
            lines.append("")
            lines.extend(findings)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        return stats_html(self)

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the CLI's ``--json``); NaN and Inf statistics become None."""
        return {
            "path": str(self.path),
            "step": self.step,
            "item": self.item,
            "layout": self.layout,
            "select": self.select,
            "arrays": len(self.entries),
            "skipped": self.skipped,
            "bytes": self.nbytes,
            "ok": self.ok,
            "with_nan": self.with_nan,
            "with_inf": self.with_inf,
            "summary": self.summary(),
            "findings": self.findings(),
            "entries": [_json_safe(e.as_dict()) for e in self.entries],
        }


def _json_safe(data: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in data.items()
    }


def which_arrays(keys: Sequence[str], total: int, limit: int = 3) -> str:
    """``head/kernel`` (the only one), ``all 4 arrays``, or ``2 of 6 arrays: head/bias,
    head/kernel``: the arrays ``keys`` of ``total``, named in the order given."""
    if total == 1 and len(keys) == 1:
        return clip(keys[0], 60)
    if len(keys) == total:
        return f"all {plural(total, 'array')}"
    shown = ", ".join(clip(k, 60) for k in keys[:limit])
    more = f", and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} of {plural(total, 'array')}: {shown}{more}"


def _counts(entry: ArrayStats) -> str:
    parts = []
    for n, label in ((entry.nan, "NaN"), (entry.posinf, "+Inf"), (entry.neginf, "-Inf")):
        if n:
            parts.append(f"{n:,} {label}")
    return ", ".join(parts) + f" of {plural(entry.size, 'value')}"


def number(value: Any, digits: int = 4) -> str:
    """A statistic as the tables show it: ``-`` when absent, floats to ``digits`` digits."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10**6 else str(value)
    return f"{value:.{digits}g}"


def _number_cells(row: ArrayStats, digits: int) -> tuple[str, ...]:
    if row.kind == "key":
        return ("-",) * 8
    inf = row.posinf + row.neginf
    zeros = row.zero_fraction
    return (
        number(row.min, digits),
        number(row.max, digits),
        number(row.mean, digits),
        number(row.std, digits),
        number(row.norm, digits),
        str(row.nan) if row.kind == "float" else "-",
        str(inf) if row.kind == "float" else "-",
        "-" if zeros is None else f"{zeros:.{min(digits, 3)}g}",
    )


def merge(group: Sequence[ArrayStats]) -> ArrayStats:
    """One row standing for a folded group: min of mins, max of maxes, pooled mean and std,
    L2 norm of all values, summed counts."""
    first = group[0]
    if len(group) == 1:
        return first
    size = sum(e.size for e in group)
    counts = {
        name: sum(getattr(e, name) for e in group) for name in ("nan", "posinf", "neginf", "zeros")
    }
    trues = sum(e.trues or 0 for e in group) if first.kind == "bool" else None
    with_values = [e for e in group if e.min is not None]
    lo = min((e.min for e in with_values), default=None)  # type: ignore[type-var]
    hi = max((e.max for e in with_values), default=None)  # type: ignore[type-var]
    mean = std = norm = None
    measured = [e for e in with_values if e.mean is not None]
    if measured:
        ns = [e.size - e.nonfinite for e in measured]
        total = sum(ns)
        mean = sum(n * (e.mean or 0.0) for n, e in zip(ns, measured, strict=True)) / total
        m2 = sum(
            n * ((e.std or 0.0) ** 2 + ((e.mean or 0.0) - mean) ** 2)
            for n, e in zip(ns, measured, strict=True)
        )
        std = math.sqrt(m2 / total)
        norm = math.sqrt(sum((e.norm or 0.0) ** 2 for e in measured))
    return dataclasses.replace(
        first,
        key="",
        size=size,
        min=lo,
        max=hi,
        mean=mean,
        std=std,
        norm=norm,
        trues=trues,
        **counts,
    )


def fold_entries(entries: Sequence[Any], signature: Any) -> list[tuple[str, list[Any]]]:
    """Fold entries (with a ``key``) whose keys differ only in layer indices and whose
    ``signature(entry)`` agree, in order of first appearance: ``layers/{0..1}/kernel``
    unchanged and ``layers/{2..3}/kernel`` changed make two rows."""
    by_signature: dict[Any, list[Any]] = {}
    for entry in entries:
        by_signature.setdefault(signature(entry), []).append(entry)
    order = {e.key: n for n, e in enumerate(entries)}
    rows: list[tuple[str, list[Any]]] = []
    for members in by_signature.values():
        by_path = {_keypaths.split(e.key): e for e in members}
        for pattern, paths in _keypaths.fold(by_path):
            rows.append((pattern, [by_path[p] for p in paths]))
    return sorted(rows, key=lambda row: order[row[1][0].key])


def member_names(group: Sequence[str], members: Sequence[str], limit: int = 4) -> str:
    """``layers/17, layers/18``: ``members`` of a folded ``group``, each cut after the last
    index that varies in the group."""
    paths = [_keypaths.split(k) for k in group]
    varying = [i for i in range(len(paths[0])) if len({p[i] for p in paths}) > 1]
    cut = (varying[-1] + 1) if varying else len(paths[0])
    names = [_keypaths.join(_keypaths.split(k)[:cut]) for k in members]
    shown = ", ".join(clip(n, 40) for n in names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def stats(
    path: str | os.PathLike,
    *,
    step: int | None = None,
    item: str | None = None,
    select: str | None = None,
    progress: ProgressArg = None,
    max_memory: MemoryArg = None,
) -> StatsReport:
    """Read a checkpoint's arrays and sum up their values: min, max, mean, std, L2 norm, the
    number of NaN, +Inf and -Inf, and the fraction of zeros.

    Float statistics are over the finite values; ints get the same (exact min and max), bools
    their counts, PRNG key arrays are listed as keys. Arrays are read in bounded batches onto
    host memory, as many at once as ``max_memory`` allows (two per core at most), so the
    whole checkpoint is never in memory.

    Args:
      path: anything :func:`nnx_ckpt_widgets.inspect` takes.
      step: under a root of steps, the step to read; the latest by default.
      item: the item (checkpointable) to read when there are several.
      select: a regex searched in each key (``layers/0/kernel``): only the arrays it matches
        are read.
      progress: a callable ``progress(done_bytes, total_bytes)`` (also given
        ``reads_in_flight=`` when it takes that keyword); ``True`` for a tqdm bar, ``False``
        for none; by default a tqdm bar when stderr is a terminal.
      max_memory: the memory the reads may use on top of what the process holds at the call:
        bytes, or a string such as ``"512MiB"``. By default a quarter of the memory available
        at the call, at most 4 GiB (the rest stays for the caller's process and its
        neighbours; more than 4 GiB buys no speed at two reads per core). Each read in flight
        counts 2.2x its batch (compressed bytes and the array they decode into).

    Returns:
      A :class:`StatsReport`.

    Raises:
      InvalidArgumentError: ``select`` is not a valid regex, or matches nothing; or
        ``max_memory`` is not a size, or too small to read the largest selected array (the
        message names the array and the budget it needs).
      CheckpointError: the checkpoint cannot be found or read.
    """
    info = inspect(path, step=step, item=item)
    leaves, skipped = select_leaves(list(info.leaves.values()), select, info_where(info))
    report = stats_of(info, leaves, progress=progress, max_memory=max_memory)
    return dataclasses.replace(report, select=select, skipped=skipped)


def info_where(info: CheckpointInfo) -> str:
    return where(info.path, info.step, info.item)


def stats_of(
    info: CheckpointInfo,
    leaves: Sequence[LeafInfo],
    *,
    progress: ProgressArg = None,
    max_memory: MemoryArg = None,
) -> StatsReport:
    """The statistics of ``leaves`` of ``info`` (what :func:`stats` and the browser call).

    Raises:
      InvalidArgumentError: ``max_memory`` is too small for the largest of ``leaves``.
      CheckpointError: the arrays cannot be read.
    """
    location = info.located()
    plan = plan_reads(leaves, max_memory, what="stats", where=info_where(info), location=location)
    callback, close = progress_callback(progress, "stats")
    entries = []
    try:
        arrays = iter_arrays(location, leaves, progress=callback, where=info_where(info), plan=plan)
        for leaf, array in arrays:
            entries.append(array_stats(leaf.name, array, key_impl=leaf.key_impl, dtype=leaf.dtype))
            del array
    finally:
        close()
    return StatsReport(
        path=str(info.path),
        entries=tuple(entries),
        step=info.step,
        item=info.item,
        layout=info.layout,
        nbytes=sum(leaf.nbytes for leaf in leaves),
    )


def _nonfinite_cells(row: Sequence[str]) -> set[int]:
    """The cells of a stats row to flag: its NaN and Inf counts that are not 0, and its key."""
    found = {i for i in (8, 9) if row[i] not in ("0", "-")}
    return found | {0} if found else found


def stats_html(report: StatsReport, digits: int = 4) -> str:
    """The report as an escaped HTML table (every key and dtype goes through ``esc``)."""
    from nnx_ckpt_widgets.render import BOX_STYLE, esc, values_table_html

    table = values_table_html(report.rows(digits), _nonfinite_cells, left=(0, 1, 2))
    findings = "".join(f"<li>{esc(line)}</li>" for line in report.findings())
    select = f"<br>select: {esc(report.select)}" if report.select is not None else ""
    return (
        f'<div class="nnx-ckpt-stats" style="{BOX_STYLE}">'
        f"<b>Values of {esc(report.where)}</b><br>{esc(report.summary())}{select}"
        + table
        + (f"<ul style='margin:4px 0'>{findings}</ul>" if findings else "")
        + "</div>"
    )
