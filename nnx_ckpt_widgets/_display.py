"""Shared pieces of the widgets: one stylesheet, theme colours, treescope outputs, text reprs.

Treescope is the renderer behind ``nnx.display``. Its HTML carries scripts, which
``ipywidgets.HTML`` never runs, so it goes into an ``ipywidgets.Output`` as a display-data
output (the front-ends render those as trusted outputs), with treescope's text rendering as the
``text/plain`` fallback.

Colours are JupyterLab's ``--jp-*`` theme variables, so they follow the light and dark themes;
the status colours are :data:`nnx_ckpt_widgets.render.COLOURS`, shared with the reports.
"""

from __future__ import annotations

import time
from typing import Any

from nnx_ckpt_widgets.render import COLOURS

MONO = "font-family:var(--jp-code-font-family,monospace);font-size:12px"


# One stylesheet for every widget of ours, scoped by class; a <style> is not a script, and the
# HTML widget that holds it shows nothing. Scrollbars are styled so that they show on systems
# with overlay scrollbars too (macOS): a pane that scrolls must look like it does.
STYLE = f"""<style>
.nnx-ckpt {{ color: var(--jp-ui-font-color1, #1f2328); }}
.nnx-ckpt .nnx-ckpt-scroll {{ overflow: auto; }}
.nnx-ckpt .nnx-ckpt-scroll, .nnx-ckpt .nnx-ckpt-scroll .jp-OutputArea-output {{
  scrollbar-width: thin;
  scrollbar-color: var(--jp-border-color1, #999) transparent;
}}
.nnx-ckpt .nnx-ckpt-report th, .nnx-ckpt .nnx-ckpt-report td,
.nnx-ckpt .nnx-ckpt-values-table th, .nnx-ckpt .nnx-ckpt-values-table td,
.nnx-ckpt .nnx-ckpt-plan th, .nnx-ckpt .nnx-ckpt-plan td {{
  padding: 1px 14px 1px 0; vertical-align: top;
}}
/* ipywidgets gives HTML content the line height of a control (28 px): text reads better at 1.45.
   min-width 0: a wide table inside scrolls in its own pane instead of widening the panel. */
.nnx-ckpt .widget-html-content {{ line-height: 1.45; min-width: 0; }}
/* Only key names break anywhere; a status, a shape or an action stays whole. */
.nnx-ckpt .nnx-ckpt-report td {{ overflow-wrap: normal; word-break: normal; }}
.nnx-ckpt .nnx-ckpt-report td:nth-child(2) {{ overflow-wrap: anywhere; }}
.nnx-ckpt .nnx-ckpt-report td:first-child, .nnx-ckpt .nnx-ckpt-report td:nth-child(n + 3) {{
  white-space: nowrap;
}}
.nnx-ckpt .nnx-ckpt-dim {{ color: var(--jp-ui-font-color2, #59636e); }}
.nnx-ckpt .nnx-ckpt-text {{ {MONO}; overflow-wrap: anywhere; word-break: break-word; }}
.nnx-ckpt .nnx-ckpt-status[data-state="running"],
.nnx-ckpt .nnx-ckpt-values-status[data-state="running"],
.nnx-ckpt .nnx-ckpt-export-status[data-state="running"] {{ color: {COLOURS["running"]}; }}
.nnx-ckpt .nnx-ckpt-status[data-state="done"],
.nnx-ckpt .nnx-ckpt-values-status[data-state="done"],
.nnx-ckpt .nnx-ckpt-export-status[data-state="done"] {{ color: {COLOURS["done"]}; }}
.nnx-ckpt .nnx-ckpt-status[data-state="failed"],
.nnx-ckpt .nnx-ckpt-values-status[data-state="failed"],
.nnx-ckpt .nnx-ckpt-export-status[data-state="failed"],
.nnx-ckpt .nnx-ckpt-error {{ color: {COLOURS["failed"]}; }}
.nnx-ckpt .nnx-ckpt-status[data-state="warn"],
.nnx-ckpt .nnx-ckpt-values-status[data-state="warn"],
.nnx-ckpt .nnx-ckpt-export-status[data-state="warn"] {{ color: {COLOURS["warn"]}; }}
.nnx-ckpt .widget-button, .nnx-ckpt .widget-toggle-button {{ flex-shrink: 0; }}
.nnx-ckpt button.nnx-ckpt-name {{
  flex-shrink: 1; min-width: 3em; text-align: left; color: var(--jp-ui-font-color1, #1f2328);
}}
/* The tree and the treescope pane never touch: "4 B" and "Click a name" must not read as one. */
.nnx-ckpt .nnx-ckpt-tree {{ container-type: inline-size; column-gap: 16px; row-gap: 8px; }}
.nnx-ckpt .nnx-ckpt-tree-pane {{ flex: 0 1 auto; min-width: 220px; max-width: 55%; }}
/* Too narrow for two panes side by side: the tree above, treescope below, both full width. */
@container (max-width: 640px) {{
  .nnx-ckpt .nnx-ckpt-tree-pane, .nnx-ckpt .nnx-ckpt-detail {{ flex: 1 1 100%; max-width: 100%; }}
}}
/* Rows keep their height in a pane of bounded height: the pane scrolls, rows never shrink. */
.nnx-ckpt .nnx-ckpt-scroll .widget-box, .nnx-ckpt .nnx-ckpt-scroll .widget-html {{
  flex-shrink: 0;
}}
.nnx-ckpt .nnx-ckpt-scroll .widget-html {{ height: auto; }}
.nnx-ckpt .nnx-ckpt-detail {{ flex: 1 1 300px; min-width: 0; }}
/* Treescope 0.1.10 draws black on white whatever the theme (no colour variables): on a dark
   theme its pane and heatmaps are inverted, hues kept, by the rule that _TREESCOPE_CSS puts in
   its shadow root; custom properties cross the shadow boundary, so this switch reaches it. */
body[data-jp-theme-light="false"] .nnx-ckpt {{
  --nnx-ckpt-treescope-filter: invert(1) hue-rotate(180deg);
  --nnx-ckpt-treescope-background: transparent;
}}
</style>"""


def stylesheet() -> Any:
    """A new HTML widget holding :data:`STYLE`; every top-level widget of ours shows one."""
    import ipywidgets as w

    sheet = w.HTML(STYLE, layout=w.Layout(display="none"))
    sheet.add_class("nnx-ckpt-style")
    return sheet


def treescope_output(value: Any, text: str | None = None, *, even: bool = False) -> dict[str, Any]:
    """A display-data output of ``value`` rendered by treescope.

    Args:
      value: what to render.
      text: the ``text/plain`` fallback; treescope's text rendering of ``value`` when None.
      even: expand every container and fold every leaf (an array shows as its one-line
        summary), instead of treescope's balanced layout, which unfolds whatever fits and so
        shows one array in full and the next folded. Two renderings meant to be read side by
        side then look alike.
    """
    import contextlib

    import treescope

    scope = (
        treescope.active_expansion_strategy.set_scoped(_expand_containers)
        if even
        else contextlib.nullcontext()
    )
    with scope:
        html = _treescope_html(value)
        if text is None:
            text = treescope.render_to_text(value, ignore_exceptions=True)
    return {
        "output_type": "display_data",
        "data": {"text/html": html, "text/plain": text},
        "metadata": {},
    }


# Treescope draws on its own white pane in either theme; its comments ("# Param: 144 (576 B)")
# are #aaaaaa there, 2.3:1. This grey is 5:1 on white (and, inverted, 5.8:1 on the dark
# theme's #111). On a dark theme the stylesheet sets the two variables: the root lets the page's
# dark background through and is inverted with its hues turned back, so black text reads white;
# a heatmap's canvas is turned back once more, so its colours are the colour scale's. The rules
# go inside treescope's shadow root, after treescope's own, so they win.
_TREESCOPE_CSS = (
    "<style>.color_comment, .color_comment a:not(:hover), .color_comment_when_expanded "
    "{ color: #707070 !important; }"
    # The heatmap's caption and zoom controls: #aaaaaa and a half-transparent filter, 2.3:1.
    ".arrayviz_container .info, .arrayviz_container .loading_message"
    " { color: #707070 !important; }"
    ".arrayviz_container .info input { filter: none !important; color: #595959 !important;"
    " background-color: white !important; accent-color: #595959; }"
    # Form controls drawn light, as the rest, whatever the page's color-scheme: on a dark
    # theme the filter below turns them dark with the rest.
    ".treescope_root, .arrayviz_container { color-scheme: light; }"
    # A figure (render_array) has no root: its container is the top.
    ".treescope_root, .arrayviz_container:not(.treescope_root *)"
    " { background-color: var(--nnx-ckpt-treescope-background, white) !important;"
    " filter: var(--nnx-ckpt-treescope-filter, none); }"
    # Inverted twice (the filter commutes with inversion), a heatmap keeps its true colours.
    " canvas { filter: var(--nnx-ckpt-treescope-filter, none); }</style>"
)


def _treescope_html(value: Any) -> str:
    """``treescope.render_to_html(value)``, with :data:`_TREESCOPE_CSS` in its shadow root.

    This uses two functions inside treescope 0.1.10 (the two steps of ``render_to_html``);
    should they change, the plain rendering is used, and the browser test's contrast and
    dark-background checks say so.
    """
    import treescope

    try:
        from treescope import rendering_parts
        from treescope._internal.api import default_renderer

        tree = rendering_parts.build_full_line_with_annotations(
            default_renderer.build_foldable_representation(value, ignore_exceptions=True)
        )
        return _part_html(tree)
    except (ImportError, AttributeError, TypeError):
        return treescope.render_to_html(value, ignore_exceptions=True)


def _part_html(part: Any) -> str:
    """A treescope rendering part as encapsulated HTML, with :data:`_TREESCOPE_CSS` inside."""
    from treescope import lowering
    from treescope._internal import html_encapsulation

    source = "".join(lowering._render_to_html_as_root_streaming(part, False, []))
    return html_encapsulation.encapsulate_html(source + _TREESCOPE_CSS, compress=True)


def figure_html(figure: Any) -> str:
    """A treescope figure (``treescope.render_array(...)``) as HTML that follows the theme.

    Falls back to the figure's own ``_repr_html_`` (white in either theme) should treescope's
    internals move.
    """
    try:
        return _part_html(figure.treescope_part)
    except (ImportError, AttributeError, TypeError):
        html: str = figure._repr_html_()
        return html


def _expand_containers(tree: Any) -> None:
    """A treescope expansion strategy: open a foldable exactly when it holds other foldables."""
    from treescope import rendering_parts

    for foldable in tree.foldables_in_this_part():
        inner = foldable.as_expanded_part()
        if inner.foldables_in_this_part():
            foldable.set_expand_state(rendering_parts.ExpandState.EXPANDED)
            _expand_containers(inner)
        else:
            foldable.set_expand_state(rendering_parts.ExpandState.COLLAPSED)


def full_text_bundle(widget: Any, **kwargs: Any) -> dict[str, Any] | None:
    """``widget``'s mime bundle with the whole ``repr`` as text/plain.

    ipywidgets cuts text/plain at 110 characters; our reprs are multi-line summaries that
    nbval compares, so they go in whole.
    """
    from ipywidgets import DOMWidget

    bundle: dict[str, Any] | None = DOMWidget._repr_mimebundle_(widget, **kwargs)
    if bundle is not None:
        bundle["text/plain"] = repr(widget)
    return bundle


def one_line(err: BaseException, width: int = 300) -> str:
    """The first line of an error's message, shortened, for a status line."""
    from nnx_ckpt_widgets._text import clip
    from nnx_ckpt_widgets.errors import first_line

    return clip(first_line(err, width=None), width)


class ProgressRow:
    """A panel's progress row: a bar and "done of total · elapsed", hidden until shown.

    ``update`` is the ``progress(done, total)`` callback, called from the worker thread; the
    panel's ticker calls ``show`` with the elapsed time and ``hide`` when the work ends.
    """

    def __init__(self, box_class: str, text_class: str) -> None:
        import ipywidgets as w

        self.text_class = text_class
        self.done = self.total = 0
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="160px"))
        self.text = w.HTML()
        self.box = w.HBox(
            [self.bar, self.text], layout=w.Layout(display="none", align_items="center")
        )
        self.box.add_class(box_class)

    def update(self, done: int, total: int) -> None:
        self.done, self.total = done, total

    def show(self, elapsed: float) -> None:
        from nnx_ckpt_widgets._text import human_bytes

        done, total = self.done, self.total
        self.bar.value = done / total if total else 0.0
        self.text.value = (
            f'<span class="nnx-ckpt-text {self.text_class}">'
            f"{human_bytes(done)} of {human_bytes(total)} · {elapsed:.1f} s</span>"
        )
        self.box.layout.display = "flex"

    def hide(self) -> None:
        self.box.layout.display = "none"


TICK = 0.25  # seconds between updates of the elapsed time and the progress row
PROGRESS_AFTER = 1.0  # seconds: work that takes longer shows the progress row


class Worker:
    """A panel's background work: one job at a time in a thread, with a ticker.

    ``start`` runs ``job`` in a daemon thread unless one is running (the caller's button is
    disabled first, through ``on_busy``); while it runs, ``on_tick(elapsed)`` is called every
    :data:`TICK` seconds and the progress row shows after :data:`PROGRESS_AFTER`. The job may
    return a function that shows its outcome: it runs once the ticker has stopped, so no tick
    can overwrite the outcome; then the row hides and ``on_busy(False)`` re-enables the
    controls. ``wait`` blocks until it all ends, for notebooks that click from Python. Elapsed
    time is read from this module's ``time``, which tests replace with a clock they move.
    """

    def __init__(self, name: str, row: ProgressRow, on_busy: Any) -> None:
        import threading

        self.name, self.row, self.on_busy = name, row, on_busy
        self.lock = threading.Lock()
        self.running = False
        self.elapsed: float | None = None
        self._thread: threading.Thread | None = None

    def start(self, job: Any, *args: Any, on_tick: Any = None) -> bool:
        """Run ``job(*args)`` in the background; False when a job is already running."""
        import threading

        with self.lock:
            if self.running:
                return False  # a second click must not start a second job
            self.running = True
            self.on_busy(True)
            self._thread = threading.Thread(
                target=self._run, args=(job, args, on_tick), name=self.name, daemon=True
            )
            self._thread.start()
        return True

    def _run(self, job: Any, args: tuple, on_tick: Any) -> None:
        import threading

        start = time.perf_counter()
        done = threading.Event()

        def tick() -> None:
            while not done.wait(TICK):
                elapsed = time.perf_counter() - start
                if on_tick is not None:
                    on_tick(elapsed)
                if elapsed >= PROGRESS_AFTER:
                    self.row.show(elapsed)

        ticker = threading.Thread(target=tick, name=f"{self.name}-tick", daemon=True)
        ticker.start()
        finish = None
        try:
            finish = job(*args)
        finally:
            done.set()
            ticker.join()
            self.elapsed = time.perf_counter() - start
            try:
                if finish is not None:
                    finish()
            finally:
                self.row.hide()
                self.running = False
                self.on_busy(False)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the running job (if any) ends."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
