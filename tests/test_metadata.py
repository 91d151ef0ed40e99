"""``inspect`` and the fast metadata reader, on real Orbax checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import (
    FAILING_READ,
    MLP,
    Stack,
    chunk_locations,
    copy_checkpoint,
    corrupt_chunks,
    make_bnnet,
    make_mlp,
    save_checkpoint,
)
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets.layouts import _pytree as _tree_metadata

# --- the fast reader returns exactly what Orbax returns ----------------------------------


def _save_with_handler(path: Path, tree, **handler_options) -> Path:
    handler = ocp.PyTreeCheckpointHandler(**handler_options)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
    return path


def _named_sharding_tree():
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    return {
        "w": jax.device_put(jnp.ones((4, 2)), NamedSharding(mesh, P(None, "model"))),
        "v": jax.device_put(jnp.ones((4,)), NamedSharding(mesh, P(("data", "model")))),
        "r": jax.device_put(jnp.ones(()), NamedSharding(mesh, P())),
    }


def _optimizer_state():
    model = make_mlp(0)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return nnx.state(optimizer)


# name -> (builder(dir) -> item folder, stored in OCDBT so the fast path must handle it)
KINDS: dict[str, tuple[Callable[[Path], Path], bool]] = {
    "nnx_state": (lambda d: save_checkpoint(d, nnx.state(make_mlp(0))), True),
    "pure_dict": (
        lambda d: save_checkpoint(
            d,
            {
                "params": nnx.to_pure_dict(nnx.state(make_mlp(0))),
                "np": np.arange(6, dtype=np.int8).reshape(2, 3),
                "lr": 0.5,
                "n": 3,
            },
        ),
        True,
    ),
    # 12 layers: keys '10' and '11' sort before '2' in the saved order.
    "nnx_list": (lambda d: save_checkpoint(d, nnx.state(Stack(12, rngs=nnx.Rngs(0)))), True),
    "batchnorm": (
        lambda d: save_checkpoint(d, nnx.state(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))),
        True,
    ),
    "rngs": (lambda d: save_checkpoint(d, nnx.state(make_bnnet(0), nnx.RngState)), True),
    "bnnet": (lambda d: save_checkpoint(d, nnx.state(make_bnnet(0))), True),
    "optimizer": (lambda d: save_checkpoint(d, _optimizer_state()), True),
    "bfloat16": (
        lambda d: save_checkpoint(d, nnx.state(MLP(rngs=nnx.Rngs(0), dtype=jnp.bfloat16))),
        True,
    ),
    "named_sharding": (lambda d: save_checkpoint(d, _named_sharding_tree()), True),
    "zarr3": (
        lambda d: _save_with_handler(d, {"x": jnp.ones((2, 2), jnp.bfloat16)}, use_zarr3=True),
        True,
    ),
    # Not OCDBT: the fast reader falls back to Orbax.
    "no_ocdbt": (
        lambda d: _save_with_handler(d, nnx.to_pure_dict(nnx.state(make_mlp(0))), use_ocdbt=False),
        False,
    ),
    "manager_model": (None, True),  # type: ignore[dict-item]
    "manager_optimizer": (None, True),  # type: ignore[dict-item]
}


@pytest.fixture(scope="session", params=sorted(KINDS))
def kind_dir(request, ckpt_dir, manager_ckpt) -> tuple[str, Path, bool]:
    name = request.param
    build, ocdbt = KINDS[name]
    if name.startswith("manager_"):
        return name, manager_ckpt / "10" / name.removeprefix("manager_"), ocdbt
    path = ckpt_dir / f"kind_{name}"
    if not path.exists():
        build(path)
    return name, path, ocdbt


def _orbax_sharding_text(sharding) -> str | None:
    """How the reader spells Orbax's sharding metadata."""
    if sharding is None:
        return None
    if isinstance(sharding, ocp.metadata.SingleDeviceShardingMetadata):
        return sharding.device_str
    assert isinstance(sharding, ocp.metadata.NamedShardingMetadata), sharding
    mesh = ",".join(f"{a}={n}" for a, n in zip(sharding.axis_names, sharding.shape, strict=True))
    spec = []
    for part in sharding.partition_spec:
        if part is None:
            spec.append("None")
        elif isinstance(part, (tuple, list)):
            spec.append("(" + ", ".join(part) + ")")
        else:
            spec.append(part)
    return f"mesh({mesh}) P({', '.join(spec)})"


def _orbax_leaves(item_dir: Path) -> list[tuple[tuple[str, ...], tuple[int, ...], str, str | None]]:
    tree = ocp.PyTreeCheckpointHandler().metadata(item_dir).tree
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = tuple(str(k.key) for k in path)
        out.append((keys, tuple(leaf.shape), np.dtype(leaf.dtype).name, leaf.sharding))
    return out


def test_fast_reader_returns_what_orbax_returns(kind_dir, monkeypatch):
    """Same leaves, shapes, dtypes and shardings as Orbax's own metadata API.

    Orbax lists leaves sorted by their string keys ('10' before '2'); the reader keeps the
    saved order (layer 2 before layer 10), so the lists are compared as mappings.
    """
    name, item_dir, ocdbt = kind_dir
    expected = {
        keys: (shape, dtype, _orbax_sharding_text(sharding))
        for keys, shape, dtype, sharding in _orbax_leaves(item_dir)
    }
    leaves = _tree_metadata.read_leaves(item_dir)
    got = {leaf.stored_path: (leaf.shape, leaf.dtype, leaf.sharding) for leaf in leaves}
    assert len(got) == len(leaves)
    assert got == expected
    assert expected, name
    if ocdbt:
        # The fast path itself (not the Orbax fallback) produced the answer.
        fast = _tree_metadata.read_fast(item_dir)
        assert {f.stored_path: (f.shape, f.dtype, f.sharding) for f in fast} == expected
        # The headers came from the B+tree's one node (no per-key read), and the per-key
        # reads, which a taller tree would use, give the same leaves.
        found = _tree_metadata._root_node_values(item_dir, None)
        assert found is not None
        header = "zarr.json" if "zarr3" in name else ".zarray"
        assert all(f"{'.'.join(f.stored_path)}/{header}".encode() in found for f in fast)
        monkeypatch.setattr(_tree_metadata, "_root_node_values", lambda *_: None)
        assert _tree_metadata.read_fast(item_dir) == fast
    else:
        with pytest.raises(_tree_metadata.Unrecognised):
            _tree_metadata.read_fast(item_dir)


def test_reader_covers_the_kinds_it_claims(ckpt_dir, manager_ckpt):
    """The kinds above really hold what they are named after."""
    bnnet = {leaf.dtype for leaf in _tree_metadata.read_leaves(ckpt_dir / "kind_bnnet")}
    assert {"float32", "uint32"} <= bnnet  # BatchStat floats and RNG key data / counters
    bf16 = {leaf.dtype for leaf in _tree_metadata.read_leaves(ckpt_dir / "kind_bfloat16")}
    assert bf16 == {"bfloat16"}
    shardings = {
        leaf.sharding for leaf in _tree_metadata.read_leaves(ckpt_dir / "kind_named_sharding")
    }
    assert "mesh(data=1,model=1) P(None, model)" in shardings


# --- inspect -------------------------------------------------------------------------------


def test_inspect_lists_every_array_with_shape_dtype_bytes_and_sharding(mlp_state_ckpt):
    info = ncw.inspect(mlp_state_ckpt)
    model = make_mlp(0)
    assert info.format == "nnx.State"
    assert set(info.leaves) == {
        ("linear1", "kernel"),
        ("linear1", "bias"),
        ("linear2", "kernel"),
        ("linear2", "bias"),
    }
    kernel = info.leaves[("linear1", "kernel")]
    assert kernel.shape == (3, 4)
    assert kernel.dtype == "float32"
    assert kernel.nbytes == 3 * 4 * 4
    # As JAX spells the device: "cpu:0" from 0.10 on, "TFRT_CPU_0" in 0.9.
    assert kernel.sharding == str(jax.devices()[0])
    assert kernel.stored_path == ("linear1", "kernel", "value")
    arrays = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
    assert info.num_params == sum(a.size for a in arrays) == 26
    assert info.nbytes == sum(a.nbytes for a in arrays)
    assert len(info) == 4
    assert {leaf.name for leaf in info} == {
        "linear1/kernel",
        "linear1/bias",
        "linear2/kernel",
        "linear2/bias",
    }


def test_inspect_totals_per_subtree(mlp_state_ckpt):
    info = ncw.inspect(mlp_state_ckpt)
    assert info.totals[("linear1",)] == (3 * 4 + 4, (3 * 4 + 4) * 4)
    assert info.totals[("linear2",)] == (4 * 2 + 2, (4 * 2 + 2) * 4)
    assert info.totals[()] == (info.num_params, info.nbytes)
    assert set(info.subtree(("linear2",))) == {("linear2", "kernel"), ("linear2", "bias")}


def test_inspect_pure_dict_and_state_give_the_same_leaves(mlp_state_ckpt, mlp_dict_ckpt):
    state, pure = ncw.inspect(mlp_state_ckpt), ncw.inspect(mlp_dict_ckpt)
    assert (state.format, pure.format) == ("nnx.State", "pure dict")
    assert {p: (v.shape, v.dtype) for p, v in state.leaves.items()} == {
        p: (v.shape, v.dtype) for p, v in pure.leaves.items()
    }
    assert pure.leaves[("linear1", "kernel")].stored_path == ("linear1", "kernel")


def test_inspect_nbytes_of_bfloat16_and_integer_keys(ckpt_dir):
    info = ncw.inspect(ckpt_dir / "kind_bfloat16")
    assert info.leaves[("linear1", "kernel")].nbytes == 3 * 4 * 2
    listed = ncw.inspect(ckpt_dir / "kind_nnx_list")
    assert ("layers", "11", "kernel") in listed.leaves
    assert listed.totals[("layers",)][0] == 12 * (2 * 2 + 2)


def test_str_is_a_summary_table_that_folds_layers(ckpt_dir, mlp_state_ckpt):
    text = str(ncw.inspect(ckpt_dir / "kind_nnx_list"))
    assert "layers/{0..11}/kernel" in text
    assert "12 × (2, 2)" in text
    assert "Orbax v0 checkpoint, nnx.State: 24 arrays, 72 params, 288 B" in text
    lines = str(ncw.inspect(mlp_state_ckpt)).splitlines()
    assert lines[0] == f"Checkpoint {mlp_state_ckpt}"
    header = next(line for line in lines if line.startswith("key"))
    assert header.split() == ["key", "shape", "dtype", "params", "bytes", "sharding"]
    row = next(line for line in lines if line.startswith("linear1/kernel"))
    device = str(jax.devices()[0])
    assert row.split() == ["linear1/kernel", "(3,", "4)", "float32", "12", "48", "B", device]


def test_repr_html_escapes_names(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    path = save_checkpoint(tmp_path / "c", {evil: {"<script>x</script>": jnp.ones(2)}})
    html = ncw.inspect(path)._repr_html_()
    assert "<img" not in html
    assert "<script>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.startswith("<div") and html.endswith("</div>")


# --- metadata only, never array bytes --------------------------------------------------------


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
def test_inspect_and_compare_never_read_array_bytes(tmp_path):
    """Destroy every stored chunk: reading any array byte would fail, but metadata still reads.

    In OCDBT, zarr headers are small values inlined in the B-tree nodes, while each chunk larger
    than ``max_inline_value_bytes`` is an indirect value at a byte range of a data file. We
    overwrite exactly those ranges (found through ``tensorstore.ocdbt.dump``) with random bytes.
    """
    rng = np.random.default_rng(0)
    tree = {
        "big": rng.standard_normal((64, 64)).astype(np.float32),
        "block": {"w": rng.standard_normal((40, 30)).astype(np.float32)},
    }
    path = save_checkpoint(tmp_path / "c", tree)
    before = ncw.inspect(path)
    locations = chunk_locations(path)
    assert {key.rsplit("/", 1)[0] for key in locations} == {"big", "block.w"}
    for name in ("big", "block.w"):
        corrupt_chunks(path, name)

    after = ncw.inspect(path)
    assert after.leaves == before.leaves
    assert after.leaves[("big",)].shape == (64, 64)
    target = nnx.State(
        {"big": nnx.Param(jnp.zeros((64, 64))), "block": {"w": nnx.Param(jnp.zeros((40, 30)))}}
    )
    assert ncw.compare(path, target).ok
    # The corruption is real: reading the bytes fails.
    with pytest.raises(ncw.CorruptCheckpointError):
        ncw.restore(path, target)


# --- CheckpointManager roots ---------------------------------------------------------------


def test_manager_steps_ascending_with_metrics_and_latest_by_default(manager_ckpt):
    info = ncw.inspect(manager_ckpt, item="model")
    assert [s.step for s in info.steps] == [1, 5, 10]
    assert [s.metrics for s in info.steps] == [{"loss": 1.0}, {"loss": 0.2}, {"loss": 0.1}]
    assert info.step == 10
    assert info.item == "model"
    assert info.items == ("model", "optimizer")
    assert info.item_dir == manager_ckpt / "10" / "model"
    text = str(info)
    assert "steps: 1 (loss=1), 5 (loss=0.2), 10 (loss=0.1)" in text
    assert "items: model, optimizer" in text
    assert "step 10" in text


def test_manager_step_and_item_selection(manager_ckpt):
    info = ncw.inspect(manager_ckpt, step=5, item="optimizer")
    assert (info.step, info.item) == (5, "optimizer")
    assert ("opt_state", "0", "mu", "linear1", "kernel") in info.leaves
    assert ("step",) in info.leaves
    by_step_folder = ncw.inspect(manager_ckpt / "5", item="optimizer")
    assert by_step_folder.leaves == info.leaves


def test_manager_several_items_need_item(manager_ckpt):
    with pytest.raises(ncw.ItemSelectionError) as raised:
        ncw.inspect(manager_ckpt)
    message = str(raised.value)
    assert "model" in message and "optimizer" in message and "item=" in message
    with pytest.raises(ncw.ItemSelectionError, match=r"'params'.*model, optimizer"):
        ncw.inspect(manager_ckpt, item="params")


def test_manager_unknown_step_lists_the_available_ones(manager_ckpt):
    with pytest.raises(ncw.CheckpointNotFoundError, match="no step 7; pick one of: 1, 5, 10"):
        ncw.inspect(manager_ckpt, step=7, item="model")


def test_manager_single_item_needs_no_item(tmp_path):
    with ocp.CheckpointManager(tmp_path / "m") as manager:
        manager.save(3, args=ocp.args.StandardSave({"w": jnp.ones(2)}))
        manager.wait_until_finished()
    info = ncw.inspect(tmp_path / "m")
    assert (info.step, info.item, info.format) == (3, "default", "pure dict")
    assert info.steps[0].metrics == {}


# --- errors ----------------------------------------------------------------------------------


def _strip_commit(folder: Path) -> None:
    """Make ``folder`` look like a save that stopped before it was committed."""
    (folder / "commit_success.txt").unlink(missing_ok=True)  # none from Orbax 0.12.0
    metadata_file = folder / "_CHECKPOINT_METADATA"
    metadata = json.loads(metadata_file.read_text())
    metadata.pop("commit_timestamp_nsecs")
    metadata_file.write_text(json.dumps(metadata))


def _assert_good_error(err: BaseException, path: Path, cause: type | None = None) -> None:
    message = str(err)
    assert isinstance(err, ncw.CheckpointError)
    assert "\n" not in message
    assert str(path) in message
    assert "Traceback" not in message
    if cause is not None:
        assert isinstance(err.__cause__, cause), repr(err.__cause__)


def test_error_missing_path(tmp_path):
    with pytest.raises(ncw.CheckpointNotFoundError) as raised:
        ncw.inspect(tmp_path / "nope")
    _assert_good_error(raised.value, tmp_path / "nope")
    assert isinstance(raised.value, FileNotFoundError)


def test_error_file_and_empty_and_unrelated_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    for name in ("file", "empty"):
        with pytest.raises(ncw.CheckpointNotFoundError) as raised:
            ncw.inspect(tmp_path / name)
        _assert_good_error(raised.value, tmp_path / name)
    # Files in no known layout: not "missing", not "damaged", but what was found and what is
    # supported.
    with pytest.raises(ncw.UnknownLayoutError) as raised:
        ncw.inspect(tmp_path / "other")
    assert not isinstance(raised.value, (ncw.CorruptCheckpointError, ncw.CheckpointNotFoundError))
    message = str(raised.value)
    assert "notes.txt" in message
    for known in ("Orbax v0 checkpoint", "Orbax v1 checkpoint", "CheckpointManager root"):
        assert known in message
    _assert_good_error(raised.value, tmp_path / "other")


def test_error_interrupted_save_tmp_folder(tmp_path, mlp_state_ckpt):
    tmp = copy_checkpoint(mlp_state_ckpt, tmp_path / "ckpt.orbax-checkpoint-tmp-1234")
    with pytest.raises(ncw.IncompleteCheckpointError) as raised:
        ncw.inspect(tmp)
    _assert_good_error(raised.value, tmp)


def test_error_missing_commit_marker(tmp_path, mlp_state_ckpt):
    path = copy_checkpoint(mlp_state_ckpt, tmp_path / "c")
    _strip_commit(path)
    with pytest.raises(ncw.IncompleteCheckpointError, match="no commit marker") as raised:
        ncw.inspect(path)
    _assert_good_error(raised.value, path)


def test_manager_skips_interrupted_steps(tmp_path, manager_ckpt):
    root = copy_checkpoint(manager_ckpt, tmp_path / "m")
    # Step 10 never committed; step 12 is a tmp folder left by a killed save.
    _strip_commit(root / "10")
    copy_checkpoint(root / "5", root / "12.orbax-checkpoint-tmp-99")
    info = ncw.inspect(root, item="model")
    assert [s.step for s in info.steps] == [1, 5]
    assert info.step == 5
    for step in (10, 12):
        with pytest.raises(ncw.IncompleteCheckpointError) as raised:
            ncw.inspect(root, step=step, item="model")
        _assert_good_error(raised.value, root)
    with pytest.raises(ncw.IncompleteCheckpointError):
        ncw.inspect(root / "10", item="model")


def test_error_manager_with_no_finished_step(tmp_path, mlp_state_ckpt):
    root = tmp_path / "m"
    root.mkdir()
    copy_checkpoint(mlp_state_ckpt, root / "3.orbax-checkpoint-tmp-1")
    with pytest.raises(ncw.IncompleteCheckpointError) as raised:
        ncw.inspect(root)
    _assert_good_error(raised.value, root)


def test_error_step_on_a_single_checkpoint(mlp_state_ckpt):
    with pytest.raises(ncw.InvalidArgumentError) as raised:
        ncw.inspect(mlp_state_ckpt, step=1)
    _assert_good_error(raised.value, mlp_state_ckpt)


@pytest.mark.parametrize(
    ("damage", "cause"),
    [
        ("metadata_not_json", json.JSONDecodeError),
        ("metadata_missing", None),
        ("step_metadata_not_json", json.JSONDecodeError),
        ("btree_missing", ValueError),
        ("manifest_missing", None),
    ],
)
def test_error_damaged_checkpoint(tmp_path, mlp_state_ckpt, damage, cause):
    path = copy_checkpoint(mlp_state_ckpt, tmp_path / "c")
    if damage == "metadata_not_json":
        (path / "_METADATA").write_text('{"tree_metadata": ')
    elif damage == "metadata_missing":
        (path / "_METADATA").unlink()
    elif damage == "step_metadata_not_json":
        (path / "_CHECKPOINT_METADATA").write_text("{")
    elif damage == "btree_missing":
        shutil.rmtree(path / "d")
    elif damage == "manifest_missing":
        (path / "manifest.ocdbt").unlink()
    with pytest.raises(ncw.CorruptCheckpointError) as raised:
        ncw.inspect(path)
    _assert_good_error(raised.value, path, cause)


def test_leaf_nbytes_matches_numpy():
    leaf = ncw.LeafInfo(("a",), ("a",), (3, 5), "bfloat16")
    assert leaf.size == 15
    assert leaf.nbytes == 30
    assert ncw.LeafInfo(("s",), ("s",), (), "int8").nbytes == 1


def test_every_error_is_a_checkpoint_error():
    for cls in (
        ncw.CheckpointNotFoundError,
        ncw.IncompleteCheckpointError,
        ncw.CorruptCheckpointError,
        ncw.CheckpointMismatchError,
        ncw.ItemSelectionError,
        ncw.InvalidArgumentError,
    ):
        assert issubclass(cls, ncw.CheckpointError)
        assert cls.__module__ == "nnx_ckpt_widgets.errors"
    # Callers catching the built-in kinds still catch ours.
    assert issubclass(ncw.CheckpointNotFoundError, FileNotFoundError)
    assert issubclass(ncw.InvalidArgumentError, ValueError)


def test_rng_state_is_not_counted_as_params(tmp_path):
    class WithDropout(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.linear = nnx.Linear(2, 3, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, rngs=rngs)

    path = save_checkpoint(tmp_path / "ckpt", nnx.state(WithDropout(nnx.Rngs(0))))
    info = ncw.inspect(path)
    keys = [leaf.name for leaf in info.leaves.values() if leaf.key_impl is not None]
    assert keys == ["dropout/rngs/key"]  # beside it, its uint32 counter dropout/rngs/count
    assert f"{len(info.leaves)} arrays, 9 params (+ 2 arrays of RNG state), " in str(info)
    # The browser's tree and the HTML tree count them apart too.
    from nnx_ckpt_widgets._tree_model import TreeModel
    from nnx_ckpt_widgets.render import info_html

    assert info.rng_paths == {("dropout", "rngs", "key"), ("dropout", "rngs", "count")}
    model = TreeModel(info)
    root = model.root
    assert model.stats(root)[0] == 9
    dropout = next(n for n in model.children(root) if n.path == ("dropout",))
    assert model.describe(dropout).startswith("0 params, ")
    rngs = model.children(dropout)[0]
    assert all("  RNG state, " in model.describe(n) for n in model.children(rngs))
    assert "9 params" in info_html(info) and "0 params" in info_html(info)
