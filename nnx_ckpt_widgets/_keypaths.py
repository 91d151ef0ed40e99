"""Key paths: how checkpoint keys and model keys are spelled, compared and folded.

A key path is a tuple of strings. Model paths come from ``nnx.to_flat_state`` and may hold
integers (``nnx.List`` indices); checkpoints always store strings (``'0'``). Converting
everything to ``str`` once, here, is what makes ``layers/0/kernel`` match on both sides.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Sequence

KeyPath = tuple[str, ...]

SEP = "/"
# Canonical ASCII integers only: "007" is a name, not the index 7.
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")


def is_index(part: str) -> bool:
    """True for a canonical list index such as ``0`` or ``12`` (not ``007``)."""
    return bool(_INDEX.match(part))


def split(name: str) -> KeyPath:
    """The inverse of :func:`join`: ``linear1/kernel`` -> ``('linear1', 'kernel')``."""
    return tuple(name.split(SEP))


def to_keypath(path: Iterable[Hashable]) -> KeyPath:
    """Return ``path`` with every part as a string, so ``1`` and ``'1'`` compare equal."""
    return tuple(str(part) for part in path)


# A saved nnx.State keeps one extra level per Variable: {'kernel': {'value': array}}.
VARIABLE_LEVEL = "value"


def from_jax(path: Sequence[object]) -> tuple[str, ...]:
    """A JAX key path (``DictKey``, ``SequenceKey``, ``GetAttrKey``) as our string key path."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def has_variable_level(paths: Iterable[Sequence[str]]) -> bool:
    """True when every path ends in the ``value`` level of a saved ``nnx.State``."""
    paths = list(paths)
    return bool(paths) and all(len(p) > 1 and p[-1] == VARIABLE_LEVEL for p in paths)


def join(path: Sequence[str]) -> str:
    """Spell a key path the way reports show it: ``linear1/kernel``."""
    return SEP.join(path)


def quote(part: str) -> str:
    """A key as shown: quoted when it holds ``/`` itself (Gemma's flat
    ``'transformer/layer_0/attn/q_einsum'``), so it cannot be read as nesting."""
    return repr(part) if SEP in part else part


def show(path: Sequence[str]) -> str:
    """A key path as shown to people, unambiguous: ``'transformer/layer_0'/w``."""
    return SEP.join(quote(part) for part in path)


def has_slash(path: Sequence[str]) -> bool:
    """Whether one of the keys of ``path`` holds ``/`` itself."""
    return any(SEP in part for part in path)


def spelled(path: Sequence[str]) -> KeyPath:
    """The nested key path that keys holding ``/`` spell: ``('a/b', 'w')`` -> ``('a', 'b',
    'w')``. A flat dict saved with ``/`` in its keys (Gemma's releases) matches the nested
    model keys this way."""
    return split(join(path))


def fold(paths: Iterable[KeyPath]) -> list[tuple[str, list[KeyPath]]]:
    """Fold repeated layer indices: ``layers/0/w`` .. ``layers/47/w`` -> ``layers/{0..47}/w``.

    Paths that differ only in integer parts are grouped under one pattern, shown as a range
    when the indices are contiguous and as a list otherwise. A pattern never stands for a path
    that is not there: several integer positions fold together only when every combination is
    present (``blocks/{0..3}/heads/{0..7}``); otherwise only the first one that varies folds.
    Only canonical integers (``0``, ``12``, not ``007``) count as indices.

    Args:
      paths: key paths, in the order to keep.

    Returns:
      ``(pattern, members)`` pairs in order of first appearance.
    """
    first_seen: dict[KeyPath, int] = {}
    groups: dict[tuple[str, ...], list[KeyPath]] = {}
    for n, path in enumerate(paths):
        first_seen.setdefault(path, n)
        shape = tuple("#" if _INDEX.match(part) else part for part in path)
        groups.setdefault(shape, []).append(path)
    folded = [pair for members in groups.values() for pair in _fold_group(members)]
    return sorted(folded, key=lambda pair: first_seen[pair[1][0]])


def _fold_group(members: list[KeyPath]) -> list[tuple[str, list[KeyPath]]]:
    """Fold paths that differ only in their integer parts (same length, same other parts)."""
    if len(members) == 1:
        return [(show(members[0]), members)]
    values = {
        position: sorted({int(m[position]) for m in members})
        for position, part in enumerate(members[0])
        if _INDEX.match(part)
    }
    varying = [position for position, found in values.items() if len(found) > 1]
    if len(set(members)) != math.prod(len(values[position]) for position in varying):
        # Not every combination is there: fold the first varying position only.
        first = varying[0]
        subgroups: dict[KeyPath, list[KeyPath]] = {}
        for m in members:
            subgroups.setdefault(m[:first] + m[first + 1 :], []).append(m)
        return [pair for sub in subgroups.values() for pair in _fold_group(sub)]
    parts = [
        _span(values[position]) if position in varying else part
        for position, part in enumerate(members[0])
    ]
    return [(show(parts), members)]


def _span(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def preview(keys: Iterable[str], limit: int = 3) -> str:
    """Up to ``limit`` keys (spelled ``a/b/c``) for a message, layer indices folded
    (``layers/*/kernel``) and each clipped, since keys from a checkpoint may be hostile."""
    from nnx_ckpt_widgets._text import clip

    folded = [pattern for pattern, _ in fold(split(k) for k in keys)]
    shown = ", ".join(clip(pattern, 60) for pattern in folded[:limit])
    return shown + (f", and {len(folded) - limit} more" if len(folded) > limit else "")
