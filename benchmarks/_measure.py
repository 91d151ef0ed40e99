"""Timing helpers: alternate two sides, take medians, and describe the machine."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any


@dataclasses.dataclass
class Result:
    number: int | str
    name: str
    ours: float | None
    reference: float | None
    unit: str = "s"
    target: float | None = None
    absolute_limit: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or not self.reference:
            return None
        return self.ours / self.reference

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        ok = self.ratio <= self.target
        if self.absolute_limit is not None:
            ok = ok and self.ours <= self.absolute_limit
        return ok

    @property
    def verdict(self) -> str:
        return {None: "report", True: "yes", False: "NO"}[self.met]

    def _fmt(self, value: float | None) -> str:
        if value is None:
            return "-"
        if self.unit == "s":
            return f"{value:.3f} s"
        return f"{value:.0f} {self.unit}"

    @property
    def ours_text(self) -> str:
        return self._fmt(self.ours)

    @property
    def reference_text(self) -> str:
        return self._fmt(self.reference)

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        text = f"<= {self.target:g}"
        if self.absolute_limit is not None:
            text += f", <= {self.absolute_limit:g} {self.unit}"
        return text

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(ratio=self.ratio, met=self.met)
        return out


def alternate(
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    setup: Callable[[], Any] | None = None,
) -> tuple[float, float]:
    """Median wall times of ``ours`` and ``reference``, run turn about after a warm-up;
    ``setup`` runs, untimed, before each call."""
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(warmup + repeats):
        order = (("ours", ours), ("reference", reference))
        if i % 2:
            order = order[::-1]
        for name, fn in order:
            if setup is not None:
                setup()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    return statistics.median(times["ours"]), statistics.median(times["reference"])


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout


def machine_facts() -> dict[str, Any]:
    packages = ("flax", "jax", "jaxlib", "orbax-checkpoint", "treescope", "ipywidgets", "numpy")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "packages": {name: version(name) for name in packages},
    }
