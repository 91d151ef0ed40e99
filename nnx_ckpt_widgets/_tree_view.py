"""``TreeView``: a checkpoint's tree as core ipywidgets, built lazily.

Rows are widgets only once their parent is expanded, a page at a time, so a 10,000-leaf
checkpoint puts a handful of rows in the page, not 10,000. Names are shown in ``Button``
descriptions and tooltips (the front-end sets those as text, never as HTML) and everything in an
``HTML`` widget goes through :func:`nnx_ckpt_widgets.render.esc`.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import traitlets
from ipywidgets.widgets.widget_string import HTMLStyle

from nnx_ckpt_widgets import _keypaths, _text
from nnx_ckpt_widgets._display import treescope_output
from nnx_ckpt_widgets._tree_model import TreeModel, TreeNode
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.metadata import CheckpointInfo
from nnx_ckpt_widgets.render import esc

TREESCOPE_LEAVES = 100  # treescope costs milliseconds per leaf: a selection shows at most this
_AUTO_ROWS = 120  # rows that may be opened at build time, over all levels
_OPEN, _CLOSED = "▾", "▸"


def _close(widget: w.Widget) -> None:
    """Close a widget with its layout and style (closing a shared one twice is harmless)."""
    for part in (getattr(widget, "style", None), getattr(widget, "layout", None)):
        if part is not None:
            part.close()
    widget.close()


class _Shared:
    """One Layout and one Style per kind of widget, shared by all rows.

    Every distinct Layout or Style is one more model in the front-end: sharing them keeps a
    row at three or four models.
    """

    def __init__(self) -> None:
        # A row stays one line of toggle, name and sizes: when the pane is narrow, a long name
        # is clipped (whole in its tooltip) and the sizes wrap inside their own box.
        self.line = w.Layout(align_items="center", overflow="visible")
        self.toggle = w.Layout(width="24px", height="22px", padding="0", margin="0")
        self.name = w.Layout(width="auto", max_width="100%", height="22px", padding="0 4px")
        self.leaf_name = w.Layout(
            width="auto", max_width="100%", height="22px", padding="0 4px", margin="0 0 0 26px"
        )
        self.info = w.Layout(margin="0 0 0 6px", flex="1 1 auto", min_width="8em")
        self.nested = w.Layout(margin="0 0 0 16px", overflow="visible")
        self.box = w.Layout(overflow="visible")  # only the pane scrolls, never a row
        self.flat = w.ButtonStyle(button_color="transparent")
        self.text = HTMLStyle()


class _ChildList:
    """The rows under one node, shown a page at a time."""

    def __init__(self, view: TreeView, node: TreeNode, depth: int):
        self.view, self.depth = view, depth
        self.nodes = view.model.children(node)
        self.rows: list[_Row] = []
        self.more: w.Button | None = None
        self.box = w.VBox(layout=view._shared.nested if depth > 1 else view._shared.box)
        self.show_more()

    def show_more(self, _button: Any = None) -> None:
        start = len(self.rows)
        for child in self.nodes[start : start + self.view.page_size]:
            self.rows.append(_Row(self.view, child, self.depth))
        left = len(self.nodes) - len(self.rows)
        children: list[w.Widget] = [row.box for row in self.rows]
        if left:
            if self.more is None:
                self.more = w.Button(layout=w.Layout(width="auto", margin="2px 0 2px 26px"))
                self.more.add_class("nnx-ckpt-more")
                self.more.on_click(self.show_more)
            shown = min(left, self.view.page_size)
            self.more.description = f"show {shown} more ({left:,} not shown)"
            children.append(self.more)
        self.box.children = children

    def close(self) -> None:
        for row in self.rows:
            row.close()
        if self.more is not None:
            _close(self.more)
        _close(self.box)

    def lines(self, indent: int) -> list[str]:
        out = []
        for row in self.rows:
            out.extend(row.lines(indent))
        if len(self.nodes) > len(self.rows):
            out.append("  " * indent + f"… {len(self.nodes) - len(self.rows):,} more")
        return out


class _Row:
    """One node: an expand button (unless a leaf), its name as a button, and its sizes."""

    def __init__(self, view: TreeView, node: TreeNode, depth: int):
        self.view, self.node, self.depth = view, node, depth
        self.children: _ChildList | None = None
        self.expanded = False
        shared = view._shared
        self.leaf = view.model.is_leaf(node)
        self.name = w.Button(
            description=_text.clip(node.label, 80),
            tooltip=_text.clip(node.name, 300),
            layout=shared.leaf_name if self.leaf else shared.name,
            style=shared.flat,
        )
        self.name.add_class("nnx-ckpt-name")
        self.name.on_click(lambda _b: view.select_node(node))
        self.info = w.HTML(
            f'<span class="nnx-ckpt-text nnx-ckpt-dim">{esc(view.model.describe(node))}</span>',
            layout=shared.info,
            style=shared.text,
        )
        self.toggle: w.Button | None = None
        if self.leaf:
            self.line = self.box = w.HBox([self.name, self.info], layout=shared.line)
            return
        self.toggle = w.Button(
            description=_CLOSED, tooltip="expand", layout=shared.toggle, style=shared.flat
        )
        self.toggle.add_class("nnx-ckpt-toggle")
        self.toggle.on_click(lambda _b: self.set_expanded(not self.expanded))
        self.line = w.HBox([self.toggle, self.name, self.info], layout=shared.line)
        self.box = w.VBox([self.line], layout=shared.box)
        if depth < view.expand_depth and view._budget > 0:
            view._budget -= min(view.model.child_count(node), view.page_size)
            self.set_expanded(True)

    def set_expanded(self, expanded: bool) -> None:
        if self.toggle is None or expanded == self.expanded:
            return
        self.expanded = expanded
        if expanded and self.children is None:
            self.children = _ChildList(self.view, self.node, self.depth + 1)
        self.toggle.description = _OPEN if expanded else _CLOSED
        self.toggle.tooltip = "collapse" if expanded else "expand"
        shown = [self.line, self.children.box] if expanded and self.children else [self.line]
        self.box.children = shown

    def close(self) -> None:
        if self.children is not None:
            self.children.close()
        for widget in (self.toggle, self.name, self.info, self.line, self.box):
            if widget is not None:
                _close(widget)

    def lines(self, indent: int) -> list[str]:
        mark = "  " if self.leaf else (_OPEN if self.expanded else _CLOSED) + " "
        text = f"{'  ' * indent}{mark}{_text.clip(self.node.label)}  "
        out = [text + self.view.model.describe(self.node)]
        if self.expanded and self.children is not None:
            out.extend(self.children.lines(indent + 1))
        return out


class TreeView(w.HBox):
    """A checkpoint's tree, folded, expanded on demand, with a treescope view of a selection.

    Args:
      info: what :func:`nnx_ckpt_widgets.inspect` read.
      expand_depth: levels open at first (fewer when they hold many rows).
      page_size: rows shown per page under one node.
    """

    selected = traitlets.Unicode(
        "", help="The selected node, spelled 'layers/{0..47}/kernel'; empty when none is."
    )
    expand_depth = traitlets.Int(2, help="Levels of the tree that are open when it is built.")
    page_size = traitlets.Int(40, help="Rows shown under one node before a 'show more' button.")

    @traitlets.validate("expand_depth", "page_size")
    def _check_positive(self, proposal: Any) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        low = 0 if name == "expand_depth" else 1
        if value < low:
            raise traitlets.TraitError(f"{name} must be at least {low}, got {value}.")
        return value

    def __init__(self, info: CheckpointInfo, *, expand_depth: int = 2, page_size: int = 40):
        super().__init__(layout=w.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.add_class("nnx-ckpt-tree")
        self.expand_depth, self.page_size = expand_depth, page_size
        self.model = TreeModel(info)
        self.selected_node: TreeNode | None = None  # what select_node showed last
        self._shared = _Shared()
        self._budget = _AUTO_ROWS
        self._top = _ChildList(self, self.model.root, 1)
        self.caption = w.HTML(
            '<div class="nnx-ckpt-caption nnx-ckpt-text nnx-ckpt-dim">'
            "Click a name to show it with treescope.</div>"
        )
        # Flex sizes live in the stylesheet (classes), not in the Layouts: the tree takes the
        # width its rows need, up to 55%, and the treescope pane the rest; what still does not
        # fit scrolls, with a scrollbar.
        self.output = w.Output(layout=w.Layout(max_height="420px"))
        self.output.add_class("nnx-ckpt-scroll")
        self.detail = w.VBox([self.caption, self.output])
        self.detail.add_class("nnx-ckpt-detail")
        tree_box = w.VBox([self._top.box], layout=w.Layout(max_height="480px"))
        tree_box.add_class("nnx-ckpt-tree-pane")
        tree_box.add_class("nnx-ckpt-scroll")
        self.children = [tree_box, self.detail]
        self._budget = 0  # rows opened later by the user open one level at a time

    def close(self) -> None:
        """Close the view and every widget it made, so the front-end drops their models."""
        self._top.close()  # rows of collapsed nodes are not in the page, so walk our own
        for widget in (*self.children, self.caption, self.output, *vars(self._shared).values()):
            _close(widget)
        self.layout.close()
        super().close()

    def row(self, *labels: str) -> _Row:
        """The row at ``labels`` (e.g. ``row("layers", "{0..47}")``), opening its parents.

        Raises:
          InvalidArgumentError: no node has those labels.
        """
        children = self._top
        for depth, label in enumerate(labels):
            here = [node.label for node in children.nodes]
            if label not in here:
                break
            index = here.index(label)
            while len(children.rows) <= index:
                children.show_more()
            found = children.rows[index]
            if depth == len(labels) - 1:
                return found
            found.set_expanded(True)
            if found.children is None:
                break
            children = found.children
        raise InvalidArgumentError(
            f"The tree has no node {_keypaths.join(labels)!r}; its top level holds: "
            f"{', '.join(n.label for n in self._top.nodes[:10])}."
        )

    def select(self, *labels: str) -> None:
        """Show the node at ``labels`` with treescope, as clicking its name does."""
        self.select_node(self.row(*labels).node)

    def select_node(self, node: TreeNode) -> None:
        tree, shown, total = self.model.abstract_tree(node.path, TREESCOPE_LEAVES)
        notes = [self.model.describe(node)]
        if node.count > 1:
            first = _keypaths.join(node.path)
            notes.append(f"{node.count:,} folded subtrees of one structure; showing {first}")
        if shown < total:
            notes.append(f"showing the first {shown:,} of {total:,} arrays")
        text = f"{node.name}: {'; '.join(notes)}"
        self.caption.value = (
            f'<div class="nnx-ckpt-caption nnx-ckpt-text"><b>{esc(node.name)}</b>: '
            f"{esc('; '.join(notes))}</div>"
        )
        self.output.outputs = (treescope_output(tree, text=_text.clip(text, 300)),)
        self.selected_node = node
        self.selected = node.name

    def text(self, max_lines: int = 200) -> str:
        """The rows now open, as indented text; folded and unexpanded rows stay folded."""
        lines = self._top.lines(0)
        if len(lines) > max_lines:
            lines = [*lines[:max_lines], f"… {len(lines) - max_lines:,} more rows"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TreeView({len(self.model.info.leaves):,} arrays)\n{self.text(40)}"
