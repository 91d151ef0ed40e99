"""Shared fixtures: small NNX models, real Orbax checkpoints on disk, and array snapshots.

Checkpoints built once per session are read-only: a test that damages a checkpoint works on its
own copy (:func:`copy_checkpoint`).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import nnx

# --- models ---------------------------------------------------------------------------------


class MLP(nnx.Module):
    def __init__(
        self, din: int = 3, dhidden: int = 4, dout: int = 2, *, rngs: nnx.Rngs, dtype=None
    ):
        dtype = dtype or jnp.float32
        self.linear1 = nnx.Linear(din, dhidden, param_dtype=dtype, rngs=rngs)
        self.linear2 = nnx.Linear(dhidden, dout, param_dtype=dtype, rngs=rngs)


class Wider(nnx.Module):
    """The MLP plus one more layer: restoring an MLP checkpoint leaves ``extra`` missing."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)
        self.extra = nnx.Linear(2, 2, rngs=rngs)


class RenamedMLP(nnx.Module):
    """MLP with its layers renamed: a checkpoint of MLP loads with rename={r"linear(\\d)": ...}."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(3, 4, rngs=rngs)
        self.layer2 = nnx.Linear(4, 2, rngs=rngs)


class Stack(nnx.Module):
    """``nnx.List`` of layers: state keys are the integers 0, 1, ...; checkpoint keys '0', '1'."""

    def __init__(self, n: int = 3, width: int = 2, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(n)])


class BNNet(nnx.Module):
    """BatchNorm statistics (nnx.BatchStat) plus RNG state: nnx.Rngs and a Dropout's own keys."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 3, rngs=rngs)
        self.bn = nnx.BatchNorm(3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.rngs = rngs


def make_mlp(seed: int = 0) -> MLP:
    return MLP(rngs=nnx.Rngs(seed))


def make_bnnet(seed: int = 0) -> BNNet:
    model = BNNet(rngs=nnx.Rngs(seed, dropout=seed + 100))
    # Non-trivial batch statistics and advanced RNG counters, so a restore has work to do.
    model.bn.mean[...] = jnp.arange(3.0) + seed
    model.bn.var[...] = jnp.arange(1.0, 4.0) * (seed + 1)
    model.rngs.default()
    model.dropout.rngs()
    return model


# --- checkpoints ----------------------------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]


def kill_mid_save(script: Path, *args: str, written: Callable[[], int]) -> int:
    """Run a saver ``script`` in a fresh interpreter and SIGKILL it, as a preempted machine
    stops (no clean-up at all), once it has printed ``saving`` and ``written()`` (bytes of the
    save that reached storage) is at least 8 MiB; returns the last ``written()`` before the
    kill."""
    command = [sys.executable, str(script), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) as child:
        watchdog = threading.Timer(180, child.kill)
        watchdog.start()
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "saving\n"
            deadline = time.monotonic() + 60
            while (done := written()) < 8 << 20 and child.poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
            assert child.wait() == -signal.SIGKILL, "the saver ended before it was killed"
        finally:
            watchdog.cancel()
    return done


def run_cli(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m nnx_ckpt_widgets ARGS`` in a fresh interpreter, as a user would."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        str(p) for p in (pythonpath, REPO, env.get("PYTHONPATH")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "nnx_ckpt_widgets", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def save_checkpoint(path: Path, tree: Any) -> Path:
    """Save ``tree`` (an nnx.State or a pure dict) with StandardCheckpointer; returns ``path``."""
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    return path


def save_manager(
    root: Path, steps: Mapping[int, Mapping[str, Any]], metrics: Mapping[int, dict] | None = None
) -> Path:
    """Save one ``Composite`` of named items per step under a CheckpointManager root."""
    names = tuple(next(iter(steps.values())))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,
        best_fn=(lambda m: m["loss"]) if metrics else None,
        best_mode="min",
    )
    with ocp.CheckpointManager(root, options=options, item_names=names) as manager:
        for step, items in steps.items():
            args = ocp.args.Composite(
                **{name: ocp.args.StandardSave(tree) for name, tree in items.items()}
            )
            manager.save(step, args=args, metrics=(metrics or {}).get(step))
        manager.wait_until_finished()
    return root


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def chunk_locations(item_dir: Path) -> dict[str, tuple[Path, int, int]]:
    """Where the OCDBT database of ``item_dir`` keeps each value outside its B-tree nodes.

    Returns ``{key: (data file, offset, length)}`` for keys such as ``'w/0.0'`` (array ``w``,
    chunk ``0.0``). Small values (zarr headers, tiny chunks) are inlined in B-tree nodes and
    are not listed.
    """
    base = ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
    manifest = ts.ocdbt.dump(base).result()
    found: dict[str, tuple[Path, int, int]] = {}

    def walk(location: str) -> None:
        node = ts.ocdbt.dump(base, location).result()
        for entry in node["entries"]:
            if "node" in entry:
                walk(entry["node"])
            elif "indirect_value" in entry:
                # "value:<base path>:<relative file>:<offset>:<length>"
                ref = entry["indirect_value"].removeprefix("value:")
                file, offset, length = ref.rsplit(":", 2)
                found[entry["key"].decode()] = (
                    item_dir / file.replace(":", ""),
                    int(offset),
                    int(length),
                )

    walk(manifest["versions"][-1]["root"]["location"])
    return found


def corrupt_chunks(item_dir: Path, array_name: str) -> int:
    """Overwrite with random bytes every stored chunk of one array; returns the bytes hit."""
    rng = np.random.default_rng(1234)
    hit = 0
    for key, (file, offset, length) in chunk_locations(item_dir).items():
        if key.rsplit("/", 1)[0] != array_name:
            continue
        with open(file, "r+b") as handle:
            handle.seek(offset)
            handle.write(rng.bytes(length))
        hit += length
    assert hit, f"array {array_name!r} has no chunk outside the B-tree in {item_dir}"
    return hit


@pytest.fixture
def failing_orbax_read():
    """For a test whose Orbax restore fails on purpose.

    Orbax then leaves coroutines of its own un-awaited; Python reports them whenever they are
    collected, which could be during a later test. Collect them here, where the test's
    ``filterwarnings`` mark (``FAILING_READ``) applies.
    """
    yield
    gc.collect()


# Orbax's un-awaited read coroutines (not ours): see ``failing_orbax_read``.
FAILING_READ = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# --- array snapshots ------------------------------------------------------------------------


def to_numpy(x: Any) -> np.ndarray:
    """A host copy of an array; typed PRNG keys through their key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.array(x, copy=True)


def snapshot(target: Any) -> dict[tuple, tuple[np.ndarray, str]]:
    """Every array of a model or nnx.State, copied: ``{path: (values, dtype name)}``."""
    state = target if isinstance(target, nnx.State) else nnx.state(target)
    out = {}
    for path, leaf in nnx.to_flat_state(state):
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        out[tuple(path)] = (to_numpy(value), str(value.dtype))
    return out


def assert_same_arrays(expected: Any, actual: Any) -> None:
    """Bit-for-bit equality of two models/states (or snapshots): same keys, dtypes, values."""
    a = expected if isinstance(expected, dict) else snapshot(expected)
    b = actual if isinstance(actual, dict) else snapshot(actual)
    assert a.keys() == b.keys()
    for path in a:
        assert a[path][1] == b[path][1], path
        assert a[path][0].dtype == b[path][0].dtype, path
        x, y = a[path][0], b[path][0]
        assert x.shape == y.shape, path
        if x.tobytes() != y.tobytes():  # bit for bit: NaN payloads and -0.0 count
            np.testing.assert_array_equal(x, y, err_msg=str(path), strict=True)
            raise AssertionError(f"{path}: equal values, different bits")


def assert_refused_cheaply(path: Path, model: Any, words: str) -> None:
    """A hostile file gets a one-line ``CorruptCheckpointError`` naming it (with ``words``) from
    inspect, compare and restore, before any large allocation (under 8 MiB traced), and
    ``model`` is unchanged."""
    import tracemalloc

    import nnx_ckpt_widgets as ncw

    before = snapshot(model)
    tracemalloc.start()
    try:
        for call in (
            lambda: ncw.inspect(path),
            lambda: ncw.compare(path, model),
            lambda: ncw.restore(path, model),
        ):
            with pytest.raises(ncw.CorruptCheckpointError) as raised:
                call()
            message = str(raised.value)
            assert str(path) in message and words in message, message
            assert "\n" not in message
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak:,} bytes allocated for a tiny hostile file"
    assert_same_arrays(before, model)


# --- session checkpoints (read-only) --------------------------------------------------------


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def mlp_state_ckpt(ckpt_dir) -> Path:
    """``nnx.state(make_mlp(0))`` saved as an nnx.State."""
    return save_checkpoint(ckpt_dir / "mlp_state", nnx.state(make_mlp(0)))


@pytest.fixture(scope="session")
def mlp_dict_ckpt(ckpt_dir) -> Path:
    """The same MLP saved as a pure dict (``nnx.to_pure_dict``)."""
    return save_checkpoint(ckpt_dir / "mlp_dict", nnx.to_pure_dict(nnx.state(make_mlp(0))))


@pytest.fixture(scope="session")
def manager_ckpt(ckpt_dir) -> Path:
    """A CheckpointManager root: steps 1, 5, 10 with items model and optimizer, and metrics."""
    import optax

    steps, metrics = {}, {}
    for step in (1, 5, 10):
        model = make_mlp(step)
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        steps[step] = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
        metrics[step] = {"loss": 1.0 / step}
    return save_manager(ckpt_dir / "manager", steps, metrics)
