"""Jupyter widgets over the library: ``CheckpointBrowser`` and the ``SideBySide`` view.

Core ipywidgets only, with no front-end code of our own, so they work wherever ipywidgets does
(JupyterLab 4, Notebook 7, VS Code, Colab). Strings from a checkpoint reach the page either
escaped by :func:`nnx_ckpt_widgets.render.esc` inside ``HTML`` widgets or as plain text
(button descriptions, dropdown labels), which the front-end never parses as HTML.

The text form of each widget (``repr``, which is also its ``text/plain`` output) is a
deterministic summary, so notebooks checked by nbval can store it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import ipywidgets as w
import traitlets

from nnx_ckpt_widgets import _text, render
from nnx_ckpt_widgets._display import full_text_bundle, one_line, stylesheet
from nnx_ckpt_widgets._export_panel import ExportPanel
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._restore_panel import RestorePanel
from nnx_ckpt_widgets._side_by_side import SideBySide, compare_states
from nnx_ckpt_widgets._tree_view import TreeView
from nnx_ckpt_widgets._untrusted import no_gc
from nnx_ckpt_widgets._values_panel import ValuesPanel
from nnx_ckpt_widgets.compare import LoadReport, Transform
from nnx_ckpt_widgets.errors import CheckpointError
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect
from nnx_ckpt_widgets.render import esc

__all__ = ["CheckpointBrowser", "SideBySide", "compare_states"]


class CheckpointBrowser(w.VBox):
    """Browse a checkpoint from its metadata and, given a model, restore it into the model.

    Below the tree, the Values panel reads the selected arrays; the Export panel
    (``export_panel``) shows :func:`~nnx_ckpt_widgets.convert`'s plan for the shown step and
    item (``plan_button``) and writes it to safetensors or Orbax (``export_button``).

    Args:
      path: a checkpoint folder, a ``CheckpointManager`` root, or one of its step folders;
        local or ``gs://``.
      model: an NNX model (or other graph node, or ``nnx.State``) to compare and restore into.
      step: under a manager root, the step to open; the latest by default.
      item: the item to open when a step holds several.
      best_metric: a metric the manager kept (e.g. ``"val_loss"``); the step where it is
        best is marked ``best`` in the step selector.
      best_mode: ``"min"`` or ``"max"``: which value of ``best_metric`` is best, as in
        Orbax's ``CheckpointManagerOptions(best_mode=...)``.
      rename: regex -> replacement for checkpoint keys, as for :func:`restore`.
      transform: regex -> function of one array, as for :func:`restore`: the load report
        shows the transformed shapes and marks each transformed key, and Restore applies
        the functions.
      stack: regex -> axis, as for :func:`restore`: per-layer checkpoint keys into a
        scanned model's stacked arrays.
      unstack: regex -> axis, as for :func:`restore`: a scanned checkpoint into a per-layer
        model; the load report marks each slice (``← layers/w[:, i]``).
      expand_depth: tree levels open at first.
      page_size: tree rows shown under one node before a "show more" button.

    Raises:
      CheckpointError: the checkpoint cannot be read, or ``model`` is not NNX state. A step or
        item chosen later that cannot be read raises nothing: the browser stays where it was,
        and ``error`` (shown on the page) says why.

    Example::

        browser = CheckpointBrowser("ckpt/", model)
        browser.restore_button.click()
        browser.wait()
        assert browser.status.startswith("Restored")
    """

    status = traitlets.Unicode(
        "",
        help="The restore status as text (empty without a model), e.g. 'Restored 4 arrays "
        "(104 B)'.",
    )

    # A first view of 10^5 leaves builds several long-lived objects a leaf (the widgets' few
    # cycles wait for the collector to resume): running, one full collection of the whole
    # heap took a quarter of its time (see no_gc).
    @no_gc()
    def __init__(
        self,
        path: str | os.PathLike,
        model: Any = None,
        *,
        step: int | None = None,
        item: str | None = None,
        best_metric: str | None = None,
        best_mode: Literal["min", "max"] = "min",
        rename: Mapping[str, str] | None = None,
        transform: Mapping[str, Transform] | None = None,
        stack: Mapping[str, int] | None = None,
        unstack: Mapping[str, int] | None = None,
        expand_depth: int = 2,
        page_size: int = 40,
    ):
        super().__init__(layout=w.Layout(width="100%"))
        self.add_class("nnx-ckpt")
        self.add_class("nnx-ckpt-browser")
        self._style = stylesheet()
        self.path = path
        self.model = model
        self.best_metric, self.best_mode = best_metric, best_mode
        self._tree_options = {"expand_depth": expand_depth, "page_size": page_size}
        self._filling = False
        self.info = inspect(path, step=step, item=item)
        self.header = w.HTML()
        self.error: CheckpointError | None = None  # why the last chosen step did not open
        self.error_html = w.HTML()
        self._error_text = ""
        # "initial": the label is as wide as its text, next to the list, not right-aligned in
        # ipywidgets' default 148 px.
        labels = {"description_width": "initial"}
        self.step_selector = w.Dropdown(
            description="step", style=labels, layout=w.Layout(width="auto", max_width="100%")
        )
        self.item_selector = w.Dropdown(
            description="item", style=labels, layout=w.Layout(width="auto", max_width="100%")
        )
        self.selectors = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.tree = self._new_tree()
        self.panel: RestorePanel | None = None
        if model is not None:
            self.panel = RestorePanel(
                self.info, model, rename=rename, transform=transform, stack=stack, unstack=unstack
            )
            self.panel.observe(self._panel_changed, names=["status", "running"])
            self.status = self.panel.status
        self.values = ValuesPanel(self.info, self._selected_leaves)
        self.values.observe(self._panel_changed, names=["running"])
        self.export_panel = ExportPanel(self.info, self._selected_paths)
        self.export_panel.observe(self._panel_changed, names=["running"])
        self._fill_selectors()
        self.step_selector.observe(self._selection_changed, "value")
        self.item_selector.observe(self._selection_changed, "value")
        self._render_header()
        self._layout()

    @property
    def restore_button(self) -> w.Button:
        """The Restore button; ``restore_button.click()`` restores from Python.

        Raises:
          AttributeError: the browser was made without a model.
        """
        if self.panel is None:
            raise AttributeError(
                "This CheckpointBrowser has no model, so no Restore button; pass one: "
                "CheckpointBrowser(path, model)."
            )
        return self.panel.button

    @property
    def report(self) -> LoadReport | None:
        """The load report of the checkpoint against the model, after the last restore."""
        if self.panel is None:
            return None
        return self.panel.result or self.panel.report

    def wait(self, timeout: float | None = None) -> LoadReport | None:
        """Block until a running restore, values read, plan or export ends; see
        :meth:`RestorePanel.wait`."""
        self.values.wait(timeout)
        self.export_panel.wait(timeout)
        return None if self.panel is None else self.panel.wait(timeout)

    @property
    def values_button(self) -> w.Button:
        """The Values button: ``values_button.click()`` then :meth:`wait` reads the values of
        the selected subtree (the whole checkpoint when nothing is selected)."""
        return self.values.values_button

    @property
    def plan_button(self) -> w.Button:
        """The Plan button of the Export panel: ``plan_button.click()`` then :meth:`wait` shows
        what Export would write (``convert(..., dry_run=True)``), writing nothing."""
        return self.export_panel.plan_button

    @property
    def export_button(self) -> w.Button:
        """The Export button: with a destination typed in ``export_panel.destination``,
        ``export_button.click()`` then :meth:`wait` converts the shown step and item with
        :func:`~nnx_ckpt_widgets.convert`; disabled (a click does nothing) until then."""
        return self.export_panel.export_button

    def _selected_paths(self) -> tuple[str, list[KeyPath]] | None:
        """The selected node's name and key paths (all its folded copies); None when nothing
        is selected."""
        node = self.tree.selected_node
        return None if node is None else (node.name, list(node.paths))

    def _selected_leaves(self) -> tuple[str, list[LeafInfo]]:
        """The selected node's name and every array under it (all its folded copies)."""
        node = self.tree.selected_node
        if node is None:
            return "", list(self.info.leaves.values())
        leaves: list[LeafInfo] = []
        for path in node.paths:
            leaves.extend(self.info.subtree(path).values())
        return node.name, leaves

    def _step_marks(self) -> dict[int, list[str]]:
        """``latest`` and, given ``best_metric``, ``best`` for the steps they apply to."""
        info = self.info
        marks: dict[int, list[str]] = {}
        if info.steps:
            marks.setdefault(info.steps[-1].step, []).append("latest")
        if self.best_metric is not None:
            best = info.best_step(self.best_metric, self.best_mode)
            if best is not None:
                marks.setdefault(best, []).append("best")
        return marks

    def _fill_selectors(self) -> None:
        info = self.info
        marks = self._step_marks()
        options = []
        for step in info.steps:
            mark = f"  ({', '.join(marks[step.step])})" if marks.get(step.step) else ""
            options.append((_text.step_text(step) + mark, step.step))
        self._filling = True  # setting options moves the value: not a user's choice
        try:
            self.step_selector.options = options
            self.step_selector.value = info.step
            self.item_selector.options = list(info.items)
            self.item_selector.value = info.item if info.items else None
        finally:
            self._filling = False

    @no_gc()  # another step's tree: see __init__
    def _selection_changed(self, change: dict[str, Any]) -> None:
        step, item = self.step_selector.value, self.item_selector.value
        if self._filling or self._busy():
            return
        if change["owner"] is self.step_selector:
            if step == self.info.step:
                return
            item = self.info.item if self.info.item in _items_of(self.info, step) else None
        elif item == self.info.item:
            return
        try:
            info = inspect(self.path, step=step, item=item)
        except CheckpointError as err:
            # A damaged step must not break the browser: keep showing the current one, put the
            # selectors back on it, and say why the other cannot be opened.
            what = f"step {step}" if change["owner"] is self.step_selector else f"item {item!r}"
            self._set_error(err, f"Cannot open {what}: {one_line(err)}")
            self._fill_selectors()
            self._layout()
            return
        self._set_error(None)
        self.info = info
        self.tree.close()
        self.tree = self._new_tree()
        if self.panel is not None:
            self.panel.set_info(self.info)
        self.values.set_info(self.info)
        self.export_panel.set_info(self.info)
        self._fill_selectors()
        self._render_header()
        self._layout()

    def _new_tree(self) -> TreeView:
        """The tree of ``self.info``; selecting another node clears the Values panel."""
        tree = TreeView(self.info, **self._tree_options)
        # The Values panel's results are about the node selected when they were read, and so
        # is an Export panel's plan of the selected subtree.
        tree.observe(lambda _change: self.values.clear(), "selected")
        tree.observe(lambda _change: self.export_panel.selection_changed(), "selected")
        return tree

    def _set_error(self, err: CheckpointError | None, text: str = "") -> None:
        self.error, self._error_text = err, text
        self.error_html.value = (
            f'<div class="nnx-ckpt-error nnx-ckpt-text">{esc(text)}</div>'
            if err is not None
            else ""
        )

    def _panel_changed(self, change: dict[str, Any]) -> None:
        if change["name"] == "status":
            self.status = change["new"]
        else:
            self.step_selector.disabled = self.item_selector.disabled = self._busy()

    def _busy(self) -> bool:
        """True while any panel reads or writes: the step and item stay as they are."""
        restoring = self.panel is not None and self.panel.running
        return self.values.running or self.export_panel.running or restoring

    def _render_header(self) -> None:
        info = self.info
        where = _text.where(info.path, info.step, info.item, info.steps)
        self.header.value = (
            f'<div class="nnx-ckpt-header nnx-ckpt-text"><b>{esc(where)}</b><br>'
            f"{esc(render.info_summary(info))}"
            # Steps that cannot be restored (and ignored pickles): the picker never offers them.
            + "".join(f"<br>{esc(line)}" for line in render.info_notes(info))
            + "</div>"
        )

    def _layout(self) -> None:
        selectors = []
        if self.info.steps:
            selectors.append(self.step_selector)
        if len(self.info.items) > 1:
            selectors.append(self.item_selector)
        children: list[w.Widget] = [self._style, self.header]
        if selectors:
            self.selectors.children = selectors
            children.append(self.selectors)
        if self.error is not None:
            children.append(self.error_html)
        children.append(self.tree)
        children.append(self.values)
        if self.panel is not None:
            children.append(self.panel)
        children.append(self.export_panel)
        self.children = children

    def __repr__(self) -> str:
        info = self.info
        lines = [
            f"CheckpointBrowser: {_text.where(info.path, info.step, info.item, info.steps)}",
            render.info_summary(info),
        ]
        if info.steps:
            marks = self._step_marks()
            steps = [
                _text.step_text(s) + "".join(f" {m}" for m in marks.get(s.step, ()))
                for s in info.steps
            ]
            lines.append("steps: " + ", ".join(steps))
        if len(info.items) > 1:
            lines.append("items: " + ", ".join(_text.clip(i, 40) for i in info.items))
        if self.error is not None:
            lines.append(f"error: {self._error_text}")
        lines.append("tree:")
        lines.extend("  " + line for line in self.tree.text(20).splitlines())
        if self.values.stats_report is not None or self.values.diff_report is not None:
            lines.append(f"values: {self.values.status}")
        if self.export_panel.plan is not None or self.export_panel.error is not None:
            lines.append(f"export: {self.export_panel.status}")
        if self.panel is not None:
            report = self.panel.report
            lines.append(f"load report: {_text.count_text(report.counts)}")
            if self.panel.result is not None:
                done = {str(a): n for a, n in self.panel.result.action_counts.items()}
                lines.append(f"actions: {_text.count_text(done)}")
            lines.append(f"status: {self.status}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return full_text_bundle(self, **kwargs)


def _items_of(info: CheckpointInfo, step: int | None) -> tuple[str, ...]:
    for candidate in info.steps:
        if candidate.step == step:
            return candidate.items
    return ()
