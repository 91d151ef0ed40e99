"""Shared pieces of the widgets: treescope outputs, full plain-text reprs, status lines.

Treescope is the renderer behind ``nnx.display``. Its HTML carries scripts, which
``ipywidgets.HTML`` never runs, so it goes into an ``ipywidgets.Output`` as a display-data
output (the front-ends render those as trusted outputs), with treescope's text rendering as the
``text/plain`` fallback.
"""

from __future__ import annotations

from typing import Any

MONO = "font-family:var(--jp-code-font-family,monospace);font-size:12px"


def treescope_output(value: Any, text: str | None = None) -> dict[str, Any]:
    """A display-data output of ``value`` rendered by treescope.

    Args:
      value: what to render.
      text: the ``text/plain`` fallback; treescope's text rendering of ``value`` when None.
    """
    import treescope

    html = treescope.render_to_html(value, ignore_exceptions=True)
    if text is None:
        text = treescope.render_to_text(value, ignore_exceptions=True)
    return {
        "output_type": "display_data",
        "data": {"text/html": html, "text/plain": text},
        "metadata": {},
    }


def full_text_bundle(widget: Any, **kwargs: Any) -> dict[str, Any] | None:
    """``widget``'s mime bundle with the whole ``repr`` as text/plain.

    ipywidgets cuts text/plain at 110 characters; our reprs are multi-line summaries that
    nbval compares, so they go in whole.
    """
    from ipywidgets import DOMWidget

    bundle = DOMWidget._repr_mimebundle_(widget, **kwargs)
    if bundle is not None:
        bundle["text/plain"] = repr(widget)
    return bundle


def one_line(err: BaseException, width: int = 300) -> str:
    """The first line of an error's message, shortened, for a status line."""
    from nnx_ckpt_widgets import render
    from nnx_ckpt_widgets.errors import first_line

    return render.clip(first_line(err, width=None), width)
