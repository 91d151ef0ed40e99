"""Text tables and HTML for checkpoints and load reports.

Everything that comes from a checkpoint (key names, metric names, dtypes, paths) is untrusted:
it goes through :func:`esc` before it reaches HTML, and long names wrap instead of stretching
the layout. The text forms are deterministic, so notebooks can store them and nbval can check
them.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._text import (
    children,
    clip,
    human_bytes,
    shape_text,
    sizes_text,
    step_text,
    table,
    where,
)

if TYPE_CHECKING:
    from nnx_ckpt_widgets.compare import KeyStatus, LoadReport
    from nnx_ckpt_widgets.convert import ConvertedKey, ConvertPlan
    from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo

__all__ = [
    "clip",
    "esc",
    "human_bytes",
    "info_html",
    "info_text",
    "plan_html",
    "report_html",
    "report_text",
    "shape_text",
    "step_text",
    "where",
]


def theme_colour(variable: str, fallback: str) -> str:
    """A CSS colour: the theme's ``variable`` mixed with its text colour, readable on both themes.

    A status colour such as ``--jp-success-color1`` alone is too pale on white (about 4:1), so
    it is mixed with the theme's text colour: darker on a light theme, lighter on a dark one,
    and at least 4.5:1 against the background in both (checked in a real browser by
    ``tests/test_browser.py``). Outside Jupyter (nbconvert HTML) the fallback applies.

    Args:
      variable: a JupyterLab colour variable, e.g. ``--jp-success-color1``.
      fallback: the colour to use where the variable is not defined.
    """
    return f"color-mix(in srgb,var({variable},{fallback}) 62%,var(--jp-content-font-color0,#000))"


# What a status means, as a colour: one table for the reports here and the widgets' statuses.
COLOURS = {
    "running": theme_colour("--jp-brand-color1", "#0969da"),
    "done": theme_colour("--jp-success-color1", "#1a7f37"),
    "failed": theme_colour("--jp-error-color1", "#cf222e"),
    "warn": theme_colour("--jp-warn-color1", "#9a6700"),
}
STATUS_COLOURS = {
    "matched": COLOURS["done"],
    "missing": COLOURS["warn"],
    "unexpected": "color-mix(in srgb,#8250df 62%,var(--jp-content-font-color0,#000))",
    "shape mismatch": COLOURS["failed"],
    "dtype mismatch": theme_colour("--jp-warn-color0", "#bc4c00"),
}
BOX_STYLE = (
    "font-family:var(--jp-code-font-family,monospace);font-size:12px;max-width:100%;"
    "overflow-wrap:anywhere;word-break:break-word"
)


# Tables: a status, a shape or a number never wraps (broken in two, it misreads); a key name
# may, past a width of its own, so that a narrow page never breaks it letter by letter. What
# does not fit scrolls sideways, with its scrollbar right under the table.
_WHOLE = "white-space:nowrap"
_KEY = "overflow-wrap:anywhere;min-width:16ch"
_PANE = "overflow-x:auto;max-width:100%"


def esc(value: object) -> str:
    """HTML-escape anything, quotes included, so it can go into text and attributes."""
    return html.escape(str(value), quote=True)


def values_table_html(
    rows: Sequence[Sequence[str]],
    flagged: Callable[[Sequence[str]], bool | Collection[int]],
    *,
    align: str = "right",
    left: Collection[int] = (0,),
) -> str:
    """An escaped table of text rows, the first being the header, as stats and diff draw them.

    Args:
      rows: the header, then one row of cells per entry.
      flagged: for a row, True to draw it all in the error colour (readable on the light and
        the dark theme), or the indices of the cells that hold a finding, to draw only those.
      align: the alignment of the cells not in ``left`` (numbers read best on the right).
      left: the columns aligned left whatever ``align`` says: names, shapes and dtypes, as
        in the load report.

    The table sits in a pane that scrolls sideways when it is wider than the page; cells never
    wrap (a number or a shape broken in two misreads), except the key column, which wraps a
    long name only past a width of its own.
    """
    style = f"color:{COLOURS['failed']};font-weight:600"

    def cell(tag: str, i: int, text: str, mark: bool) -> str:
        css = f"text-align:{'left' if i in left else align}" + (";" + style if mark else "")
        css += ";" + (_KEY if i == 0 else _WHOLE)  # the key column may wrap a long name
        return f"<{tag} style='{css}'>{esc(text)}</{tag}>"

    head = "".join(cell("th", i, text, False) for i, text in enumerate(rows[0]))
    body = []
    for row in rows[1:]:
        mark = flagged(row)
        marked = set(range(len(row))) if mark is True else set() if mark is False else set(mark)
        body.append("<tr>" + "".join(cell("td", i, t, i in marked) for i, t in enumerate(row)))
    return (
        f"<div class='nnx-ckpt-scroll nnx-ckpt-table-pane' style='{_PANE}'>"
        "<table class='nnx-ckpt-values-table' style='border-collapse:collapse;"
        "overflow-wrap:normal;word-break:normal'>"
        f"<tr>{head}</tr>{'</tr>'.join(body)}{'</tr>' if body else ''}</table></div>"
    )


def _leaf_groups(leaves: Iterable[LeafInfo]) -> list[tuple[str, list[LeafInfo]]]:
    """Fold repeated layers whose arrays agree in shape, dtype and sharding into one row."""
    by_path = {leaf.path: leaf for leaf in leaves}
    rows: list[tuple[str, list[LeafInfo]]] = []
    for pattern, members in _keypaths.fold(by_path):
        group = [by_path[p] for p in members]
        if len({(g.shape, g.dtype, g.sharding) for g in group}) == 1:
            rows.append((pattern, group))
        else:
            rows.extend((_keypaths.show(leaf.path), [leaf]) for leaf in group)
    return rows


def info_text(info: CheckpointInfo) -> str:
    """The summary table that ``str(inspect(path))`` prints."""
    lines = [
        f"Checkpoint {where(info.path, info.step, info.item, info.steps)}",
        f"{info_summary(info)}",
    ]
    if info.custom_metadata:
        lines.append(f"custom metadata: {custom_text(info.custom_metadata)}")
    if info.config:
        lines.append(f"config.json: {custom_text(info.config)}")
    if len(info.steps) > 1 or (info.steps and info.steps[0].metrics):
        lines.append("steps: " + ", ".join(step_text(s) for s in info.steps))
    if len(info.items) > 1:
        lines.append("items: " + ", ".join(info.items))
    lines.extend(info_notes(info))
    rows = [("key", "shape", "dtype", "params", "bytes", "sharding")]
    for pattern, group in _leaf_groups(info.leaves.values()):
        first = group[0]
        count = f"{len(group)} × " if len(group) > 1 else ""
        rows.append(
            (
                clip(pattern),
                count + shape_text(first.shape),
                clip(first.dtype, 24),
                f"{first.size * len(group):,}",
                human_bytes(first.nbytes * len(group)),
                clip(first.sharding or "-", 40),
            )
        )
    lines.append("")
    lines.extend(table(rows, right=(3, 4)))
    return "\n".join(lines)


def info_notes(info: CheckpointInfo) -> list[str]:
    """One line per step that cannot be restored, and per note on how the path was read."""
    lines = [f"not restorable: step {s.step}: {s.reason}" for s in info.unrestorable]
    return lines + [f"note: {note}" for note in info.notes]


def info_summary(info: CheckpointInfo) -> str:
    """``Orbax v1 checkpoint, nnx.State: 4 arrays, 26 params, 104 B``."""
    # RNG state is no parameter: counted apart (see CheckpointInfo.rng_paths).
    params = info.num_params - info.rng_totals.get((), 0)
    sizes = sizes_text(len(info.leaves), params, info.nbytes, rng=len(info.rng_paths))
    kind = f"{info.layout}, " if info.layout else ""
    return f"{kind}{info.format}: {sizes}"


def custom_text(metadata: Mapping[str, object], width: int = 200) -> str:
    """``n=3, note='hi'``: custom metadata, sorted, each value as JSON, clipped."""
    import json

    parts = []
    for key in sorted(metadata, key=str):
        try:
            value = json.dumps(metadata[key], sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):
            value = repr(metadata[key])
        parts.append(f"{clip(str(key), 24)}={clip(value, 60)}")
    return clip(", ".join(parts), width)


def info_html(info: CheckpointInfo, max_children: int = 50) -> str:
    """A compact, escaped HTML tree of a checkpoint: subtrees fold, repeated layers fold."""
    header = (
        f"<b>{esc(where(info.path, info.step, info.item, info.steps))}</b><br>"
        f"{esc(info_summary(info))}"
    )
    if info.custom_metadata:
        header += f"<br>custom metadata: {esc(custom_text(info.custom_metadata))}"
    if info.config:
        header += f"<br>config.json: {esc(custom_text(info.config))}"
    for line in info_notes(info):
        header += f"<br>{esc(line)}"
    body = _tree_html(info, (), children(info.leaves), max_children, depth=0)
    return f'<div class="nnx-ckpt-info" style="{BOX_STYLE}">{header}{body}</div>'


def _tree_html(info, prefix: KeyPath, children, max_children: int, depth: int) -> str:
    items = []
    names = children.get(prefix, [])
    for name in names[:max_children]:
        path = (*prefix, name)
        if path in info.leaves:
            leaf = info.leaves[path]
            items.append(
                f"<li>{esc(_keypaths.quote(name))}: {esc(shape_text(leaf.shape))} "
                f"{esc(leaf.dtype)} "
                f"<span style='opacity:.6'>{esc(human_bytes(leaf.nbytes))}</span></li>"
            )
            continue
        params, nbytes = info.totals[path]
        params -= info.rng_totals.get(path, 0)  # RNG state is no parameter
        open_attr = " open" if depth < 1 else ""
        inner = _tree_html(info, path, children, max_children, depth + 1)
        items.append(
            f"<li><details{open_attr}><summary>{esc(_keypaths.quote(name))} "
            f"<span style='opacity:.6'>{params:,} params, {esc(human_bytes(nbytes))}</span>"
            f"</summary>{inner}</details></li>"
        )
    if len(names) > max_children:
        items.append(f"<li>… and {len(names) - max_children:,} more</li>")
    return "<ul style='margin:0;padding-left:1.2em;list-style:none'>" + "".join(items) + "</ul>"


def _report_groups(entries: Iterable[KeyStatus]) -> list[tuple[str, list[KeyStatus]]]:
    """Fold entries of one status whose paths differ only in layer indices."""
    order = ("shape mismatch", "dtype mismatch", "missing", "unexpected", "matched")
    rows = []
    for status in order:
        chosen = {tuple(e.path.split("/")): e for e in entries if e.status == status}
        for pattern, members in _keypaths.fold(chosen):
            group = [chosen[m] for m in members]
            if len({(g.detail, g.action) for g in group}) == 1:
                rows.append((pattern, group))
            else:
                rows.extend((g.path, [g]) for g in group)
    return rows


def _counts_line(report: LoadReport) -> str:
    line = ", ".join(f"{n} {status}" for status, n in report.counts.items())
    transformed = sum(e.transformed for e in report.entries)
    return line + (f"; {transformed} transformed" if transformed else "")


def report_text(report: LoadReport) -> str:
    """The load-report table that ``str(compare(...))`` prints."""
    with_action = report.restored_arrays is not None
    rows: list[Sequence[str]] = [("status", "key", "detail")]
    if with_action:
        rows = [("status", "key", "detail", "action")]
    for pattern, group in _report_groups(report.entries):
        first = group[0]
        row = [first.status, clip(pattern), first.detail]
        if first.source and len(group) == 1:
            row[2] += f" (from {clip(first.source, 40)})"
        if with_action:
            row.append(first.action or "")
        rows.append(row)
    lines = [f"Load report for {where(report.path, report.step, report.item)} ({report.format})"]
    lines.extend(table(rows))
    lines.append(_counts_line(report))
    lines.extend(f"note: {note}" for note in report.notes)
    lines.append(report.advice)
    return "\n".join(lines)


def report_html(report: LoadReport) -> str:
    """The load report as a colour-coded, escaped HTML table."""
    with_action = report.restored_arrays is not None
    head = "<tr><th>status</th><th>key</th><th>detail</th>"
    head += "<th>action</th></tr>" if with_action else "</tr>"
    rows = []
    for pattern, group in _report_groups(report.entries):
        first = group[0]
        colour = STATUS_COLOURS[first.status]
        detail = first.detail + (
            f" (from {first.source})" if first.source and len(group) == 1 else ""
        )
        action = f"<td style='{_WHOLE}'>{esc(first.action or '')}</td>" if with_action else ""
        rows.append(
            f"<tr><td style='color:{colour};font-weight:600;{_WHOLE}'>{esc(first.status)}</td>"
            f"<td style='{_KEY}'>{esc(pattern)}</td><td style='{_WHOLE}'>{esc(detail)}</td>"
            f"{action}</tr>"
        )
    counts = esc(_counts_line(report))
    return (
        f'<div class="nnx-ckpt-report" style="{BOX_STYLE}">'
        f"<b>Load report for {esc(where(report.path, report.step, report.item))}</b> "
        f"({esc(report.format)})"
        f"<div class='nnx-ckpt-scroll nnx-ckpt-table-pane' style='{_PANE}'>"
        "<table style='border-collapse:collapse;text-align:left;table-layout:auto;"
        "overflow-wrap:normal;word-break:normal'>"
        f"{head}{''.join(rows)}</table></div>"
        f"<div>{counts}</div>"
        + "".join(f"<div>note: {esc(note)}</div>" for note in report.notes)
        + f"<div><b>{esc(report.advice)}</b></div></div>"
    )


# Rows of a convert plan's table before the rest is summed up in one line: str(plan) lists all.
PLAN_ROWS = 200


def _plan_marks(key: ConvertedKey) -> str:
    """What happens to a key on the way out: ``cast from float32``, ``transformed``,
    ``stacked`` or ``unstacked``."""
    marks = []
    if key.layers is not None:
        marks.append("stacked" if key.layers.kind == "stack" else "unstacked")
    if key.transformed:
        marks.append("transformed")
    if key.cast:
        marks.append(f"cast from {key.value_dtype}" if key.value_dtype else "cast")
    return ", ".join(marks)


def _plan_groups(plan: ConvertPlan) -> list[tuple[str, str, list[ConvertedKey]]]:
    """``(key pattern, source pattern, keys)``: keys of one file, shape, dtype and marks whose
    names differ only in layer indices fold into one row, as the load report folds them."""
    sep = "." if plan.format == "safetensors" else _keypaths.SEP
    rows: list[tuple[str, str, list[ConvertedKey]]] = []
    run: list[ConvertedKey] = []

    def flush() -> None:
        by_path = {tuple(k.key.split(sep)): k for k in run}
        for pattern, members in _keypaths.fold(by_path):
            group = [by_path[m] for m in members]
            # Parts never hold the separator (convert splits on it), so "/" is safe to swap.
            shown = pattern if sep == _keypaths.SEP else pattern.replace(_keypaths.SEP, sep)
            sources = _keypaths.fold(_keypaths.split(k.source) for k in group if k.renamed)
            source = sources[0][0] if len(sources) == 1 else ", ".join(p for p, _ in sources)
            rows.append((shown, source, group))
        run.clear()

    def signature(k: ConvertedKey) -> tuple:
        return (k.file, k.shape, k.dtype, _plan_marks(k), k.renamed)

    for key in plan.keys:
        if run and signature(run[0]) != signature(key):
            flush()
        run.append(key)
    if run:
        flush()
    return rows


def plan_html(plan: ConvertPlan, max_rows: int = PLAN_ROWS, *, title: bool = True) -> str:
    """A convert plan as an escaped HTML table: one row per key (layer indices folded), with
    its shape, dtype and bytes, the source key under it when ``rename`` changed it, and what
    happens to it on the way out; safetensors rows under a row naming their file. Past
    ``max_rows`` rows, one line says how many more.

    The table is narrow on purpose (files as rows of their own, the source under the key,
    notes that wrap between words): it must fit a notebook beside JupyterLab's file browser
    at 800 px, where a sideways scrollbar would sit below a long table, out of sight.

    Args:
      plan: the plan.
      max_rows: rows shown before the rest is summed up in one line.
      title: start with the plan's summary; the browser's Export panel says it in its status
        line instead, once.
    """
    marked = any(_plan_marks(k) for k in plan.keys)
    heads = ["key", "shape", "dtype", "bytes"] + (["notes"] if marked else [])
    head = "".join(f"<th style='{_WHOLE}'>{esc(h)}</th>" for h in heads)
    groups = _plan_groups(plan)
    rows = []
    file = None
    for pattern, source, group in groups[:max_rows]:
        first = group[0]
        if first.file is not None and first.file != file:
            file = first.file
            names = plan.files.get(file, ())
            size = sum(k.nbytes for k in plan.keys if k.file == file)
            tensors = f"{len(names)} tensor" + ("" if len(names) == 1 else "s")
            rows.append(
                f"<tr class='nnx-ckpt-plan-file'><td colspan='{len(heads)}' "
                f"style='font-weight:600;{_KEY}'>{esc(f'{file}: {tensors}, {human_bytes(size)}')}"
                "</td></tr>"
            )
        count = f"{len(group)} × " if len(group) > 1 else ""
        key = esc(pattern)
        if source:
            key += f"<div class='nnx-ckpt-dim'>from {esc(source)}</div>"
        cells = [
            (key, _KEY),
            (esc(count + shape_text(first.shape)), _WHOLE),
            (esc(first.dtype), _WHOLE),
            (esc(human_bytes(sum(k.nbytes for k in group))), _WHOLE + ";text-align:right"),
        ]
        if marked:
            cells.append((esc(_plan_marks(first)), "min-width:11ch"))
        rows.append("<tr>" + "".join(f"<td style='{css}'>{t}</td>" for t, css in cells) + "</tr>")
    more = ""
    if len(groups) > max_rows:
        rest = sum(len(group) for _, _, group in groups[max_rows:])
        more = (
            f"<div class='nnx-ckpt-dim'>… and {len(groups) - max_rows:,} more rows "
            f"({rest:,} arrays): str(plan) lists every key.</div>"
        )
    also = f"<div>also: {esc(', '.join(plan.other_files))}</div>" if plan.other_files else ""
    return (
        f'<div class="nnx-ckpt-plan" style="{BOX_STYLE}">'
        # Bold by style, with no <b> tag: a <b> in the output can only be escaping gone wrong.
        + (f"<div style='font-weight:600'>{esc(plan.summary())}</div>" if title else "")
        + f"<div class='nnx-ckpt-scroll nnx-ckpt-table-pane' style='{_PANE}'>"
        "<table style='border-collapse:collapse;text-align:left;table-layout:auto;"
        "overflow-wrap:normal;word-break:normal'>"
        f"<tr>{head}</tr>{''.join(rows)}</table></div>"
        f"{also}{more}</div>"
    )
