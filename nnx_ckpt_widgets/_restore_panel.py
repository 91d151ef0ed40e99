"""``RestorePanel``: the load report of a checkpoint against a model, and a Restore button.

A restore runs in a worker thread, so the page keeps updating the elapsed time while Orbax
reads. One lock guards the start: the button is disabled and ``running`` is set before the
thread starts, and a click that finds a restore running does nothing, so two clicks never
run two restores. :meth:`RestorePanel.wait` blocks until the restore has finished, for
notebooks that click from Python and assert the result.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ipywidgets as w
import traitlets

from nnx_ckpt_widgets import render
from nnx_ckpt_widgets._display import MONO, one_line
from nnx_ckpt_widgets.compare import LoadReport, build_report, flatten_target
from nnx_ckpt_widgets.metadata import CheckpointInfo
from nnx_ckpt_widgets.restore import restore

_TICK = 0.25  # seconds between updates of the elapsed time while a restore runs
# Cell spacing for the report table, scoped to our widgets; a <style> is not a script.
_REPORT_STYLE = (
    "<style>.nnx-ckpt-browser .nnx-ckpt-report th,.nnx-ckpt-browser .nnx-ckpt-report td"
    "{padding:1px 14px 1px 0;vertical-align:top}</style>"
)
_COLOURS = {"ready": "inherit", "running": "#0969da", "done": "#1a7f37", "failed": "#cf222e"}


class RestorePanel(w.VBox):
    """The colour-coded load report, the options of :func:`restore`, a button and a status.

    Args:
      info: the checkpoint, as :func:`nnx_ckpt_widgets.inspect` read it.
      model: the NNX model (or other graph node, or ``nnx.State``) to restore into.
    """

    status = traitlets.Unicode(
        "",
        help="The status line as text: 'Ready ...', 'Restoring ...', 'Restored ...' or "
        "'Restore failed: <reason>'.",
    )
    running = traitlets.Bool(False, help="True while a restore runs; the button is disabled.")

    def __init__(self, info: CheckpointInfo, model: Any):
        self.model = model
        self.report: LoadReport | None = None
        self.error: BaseException | None = None
        self.result: LoadReport | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.report_html = w.HTML()
        self.mode = w.ToggleButtons(
            options=[("strict", True), ("lenient", False)],
            value=True,
            tooltips=[
                "any difference between checkpoint and model fails the restore",
                "keep or zero missing keys, skip unexpected ones",
            ],
            style=w.ToggleButtonsStyle(button_width="72px"),
        )
        self.missing = w.Dropdown(
            options=["keep", "zeros"], description="missing", layout=w.Layout(width="170px")
        )
        self.unexpected = w.Dropdown(
            options=["ignore", "error"], description="unexpected", layout=w.Layout(width="190px")
        )
        self.cast = w.Checkbox(description="cast dtypes", indent=False)
        self.button = w.Button(description="Restore", button_style="primary", icon="download")
        self.button.add_class("nnx-ckpt-restore")
        self.status_html = w.HTML()
        for option in (self.mode, self.missing, self.unexpected, self.cast):
            option.observe(self._options_changed, "value")
        self.button.on_click(self._clicked)
        self.options_box = w.HBox(
            [self.mode, self.missing, self.unexpected, self.cast],
            layout=w.Layout(flex_flow="row wrap", align_items="center"),
        )
        super().__init__(
            [
                self.report_html,
                self.options_box,
                w.HBox([self.button, self.status_html], layout=w.Layout(align_items="center")),
            ]
        )
        self.set_info(info)

    def set_info(self, info: CheckpointInfo) -> None:
        """Compare another step or item with the model; a running restore is not touched."""
        self.info = info
        self.result = self.error = None
        self.report = build_report(info, flatten_target(self.model))
        self.report_html.value = _REPORT_STYLE + render.report_html(self.report)
        self._options_changed()

    def options(self) -> dict[str, Any]:
        """The keyword arguments the button passes to :func:`restore`."""
        return {
            "step": self.info.step,
            "item": self.info.item,
            "strict": self.mode.value,
            "missing": self.missing.value,
            "unexpected": self.unexpected.value,
            "cast": self.cast.value,
        }

    def _options_changed(self, _change: Any = None) -> None:
        lenient = not self.mode.value
        for option in (self.missing, self.unexpected, self.cast):
            option.disabled = not lenient or self.running
        if not self.running:
            self._set_status("ready", self._ready_text())

    def _ready_text(self) -> str:
        report = self.report
        arrays, nbytes = _to_read(report)
        if self.mode.value and not report.ok:
            return f"A strict restore will fail: {render.clip(report.summary(), 200)}."
        return f"Ready to restore {arrays} arrays ({render.human_bytes(nbytes)})."

    def _clicked(self, _button: Any = None) -> None:
        with self._lock:
            if self.running:
                return  # a restore is running: this click must not start another
            self.running = True
            self.button.disabled = True
            for option in (self.mode, self.missing, self.unexpected, self.cast):
                option.disabled = True
            self.error = self.result = None
            kwargs = self.options()
            self._thread = threading.Thread(
                target=self._run, args=(kwargs,), name="nnx-ckpt-restore", daemon=True
            )
            self._thread.start()

    def _run(self, kwargs: dict[str, Any]) -> None:
        arrays, nbytes = _to_read(self.report)
        what = f"{arrays} arrays ({render.human_bytes(nbytes)})"
        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(_TICK):
                elapsed = time.perf_counter() - start
                self._set_status("running", f"Restoring {what}…", f"{elapsed:.1f} s")

        self._set_status("running", f"Restoring {what}…", "0.0 s")
        ticker = threading.Thread(target=tick, name="nnx-ckpt-restore-tick", daemon=True)
        ticker.start()
        try:
            result = restore(self.info.path, self.model, **kwargs)
        except Exception as err:  # every failure becomes the status line; the model is intact
            done.set()
            ticker.join()
            self.error = err
            self._set_status("failed", f"Restore failed: {one_line(err)}")
        else:
            done.set()
            ticker.join()
            self.result = result
            self.report_html.value = _REPORT_STYLE + render.report_html(result)
            elapsed = time.perf_counter() - start
            self._set_status(
                "done",
                f"Restored {result.restored_arrays} arrays "
                f"({render.human_bytes(result.restored_bytes or 0)}).",
                f"in {elapsed:.2f} s",
            )
        finally:
            self.running = False
            self.button.disabled = False
            self._options_changed_after_run()

    def _options_changed_after_run(self) -> None:
        lenient = not self.mode.value
        self.mode.disabled = False
        for option in (self.missing, self.unexpected, self.cast):
            option.disabled = not lenient

    def _set_status(self, state: str, text: str, timing: str = "") -> None:
        self.status = text
        extra = f' <span style="opacity:.7">{render.esc(timing)}</span>' if timing else ""
        self.status_html.value = (
            f'<span class="nnx-ckpt-status" data-state="{state}" '
            f'style="{MONO};color:{_COLOURS[state]};overflow-wrap:anywhere">'
            f"{render.esc(text)}{extra}</span>"
        )

    def wait(self, timeout: float | None = None) -> LoadReport | None:
        """Block until the running restore (if any) ends.

        Args:
          timeout: seconds to wait at most; ``None`` waits as long as it takes.

        Returns:
          The report of the last restore when it succeeded, else ``None`` (``error`` says why).
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.result


def _to_read(report: LoadReport | None) -> tuple[int, int]:
    """Arrays and bytes a restore will read: the matched keys and the ones to cast."""
    if report is None:
        return 0, 0
    entries = [e for e in report.entries if e.status in ("matched", "dtype mismatch")]
    return len(entries), sum(e.checkpoint.nbytes for e in entries)
