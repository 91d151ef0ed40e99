"""Plain-text spelling shared by every stage: sizes, shapes, counts, steps and clipped names.

This module imports nothing of ours, so the reading layer, the reports and the widgets can all
use it without importing each other. Nothing here produces HTML: :mod:`render` escapes.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol

MAX_KEY = 64


class StepLike(Protocol):
    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, Any]: ...


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def shape_text(shape: Sequence[int] | None) -> str:
    """``(4, 4)``, ``(3,)`` or ``()``, as Python spells a shape."""
    parts = tuple(shape or ())
    return "(" + ", ".join(map(str, parts)) + (",)" if len(parts) == 1 else ")")


def plural(n: int, noun: str) -> str:
    """``plural(1, "param") == "1 param"``; ``plural(2, "array") == "2 arrays"``."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def clip(text: str, width: int = MAX_KEY) -> str:
    """Shorten ``text`` to ``width`` characters, keeping both ends, for text tables."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    if len(text) <= width:
        return text
    half = (width - 1) // 2
    return text[:half] + "…" + text[-(width - 1 - half) :]


def table(rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> list[str]:
    """Align rows into columns; ``right`` lists the right-aligned column numbers."""
    right = set(right)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def metric_text(value: object) -> str:
    """A metric as every view shows it: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return clip(str(value), 24)


def step_text(step: StepLike) -> str:
    """``300 (accuracy=0.75, loss=0.003333)``: a step and the metrics kept for it."""
    metrics = ", ".join(f"{clip(k, 24)}={metric_text(v)}" for k, v in sorted(step.metrics.items()))
    return f"{step.step}" + (f" ({metrics})" if metrics else "")


def where(path: object, step: int | None, item: str | None, steps: Sequence[StepLike] = ()) -> str:
    """``ckpt/, step 50 (2 steps, latest 60), item 'model'``: the same wording for every step."""
    parts = [str(path)]
    if step is not None:
        if len(steps) <= 1:
            parts.append(f"step {step}")
        else:
            latest = max(s.step for s in steps)
            parts.append(f"step {step} ({plural(len(steps), 'step')}, latest {latest})")
    if item is not None:
        parts.append(f"item {item!r}")
    return ", ".join(parts)


def sizes_text(arrays: int, params: int, nbytes: int, rng: int = 0) -> str:
    """``4 arrays, 26 params, 104 B``: the one header every view prints. ``rng`` arrays of RNG
    state (keys and their counters) are no parameters and are counted apart:
    ``6 arrays, 26 params (+ 2 arrays of RNG state), 116 B``."""
    state = f" (+ {plural(rng, 'array')} of RNG state)" if rng else ""
    return f"{plural(arrays, 'array')}, {plural(params, 'param')}{state}, {human_bytes(nbytes)}"


def children(paths: Iterable[Sequence[Hashable]]) -> dict[tuple, list]:
    """Each prefix of ``paths`` -> its child names, in first-seen order (``()`` is the root)."""
    found: dict[tuple, dict[Hashable, None]] = {}
    # Paths come grouped by parent (a layer's arrays): its ancestors are walked once a group.
    parent: tuple | None = None
    names: dict[Hashable, None] = {}
    for path in paths:
        path = tuple(path)
        if not path:
            continue
        if path[:-1] != parent:
            parent = path[:-1]
            for depth in range(len(parent)):
                found.setdefault(parent[:depth], {})[parent[depth]] = None
            names = found.setdefault(parent, {})
        names[path[-1]] = None
    return {prefix: list(names) for prefix, names in found.items()}


def count_text(counts: Mapping[str, int]) -> str:
    """``2 matched, 1 missing``: the non-zero counts, in the given order."""
    return ", ".join(f"{n} {name}" for name, n in counts.items() if n)


def finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)
