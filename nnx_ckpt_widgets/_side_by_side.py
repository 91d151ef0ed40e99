"""``SideBySide``: two states next to each other, rendered by treescope as ``nnx.display`` does.

Typical use is a checkpoint's saved values against the model after a restore. Above the two
renderings, a line says which arrays differ; the widget's text form says the same, so a
notebook can store it. A model is shown as its ``nnx.State``, and both columns unfold the same
way (every container open, every array as its one-line summary), so that the two read alike.
Each column takes half the width and scrolls, with a scrollbar, what does not fit.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from nnx_ckpt_widgets import _keypaths, _text
from nnx_ckpt_widgets._display import full_text_bundle, stylesheet, treescope_output
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.render import esc

__all__ = ["SideBySide", "compare_states"]


class SideBySide(w.VBox):
    """Two states side by side, each through treescope, with the arrays that differ listed.

    Args:
      left: an NNX model, other graph node, ``nnx.State`` or any pytree of arrays.
      right: the same kinds, e.g. the model after a restore.
      labels: the two column titles.
    """

    def __init__(self, left: Any, right: Any, *, labels: tuple[str, str] = ("left", "right")):
        if len(labels) != 2:
            raise InvalidArgumentError(f"labels must name the two sides, got {labels!r}.")
        self.labels = (str(labels[0]), str(labels[1]))
        self.left, self.right = left, right
        self.differences = _differences(_flat(left), _flat(right))
        self.summary = w.HTML(
            f'<div class="nnx-ckpt-summary nnx-ckpt-text">{esc(self.summary_text())}</div>'
        )
        columns = []
        for label, value in zip(self.labels, (left, right), strict=True):
            output = w.Output(layout=w.Layout(max_height="480px"))
            output.add_class("nnx-ckpt-scroll")
            output.outputs = (treescope_output(_shown(value), even=True),)
            title = w.HTML(f'<b class="nnx-ckpt-text">{esc(label)}</b>')
            column = w.VBox([title, output], layout=w.Layout(flex="1 1 0", min_width="0"))
            column.add_class("nnx-ckpt-column")
            columns.append(column)
        row = w.HBox(columns, layout=w.Layout(width="100%", grid_gap="12px"))
        super().__init__([stylesheet(), self.summary, row], layout=w.Layout(width="100%"))
        self.add_class("nnx-ckpt")
        self.add_class("nnx-ckpt-side-by-side")

    @property
    def equal(self) -> bool:
        """True when both sides hold the same keys with equal arrays."""
        d = self.differences
        return not (d["different"] or d["only_left"] or d["only_right"])

    def summary_text(self) -> str:
        """One line: how many arrays each side has and which differ, layers folded."""
        d = self.differences
        parts = [f"{d['compared']} arrays compared"]
        kinds = (
            ("different", "different"),
            ("only_left", f"only in {self.labels[0]}"),
            ("only_right", f"only in {self.labels[1]}"),
        )
        for key, kind in kinds:
            paths = d[key]
            if paths:
                folded = [p for p, _ in _keypaths.fold(paths)]
                shown = ", ".join(_text.clip(p, 60) for p in folded[:5])
                more = f", and {len(folded) - 5} more" if len(folded) > 5 else ""
                parts.append(f"{len(paths)} {kind}: {shown}{more}")
        if self.equal:
            parts.append("all equal")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"SideBySide({self.labels[0]} | {self.labels[1]}): {self.summary_text()}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        return full_text_bundle(self, **kwargs)


def compare_states(
    left: Any, right: Any, *, labels: tuple[str, str] = ("saved", "restored")
) -> SideBySide:
    """Show two states side by side through treescope and list the arrays that differ.

    Args:
      left: an NNX model, other graph node, ``nnx.State`` or pytree, e.g. the saved state.
      right: the same kinds, e.g. the model after a restore.
      labels: the two column titles.

    Returns:
      A :class:`SideBySide` widget; ``.differences`` maps ``different``, ``only_left`` and
      ``only_right`` to key paths, and ``.equal`` is True when nothing differs.
    """
    return SideBySide(left, right, labels=labels)


def _shown(value: Any) -> Any:
    """What a column renders: a model (any graph node) as its ``nnx.State``."""
    from flax import nnx

    return nnx.state(value) if nnx.graph.is_graph_node(value) else value


def _flat(value: Any) -> dict[KeyPath, Any]:
    """Key path -> array of a model, ``nnx.State`` or pytree, ``value`` levels removed."""
    import jax
    from flax import nnx

    if nnx.graph.is_graph_node(value):
        value = nnx.state(value)
    if isinstance(value, nnx.State):
        out = {}
        for path, leaf in nnx.to_flat_state(value):
            out[_keypaths.to_keypath(path)] = (
                leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            )
        return out
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        flat[_keypaths.to_keypath(_keypaths.from_jax(path))] = leaf
    if _keypaths.has_variable_level(flat):
        flat = {p[:-1]: v for p, v in flat.items()}
    return flat


def _differences(left: dict[KeyPath, Any], right: dict[KeyPath, Any]) -> dict[str, Any]:
    both = [p for p in left if p in right]
    return {
        "compared": len(both),
        "different": [p for p in both if not _same(left[p], right[p])],
        "only_left": [p for p in left if p not in right],
        "only_right": [p for p in right if p not in left],
    }


def _same(a: Any, b: Any) -> bool:
    import jax
    import numpy as np

    def data(x: Any) -> Any:
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return np.asarray(jax.random.key_data(x))
        return np.asarray(x)

    a, b = data(a), data(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.inexact)))
