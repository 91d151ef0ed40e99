"""``convert`` to a ``gs://`` destination, against the real emulator (fake-gcs-server).

The output is written under a hidden staging prefix beside ``dst`` and committed object by
object when complete (``nnx_ckpt_widgets._commit``). Round trips are read back from the bucket
by ``nw.load``/``nw.restore``, by Orbax itself, and (safetensors) by the ``safetensors``
library on the downloaded bytes, bit for bit; the faults leave nothing at ``dst``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
import safetensors.numpy
from conftest import MLP, REPO, assert_same_arrays, make_mlp, run_cli, save_checkpoint, snapshot
from flax import nnx
from orbax.checkpoint import v1
from safetensors import safe_open

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import _bucket, _commit
from nnx_ckpt_widgets.emulator import GCSEmulator

TIMEOUT = 4  # seconds a bucket request may take here


@pytest.fixture(scope="module")
def gcs():
    saved = os.environ.get(_bucket.TIMEOUT_ENV)
    os.environ[_bucket.TIMEOUT_ENV] = str(TIMEOUT)
    with GCSEmulator() as emulator:
        yield emulator
    if saved is None:
        os.environ.pop(_bucket.TIMEOUT_ENV, None)
    else:
        os.environ[_bucket.TIMEOUT_ENV] = saved


@pytest.fixture(scope="module")
def bucket(gcs) -> str:
    return gcs.create_bucket(f"convert-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def folder(bucket) -> str:
    """A fresh folder of the bucket for one test."""
    return f"{bucket}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def running(gcs):
    """The emulator, restarted after a test that stopped it, once the saves given up on have
    ended (Orbax keeps retrying them; they end once it is back)."""
    yield gcs
    gcs.start()
    for thread in _bucket.abandoned():
        thread.join(90)
        assert not thread.is_alive(), "an abandoned save still runs after the server came back"


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    """A local Orbax v0 checkpoint of ``make_mlp(0)``."""
    return str(save_checkpoint(tmp_path_factory.mktemp("src") / "ckpt", nnx.state(make_mlp(0))))


def fs():
    import fsspec

    return fsspec.filesystem("gs")


def objects(url: str) -> dict[str, bytes]:
    """Every object at or under ``url``: relative name -> bytes."""
    return {name: fs().cat_file(f"{url}/{name}" if name else url) for name in _bucket.objects(url)}


def staging_left(folder: str) -> list[str]:
    """Names of convert's staging prefixes left in ``folder``."""
    return [n for n in _bucket.objects(folder) if _commit.STAGING_SUFFIX + "/" in n]


def library_tensors(data: bytes, tmp_path) -> dict[str, np.ndarray]:
    """The tensors of a downloaded safetensors file, as the library's ``safe_open`` reads them
    (it validates the header and offsets)."""
    file = tmp_path / f"{uuid.uuid4().hex}.safetensors"
    file.write_bytes(data)
    with safe_open(str(file), framework="numpy") as opened:
        return {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118


def expected_tensors() -> dict[str, np.ndarray]:
    return {
        ".".join(map(str, path)): np.asarray(value)
        for path, (value, _) in snapshot(make_mlp(0)).items()
    }


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "shard", "files"),
    [
        ("out", "5GB", ["model.safetensors"]),
        ("out", 40, [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]),
        ("out/weights.safetensors", "5GB", [""]),
    ],
    ids=["one file", "sharded", "a file as dst"],
)
def test_safetensors_round_trip(folder, src, tmp_path, where, shard, files):
    dst = f"{folder}/{where}"
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "mlp"}')
    extra = [config] if where == "out" else []
    before = ncw.inspect(src)
    planned = ncw.convert(src, dst, to="safetensors", max_shard_size=shard, dry_run=True)
    assert not planned.written and _bucket.objects(folder) == []  # a dry run writes nothing
    plan = ncw.convert(src, dst, to="safetensors", max_shard_size=shard, extra_files=extra)
    assert plan.files == planned.files
    assert plan.written and plan.dst == dst
    stored = objects(dst)
    index = ["model.safetensors.index.json"] if len(files) > 1 else []
    assert sorted(stored) == sorted(files + index + (["config.json"] if extra else []))
    assert staging_left(folder) == []
    # The library's own reader on the downloaded bytes: every tensor, bit for bit.
    read = {}
    for name in files:
        read.update(library_tensors(stored[name], tmp_path))
    expected = expected_tensors()
    assert sorted(read) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(read[name], array, strict=True)
    if index:
        weight_map = json.loads(stored[index[0]])["weight_map"]
        assert sorted(set(weight_map.values())) == files
    if extra:
        assert stored["config.json"] == config.read_bytes()
        assert ncw.inspect(dst).config == {"model_type": "mlp"}
    # And the package from the bucket.
    loaded = ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7)))
    assert_same_arrays(make_mlp(0), loaded)
    assert ncw.inspect(src).leaves == before.leaves  # the source was only read


@pytest.mark.parametrize("fmt", ["orbax", "orbax-v1"])
# v1.load with an abstract tree that names no sharding (Orbax's own notice, not ours).
@pytest.mark.filterwarnings("ignore:Sharding info not provided:UserWarning")
def test_orbax_round_trip_from_a_bucket_source(bucket, folder, fmt):
    src = f"{folder}/src"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(src, nnx.state(make_mlp(3)))
    source_objects = objects(src)
    dst = f"{folder}/{fmt}"
    ncw.convert(src, dst, to=fmt, metadata={"run": "gcs"}, progress=False)
    assert objects(src) == source_objects  # not one byte of the source changed
    stored = objects(dst)
    assert "commit_success.txt" in stored and staging_left(folder) == []
    info = ncw.inspect(dst)
    assert info.custom_metadata == {"run": "gcs"}
    target = make_mlp(99)
    assert ncw.restore(dst, target).restored_arrays == 4
    assert_same_arrays(make_mlp(3), target)
    # Orbax reads the committed copy as its own checkpoint.
    abstract = nnx.eval_shape(lambda: make_mlp(0))
    if fmt == "orbax":
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(dst, nnx.state(abstract))
    else:
        restored = v1.load(dst, nnx.state(abstract))
    nnx.update(target, restored)
    assert_same_arrays(make_mlp(3), target)


def test_cli_converts_to_a_bucket(folder, src):
    dst = f"{folder}/cli"
    done = run_cli("convert", src, dst, "--to", "orbax-v1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Wrote 4 arrays (104 B) as an Orbax v1 checkpoint to {dst}.")
    assert_same_arrays(make_mlp(0), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))
    again = run_cli("convert", src, dst, "--to", "orbax-v1")
    assert again.returncode == 1 and again.stderr.startswith(f"error: dst '{dst}' exists")


# --- destinations ---------------------------------------------------------------------------


def test_dst_exists_refused_untouched_and_overwrite_leaves_no_stale_objects(folder, src, tmp_path):
    dst = f"{folder}/out"
    config = tmp_path / "config.json"
    config.write_text("{}")
    ncw.convert(src, dst, to="safetensors", max_shard_size=40, extra_files=[config])
    old = objects(dst)
    assert len(old) == 5  # three shards, the index, config.json
    file = f"{folder}/weights.safetensors"
    fs().pipe_file(file, b"mine")  # an object is a dst that exists too
    for taken in (dst, file):
        with pytest.raises(ncw.InvalidArgumentError, match="exists; pass overwrite=True"):
            ncw.convert(src, taken, to="safetensors")
    assert objects(dst) == old and objects(file) == {"": b"mine"}

    ncw.convert(make_mlp(5), dst, to="safetensors", overwrite=True, progress=False)
    assert sorted(objects(dst)) == ["model.safetensors"]  # no stale shard, index or config
    assert_same_arrays(make_mlp(5), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))
    ncw.convert(make_mlp(6), dst, to="orbax", overwrite=True, progress=False)
    assert "model.safetensors" not in objects(dst)
    assert ncw.inspect(dst).layout == "Orbax v0 checkpoint"
    assert_same_arrays(make_mlp(6), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))
    ncw.convert(make_mlp(7), dst, to="orbax", overwrite=True, progress=False)
    data = [n for n in objects(dst) if "/d/" in n or n.startswith("d/")]
    assert len(data) == len(set(data)) and staging_left(folder) == []
    assert_same_arrays(make_mlp(7), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))
    # The object dst, replaced by another.
    ncw.convert(src, file, to="safetensors", overwrite=True, progress=False)
    assert list(objects(file)) == [""] and staging_left(folder) == []
    assert_same_arrays(make_mlp(0), ncw.load(file, lambda: MLP(rngs=nnx.Rngs(7))))


def test_overlapping_bucket_source_refused(folder):
    src = f"{folder}/src"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(src, nnx.state(make_mlp(0)))
    before = objects(src)
    for dst in (src, f"{src}/inside", folder):
        with pytest.raises(ncw.InvalidArgumentError, match="overlaps the source"):
            ncw.convert(src, dst, to="orbax", overwrite=True)
    assert objects(src) == before
    ncw.convert(src, f"{src}-2", to="orbax", progress=False)  # a sibling is no overlap


def test_destinations_that_are_no_folder_of_a_bucket(src):
    with pytest.raises(ncw.InvalidArgumentError, match="is a whole bucket"):
        ncw.convert(src, "gs://some-bucket", to="orbax", dry_run=True)


# --- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_transform_raising_leaves_nothing(folder, src, fmt):
    def breaks_on_values(w):
        if isinstance(w, np.ndarray):  # fine on shapes, raises on the real array
            raise RuntimeError("bad weights")
        return w

    dst = f"{folder}/out"
    with pytest.raises(ncw.TransformError, match=r"linear2/kernel.*bad weights"):
        ncw.convert(
            src,
            dst,
            to=fmt,
            max_shard_size=40,
            transform={"linear2/kernel": breaks_on_values},
            progress=False,
        )
    assert _bucket.objects(folder) == []  # nothing at dst, no staging prefix
    assert_same_arrays(make_mlp(0), ncw.load(src, lambda: MLP(rngs=nnx.Rngs(7))))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_endpoint_stopping_mid_convert(running, folder, src, fmt):
    dst = f"{folder}/out"

    def stop_the_server(w):
        # Runs just before the last array is written: two shards are complete by then.
        if isinstance(w, np.ndarray) and running.running:
            running.stop()
        return w

    with pytest.raises(ncw.StorageError, match=r"^Writing gs://.*/out failed") as raised:
        ncw.convert(
            src,
            dst,
            to=fmt,
            max_shard_size=40,
            transform={"linear2/kernel": stop_the_server},
            progress=False,
        )
    message = str(raised.value)
    assert "Cannot write" in message and "gcloud storage rm -r" in message, message
    assert not running.running
    running.start()
    assert _bucket.objects(dst) == []  # nothing committed
    if fmt == "safetensors":  # complete shards, in the staging prefix only
        left = staging_left(folder)
        assert sum(n.endswith("-of-00003.safetensors") for n in left) == 2, left
    ncw.convert(src, dst, to=fmt, progress=False)  # what was left does not block a new one
    assert_same_arrays(make_mlp(0), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))


@pytest.mark.parametrize("fmt", ["safetensors", "orbax", "orbax-v1"])
def test_a_kill_at_any_point_of_the_commit_leaves_nothing_a_reader_takes_for_complete(
    folder, src, fmt
):
    """The commit copies objects one by one in ``_commit``'s order; a process killed after any
    number of them leaves that many at ``dst``. For each such state, our reader refuses ``dst``
    or reads all of it, bit for bit; it never reads a part as if it were the whole."""
    staged = f"{folder}/staged"
    ncw.convert(src, staged, to=fmt, max_shard_size=40, progress=False)
    order = sorted(_bucket.objects(staged), key=_commit._order)
    assert order[-1] == (
        "model.safetensors.index.json" if fmt == "safetensors" else "commit_success.txt"
    )
    complete_from = None
    for k in range(1, len(order) + 1):
        dst = f"{folder}/killed-{k}"
        for name in order[:k]:
            _bucket.copy(_bucket.as_path(f"{staged}/{name}"), _bucket.as_path(f"{dst}/{name}"))
        try:
            loaded = ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7)))
        except ncw.CheckpointError:
            assert complete_from is None, f"refused after {k} objects, read after fewer"
            continue
        complete_from = complete_from or k
        assert_same_arrays(make_mlp(0), loaded)
    assert complete_from is not None
    # Only the last objects, which describe data already there, separate refused and read.
    tail = order[complete_from - 1 :]
    if fmt == "safetensors":
        assert tail == ["model.safetensors.index.json"]
    else:
        assert all(_commit._rank(n) is not None for n in tail), tail


def test_one_shard_without_its_index_is_incomplete(folder, src, tmp_path):
    dst = f"{folder}/out"
    ncw.convert(src, dst, to="safetensors", max_shard_size=64, progress=False)
    fs().rm_file(f"{dst}/model.safetensors.index.json")
    fs().rm_file(f"{dst}/model-00002-of-00002.safetensors")
    with pytest.raises(ncw.IncompleteCheckpointError, match=r"one shard of 2, and no index"):
        ncw.inspect(dst)
    # The file itself, asked for by name, is a complete safetensors file.
    assert len(ncw.inspect(f"{dst}/model-00001-of-00002.safetensors").leaves) >= 1
    shard = safetensors.deserialize(fs().cat_file(f"{dst}/model-00001-of-00002.safetensors"))
    assert len(shard) >= 1


def test_endpoint_stopping_during_orbax_own_save(running, folder, src, monkeypatch):
    """Orbax's TensorStore retries a dead endpoint for many minutes; the probe gives up on it at
    once, and nothing is committed."""
    dst = f"{folder}/out"
    real_watched = _bucket.watched

    def stop_as_orbax_starts(path, save):
        running.stop()
        return real_watched(path, save)

    monkeypatch.setattr(_bucket, "watched", stop_as_orbax_starts)
    with pytest.raises(ncw.StorageError, match=r"^Writing gs://.*/out failed \(Cannot write"):
        ncw.convert(src, dst, to="orbax", progress=False)
    running.start()
    assert _bucket.objects(dst) == []


def test_commit_failing_part_way_is_undone(folder, src, monkeypatch):
    dst = f"{folder}/out"
    ncw.convert(make_mlp(1), dst, to="orbax", progress=False)
    old = objects(dst)
    real_copy = _bucket.copy

    def refuse_the_index(a, b):
        if str(b).endswith(".index.json"):
            raise RuntimeError("copy refused")
        real_copy(a, b)

    monkeypatch.setattr(_bucket, "copy", refuse_the_index)
    for where, overwrite in ((f"{folder}/new", False), (dst, True)):
        with pytest.raises(ncw.StorageError, match=r"copy refused\); nothing was left there"):
            ncw.convert(src, where, to="safetensors", max_shard_size=40, overwrite=overwrite)
    assert _bucket.objects(f"{folder}/new") == [] and staging_left(folder) == []
    assert objects(dst) == old  # the old output back, byte for byte
    assert_same_arrays(make_mlp(1), ncw.load(dst, lambda: MLP(rngs=nnx.Rngs(7))))


def test_endpoint_stopping_mid_commit_leaves_nothing_a_reader_takes(
    running, folder, src, monkeypatch
):
    dst = f"{folder}/out"
    real_copy = _bucket.copy

    def stop_after_the_first_shard(a, b):
        real_copy(a, b)
        if str(b).endswith(".safetensors") and running.running:
            running.stop()

    monkeypatch.setattr(_bucket, "copy", stop_after_the_first_shard)
    with pytest.raises(ncw.StorageError, match=r"^Committing gs://.*/out failed after 1 of 4") as e:
        ncw.convert(src, dst, to="safetensors", max_shard_size=40, progress=False)
    assert "no reader takes for a complete checkpoint" in str(
        e.value
    ) and "gcloud storage rm -r" in str(e.value)
    running.start()
    assert _bucket.objects(dst) == ["model-00001-of-00003.safetensors"]
    with pytest.raises(ncw.IncompleteCheckpointError, match="one shard of 3, and no index"):
        ncw.inspect(dst)


def test_a_large_array_is_uploaded_a_block_at_a_time(folder):
    import tracemalloc

    array = np.random.default_rng(0).standard_normal(12 * 2**20).astype(np.float32)  # 48 MiB
    state = nnx.State({"w": array})
    # Once first, small: what the first call imports and sets up is no part of the upload.
    ncw.convert(nnx.State({"w": array[:4]}), f"{folder}/small.safetensors", progress=False)
    tracemalloc.start()
    try:
        ncw.convert(state, f"{folder}/big.safetensors", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # gcsfs buffers one 5 MiB block; the array itself is never copied whole.
    assert peak < 24 << 20, f"{peak:,} bytes traced while uploading a 48 MiB array"
    data = fs().cat_file(f"{folder}/big.safetensors")
    np.testing.assert_array_equal(safetensors.numpy.load(data)["w"], array, strict=True)


CHILD = """
import os, signal, sys
import nnx_ckpt_widgets as ncw
import nnx_ckpt_widgets._values
nnx_ckpt_widgets._values.BATCH_BYTES = 1 << 16  # one array per batch

def progress(done, total):
    if total // 2 <= done < total:  # half of it read and being written: killed, as preempted
        os.kill(os.getpid(), signal.SIGKILL)

ncw.convert(sys.argv[1], sys.argv[2], to="safetensors", max_shard_size=1 << 16, progress=progress)
"""


def test_killed_convert_leaves_nothing_at_dst(folder, tmp_path):
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((128, 128), np.float32) for i in range(4)}
    src = save_checkpoint(tmp_path / "wide", state)
    dst = f"{folder}/out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), dst], env=env, timeout=300, check=False
    )
    assert done.returncode == -signal.SIGKILL
    assert _bucket.objects(dst) == []
    with pytest.raises(ncw.CheckpointNotFoundError):
        ncw.inspect(dst)
    # Only whole files reached the staging prefix: an upload cut short leaves no object.
    for name in staging_left(folder):
        assert name.endswith(".safetensors"), name
        with_library = safetensors.deserialize(fs().cat_file(f"{folder}/{name}"))
        assert len(with_library) == 1
    ncw.convert(src, dst, to="safetensors", progress=False)  # not blocked by what was left
    assert sorted(ncw.inspect(dst).leaves) == [("w0",), ("w1",), ("w2",), ("w3",)]
