"""Send real SIGINTs at random moments across restores; print what each try left behind.

Run by ``tests/test_plan.py`` in a child process (a SIGINT that lands after a try would stop
pytest itself). Usage: ``python sigint_restore.py FOLDER TRIES SEED``. The model holds 3,000
small arrays; the checkpoint (safetensors, written here with the library's own writer) holds
them plus one. Each try restores into a model of ``old`` values while a timer thread sends
SIGINT to this process, half the time at a uniform moment of the whole restore and half the
time just after the last read, where the commit runs. It prints one JSON line per try:
``{"interrupted": bool, "new": n, "old": m}``. Without the deferred commit, some tries
leave a mix (checked by hand: the test fails when ``restore._sigint_deferred`` does nothing).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

import nnx_ckpt_widgets as ncw

N = 3000


class Many(nnx.Module):
    def __init__(self, value: float):
        # NumPy values: building 3,000 device arrays per try would dominate the test's time.
        self.ws = nnx.List([nnx.Param(np.full((4,), value, np.float32)) for _ in range(N)])


def count(model: Many, value: float) -> int:
    return sum(bool(np.all(np.asarray(w[...]) == value)) for w in model.ws)


def main() -> None:
    folder, tries, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    path = folder / "many.safetensors"
    save_file({f"ws.{i}": np.full((4,), 1.0, np.float32) for i in range(N)}, path)
    report = ncw.compare(path, Many(0.0))
    rng = random.Random(seed)
    # One restore without signals, to know how long one takes, and how long its last part
    # (from the last read to the end: checks, then the commit) takes.
    read_done: list[float] = []
    start = time.perf_counter()
    ncw.apply_plan(
        report.plan(),
        Many(0.0),
        progress=lambda done, total: read_done.append(time.perf_counter()),
    )
    end = time.perf_counter()
    whole, tail = end - start, end - read_done[-1]
    for i in range(tries):
        model = Many(0.0)
        at_commit = i % 2 == 1
        fired = threading.Event()

        def fire(delay: float, fired: threading.Event = fired) -> None:
            time.sleep(delay)
            fired.set()
            os.kill(os.getpid(), signal.SIGINT)

        def progress(done: int, total: int, at_commit: bool = at_commit) -> None:
            if at_commit and done == total and total:
                delay = rng.uniform(0, tail)
                threading.Thread(target=fire, args=(delay,), daemon=True).start()

        if not at_commit:
            threading.Thread(target=fire, args=(rng.uniform(0, whole),), daemon=True).start()
        interrupted = False
        try:
            ncw.apply_plan(report.plan(), model, progress=progress)
            fired.wait(5)  # the signal may still come: let it land here, not in the next try
            time.sleep(0.01)
        except KeyboardInterrupt:
            interrupted = True
        new, old = count(model, 1.0), count(model, 0.0)
        print(json.dumps({"interrupted": interrupted, "new": new, "old": old}), flush=True)


if __name__ == "__main__":
    main()
