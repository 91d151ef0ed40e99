"""``RestorePanel``: the load report of a checkpoint against a model, and a Restore button.

The panel tells one story at a time. Before a restore, and again whenever an option, the step
or the item changes, the report is the comparison and the status says what the current options
will do ("Ready to restore 4 arrays (104 B) and zero-fill 2", or why they will fail). After a
restore, the report lists what was done and the status counts it; after a failed one, the
report is the comparison again and the status says why. In strict mode the lenient options are
disabled and show what strict means (``missing: error``, ``unexpected: error``, no casts); the
lenient choices come back when lenient is chosen again.

A restore runs in a worker thread, so the page keeps updating while Orbax reads: after a second,
a progress bar with the bytes read, the total and the elapsed time. One lock guards the start:
the button is disabled and ``running`` is set before the thread starts, and a click that finds
a restore running does nothing, so two clicks never run two restores. :meth:`RestorePanel.wait`
blocks until the restore has finished, for notebooks that click from Python.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import ipywidgets as w
import traitlets

from nnx_ckpt_widgets import _text, render
from nnx_ckpt_widgets._display import PROGRESS_AFTER, ProgressRow, Worker, one_line

__all__ = ["PROGRESS_AFTER", "RestorePanel"]
from nnx_ckpt_widgets.compare import LoadReport, Transform, build_report, flatten_target
from nnx_ckpt_widgets.metadata import CheckpointInfo
from nnx_ckpt_widgets.plan import MISSING_POLICIES, UNEXPECTED_POLICIES, RestorePlan
from nnx_ckpt_widgets.restore import apply_plan

State = Literal["ready", "warn", "running", "done", "failed"]
_STRICT = "error"  # what the disabled lenient options show in strict mode


class RestorePanel(w.VBox):
    """The colour-coded load report, the options of :func:`restore`, a button and a status.

    Args:
      info: the checkpoint, as :func:`nnx_ckpt_widgets.inspect` read it.
      model: the NNX model (or other graph node, or ``nnx.State``) to restore into.
    """

    status = traitlets.Unicode(
        "",
        help="The status line as text: 'Ready ...', 'A strict restore will fail: ...', "
        "'Restoring ...', 'Restored ...' or 'Restore failed: <reason>'.",
    )
    phase = traitlets.Enum(
        ("ready", "warn", "running", "done", "failed"),
        "ready",
        help="What the status says: ready, warn (the options will fail), running, done, failed.",
    )
    running = traitlets.Bool(False, help="True while a restore runs; the button is disabled.")

    def __init__(
        self,
        info: CheckpointInfo,
        model: Any,
        *,
        rename: Mapping[str, str] | None = None,
        transform: Mapping[str, Transform] | None = None,
        stack: Mapping[str, int] | None = None,
        unstack: Mapping[str, int] | None = None,
    ):
        self.model = model
        self.targets = flatten_target(model)
        self.info = info
        self._keys: dict[str, Any] = {
            "rename": rename,
            "transform": transform,
            "stack": stack,
            "unstack": unstack,
        }
        self.report: LoadReport = build_report(info, self.targets, **self._keys)
        self.error: BaseException | None = None
        self.result: LoadReport | None = None
        self.elapsed: float | None = None  # seconds the last restore took
        self._syncing = False  # set while the panel itself moves option values
        self._lenient = {"missing": "keep", "unexpected": "ignore", "cast": False}
        self.report_html = w.HTML()
        self.mode = w.ToggleButtons(
            options=[("strict", True), ("lenient", False)],
            value=True,
            tooltips=[
                "any difference between checkpoint and model fails the restore",
                "keep or zero missing keys, skip unexpected ones",
            ],
            style=w.ToggleButtonsStyle(button_width="auto"),
        )
        self.mode.add_class("nnx-ckpt-mode")
        initial = {"description_width": "initial"}
        self.missing = w.Dropdown(
            options=[_STRICT], description="missing", style=initial, layout=w.Layout(width="auto")
        )
        self.unexpected = w.Dropdown(
            options=[_STRICT],
            description="unexpected",
            style=initial,
            layout=w.Layout(width="auto"),
        )
        self.cast = w.Checkbox(description="cast dtypes", indent=False)
        self.cast.layout.width = "auto"
        self.button = w.Button(description="Restore", button_style="primary", icon="download")
        self.button.layout.width = "auto"
        self.button.layout.min_width = "max-content"
        self.button.add_class("nnx-ckpt-restore")
        self._row = ProgressRow("nnx-ckpt-progress", "nnx-ckpt-progress-text")
        self._worker = Worker("nnx-ckpt-restore", self._row, self._busy)
        self.bar, self.bar_text, self.progress = self._row.bar, self._row.text, self._row.box
        self.status_html = w.HTML()
        for option in (self.mode, self.missing, self.unexpected, self.cast):
            option.observe(self._options_changed, "value")
        self.button.on_click(self._clicked)
        self.options_box = w.HBox(
            [self.mode, self.missing, self.unexpected, self.cast],
            layout=w.Layout(flex_flow="row wrap", align_items="center"),
        )
        # The status has a row of its own: a long error wraps there and never squeezes the
        # button (which does not shrink: see the stylesheet).
        actions = w.HBox(
            [self.button, self.progress],
            layout=w.Layout(flex_flow="row wrap", align_items="center"),
        )
        super().__init__([self.report_html, self.options_box, actions, self.status_html])
        self.add_class("nnx-ckpt-panel")
        self._sync_options()
        self._show_plan()

    def set_info(self, info: CheckpointInfo) -> None:
        """Compare another step or item with the model; a running restore is not touched."""
        self.info = info
        self.report = build_report(info, self.targets, **self._keys)
        self._show_plan()

    def options(self) -> dict[str, Any]:
        """The keyword arguments the button passes to :func:`restore.apply_report`."""
        if self.mode.value:
            return {"strict": True, "missing": "keep", "unexpected": "ignore", "cast": False}
        return {"strict": False, **self._lenient}

    def _options_changed(self, change: dict[str, Any]) -> None:
        if self._syncing or self.running:
            return
        owner = change["owner"]
        if owner is not self.mode:
            name = {self.missing: "missing", self.unexpected: "unexpected", self.cast: "cast"}
            self._lenient[name[owner]] = change["new"]
        self._sync_options()
        self._show_plan()

    def _sync_options(self) -> None:
        """Enable the controls for the mode, and let the disabled ones show what strict means."""
        strict = bool(self.mode.value)
        self._syncing = True
        try:
            if strict:
                self.missing.options = self.unexpected.options = [_STRICT]
                self.missing.value = self.unexpected.value = _STRICT
                self.cast.value = False
            else:
                self.missing.options = MISSING_POLICIES
                self.unexpected.options = UNEXPECTED_POLICIES
                self.missing.value = self._lenient["missing"]
                self.unexpected.value = self._lenient["unexpected"]
                self.cast.value = self._lenient["cast"]
        finally:
            self._syncing = False
        self._enable(not self.running)

    def _enable(self, idle: bool) -> None:
        self.button.disabled = self.mode.disabled = not idle
        lenient_controls = idle and not self.mode.value
        for option in (self.missing, self.unexpected, self.cast):
            option.disabled = not lenient_controls

    def _show_plan(self) -> None:
        """The comparison, and what the current options would do with it."""
        self.result = self.error = None
        self.report_html.value = render.report_html(self.report)
        self._set_status(*self._plan())

    def plan(self) -> RestorePlan:
        """What the Restore button will do with the current options: the plan that
        :func:`~nnx_ckpt_widgets.restore.apply_plan` carries out, so the status and the
        restore can never disagree."""
        return self.report.plan(**self.options())

    def _plan(self) -> tuple[State, str]:
        plan = self.plan()
        if plan.refusal is not None:
            lead = "A strict restore will fail" if plan.options.strict else "This restore will fail"
            why = _text.clip(plan.refusal.reason, 200)
            return "warn", f"{lead}: {why}. {plan.refusal.controls}"
        return "ready", plan.summary().rstrip(".")

    def _clicked(self, _button: Any = None) -> None:
        plan = self.plan()
        what = f"{_text.plural(plan.read_arrays, 'array')} ({_text.human_bytes(plan.read_bytes)})"

        def tick(elapsed: float) -> None:
            self._set_status("running", f"Restoring {what}…", f"{elapsed:.1f} s")

        self._worker.start(self._run, plan, what, on_tick=tick)

    def _busy(self, busy: bool) -> None:
        self.running = busy
        self._enable(not busy)

    def _run(self, plan: RestorePlan, what: str) -> Callable[[], None]:
        """The restore, in the worker's thread; returns what shows its outcome."""
        self.error = self.result = None
        report = plan.report
        self._row.update(0, plan.read_bytes)
        self._set_status("running", f"Restoring {what}…", "0.0 s")
        try:
            result = apply_plan(plan, self.model, progress=self._row.update)
        except Exception as err:  # every failure becomes the status line; the model is intact
            error = err  # `err` is unbound when the except block ends; the closure keeps this
            refusal = plan.refusal
            why = (
                f"Checkpoint at {report.path} does not fit the target: {refusal.reason}. "
                f"{refusal.controls}"
                if refusal is not None
                else one_line(err)
            )

            def failed() -> None:
                self.elapsed = self._worker.elapsed
                self.error = error
                self.report_html.value = render.report_html(report)
                self._set_status("failed", f"Restore failed: {why}")

            return failed

        def done() -> None:
            self.elapsed = self._worker.elapsed
            self.result = result
            # The report's last line would repeat the outcome that the status line gives.
            advice = f"<div><b>{render.esc(result.advice)}</b></div>"
            self.report_html.value = render.report_html(result).replace(advice, "")
            # The outcome is a sentence; the status adds the time after it, without its stop.
            outcome = (result.outcome or "Restored").rstrip(".")
            self._set_status("done", outcome, f"in {self.elapsed:.2f} s")

        return done

    def _set_status(self, state: State, text: str, timing: str = "") -> None:
        self.phase, self.status = state, text
        extra = f' <span class="nnx-ckpt-dim">{render.esc(timing)}</span>' if timing else ""
        self.status_html.value = (
            f'<div class="nnx-ckpt-status nnx-ckpt-text" data-state="{state}">'
            f"{render.esc(text)}{extra}</div>"
        )

    def wait(self, timeout: float | None = None) -> LoadReport | None:
        """Block until the running restore (if any) ends.

        Args:
          timeout: seconds to wait at most; ``None`` waits as long as it takes.

        Returns:
          The report of the last restore when it succeeded, else ``None`` (``error`` says why).
        """
        self._worker.wait(timeout)
        return self.result
