"""``ValuesPanel``: the values of the browser's selected subtree, and a diff with another step.

Nothing is read until a button is pressed. **Values** reads the arrays of the selected subtree
(every folded copy of it) and shows their statistics; when the selection is one array, it also
shows treescope's own array rendering of it (``treescope.render_array``: a heatmap with its
value distribution), in an ``Output`` as a display-data output, as the tree's treescope pane
does. Under a root of steps, **compare with step** diffs the browser's step against the step
chosen in the dropdown, for the selected subtree.

Reads run in a worker thread, so the page keeps updating; a read that takes longer than a
second shows a progress bar with the bytes read. Every string from the checkpoint reaches the
page through :func:`nnx_ckpt_widgets.render.esc` or as a widget's plain-text label.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w
import traitlets

from nnx_ckpt_widgets import _text
from nnx_ckpt_widgets._display import ProgressRow, Worker, figure_html, one_line
from nnx_ckpt_widgets.diff import DiffReport, diff_html, diff_infos
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect
from nnx_ckpt_widgets.render import esc
from nnx_ckpt_widgets.stats import StatsReport, stats_html, stats_of

# Treescope draws at most this many cells of one array (it summarises the rest).
ARRAY_CELLS = 10_000

Selection = Callable[[], tuple[str, list[LeafInfo]]]


class ValuesPanel(w.VBox):
    """Value statistics of the selected subtree, and a step-to-step diff.

    Args:
      info: the checkpoint shown by the browser.
      selection: returns ``(name, leaves)`` of what is selected in the tree (the whole
        checkpoint when nothing is).
    """

    status = traitlets.Unicode(
        "", help="What the panel did last, as text: 'Values of 4 arrays: no NaN or Inf.'"
    )
    running = traitlets.Bool(False, help="True while arrays are being read; buttons disabled.")

    def __init__(self, info: CheckpointInfo, selection: Selection):
        self.info = info
        self.selection = selection
        self.stats_report: StatsReport | None = None
        self.diff_report: DiffReport | None = None
        self.array: Any = None  # the one array read for treescope, when one was selected
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        # Bumped whenever what is shown stops being about the selection (another node, step
        # or item): a read that started before then drops its result instead of showing it.
        self._generation = 0
        self.values_button = w.Button(
            description="Values", icon="bar-chart", tooltip="read the selected arrays"
        )
        self.values_button.add_class("nnx-ckpt-values")
        self.values_button.layout.width = "auto"
        self.values_button.on_click(self._values_clicked)
        # The button carries the words, the list only the steps: in a narrow notebook each
        # wraps to a line of its own instead of squeezing a labelled list.
        self.other_step = w.Dropdown(
            tooltip="the step to compare the shown step with",
            layout=w.Layout(width="auto", max_width="100%"),
        )
        self.diff_button = w.Button(
            description="compare with step",
            icon="exchange",
            tooltip="diff the shown step against the chosen one",
        )
        self.diff_button.add_class("nnx-ckpt-diff-button")
        self.diff_button.layout.width = "auto"
        self.diff_button.on_click(self._diff_clicked)
        self._row = ProgressRow("nnx-ckpt-values-progress", "nnx-ckpt-values-progress-text")
        self._worker = Worker("nnx-ckpt-values", self._row, self._busy)
        self.bar, self.bar_text, self.progress = self._row.bar, self._row.text, self._row.box
        self.status_html = w.HTML()
        self.result_html = w.HTML()
        self.array_output = w.Output(layout=w.Layout(max_height="420px"))
        self.array_output.add_class("nnx-ckpt-scroll")
        self.actions = w.HBox(layout=w.Layout(flex_flow="row wrap", align_items="center"))
        super().__init__([self.actions, self.status_html, self.result_html, self.array_output])
        self.add_class("nnx-ckpt-values-panel")
        self.set_info(info)

    def set_info(self, info: CheckpointInfo) -> None:
        """Show another step or item: the results shown are dropped, nothing is read."""
        self.info = info
        others = [s.step for s in info.steps if s.step != info.step]
        self.other_step.options = [
            (_text.step_text(s), s.step) for s in info.steps if s.step in others
        ]
        if others:
            before = [s for s in others if info.step is not None and s < info.step]
            self.other_step.value = before[-1] if before else others[0]
        children: list[w.Widget] = [self.values_button]
        if others:
            children += [self.diff_button, self.other_step]
        self.actions.children = [*children, self.progress]
        self.clear()

    def clear(self) -> None:
        """Drop the results shown (the selection changed): nothing is read until asked again.

        A read still running finishes in the background and its result is dropped.
        """
        with self._lock:
            self._generation += 1
            self.stats_report = self.diff_report = self.array = self.error = None
            self.result_html.value = ""
            self.array_output.outputs = ()
            self._set_status("ready", "Nothing read yet: Values reads the selected arrays.")

    def _values_clicked(self, _button: Any = None) -> None:
        name, leaves = self.selection()
        self._start(self._run_values, name, leaves)

    def _diff_clicked(self, _button: Any = None) -> None:
        name, leaves = self.selection()
        self._start(self._run_diff, name, leaves, self.other_step.value)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        with self._lock:
            generation = self._generation
        self._worker.start(self._guarded, generation, target, *args)

    def _busy(self, busy: bool) -> None:
        self.running = busy
        self._enable(not busy)

    def _show(self, generation: int, show: Callable[[], None]) -> None:
        """Run ``show`` (which updates the page) unless the selection changed since the read
        began."""
        with self._lock:
            if generation == self._generation:
                show()

    def _enable(self, idle: bool) -> None:
        self.values_button.disabled = self.diff_button.disabled = not idle
        self.other_step.disabled = not idle

    def _guarded(self, generation: int, target: Callable[..., None], *args: Any) -> None:
        self.error = None
        try:
            target(generation, *args)
        except Exception as err:  # every failure becomes the status line
            self._show(generation, functools.partial(self._failed, err))

    def _failed(self, err: Exception) -> None:
        self.error = err
        self._set_status("failed", f"Could not read the values: {one_line(err)}")

    def _run_values(self, generation: int, name: str, leaves: Sequence[LeafInfo]) -> None:
        what = name or "the checkpoint"
        info = self.info

        def running() -> None:
            self._set_status("running", f"Reading {_text.plural(len(leaves), 'array')} of {what}…")
            self.array = None
            self.array_output.outputs = ()

        self._show(generation, running)
        if len(leaves) == 1:
            report, array = _one_array(info, leaves[0], self._row.update)
        else:
            report, array = stats_of(info, leaves, progress=self._row.update), None

        def done() -> None:
            self.stats_report, self.diff_report = report, None
            self.result_html.value = stats_html(report)
            if array is not None:
                self.array = array
                self.array_output.outputs = (_array_output(leaves[0], array),)
            # Green means "checked, nothing wrong"; NaN or Inf is a warning.
            state = "done" if report.ok else "warn"
            self._set_status(state, f"Values of {what}, {report.summary()}")

        self._show(generation, done)

    def _run_diff(self, generation: int, name: str, leaves: Sequence[LeafInfo], other: int) -> None:
        info = self.info
        self._show(
            generation,
            lambda: self._set_status("running", f"Reading step {info.step} and step {other}…"),
        )
        other_info = inspect(info.path, step=other, item=info.item)
        keys = [leaf.name for leaf in leaves] if name else None
        report = diff_infos(other_info, info, keys=keys, progress=self._row.update)

        def done() -> None:
            self.diff_report = report
            self.result_html.value = diff_html(report)
            self.array_output.outputs = ()
            # A diff reports change, which is neither good nor bad: plain text, unless NaN or
            # Inf appeared or an array blew up (DiffReport.ok).
            state = "info" if report.ok else "warn"
            self._set_status(state, f"Step {other} → step {info.step}: {report.summary()}")

        self._show(generation, done)

    def _set_status(self, state: str, text: str) -> None:
        self.status = text
        self.status_html.value = (
            f'<div class="nnx-ckpt-values-status nnx-ckpt-text" data-state="{esc(state)}">'
            f"{esc(_text.clip(text, 400))}</div>"
        )

    def wait(self, timeout: float | None = None) -> None:
        """Block until a running read ends (for notebooks that click from Python)."""
        self._worker.wait(timeout)

    def text(self) -> str:
        """What the panel shows, as text: the status and the last table."""
        lines = [f"values: {self.status}"]
        if self.stats_report is not None and self.diff_report is None:
            lines.append(self.stats_report.text())
        if self.diff_report is not None:
            lines.append(self.diff_report.text())
        return "\n".join(lines)


def _one_array(
    info: CheckpointInfo, leaf: LeafInfo, progress: Callable[[int, int], None]
) -> tuple[StatsReport, Any]:
    """Stats of one array, and the array itself for treescope: one read for both."""
    from nnx_ckpt_widgets._values import array_stats, iter_arrays
    from nnx_ckpt_widgets.stats import info_where

    assert info.location is not None
    read = iter_arrays(info.location, [leaf], progress=progress, where=info_where(info))
    ((_, array),) = list(read)
    entry = array_stats(leaf.name, array, key_impl=leaf.key_impl, dtype=leaf.dtype)
    report = StatsReport(
        path=str(info.path),
        entries=(entry,),
        step=info.step,
        item=info.item,
        layout=info.layout,
        nbytes=leaf.nbytes,
    )
    return report, array


def _array_output(leaf: LeafInfo, array: Any) -> dict[str, Any]:
    """Treescope's rendering of one array as a display-data output, text as fallback."""
    text = f"{leaf.name}: {_text.shape_text(leaf.shape)} {leaf.dtype}"
    html = None
    if leaf.key_impl is None and array.ndim > 0 and array.size > 0:
        import warnings

        import treescope

        try:
            # An all-NaN array makes NumPy warn inside treescope's colour scale: not news here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                figure = treescope.render_array(array, truncate=True, maximum_size=ARRAY_CELLS)
                html = figure_html(figure)
        except Exception:  # treescope cannot draw every dtype (complex, keys): text only
            html = None
    if html is None:
        html = f"<pre>{esc(text)} (no array rendering for this array)</pre>"
    return {
        "output_type": "display_data",
        "data": {"text/html": html, "text/plain": text},
        "metadata": {},
    }
