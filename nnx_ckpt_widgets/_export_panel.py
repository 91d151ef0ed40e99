"""``ExportPanel``: the browser's checkpoint written out by :func:`nnx_ckpt_widgets.convert`.

The panel holds convert's options (format, destination, the selected subtree only, the
safetensors shard size, overwrite) and two buttons. **Plan** runs ``convert(...,
dry_run=True)`` on the browser's path, step and item and shows the plan's own HTML
(:meth:`ConvertPlan._repr_html_`): what **Export** would write, before anything is. **Export**
runs the same call without ``dry_run``; it stays disabled until a destination is typed, so
nothing can be written by accident, and ``convert`` itself refuses a destination that exists
unless overwrite is ticked.

Both run in a worker thread (:class:`nnx_ckpt_widgets._display.Worker`), so the page keeps
updating: after a second, a progress bar with the bytes written. The outcome is one line, the
plan's summary ("Wrote 4 arrays (104 B) in 1 safetensors file to out") or the error's one
sentence. Every string from the checkpoint reaches the page escaped.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w
import traitlets

from nnx_ckpt_widgets import _keypaths, _text
from nnx_ckpt_widgets._display import ProgressRow, Worker, one_line
from nnx_ckpt_widgets.convert import FORMATS, ConvertPlan, convert
from nnx_ckpt_widgets.metadata import CheckpointInfo
from nnx_ckpt_widgets.render import esc, plan_html

# The selected node's key paths (all its folded copies), or None when nothing is selected.
Selected = Callable[[], tuple[str, list[_keypaths.KeyPath]] | None]

__all__ = ["ExportPanel", "select_pattern"]

_DESTINATION_TIP = (
    "where Export writes: a new local folder or gs:// URL (empty: nothing is written)"
)


def select_pattern(paths: list[_keypaths.KeyPath]) -> str:
    """convert's ``select=`` regex for exactly the subtrees at ``paths``: each key spelled
    ``a/b/c``, escaped, anchored at the start and ending at a ``/`` or at the key's end, so
    ``layers/1`` never takes ``layers/10``."""
    names = sorted({_keypaths.join(path) for path in paths})
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")(?:/|$)"


class ExportPanel(w.VBox):
    """Convert's options, a Plan and an Export button, the plan shown as a table, a status.

    Args:
      info: the checkpoint shown by the browser (its path, step and item are converted).
      selected: returns ``(name, paths)`` of the tree's selected node (every folded copy of
        it), or None when nothing is selected.
    """

    status = traitlets.Unicode(
        "",
        help="What the panel did last, as text: 'Will write ...', 'Wrote 4 arrays (104 B) in 1 "
        "safetensors file to out.' or 'Export failed: <reason>'.",
    )
    phase = traitlets.Enum(
        ("ready", "running", "planned", "done", "failed"),
        "ready",
        help="What the status says: ready, running, planned (a dry run), done, failed.",
    )
    running = traitlets.Bool(False, help="True while a plan or an export runs; buttons disabled.")

    def __init__(self, info: CheckpointInfo, selected: Selected):
        self.info = info
        self.selected = selected
        self.plan: ConvertPlan | None = None  # the plan shown (a dry run, or what was written)
        self.result: ConvertPlan | None = None  # the plan of the last export that succeeded
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        # Bumped whenever the shown plan stops being about the options, step or item: a run
        # that started before then drops its outcome instead of showing it.
        self._generation = 0
        labels = {"description_width": "initial"}
        self.format = w.Dropdown(
            options=list(FORMATS),
            value="safetensors",
            description="format",
            style=labels,
            layout=w.Layout(width="auto"),
        )
        # No description: ipywidgets then puts the tooltip on the input itself, where it shows
        # the whole destination when a long path scrolls inside the box.
        self.destination = w.Text(
            value="",
            placeholder="destination: a folder or gs://bucket/path",
            tooltip=_DESTINATION_TIP,
            layout=w.Layout(width="auto", flex="1 1 18em", min_width="12em"),
        )
        self.destination.add_class("nnx-ckpt-export-dst")
        self.subtree = w.Checkbox(value=False, description="selected subtree only", indent=False)
        self.subtree.layout.width = "auto"
        self.shard_size = w.Text(
            value="5GB",
            description="shard size",
            style=labels,
            tooltip="max_shard_size: bytes per safetensors file, e.g. 5GB or 500MiB",
            layout=w.Layout(width="13em"),
        )
        self.overwrite = w.Checkbox(value=False, description="overwrite", indent=False)
        self.overwrite.layout.width = "auto"
        self.plan_button = w.Button(
            description="Plan", icon="list", tooltip="show what Export would write (a dry run)"
        )
        self.plan_button.add_class("nnx-ckpt-plan-button")
        self.export_button = w.Button(
            description="Export",
            icon="upload",
            button_style="primary",
            tooltip="write the checkpoint to the destination",
        )
        self.export_button.add_class("nnx-ckpt-export-button")
        for button in (self.plan_button, self.export_button):
            button.layout.width = "auto"
            button.layout.min_width = "max-content"
        self.plan_button.on_click(self._plan_clicked)
        self.export_button.on_click(self._export_clicked)
        for option in (self.format, self.destination, self.subtree, self.shard_size):
            option.observe(self._options_changed, "value")
        self.overwrite.observe(self._options_changed, "value")
        self._row = ProgressRow("nnx-ckpt-export-progress", "nnx-ckpt-export-progress-text")
        self._worker = Worker("nnx-ckpt-export", self._row, self._busy)
        self.bar, self.bar_text, self.progress = self._row.bar, self._row.text, self._row.box
        self.status_html = w.HTML()
        self.plan_html = w.HTML()
        # Each option keeps a gap after it: a checkbox's label must not read as the next
        # option's ("selected subtree only shard size").
        for option in (self.format, self.destination, self.subtree, self.shard_size):
            option.layout.margin = "2px 14px 2px 2px"
        row = w.Layout(flex_flow="row wrap", align_items="center")
        self.options_box = w.HBox(
            [self.format, self.destination, self.subtree, self.shard_size, self.overwrite],
            layout=row,
        )
        actions = w.HBox([self.plan_button, self.export_button, self.progress], layout=row)
        super().__init__([self.options_box, actions, self.status_html, self.plan_html])
        self.add_class("nnx-ckpt-export-panel")
        self._enable(True)
        self.clear()

    def set_info(self, info: CheckpointInfo) -> None:
        """Export another step or item: the plan shown is dropped, nothing is read."""
        self.info = info
        self.clear()

    def selection_changed(self) -> None:
        """The tree's selection moved: a plan of the selected subtree no longer holds."""
        if self.subtree.value:
            self.clear()

    def clear(self, why: str = "") -> None:
        """Drop the plan shown; a run still going finishes and its outcome is dropped."""
        with self._lock:
            self._generation += 1
            self.plan = self.error = None
            self.plan_html.value = ""
            text = why or (
                "Nothing written: Plan shows what Export would write."
                if self.destination.value.strip()
                else "Nothing written: type a destination, then Plan or Export."
            )
            self._set_status("ready", text)

    def options(self, dry_run: bool) -> dict[str, Any]:
        """The keyword arguments the buttons pass to :func:`convert` (``src`` included)."""
        info = self.info
        kwargs: dict[str, Any] = {
            "src": info.path,
            "dst": self.destination.value.strip(),
            "to": self.format.value,
            "step": info.step,
            "item": info.item,
            "overwrite": bool(self.overwrite.value),
            "dry_run": dry_run,
        }
        if self.format.value == "safetensors":
            kwargs["max_shard_size"] = self.shard_size.value.strip()
        chosen = self.selected() if self.subtree.value else None
        if chosen is not None:
            kwargs["select"] = select_pattern(chosen[1])
        return kwargs

    def _options_changed(self, _change: Any = None) -> None:
        self.destination.tooltip = self.destination.value.strip() or _DESTINATION_TIP
        self._enable(not self.running)
        self.clear()

    def _enable(self, idle: bool) -> None:
        self.plan_button.disabled = not idle
        # Nothing can be written before a destination is typed.
        self.export_button.disabled = not idle or not self.destination.value.strip()
        for option in (self.format, self.destination, self.subtree, self.overwrite):
            option.disabled = not idle
        self.shard_size.disabled = not idle or self.format.value != "safetensors"

    def _busy(self, busy: bool) -> None:
        self.running = busy
        self._enable(not busy)

    def _plan_clicked(self, _button: Any = None) -> None:
        self._start(self.options(dry_run=True))

    def _export_clicked(self, _button: Any = None) -> None:
        if not self.destination.value.strip():
            return  # the button is disabled then; a click from Python does nothing either
        self._start(self.options(dry_run=False))

    def _start(self, kwargs: dict[str, Any]) -> None:
        with self._lock:
            generation = self._generation
        what = _what(self.selected() if self.subtree.value else None)
        verb = "Planning" if kwargs["dry_run"] else "Exporting"

        def tick(elapsed: float) -> None:
            self._show(
                generation,
                lambda: self._set_status("running", f"{verb} {what}…", f"{elapsed:.1f} s"),
            )

        self._worker.start(self._run, generation, kwargs, f"{verb} {what}…", on_tick=tick)

    def _show(self, generation: int, show: Callable[[], None]) -> None:
        """Run ``show`` unless the options, step or item changed since the run began."""
        with self._lock:
            if generation == self._generation:
                show()

    def _run(self, generation: int, kwargs: dict[str, Any], doing: str) -> Callable[[], None]:
        """Convert, in the worker's thread; returns what shows its outcome."""
        dry_run = kwargs["dry_run"]
        self._row.update(0, 0)
        self._show(generation, lambda: self._set_status("running", doing, "0.0 s"))
        try:
            if kwargs["dst"]:
                plan = convert(**kwargs, progress=self._row.update)
            else:
                plan = _plan_without_destination(kwargs)
        except Exception as err:  # every failure becomes the status line; nothing was written
            error = err  # `err` is unbound when the except block ends; the closure keeps this
            lead = "Cannot plan" if dry_run else "Export failed"

            def failed() -> None:
                self.error = error
                self.plan_html.value = ""
                self._set_status("failed", f"{lead}: {one_line(error)}")

            return lambda: self._show(generation, failed)

        def done() -> None:
            self.plan = plan
            # The plan's own table (its _repr_html_), but its summary is the status line.
            self.plan_html.value = plan_html(plan, title=False)
            if dry_run:
                self._set_status("planned", plan.summary())
            else:
                self.result = plan
                elapsed = self._worker.elapsed or 0.0
                # The outcome is a sentence; the status adds the time after it, without its
                # stop, as the Restore panel does.
                self._set_status("done", plan.summary()[:-1], f"in {elapsed:.2f} s")

        return lambda: self._show(generation, done)

    def _set_status(self, state: str, text: str, timing: str = "") -> None:
        self.phase, self.status = state, text
        extra = f' <span class="nnx-ckpt-dim">{esc(timing)}</span>' if timing else ""
        self.status_html.value = (
            f'<div class="nnx-ckpt-export-status nnx-ckpt-text" data-state="{esc(state)}">'
            f"{esc(_text.clip(text, 400))}{extra}</div>"
        )

    def wait(self, timeout: float | None = None) -> ConvertPlan | None:
        """Block until a running plan or export ends (for notebooks that click from Python).

        Returns:
          The plan shown (``written`` is True after an export), or None after a failure
          (``error`` says why).
        """
        self._worker.wait(timeout)
        return self.plan

    def text(self) -> str:
        """What the panel shows, as text: the status and the plan."""
        lines = [f"export: {self.status}"]
        if self.plan is not None:
            lines.extend(str(self.plan).splitlines()[1:])
        return "\n".join(lines)


def _what(chosen: tuple[str, list[_keypaths.KeyPath]] | None) -> str:
    return "the checkpoint" if chosen is None else _text.clip(chosen[0] or "the checkpoint", 80)


def _plan_without_destination(kwargs: dict[str, Any]) -> ConvertPlan:
    """The plan before a destination is typed: planned for a folder that cannot exist (inside
    a new empty temporary folder, which a dry run never writes to), and shown as going nowhere
    yet."""
    with tempfile.TemporaryDirectory(prefix="nnx-ckpt-plan-") as scratch:
        plan = convert(**{**kwargs, "dst": os.path.join(scratch, "export"), "dry_run": True})
    return dataclasses.replace(plan, dst="(no destination yet)")
