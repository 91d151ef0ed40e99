"""Key paths: how checkpoint keys and model keys are spelled, compared and folded.

A key path is a tuple of strings. Model paths come from ``nnx.to_flat_state`` and may hold
integers (``nnx.List`` indices); checkpoints always store strings (``'0'``). Converting
everything to ``str`` once, here, is what makes ``layers/0/kernel`` match on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence

KeyPath = tuple[str, ...]

SEP = "/"
_INDEX = re.compile(r"^\d+$")


def to_keypath(path: Iterable[Hashable]) -> KeyPath:
    """Return ``path`` with every part as a string, so ``1`` and ``'1'`` compare equal."""
    return tuple(str(part) for part in path)


def join(path: Sequence[str]) -> str:
    """Spell a key path the way reports show it: ``linear1/kernel``."""
    return SEP.join(path)


def fold(paths: Iterable[KeyPath]) -> list[tuple[str, list[KeyPath]]]:
    """Fold repeated layer indices: ``layers/0/w`` .. ``layers/47/w`` -> ``layers/{0..47}/w``.

    Paths that differ only in integer parts are grouped under one pattern. The first integer
    position that varies is folded; a group is shown as a range when its indices are
    contiguous and as a list otherwise.

    Args:
      paths: key paths, in the order to keep.

    Returns:
      ``(pattern, members)`` pairs in order of first appearance.
    """
    groups: dict[tuple[str, ...], list[KeyPath]] = {}
    for path in paths:
        shape = tuple("#" if _INDEX.match(part) else part for part in path)
        groups.setdefault(shape, []).append(path)
    folded = []
    for shape, members in groups.items():
        if len(members) == 1:
            folded.append((join(members[0]), members))
            continue
        parts = []
        for position, part in enumerate(shape):
            if part != "#":
                parts.append(part)
                continue
            values = sorted({int(m[position]) for m in members})
            parts.append(str(values[0]) if len(values) == 1 else _span(values))
        folded.append((join(parts), members))
    return folded


def _span(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"
