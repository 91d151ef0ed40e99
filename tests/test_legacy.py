"""Checkpoints from older writers, through every entry point: legacy Flax msgpack
(``flax.training.checkpoints`` without Orbax, written live here by flax 0.12.8), Hugging Face
``flax_model.msgpack`` single and sharded (written by transformers 4.57.1), Orbax's layout from
before ``_METADATA`` and flax 0.7's roots (written by Orbax 0.2.3 and flax 0.7.0). The committed
files come from ``tools/fixtures/``; ``tests/data/README.md`` names the versions. Restores
compare bit for bit against the writers' own arrays; hostile msgpack files are refused before
any large allocation."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import flax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_refused_cheaply, assert_same_arrays, run_cli, snapshot
from flax import nnx, serialization
from flax.training import checkpoints

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets.layouts import _steps
from nnx_ckpt_widgets.layouts import msgpack as msgpack_layout

DATA = Path(__file__).parent / "data"
OLD = DATA / "orbax_0.2.3"
FLAX07 = DATA / "flax_0.7.0"
HF = DATA / "hf_flax"


class Node(nnx.Module):
    """A module of any shape: one attribute per key, built from flat ``a/b/c`` names."""


def tree_module(flat: dict[str, np.ndarray]) -> Node:
    """A zeroed NNX model holding exactly the keys, shapes and dtypes of ``flat``."""
    root = Node()
    for key, array in flat.items():
        node = root
        parts = key.split("/")
        for part in parts[:-1]:
            if not hasattr(node, part):
                setattr(node, part, Node())
            node = getattr(node, part)
        setattr(node, parts[-1], nnx.Param(jnp.zeros(array.shape, array.dtype)))
    return root


def expected_old(step: int) -> dict[str, np.ndarray]:
    """The arrays the old writers held at ``step`` (saved by the fixture script)."""
    out = {}
    for file in sorted((DATA / "old_expected" / f"step_{step}").glob("*.npy")):
        value, name = np.load(file), file.stem
        if name.endswith(".bfloat16"):
            value, name = value.view(ml_dtypes.bfloat16), name.removesuffix(".bfloat16")
        out[name.replace(".", "/")] = value
    return out


def expected_hf() -> dict[str, np.ndarray]:
    return {f.stem.replace(".", "/"): np.load(f) for f in sorted((HF / "expected").glob("*.npy"))}


def values(model: nnx.Module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, k)): v for k, (v, _) in snapshot(model).items()}


def assert_holds(model: nnx.Module, expected: dict[str, np.ndarray]) -> None:
    got = values(model)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert got[key].tobytes() == value.tobytes(), key  # bit for bit


# --- legacy flax msgpack, written live by flax 0.12.8 ---------------------------------------


def mlp_tree(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "linear1": {
            "kernel": rng.standard_normal((3, 4)).astype(np.float32),
            "bias": rng.standard_normal(4).astype(np.float32),
        },
        "linear2": {
            "kernel": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
            "bias": np.arange(2, dtype=np.int32),
        },
    }


@pytest.fixture(scope="module")
def flax_run(tmp_path_factory) -> Path:
    """A root of ``checkpoint_<n>`` msgpack files from ``flax.training.checkpoints``."""
    root = tmp_path_factory.mktemp("flax_msgpack") / "run"
    with (
        flax.config.temp_flip_flag("use_orbax_checkpointing", False),
        warnings.catch_warnings(),
    ):
        # flax's notice that this backend is deprecated: it is the writer being tested
        warnings.simplefilter("ignore", DeprecationWarning)
        for step in (10, 20, 30):
            checkpoints.save_checkpoint(root, mlp_tree(step), step, keep=5)
    return root


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def test_flax_msgpack_root_inspect_restore_stats_diff(flax_run):
    assert sorted(p.name for p in flax_run.iterdir()) == [
        "checkpoint_10",
        "checkpoint_20",
        "checkpoint_30",
    ]
    info = ncw.inspect(flax_run)
    assert info.layout == "Flax msgpack checkpoint root"
    assert [s.step for s in info.steps] == [10, 20, 30] and info.step == 30
    assert {"/".join(leaf.path): (leaf.shape, leaf.dtype) for leaf in info.leaves.values()} == {
        k: (v.shape, str(v.dtype)) for k, v in flat(mlp_tree(30)).items()
    }
    for step in (10, 20, None):
        model = tree_module(flat(mlp_tree(0)))
        ncw.restore(flax_run, model, step=step)
        expected = flat(mlp_tree(step or 30))
        assert_holds(model, expected)
        # flax's own reader gives the same arrays
        theirs = checkpoints.restore_checkpoint(flax_run, None, step=step)
        assert_holds(model, {k: np.asarray(v) for k, v in flat(theirs).items()})
    with pytest.raises(ncw.CheckpointNotFoundError, match="no step 15; pick one of: 10, 20, 30"):
        ncw.inspect(flax_run, step=15)
    report = ncw.stats(flax_run, step=20, select="linear1/*")
    assert [e.key for e in report.entries] == ["linear1/kernel", "linear1/bias"]
    kernel = flat(mlp_tree(20))["linear1/kernel"]
    assert report.entries[0].max == pytest.approx(float(kernel.max()))
    changes = ncw.diff(flax_run, steps=(10, 30))
    assert changes.summary().startswith("1 of 4 arrays unchanged: linear2/bias")


def test_damaged_newest_step_file_leaves_the_older_ones(flax_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(flax_run, root)
    newest = root / "checkpoint_30"
    newest.write_bytes(newest.read_bytes()[:50])  # a copy cut short
    info = ncw.inspect(root)
    assert info.step == 20 and [s.step for s in info.steps] == [10, 20]
    with pytest.raises(ncw.CorruptCheckpointError, match="checkpoint_30 is damaged"):
        ncw.inspect(root, step=30)


def test_hf_weights_file_alone_shows_its_config():
    info = ncw.inspect(HF / "single" / "flax_model.msgpack")
    assert info.layout == "Hugging Face Flax weights"
    assert info.config is not None and info.config["hidden_size"] == 8


def test_flax_msgpack_single_file_and_cli(flax_run, tmp_path):
    file = flax_run / "checkpoint_20"
    info = ncw.inspect(file)
    assert info.layout == "Flax msgpack checkpoint" and info.step is None
    model = tree_module(flat(mlp_tree(0)))
    report = ncw.compare(file, model)
    assert {e.status for e in report.entries} == {"matched"}
    ncw.restore(file, model)
    assert_holds(model, flat(mlp_tree(20)))
    with pytest.raises(ncw.InvalidArgumentError, match="single checkpoint"):
        ncw.inspect(file, step=20)
    done = run_cli("inspect", str(flax_run))
    assert done.returncode == 0, done.stderr
    assert "Flax msgpack checkpoint root" in done.stdout and "linear2/kernel" in done.stdout
    # any .msgpack file of to_bytes, the way transformers and others write them
    other = tmp_path / "weights.msgpack"
    other.write_bytes(serialization.to_bytes(mlp_tree(3)))
    model = tree_module(flat(mlp_tree(0)))
    ncw.restore(other, model)
    assert_holds(model, flat(mlp_tree(3)))


def test_msgpack_python_scalars_and_scalars_restore(tmp_path):
    class WithStep(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3, jnp.float32))
            self.count = nnx.Variable(jnp.zeros((), jnp.int32))
            self.scale = nnx.Variable(jnp.zeros((), jnp.float32))

    tree = {"w": np.arange(3, dtype=np.float32), "count": np.int32(7), "scale": 0.5}
    file = tmp_path / "scalars.msgpack"
    file.write_bytes(serialization.to_bytes(tree))
    info = ncw.inspect(file)
    assert {"/".join(x.path): (x.shape, x.dtype) for x in info.leaves.values()} == {
        "w": ((3,), "float32"),
        "count": ((), "int32"),
        "scale": ((), "float64"),
    }
    model = WithStep()
    ncw.restore(file, model, cast=True)
    assert int(model.count[...]) == 7 and float(model.scale[...]) == 0.5
    np.testing.assert_array_equal(model.w[...], tree["w"])


def test_inspect_reads_no_array_bytes(tmp_path, monkeypatch):
    file = tmp_path / "big.msgpack"
    big = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MiB
    file.write_bytes(serialization.to_bytes({"a": {"big": big}, "b": np.ones(3, np.float32)}))
    read = []
    real = _storage.read_range

    def counting(path, offset, length):
        data = real(path, offset, length)
        read.append(len(data))
        return data

    monkeypatch.setattr(_storage, "read_range", counting)
    info = ncw.inspect(file)
    assert [leaf.shape for leaf in info.leaves.values()] == [(512, 1024), (3,)]
    assert sum(read) < 200_000 < big.nbytes, read  # two 64 KiB windows, not 2 MiB


def test_sharded_restore_reads_one_shard_at_a_time(monkeypatch):
    files = []
    real = _storage.read_range

    def recording(path, offset, length):
        files.append(Path(path).name)
        return real(path, offset, length)

    expected = expected_hf()
    model = tree_module(expected)
    monkeypatch.setattr(_storage, "read_range", recording)
    ncw.restore(HF / "sharded", model)
    assert_holds(model, expected)
    shards = [name for i, name in enumerate(files) if i == 0 or files[i - 1] != name]
    # each shard is visited in one run of reads: inspect's walk, then restore's reads
    assert (
        shards
        == [
            "flax_model-00001-of-00002.msgpack",
            "flax_model-00002-of-00002.msgpack",
        ]
        * 2
    ), shards


# --- Hugging Face Flax weights, written by transformers 4.57.1 ------------------------------


@pytest.mark.parametrize("folder", ["single", "sharded"])
def test_hf_flax_weights_every_entry_point(folder):
    path = HF / folder
    expected = expected_hf()
    info = ncw.inspect(path)
    assert info.layout == (
        "Hugging Face Flax weights" + (" (2 shards)" if folder == "sharded" else "")
    )
    assert info.config is not None and info.config["model_type"] == "bert"
    assert {"/".join(x.path): x.shape for x in info.leaves.values()} == {
        k: v.shape for k, v in expected.items()
    }
    model = tree_module(expected)
    report = ncw.compare(path, model)
    assert {e.status for e in report.entries} == {"matched"}
    ncw.restore(path, model)
    assert_holds(model, expected)
    stats = ncw.stats(path, select="pooler/*")
    assert [e.key for e in stats.entries] == ["pooler/dense/kernel", "pooler/dense/bias"]
    browser = ncw.CheckpointBrowser(path)
    assert "Hugging Face Flax weights" in browser.header.value


def test_hf_single_and_sharded_are_the_same_weights():
    report = ncw.diff(HF / "single", HF / "sharded")
    assert report.summary() == "all 39 arrays compared are bit-identical."


def test_hf_index_naming_a_missing_or_outside_shard(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(HF / "sharded", folder)
    (folder / "flax_model-00002-of-00002.msgpack").unlink()
    with pytest.raises(ncw.CorruptCheckpointError, match="missing from the folder"):
        ncw.inspect(folder)
    index = folder / "flax_model.msgpack.index.json"
    index.write_text(index.read_text().replace("flax_model-00002-of-00002", "../../x"))
    with pytest.raises(ncw.CorruptCheckpointError, match="not a file beside it"):
        ncw.inspect(folder)


def test_safetensors_beside_msgpack_wins(tmp_path):
    from safetensors.numpy import save_file

    folder = tmp_path / "hub"
    shutil.copytree(HF / "single", folder)
    save_file({"w": np.ones(2, np.float32)}, folder / "model.safetensors")
    assert ncw.inspect(folder).layout == "safetensors"


# --- Orbax 0.2.3 and flax 0.7.0 -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [OLD / "plain", OLD / "aggregate", FLAX07 / "orbax" / "checkpoint_6"],
    ids=["plain", "aggregate", "flax07-step"],
)
def test_orbax_before_metadata(path):
    step = 6 if "checkpoint_6" in str(path) else 1
    expected = expected_old(step)
    info = ncw.inspect(path)
    assert info.layout == "Orbax checkpoint (before _METADATA)"
    assert {"/".join(x.path): (x.shape, x.dtype) for x in info.leaves.values()} == {
        k: (v.shape, str(v.dtype)) for k, v in expected.items()
    }
    model = tree_module(expected)
    ncw.restore(path, model)
    assert_holds(model, expected)
    # Orbax 0.12.8's own reader of the whole folder agrees
    theirs = ocp.PyTreeCheckpointer().restore(path.absolute())
    assert_holds(model, {k: np.asarray(v) for k, v in flat(theirs).items()})
    partial = tree_module({"linear1/kernel": expected["linear1/kernel"]})
    ncw.restore(path, partial, strict=False)
    assert_holds(partial, {"linear1/kernel": expected["linear1/kernel"]})
    stats = ncw.stats(path)
    assert len(stats.entries) == 5


def test_orbax_02_manager_root():
    info = ncw.inspect(OLD / "manager")
    assert [s.step for s in info.steps] == [1, 2] and info.step == 2 and info.item == "default"
    for step in (1, 2):
        model = tree_module(expected_old(step))
        ncw.restore(OLD / "manager", model, step=step)
        assert_holds(model, expected_old(step))
    changes = ncw.diff(OLD / "manager", steps=(1, 2))
    assert "4 of 5" not in changes.summary() and len(changes.entries) == 5


def test_flax07_msgpack_root():
    info = ncw.inspect(FLAX07 / "msgpack")
    assert [s.step for s in info.steps] == [5, 6]
    model = tree_module(expected_old(5))
    ncw.restore(FLAX07 / "msgpack", model, step=5)
    assert_holds(model, expected_old(5))
    browser = ncw.CheckpointBrowser(FLAX07 / "msgpack")
    assert [value for _, value in browser.step_selector.options] == [5, 6]
    browser.step_selector.value = 5
    assert browser.error is None and browser.info.step == 5


def test_cli_json_of_hf_weights():
    done = run_cli("inspect", str(HF / "sharded"), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["layout"] == "Hugging Face Flax weights (2 shards)" and data["arrays"] == 39


@pytest.mark.skipif(
    not hasattr(_steps, "single_layout"),
    reason="a root of plain step folders needs the step roots of issue 24 point 1 (steps branch)",
)
def test_flax07_orbax_root():
    info = ncw.inspect(FLAX07 / "orbax")
    assert [s.step for s in info.steps] == [5, 6]
    for step in (5, 6):
        model = tree_module(expected_old(step))
        ncw.restore(FLAX07 / "orbax", model, step=step)
        assert_holds(model, expected_old(step))


def test_damaged_legacy_zarr_header(tmp_path):
    folder = tmp_path / "plain"
    shutil.copytree(OLD / "plain", folder)
    (folder / "linear1.kernel" / ".zarray").write_text("{not json")
    with pytest.raises(ncw.CorruptCheckpointError, match=r"\.zarray"):
        ncw.inspect(folder)


# --- hostile msgpack ------------------------------------------------------------------------


def _ext(code: int, payload: bytes) -> bytes:
    return b"\xc9" + struct.pack(">I", len(payload)) + struct.pack(">b", code) + payload


def _array_payload(shape: list[int], dtype: bytes, data: bytes) -> bytes:
    dims = bytes([0x90 + len(shape)]) + b"".join(b"\xce" + struct.pack(">I", n) for n in shape)
    return (
        b"\x93"
        + dims
        + bytes([0xA0 + len(dtype)])
        + dtype
        + b"\xc6"
        + struct.pack(">I", len(data))
        + data
    )


GOOD = serialization.to_bytes({"w": np.zeros(2, np.float32)})
HOSTILE = {
    "key-2-32": (b"\x81\xdb\xff\xff\xff\xffw", "is 4,294,967,295 bytes long"),
    "str-2-32": (b"\x81\xa1w\xdb\xff\xff\xff\xffw", "declares 4,294,967,295 bytes"),
    "map-2-32": (b"\xdf\xff\xff\xff\xff\xa1w", "a map of 4,294,967,295 entries"),
    "bin-2-32": (b"\x81\xa1w\xc6\xff\xff\xff\xf0", "declares 4,294,967,280 bytes"),
    "ext-2-32": (b"\x81\xa1w\xc9\xff\xff\xff\xf0\x01", "declares 4,294,967,280 bytes"),
    "deep": (b"\x81\xa1w" * 100_000 + b"\xc0", "nested more than 64 levels"),
    "wrong-ext": (b"\x81\xa1w" + _ext(7, b"\0" * 4), "ext of type 7"),
    "truncated": (GOOD[: len(GOOD) - 3], "truncated"),
    "bytes-vs-shape": (
        b"\x81\xa1w" + _ext(1, _array_payload([1000, 1000], b"float32", b"\0" * 8)),
        "needs 4,000,000",
    ),
    "unknown-dtype": (b"\x81\xa1w" + _ext(1, _array_payload([2], b"object", b"\0" * 16)), "object"),
    "trailing": (GOOD + b"\0", "follow the end"),
    "empty": (b"", "empty"),
    "not-msgpack": (b"\x81\xa1w\xc1", "starts no msgpack value"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_msgpack_is_refused_before_any_allocation(tmp_path, case):
    data, words = HOSTILE[case]
    path = tmp_path / "evil.msgpack"
    path.write_bytes(data)
    assert_refused_cheaply(path, tree_module({"w": np.zeros(2, np.float32)}), words)


def test_file_changed_after_inspect_leaves_model_unchanged(tmp_path):
    path = tmp_path / "w.msgpack"
    path.write_bytes(serialization.to_bytes({"w": np.arange(4, dtype=np.float32)}))
    model = tree_module({"w": np.zeros(4, np.float32)})
    before = snapshot(model)
    report = ncw.compare(path, model)
    path.write_bytes(serialization.to_bytes({"w": np.arange(2, dtype=np.float32)}))
    with pytest.raises(ncw.CorruptCheckpointError, match="changed since it was inspected"):
        ncw.apply_report(report, model)
    assert_same_arrays(before, model)


def test_msgpack_names_are_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    path = tmp_path / "names.msgpack"
    path.write_bytes(serialization.to_bytes({evil: {"w": np.ones(2, np.float32)}}))
    info = ncw.inspect(path)
    assert "<img" not in info._repr_html_() and "&lt;img" in info._repr_html_()
    browser = ncw.CheckpointBrowser(path)
    assert "<img" not in browser.header.value


def test_files_named_like_steps_that_are_not_msgpack(tmp_path):
    for step in (1, 2):
        (tmp_path / f"log_{step}").write_text("epoch done\n")
    with pytest.raises(ncw.UnknownLayoutError, match="not flax msgpack checkpoints"):
        ncw.inspect(tmp_path)
    with pytest.raises(ncw.UnknownLayoutError, match="not a flax msgpack checkpoint"):
        ncw.inspect(tmp_path / "log_2")


def test_tensorflow_checkpoint_folder_is_not_called_damaged(tmp_path):
    # TensorFlow's layout also has a file named "checkpoint" (a text index of ckpt-<n> files)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "ckpt-1"\n')
    (tmp_path / "ckpt-1.index").write_bytes(b"\0" * 8)
    (tmp_path / "ckpt-1.data-00000-of-00001").write_bytes(b"\0" * 8)
    with pytest.raises(ncw.UnknownLayoutError):
        ncw.inspect(tmp_path)
    (tmp_path / "ckpt-1.index").unlink()
    (tmp_path / "ckpt-1.data-00000-of-00001").unlink()
    with pytest.raises(ncw.UnknownLayoutError, match=r"not the msgpack tree Orbax 0\.2 writes"):
        ncw.inspect(tmp_path)


def test_too_many_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(msgpack_layout, "MAX_KEYS", 100)
    path = tmp_path / "many.msgpack"
    path.write_bytes(serialization.msgpack_serialize({str(i): None for i in range(200)}))
    with pytest.raises(ncw.CorruptCheckpointError, match="more than 100 keys"):
        ncw.inspect(path)


# --- in a bucket ----------------------------------------------------------------------------

# In a fresh interpreter: TensorStore reads the emulator's address once per process, and
# tests/test_gcs.py keeps its own emulator for its module (a second one in the same process
# cannot take the port back).
BUCKET_SCRIPT = """
import sys, uuid
from pathlib import Path
import fsspec
import numpy as np
import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets.emulator import GCSEmulator
sys.path.insert(0, sys.argv[1])
import test_legacy as t

with GCSEmulator() as gcs:
    bucket = gcs.create_bucket(f"legacy-{uuid.uuid4().hex[:12]}")
    fs = fsspec.filesystem("gs")
    cases = {
        "hf": (t.HF / "sharded", t.expected_hf()),
        "flax": (t.FLAX07 / "msgpack", t.expected_old(6)),
        "plain": (t.OLD / "plain", t.expected_old(1)),
        "aggregate": (t.OLD / "aggregate", t.expected_old(1)),
    }
    for name, (local, expected) in cases.items():
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.pipe(f"{bucket}/{name}/{file.relative_to(local)}", file.read_bytes())
        url = f"{bucket}/{name}"
        info = ncw.inspect(url)
        assert str(info.path) == url and len(info.leaves) == len(expected), name
        model = t.tree_module(expected)
        ncw.restore(url, model)
        t.assert_holds(model, expected)
        print(name, info.layout)
"""


def test_in_a_bucket(tmp_path):
    script = tmp_path / "bucket.py"
    script.write_text(BUCKET_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=Path(__file__).parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "hf Hugging Face Flax weights (2 shards)",
        "flax Flax msgpack checkpoint root",
        "plain Orbax checkpoint (before _METADATA)",
        "aggregate Orbax checkpoint (before _METADATA)",
    ]


def _tree_hash(folder: Path) -> dict[str, bytes]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize(
    "path,expected",
    [
        (HF / "sharded", expected_hf),
        (FLAX07 / "msgpack", lambda: expected_old(6)),
        (OLD / "manager", lambda: expected_old(2)),
        (OLD / "plain", lambda: expected_old(1)),
    ],
    ids=["hf", "flax-msgpack", "orbax-manager", "orbax-plain"],
)
def test_no_entry_point_writes_into_the_checkpoint(path, expected):
    before = _tree_hash(path)
    model = tree_module(expected())
    ncw.inspect(path)
    ncw.compare(path, model)
    ncw.restore(path, model)
    ncw.stats(path)
    ncw.diff(path, path)
    ncw.CheckpointBrowser(path, model)
    assert _tree_hash(path) == before
