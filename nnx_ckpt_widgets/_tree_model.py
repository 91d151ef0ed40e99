"""The folded tree behind the checkpoint browser, from metadata only and without widgets.

Children are computed when a node is expanded, never up front, so a 10,000-leaf checkpoint
costs one pass over its key paths at build time. Integer-named children whose subtrees have the
same structure (names, shapes, dtypes, shardings) fold into one node such as ``{0..47}``; the
folding and its spelling are :func:`nnx_ckpt_widgets._keypaths.fold`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any

from nnx_ckpt_widgets import _keypaths, _text
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo


@dataclasses.dataclass(frozen=True)
class TreeNode:
    """One row of the tree: the child ``members`` of every path in ``parents``.

    Attributes:
      label: the name shown, e.g. ``linear1`` or ``{0..47}`` for folded layers.
      parents: the paths this node's subtrees hang from; several under a folded node.
      members: the child names folded into this node; one unless folded.
      labels: the labels from the root down to this node, for finding it again.
    """

    label: str
    parents: tuple[KeyPath, ...]
    members: tuple[str, ...]
    labels: tuple[str, ...] = ()

    @property
    def path(self) -> KeyPath:
        """The first subtree the node stands for."""
        return (*self.parents[0], self.members[0]) if self.members else self.parents[0]

    @property
    def paths(self) -> list[KeyPath]:
        """Every subtree the node stands for (built on demand: a fold may hold thousands)."""
        if not self.members:
            return list(self.parents)
        return [(*parent, m) for parent in self.parents for m in self.members]

    @property
    def count(self) -> int:
        """How many subtrees were folded into this node."""
        return len(self.parents) * max(len(self.members), 1)

    @property
    def name(self) -> str:
        """The node's place, spelled ``layers/{0..47}/kernel``."""
        return _keypaths.join(self.labels)


class TreeModel:
    """Children, folding and totals of a :class:`CheckpointInfo`, computed on demand."""

    def __init__(self, info: CheckpointInfo):
        self.info = info
        self._children = _text.children(info.leaves)
        self._ids: dict[Hashable, int] = {}
        self._signatures: dict[KeyPath, int] = {}
        self.root = TreeNode("", ((),), ())

    def child_count(self, node: TreeNode) -> int:
        """How many names the node's first subtree holds, before folding."""
        return len(self._children.get(node.path, ()))

    def is_leaf(self, node: TreeNode) -> bool:
        return node.path in self.info.leaves

    def leaf(self, node: TreeNode) -> LeafInfo:
        return self.info.leaves[node.path]

    def stats(self, node: TreeNode) -> tuple[int, int]:
        """``(params, bytes)`` of the node, over every folded subtree; RNG state (keys and
        their counters) is counted in the bytes, never as parameters."""
        if self.is_leaf(node):
            leaf = self.leaf(node)
            params = 0 if node.path in self.info.rng_paths else leaf.size
            return params * node.count, leaf.nbytes * node.count
        params, nbytes = self.info.totals[node.path]
        params -= self.info.rng_totals.get(node.path, 0)
        return params * node.count, nbytes * node.count

    def describe(self, node: TreeNode) -> str:
        """Shape, dtype, params and bytes as one line of text (checkpoint strings unescaped)."""
        params, nbytes = self.stats(node)
        sizes = f"{_text.plural(params, 'param')}, {_text.human_bytes(nbytes)}"
        if self.is_leaf(node) and node.path in self.info.rng_paths:
            sizes = f"RNG state, {_text.human_bytes(nbytes)}"
        if self.is_leaf(node):
            leaf = self.leaf(node)
            times = f"{node.count:,} × " if node.count > 1 else ""
            # A multi-device layout is worth a glance; a single device ("cpu:0") is noise.
            layout = f"  {leaf.sharding}" if leaf.sharding and "mesh(" in leaf.sharding else ""
            return f"{times}{_text.shape_text(leaf.shape)} {leaf.dtype}  {sizes}{layout}"
        return (f"{node.count:,} folded  " if node.count > 1 else "") + sizes

    def children(self, node: TreeNode) -> list[TreeNode]:
        """The node's children, integer names with one structure folded together."""
        names = self._children.get(node.path, [])
        slots: list[str | int] = []
        groups: dict[int, list[str]] = {}
        for name in names:
            if not _keypaths.is_index(name):
                slots.append(name)
                continue
            signature = self.signature((*node.path, name))
            if signature not in groups:
                groups[signature] = []
                slots.append(signature)
            groups[signature].append(name)
        out = []
        for slot in slots:
            members = [slot] if isinstance(slot, str) else groups[slot]
            if len(members) == 1:
                label = members[0]
            else:
                label = _keypaths.fold([(m,) for m in members])[0][0]
            parents = tuple(node.paths) if node.count > 1 else (node.path,)
            out.append(TreeNode(label, parents, tuple(members), (*node.labels, label)))
        return out

    def signature(self, path: KeyPath) -> int:
        """A small integer that two subtrees share exactly when their structure is the same."""
        known = self._signatures.get(path)
        if known is not None:
            return known
        leaves = self.info.leaves
        leaf = leaves.get(path)
        if leaf is not None:
            key: Hashable = (leaf.shape, leaf.dtype, leaf.sharding)
        else:
            parts: list[Hashable] = []
            for name in self._children.get(path, ()):
                child = (*path, name)
                below = leaves.get(child)  # most children are leaves: skip the call for them
                if below is None:
                    parts.append((name, self.signature(child)))
                else:
                    parts.append((name, below.shape, below.dtype, below.sharding))
            key = tuple(parts)
        signature = self._ids.setdefault(key, len(self._ids))
        self._signatures[path] = signature
        return signature

    def subtree_leaves(self, path: KeyPath, limit: int) -> tuple[list[LeafInfo], int]:
        """Up to ``limit`` leaves under ``path`` in saved order, and how many there are."""
        shown: list[LeafInfo] = []
        total = 0
        stack = [path]
        while stack:
            current = stack.pop()
            if current in self.info.leaves:
                total += 1
                if len(shown) < limit:
                    shown.append(self.info.leaves[current])
                continue
            names = self._children.get(current, [])
            stack.extend((*current, n) for n in reversed(names))
        return shown, total

    def abstract_tree(self, path: KeyPath, limit: int) -> tuple[Any, int, int]:
        """The subtree at ``path`` as nested dicts of ``jax.ShapeDtypeStruct``, for treescope.

        Returns:
          ``(tree, shown, total)``: at most ``limit`` leaves are in ``tree``.
        """
        import jax

        leaves, total = self.subtree_leaves(path, limit)
        if path in self.info.leaves:
            return _abstract(jax, leaves[0]), 1, 1
        tree: dict[str, Any] = {}
        for leaf in leaves:
            node = tree
            for part in leaf.path[len(path) : -1]:
                node = node.setdefault(part, {})
            node[leaf.path[-1]] = _abstract(jax, leaf)
        return tree, len(leaves), total


def _abstract(jax: Any, leaf: LeafInfo) -> Any:
    try:
        return jax.ShapeDtypeStruct(leaf.shape, jax.numpy.dtype(leaf.dtype))
    except TypeError:  # a dtype this JAX does not know: show the metadata record instead
        return leaf
