"""Restores across topologies, and read failures named for what they are.

Checkpoints saved on another machine are the normal case. Here: saved on 8 devices and
restored on 1; saved on 1 and restored onto targets sharded over 8; a ``_sharding`` file that
records a GPU (``cuda:0``) or a TPU mesh, as a checkpoint written there holds, restored on this
CPU-only machine. Every restore lands on the target's own shardings, bit for bit, through
``restore``, ``load`` and ``stats``, for Orbax v0, Orbax v1 and safetensors.

What does not fit is named as such, never as damage: a sharding that does not divide an array
(``ShardingMismatchError``), a machine out of memory (``ResourceExhaustedError``, provoked
with a real ``RLIMIT_AS``); truncated or garbled chunks stay ``CorruptCheckpointError``, and an
error of no known kind is a plain ``CheckpointError`` naming its cause.

Devices: a JAX process has its device count fixed at start, so the 8-device work runs in one
child process (``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and the memory limit in
another; this process has 1 device. Children run functions of this module and write what they
saw to a JSON file, which the tests read.
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FAILING_READ, chunk_locations, copy_checkpoint, save_checkpoint
from flax import nnx
from orbax.checkpoint import v1

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets._failures import read_error

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# How the 8-device model splits its kernels over the mesh axis "d": a's rows, b's columns.
AXES = (("d", None), (None, "d"))
MiB = 1 << 20


class Net(nnx.Module):
    """Two layers; with ``axes``, each kernel carries a sharding annotation, as model code
    written for a mesh does (``nnx.with_partitioning``)."""

    def __init__(self, rngs: nnx.Rngs, axes: tuple | None = None, din: int = 16):
        def init(i: int) -> Any:
            base = nnx.initializers.lecun_normal()
            return base if axes is None else nnx.with_partitioning(base, axes[i])

        self.a = nnx.Linear(din, 8, kernel_init=init(0), rngs=rngs)
        self.b = nnx.Linear(8, 8, kernel_init=init(1), rngs=rngs)


class NetPlus(Net):
    """The Net and a layer no checkpoint here holds: missing keys to zero-fill."""

    def __init__(self, rngs: nnx.Rngs, axes: tuple | None = None):
        super().__init__(rngs, axes)
        init = nnx.initializers.lecun_normal()
        kernel_init = init if axes is None else nnx.with_partitioning(init, axes[1])
        self.c = nnx.Linear(8, 8, kernel_init=kernel_init, rngs=rngs)


class Big(nnx.Module):
    """One large array of ones (``n`` float32) and a small one."""

    def __init__(self, n: int):
        self.w = nnx.Param(jax.numpy.ones((n,), jax.numpy.float32))
        self.s = nnx.Param(jax.numpy.ones((3,), jax.numpy.float32))


def arrays(target: Any) -> dict[str, jax.Array]:
    """``{"a/kernel": array}`` of a model or nnx.State."""
    state = target if isinstance(target, nnx.State) else nnx.state(target)
    return {
        "/".join(map(str, path)): leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        for path, leaf in nnx.to_flat_state(state)
    }


def host(target: Any) -> dict[str, np.ndarray]:
    return {key: np.asarray(value) for key, value in arrays(target).items()}


def assert_exact(expected: dict[str, np.ndarray], target: Any, shardings: dict[str, Any]) -> None:
    """Every array of ``target`` equals ``expected`` bit for bit and sits on ``shardings``."""
    got = arrays(target)
    assert got.keys() == expected.keys()
    for key, value in got.items():
        assert value.dtype == expected[key].dtype, key
        np.testing.assert_array_equal(np.asarray(value), expected[key], err_msg=key, strict=True)
        assert value.sharding == shardings[key], (key, value.sharding, shardings[key])


def assert_stats_exact(expected: dict[str, np.ndarray], path: Path) -> None:
    """``stats`` of ``path`` reads exactly the values of ``expected`` (min, max, zeros)."""
    report = ncw.stats(path, progress=False)
    entries = {e.key: e for e in report.entries}
    assert entries.keys() == expected.keys()
    for key, values in expected.items():
        assert entries[key].shape == values.shape, key
        assert (entries[key].min, entries[key].max) == (values.min(), values.max()), key
        assert entries[key].zeros == int((values == 0).sum()), key


def save_safetensors(path: Path, target: Any) -> Path:
    """Save arrays (a model's, or a dict's) as HF names them (``a.kernel``), with the
    safetensors package."""
    from safetensors.numpy import save_file

    named = target if isinstance(target, dict) else host(target)
    save_file({key.replace("/", "."): value for key, value in named.items()}, str(path))
    return path


def record_sharding(item_dir: Path, spec: Callable[[str, int], dict[str, Any]]) -> None:
    """Rewrite ``_sharding`` as a checkpoint saved on other hardware holds it: each array's
    entry becomes ``spec(array name, ndim)``."""
    file = item_dir / "_sharding"
    entries = json.loads(file.read_text())
    metadata = ocp.StandardCheckpointer().metadata(item_dir).item_metadata.tree
    ndims = {".".join(map(str, p)): len(leaf.shape) for p, leaf in _leaves(metadata)}
    for key in entries:
        name = base64.b64decode(key).decode()
        entries[key] = json.dumps(spec(name, ndims[name]))
    file.write_text(json.dumps(entries))


def _leaves(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf) for path, leaf in flat]


def gpu_sharding(name: str, ndim: int) -> dict[str, Any]:
    return {"sharding_type": "SingleDeviceSharding", "device_str": "cuda:0"}


def tpu_sharding(name: str, ndim: int) -> dict[str, Any]:
    """A v5e-8 slice: mesh (data=2, model=4) over TPU devices 0-7."""
    ids = [[{"id": 4 * row + col} for col in range(4)] for row in range(2)]
    return {
        "sharding_type": "NamedSharding",
        "shape": [2, 4],
        "axis_names": ["data", "model"],
        "partition_spec": ["data", "model"] if ndim == 2 else ["model"],
        "device_mesh": {"mesh": ids},
    }


def annotations_shard(mesh: Any) -> bool:
    """Whether this Flax places ``nnx.with_partitioning`` annotations on the mesh set with
    ``jax.set_mesh``, concretely and under ``nnx.eval_shape``: Flax 0.12.8 does; at the floor
    (Flax 0.12.2) the arrays come out replicated, so the tests that restore onto annotated
    targets have nothing to check there."""
    from jax.sharding import PartitionSpec

    with jax.set_mesh(mesh):
        concrete = arrays(Net(nnx.Rngs(0), AXES))["a/kernel"].sharding
        abstract = arrays(nnx.eval_shape(lambda: Net(nnx.Rngs(0), AXES)))["a/kernel"].sharding
    want = PartitionSpec("d", None)
    return getattr(concrete, "spec", None) == want and getattr(abstract, "spec", None) == want


ANNOTATIONS = "this Flax does not shard with_partitioning annotations under jax.set_mesh"


def run_child(function: str, root: Path, devices: int) -> dict[str, Any]:
    """Run ``function(root)`` of this module in a fresh JAX process with ``devices`` CPU
    devices; returns the JSON it wrote."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
    }
    code = f"import pathlib, test_topology; test_topology.{function}(pathlib.Path({str(root)!r}))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads((root / f"{function}.json").read_text())


def outcome(call: Callable[[], Any]) -> dict[str, Any]:
    """``{"error": None}``, or the class, message and cause of what ``call`` raised (a failed
    assertion too: each case is reported on its own)."""
    try:
        call()
    except Exception as err:
        return {
            "error": type(err).__name__,
            "message": str(err),
            "cause": type(err.__cause__).__name__ if err.__cause__ is not None else None,
        }
    return {"error": None}


# --- the checkpoints ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """Checkpoints saved here on 1 device, then the 8-device child: it saves its own and
    restores these onto targets sharded over 8. Returns the folder and the child's findings."""
    root = tmp_path_factory.mktemp("topology")
    model = Net(nnx.Rngs(0))
    np.savez(root / "one.npz", **host(model))
    save_checkpoint(root / "one_v0", nnx.state(model))
    save_safetensors(root / "one.safetensors", model)
    # What a GPU or a TPU machine writes: the same arrays, other devices in _sharding.
    for name, spec in (("gpu", gpu_sharding), ("tpu", tpu_sharding)):
        record_sharding(copy_checkpoint(root / "one_v0", root / name), spec)
    odd = Net(nnx.Rngs(0), din=12)  # a/kernel (12, 8): 8 devices cannot split its rows
    save_checkpoint(root / "odd_v0", nnx.state(odd))
    save_safetensors(root / "odd.safetensors", odd)
    return root, run_child("eight_devices", root, 8)


def eight_devices(root: Path) -> None:
    """In a process with 8 devices: save a model sharded over them; restore the 1-device
    checkpoints onto targets sharded over them; try targets that do not fit."""
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("d",))
    with jax.set_mesh(mesh):
        model = Net(nnx.Rngs(0), AXES)
    assert len(arrays(model)["a/kernel"].sharding.device_set) == 8
    np.savez(root / "eight.npz", **host(model))
    save_checkpoint(root / "eight_v0", nnx.state(model))
    v1.save(root / "eight_v1", nnx.state(model))

    one = dict(np.load(root / "one.npz"))
    with jax.set_mesh(mesh):
        reference = {k: v.sharding for k, v in arrays(Net(nnx.Rngs(1), AXES)).items()}
    found: dict[str, Any] = {
        "shardings": {
            k: f"{len(s.device_set)} {getattr(s, 'spec', type(s).__name__)}"
            for k, s in reference.items()
        },
        "annotations shard": annotations_shard(mesh),
    }
    for source in ("one_v0", "one.safetensors", "tpu"):
        path = root / source

        def restore(path: Path = path) -> None:
            with jax.set_mesh(mesh):
                target = Net(nnx.Rngs(1), AXES)
            ncw.restore(path, target)
            assert_exact(one, target, reference)

        def restore_abstract(path: Path = path) -> None:
            with jax.set_mesh(mesh):
                target = nnx.eval_shape(lambda: Net(nnx.Rngs(1), AXES))
                ncw.restore(path, target)
            assert_exact(one, target, reference)

        def load(path: Path = path) -> None:
            with jax.set_mesh(mesh):
                target = ncw.load(path, lambda: Net(nnx.Rngs(1), AXES))
            assert_exact(one, target, reference)

        found[f"restore {source}"] = outcome(restore)
        found[f"restore abstract {source}"] = outcome(restore_abstract)
        found[f"load {source}"] = outcome(load)
        found[f"stats {source}"] = outcome(lambda path=path: assert_stats_exact(one, path))

    # Targets that cannot fit: an array of 12 rows split over 8 devices. An explicit mesh
    # refuses to even build such a model; an Auto mesh builds it abstractly.
    auto = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    try:  # older Flax (0.12.2) shards each value as it builds it, even abstractly: no model
        nnx.get_abstract_model(lambda: Net(nnx.Rngs(1), AXES, din=12), auto)
    except ValueError as err:
        unbuildable = {"error": "unbuildable", "message": str(err).splitlines()[0]}
    else:
        unbuildable = None
    for source in ("odd_v0", "odd.safetensors"):
        path = root / source
        if unbuildable is not None:
            found[f"load uneven {source}"] = found[f"restore uneven {source}"] = unbuildable
            continue
        with jax.set_mesh(auto):
            found[f"load uneven {source}"] = outcome(
                lambda path=path: ncw.load(path, lambda: Net(nnx.Rngs(1), AXES, din=12))
            )
        _, abstract = nnx.get_abstract_model(lambda: Net(nnx.Rngs(1), AXES, din=12), auto)
        found[f"restore uneven {source}"] = outcome(
            lambda path=path, abstract=abstract: ncw.restore(path, abstract)
        )

    # Under the mesh, load's other paths: zero-filled missing keys land on their shardings,
    # a transform runs on the mesh's devices, and a model the mesh cannot hold is a mismatch.
    def load_zeros() -> None:
        with jax.set_mesh(mesh):
            target = ncw.load(
                root / "one_v0", lambda: NetPlus(nnx.Rngs(1), AXES), strict=False, missing="zeros"
            )
        got = arrays(target)
        kernel = got.pop("c/kernel")
        assert len(kernel.sharding.device_set) == 8 and not np.asarray(kernel).any()
        assert not np.asarray(got.pop("c/bias")).any()
        for key, value in got.items():
            np.testing.assert_array_equal(np.asarray(value), one[key], err_msg=key, strict=True)
            assert value.sharding == reference[key], key

    def load_transform() -> None:
        with jax.set_mesh(mesh):
            target = ncw.load(
                root / "one_v0",
                lambda: Net(nnx.Rngs(1), AXES),
                transform={r"b/kernel$": lambda w: w * 2},
            )
        doubled = {**one, "b/kernel": one["b/kernel"] * 2}
        assert_exact(doubled, target, reference)

    found["load zeros under a mesh"] = outcome(load_zeros)
    found["load transform under a mesh"] = outcome(load_transform)
    with jax.set_mesh(mesh):
        found["load unbuildable under a mesh"] = outcome(
            lambda: ncw.load(root / "odd_v0", lambda: Net(nnx.Rngs(1), AXES, din=12))
        )
    # An abstract target made under a mesh, restored after leaving it: no devices to place on.
    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(1), AXES))
    found["restore abstract outside its mesh"] = outcome(
        lambda: ncw.restore(root / "one_v0", abstract)
    )
    found["still abstract"] = all(
        isinstance(v, jax.ShapeDtypeStruct) for v in arrays(abstract).values()
    )
    (root / "eight_devices.json").write_text(json.dumps(found))


# --- saved on 8 devices, on a GPU or a TPU: restored here, on 1 CPU device ------------------


def single_device(target: Any) -> dict[str, Any]:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return dict.fromkeys(arrays(target), device)


@pytest.mark.parametrize("source", ["eight_v0", "eight_v1", "gpu", "tpu"])
def test_restore_load_and_stats_on_one_device(saved, source):
    root, _ = saved
    path = root / source
    expected = dict(np.load(root / ("one.npz" if source in ("gpu", "tpu") else "eight.npz")))
    assert jax.device_count() == 1

    # A model written for this one device, and the same model code as on 8 devices, here on
    # a mesh of one device: each keeps its own shardings.
    plain = Net(nnx.Rngs(1))
    shardings = single_device(plain)
    ncw.restore(path, plain)
    assert_exact(expected, plain, shardings)
    mesh = jax.make_mesh((1,), ("d",))
    if not annotations_shard(mesh):
        pytest.skip(ANNOTATIONS)
    with jax.set_mesh(mesh):
        annotated = Net(nnx.Rngs(1), AXES)
        shardings = {k: v.sharding for k, v in arrays(annotated).items()}
        ncw.restore(path, annotated)
        loaded = ncw.load(path, lambda: Net(nnx.Rngs(1), AXES))
    assert_exact(expected, annotated, shardings)
    assert_exact(expected, loaded, shardings)
    assert_exact(expected, ncw.load(path, lambda: Net(nnx.Rngs(1))), single_device(plain))
    assert_stats_exact(expected, path)


def test_recorded_devices_are_shown_as_recorded(saved):
    root, _ = saved
    gpu = ncw.inspect(root / "gpu").leaves
    assert {leaf.sharding for leaf in gpu.values()} == {"cuda:0"}
    tpu = {"/".join(k): leaf.sharding for k, leaf in ncw.inspect(root / "tpu").leaves.items()}
    assert tpu["a/kernel"] == "mesh(data=2,model=4) P(data, model)"
    eight = ncw.inspect(root / "eight_v0").leaves
    assert {leaf.sharding for leaf in eight.values()} >= {"mesh(d=8) P(d, None)"}


# --- saved on 1 device: restored onto targets sharded over 8 --------------------------------


@pytest.mark.parametrize("source", ["one_v0", "one.safetensors", "tpu"])
@pytest.mark.parametrize("how", ["restore", "restore abstract", "load", "stats"])
def test_restore_onto_eight_devices(saved, how, source):
    _, found = saved
    if how in ("restore abstract", "load") and not found["annotations shard"]:
        pytest.skip(ANNOTATIONS)
    assert found[f"{how} {source}"] == {"error": None}


def test_eight_device_targets_were_sharded(saved):
    _, found = saved
    if not found["annotations shard"]:
        pytest.skip(ANNOTATIONS)
    assert found["shardings"] == {
        "a/bias": "8 P(None,)",
        "a/kernel": "8 P('d', None)",
        "b/bias": "8 P(None,)",
        "b/kernel": "8 P(None, 'd')",
    }


@pytest.mark.parametrize("how", ["load", "restore"])
@pytest.mark.parametrize("source", ["odd_v0", "odd.safetensors"])
def test_uneven_sharding_is_a_mismatch_not_damage(saved, how, source):
    root, found = saved
    seen = found[f"{how} uneven {source}"]
    if seen["error"] == "unbuildable":
        pytest.skip(f"this Flax cannot build the model abstractly: {seen['message'][:120]}")
    assert seen["error"] == "ShardingMismatchError", seen
    message = seen["message"]
    assert message.startswith(f"Checkpoint at {root / source}: the target's a")
    assert "splits axis 0 of shape (12, 8) into 8 parts, which do not divide 12" in message
    assert "damaged" not in message and "\n" not in message


@pytest.mark.parametrize("how", ["load zeros", "load transform"])
def test_load_paths_under_a_mesh(saved, how):
    """Zero-fills and transforms under an 8-device mesh: once a raw ValueError and a
    TransformError about incompatible devices."""
    _, found = saved
    if not found["annotations shard"]:
        pytest.skip(ANNOTATIONS)
    assert found[f"{how} under a mesh"] == {"error": None}


def test_a_model_the_mesh_cannot_hold_is_a_mismatch(saved):
    _, found = saved
    seen = found["load unbuildable under a mesh"]
    assert seen["error"] == "ShardingMismatchError", seen
    assert "damaged" not in seen["message"] and "\n" not in seen["message"]


def test_abstract_target_outside_its_mesh_is_a_mismatch(saved):
    root, found = saved
    seen = found["restore abstract outside its mesh"]
    assert seen["error"] == "ShardingMismatchError", seen
    assert f"Checkpoint at {root / 'one_v0'}: the target's a" in seen["message"]
    assert "abstract mesh (mesh(d=8))" in seen["message"]
    assert "jax.set_mesh" in seen["message"]
    assert found["still abstract"]


# --- out of memory, for real ----------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_out_of_memory_is_resource_exhausted(tmp_path):
    found = run_child("out_of_memory", tmp_path, 1)
    for case in ("restore orbax", "restore safetensors", "stats safetensors"):
        seen = found[case]
        assert seen["error"] == "ResourceExhaustedError", (case, seen)
        assert "ran out of memory" in seen["message"] and "checkpoint is fine" in seen["message"]
        assert "Unable to allocate" in seen["message"], seen  # NumPy's words, kept
        assert "damaged" not in seen["message"]
    assert found["target unchanged"]
    assert found["xla"]["error"] == "ResourceExhaustedError"
    assert "RESOURCE_EXHAUSTED" in found["xla"]["message"]
    assert found["thread"]["error"] == "ResourceExhaustedError"
    assert "can't start new thread" in found["thread"]["message"]


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize in /proc/self/status")


def raised(call: Callable[[], Any]) -> Exception:
    try:
        call()
    except Exception as err:
        return err
    raise AssertionError("no error")


def _raise(err: Exception, cause: Exception) -> None:
    raise err from cause


def out_of_memory(root: Path) -> None:
    """In a fresh process: read 128 MiB arrays with only 64 MiB of address space to spare."""
    import resource
    import threading

    import jax.numpy as jnp

    n = 32 * MiB  # float32: 128 MiB
    zeros = {"w": np.zeros(n, np.float32), "s": np.zeros(3, np.float32)}
    save_checkpoint(root / "big_v0", zeros)
    save_safetensors(root / "big.safetensors", zeros)
    small = {"w": np.zeros(4, np.float32), "s": np.zeros(3, np.float32)}
    save_checkpoint(root / "small_v0", small)
    save_safetensors(root / "small.safetensors", small)
    # The same reads once, small: thread pools and lazy imports exist before the limit.
    ncw.restore(root / "small_v0", Big(4))
    ncw.restore(root / "small.safetensors", Big(4))
    ncw.stats(root / "small.safetensors", progress=False)

    target = Big(n)
    found: dict[str, Any] = {}
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (_vm_bytes() + 64 * MiB, hard))
    try:
        found["restore orbax"] = outcome(lambda: ncw.restore(root / "big_v0", target))
        found["restore safetensors"] = outcome(
            lambda: ncw.restore(root / "big.safetensors", target)
        )
        found["stats safetensors"] = outcome(
            lambda: ncw.stats(root / "big.safetensors", progress=False)
        )

        # XLA's own out-of-memory error, and a thread with no memory left for its stack,
        # classified once the limit is lifted.
        xla = raised(lambda: jnp.zeros(4 * n).block_until_ready())
        # A stack larger than what is left: glibc cannot reuse a cached 8 MiB stack of an
        # ended thread, so pthread_create itself fails (a thread that starts and then fails
        # in Python would leave Thread.start waiting forever).
        threading.stack_size(128 * MiB)
        thread = raised(lambda: threading.Thread(target=int).start())
    finally:
        threading.stack_size(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    for name, err in (("xla", xla), ("thread", thread)):
        found[name] = outcome(lambda err=err: _raise(read_error(root / "big_v0", err), err))
    found["target unchanged"] = bool((np.asarray(target.w[...]) == 1).all())
    (root / "out_of_memory.json").write_text(json.dumps(found))


# --- damage is still damage; the rest is not called damage ----------------------------------


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_damaged_chunks_are_damage(tmp_path, damage):
    model = Net(nnx.Rngs(0), din=64)  # a/kernel's chunk is stored outside OCDBT's B-tree
    path = save_checkpoint(tmp_path / "c", nnx.state(model))
    (file, offset, length), *_ = [
        where for key, where in chunk_locations(path).items() if key.startswith("a.kernel")
    ]
    with open(file, "r+b") as handle:
        if damage == "truncated":
            handle.truncate(offset + length // 2)
        else:
            handle.seek(offset)
            handle.write(np.random.default_rng(0).bytes(length))
    target = Net(nnx.Rngs(1), din=64)
    before = host(target)
    for call in (lambda: ncw.restore(path, target), lambda: ncw.stats(path, progress=False)):
        with pytest.raises(ncw.CorruptCheckpointError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"Checkpoint at {path} is damaged: ")
        assert "a.kernel.value" in message and "from a copy" in message
        assert raised.value.__cause__ is not None
    for key, value in host(target).items():
        np.testing.assert_array_equal(value, before[key], strict=True)


def test_what_the_classifier_calls_each_real_error(saved, tmp_path):
    root, _ = saved
    path = root / "gpu"

    def caught(call: Callable[[], Any]) -> ncw.CheckpointError:
        try:
            call()
        except Exception as err:
            classified = read_error(path, err)
            assert "\n" not in str(classified) and str(path) in str(classified)
            return classified
        raise AssertionError("no error")

    # Orbax without a target: it places arrays where _sharding says, and those devices are
    # not here (a GPU; 8 devices on this 1-device machine).
    with ocp.StandardCheckpointer() as checkpointer:
        gpu = caught(lambda: checkpointer.restore(path))
        eight = caught(lambda: checkpointer.restore(root / "eight_v0"))
    assert type(gpu) is ncw.ShardingMismatchError, gpu
    assert "cuda:0" in str(gpu) and "1 cpu" in str(gpu)
    assert type(eight) is ncw.ShardingMismatchError, eight

    # A timeout is the storage's, not the checkpoint's.
    timeout = caught(lambda: concurrent.futures.Future().result(timeout=0))
    assert type(timeout) is ncw.StorageError, timeout

    # Anything else: the read failed, its cause is named, and it is not called damage.
    unknown = caught(lambda: 1 // 0)
    assert type(unknown) is ncw.CheckpointError, unknown
    assert "ZeroDivisionError" in str(unknown) or "division" in str(unknown)
    assert "damaged" in str(unknown) and "nothing shows that the checkpoint is damaged" in str(
        unknown
    )

    # Ours pass through unchanged.
    ours = ncw.CorruptCheckpointError("x")
    assert read_error(path, ours) is ours


def test_a_file_gone_since_inspect_is_damage(tmp_path):
    """A safetensors file deleted between ``compare`` and the read: the checkpoint's own
    files are inconsistent, which is damage (the OSError is no longer called damage blindly)."""
    model = Net(nnx.Rngs(0))
    path = save_safetensors(tmp_path / "model.safetensors", model)
    target = Net(nnx.Rngs(1))
    before = host(target)
    report = ncw.compare(path, target)
    path.unlink()
    with pytest.raises(ncw.CorruptCheckpointError) as raised:
        ncw.apply_report(report, target)
    assert str(raised.value).startswith(f"Safetensors checkpoint at {path} is damaged: ")
    assert "download or save it again" in str(raised.value)
    assert isinstance(raised.value.__cause__, FileNotFoundError)
    for key, value in host(target).items():
        np.testing.assert_array_equal(value, before[key], strict=True)
