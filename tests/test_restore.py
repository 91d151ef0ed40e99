"""``restore`` and ``load``: exact round trips, all-or-nothing, and only the bytes needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import (
    FAILING_READ,
    MLP,
    BNNet,
    RenamedMLP,
    Stack,
    assert_same_arrays,
    copy_checkpoint,
    corrupt_chunks,
    make_bnnet,
    make_mlp,
    save_checkpoint,
    save_manager,
    snapshot,
    to_numpy,
)
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nnx_ckpt_widgets as ncw


class Bigger(nnx.Module):
    """The MLP plus a head the MLP checkpoint lacks."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)
        self.head = nnx.Linear(2, 2, rngs=rngs)


class Half(nnx.Module):
    """Only the second layer of a wide MLP."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear2 = nnx.Linear(64, 2, rngs=rngs)


def fill_random(target, seed: int):
    """Give every non-key array of ``target`` random values, so restores have work to do."""
    rng = np.random.default_rng(seed)
    state = target if isinstance(target, nnx.State) else nnx.state(target)
    for _, variable in nnx.to_flat_state(state):
        value = variable.get_value()
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            continue
        variable.set_value(jnp.asarray(rng.integers(0, 100, value.shape), value.dtype))
    return target


def make_optimizer(seed: int) -> nnx.Optimizer:
    optimizer = nnx.Optimizer(make_mlp(seed), optax.adam(1e-3), wrt=nnx.Param)
    return fill_random(optimizer, seed)


def _assert_not_same(a, b):
    with pytest.raises(AssertionError):
        assert_same_arrays(a, b)


# --- round trips -----------------------------------------------------------------------------

# name -> (source, target factory); the checkpoint holds nnx.state(source)
ROUND_TRIPS = {
    "model": (lambda: make_mlp(0), lambda: make_mlp(1)),
    "abstract-model": (lambda: make_mlp(0), lambda: nnx.eval_shape(lambda: make_mlp(1))),
    "nnx.State": (lambda: make_mlp(0), lambda: nnx.state(make_mlp(1))),
    "nnx.List": (lambda: Stack(3, rngs=nnx.Rngs(0)), lambda: Stack(3, rngs=nnx.Rngs(1))),
    "batchnorm-and-rngs": (lambda: make_bnnet(0), lambda: make_bnnet(1)),
    "abstract-batchnorm-and-rngs": (
        lambda: make_bnnet(0),
        lambda: nnx.eval_shape(lambda: BNNet(rngs=nnx.Rngs(1, dropout=2))),
    ),
    "optimizer": (lambda: make_optimizer(0), lambda: make_optimizer(1)),
    "bfloat16": (
        lambda: MLP(rngs=nnx.Rngs(0), dtype=jnp.bfloat16),
        lambda: MLP(rngs=nnx.Rngs(1), dtype=jnp.bfloat16),
    ),
}


@pytest.mark.parametrize("pure_dict", [False, True], ids=["state-ckpt", "pure-dict-ckpt"])
@pytest.mark.parametrize("case", sorted(ROUND_TRIPS))
def test_round_trip_is_exact(ckpt_dir, case, pure_dict):
    make_source, make_target = ROUND_TRIPS[case]
    source = make_source()
    tree = nnx.state(source)
    path = ckpt_dir / f"round_trip_{case}_{pure_dict}"
    if not path.exists():
        save_checkpoint(path, nnx.to_pure_dict(tree) if pure_dict else tree)
    target = make_target()
    if not case.startswith("abstract"):
        _assert_not_same(source, target)

    report = ncw.restore(path, target)

    assert_same_arrays(source, target)
    assert report.ok
    assert {e.action for e in report.entries} == {"restored"}
    assert report.restored_arrays == len(snapshot(source))
    assert report.advice.startswith(f"Restored {report.restored_arrays} arrays (")


def test_round_trip_in_the_jax_ai_stack_style(mlp_state_ckpt):
    model = make_mlp(9)
    ncw.restore(mlp_state_ckpt, model)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(make_mlp(0)), nnx.state(model))


def test_restored_keys_stay_typed_keys(ckpt_dir):
    source = make_bnnet(0)
    path = save_checkpoint(ckpt_dir / "keys", nnx.state(source))
    target = nnx.eval_shape(lambda: BNNet(rngs=nnx.Rngs(1, dropout=2)))
    ncw.restore(path, target)
    key = target.rngs.default.key.get_value()
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(
        jax.random.key_data(key), jax.random.key_data(source.rngs.default.key.get_value())
    )
    # The restored stream works and continues where the source would.
    np.testing.assert_array_equal(
        jax.random.key_data(target.rngs.default()), jax.random.key_data(source.rngs.default())
    )


def test_restore_into_a_state_of_plain_arrays(mlp_dict_ckpt):
    state = nnx.State(nnx.to_pure_dict(nnx.state(make_mlp(1))))
    report = ncw.restore(mlp_dict_ckpt, state)
    assert report.ok
    expected = nnx.to_pure_dict(nnx.state(make_mlp(0)))
    jax.tree.map(np.testing.assert_array_equal, expected, nnx.to_pure_dict(state))


def test_restore_a_manager_step_and_item(manager_ckpt):
    model = make_mlp(0)
    report = ncw.restore(manager_ckpt, model, step=5, item="model")
    assert (report.step, report.item) == (5, "model")
    assert_same_arrays(make_mlp(5), model)
    optimizer = make_optimizer(3)
    ncw.restore(manager_ckpt, optimizer, item="optimizer")  # latest: step 10
    fresh = nnx.Optimizer(make_mlp(10), optax.adam(1e-3), wrt=nnx.Param)
    assert_same_arrays(fresh, optimizer)


# --- strict, policies, rename, cast ----------------------------------------------------------


def test_strict_raises_and_lists_the_differences(mlp_state_ckpt):
    target = Bigger(rngs=nnx.Rngs(3))
    before = snapshot(target)
    with pytest.raises(ncw.CheckpointMismatchError) as raised:
        ncw.restore(mlp_state_ckpt, target)
    message = str(raised.value)
    assert "\n" not in message
    assert str(mlp_state_ckpt) in message
    assert "2 missing (head/bias, head/kernel)" in message
    assert "strict=False" in message
    assert raised.value.report.missing == ["head/bias", "head/kernel"]
    assert_same_arrays(before, target)


def test_missing_keep_and_zeros(mlp_state_ckpt):
    kept = Bigger(rngs=nnx.Rngs(3))
    head = snapshot(kept.head)
    report = ncw.restore(mlp_state_ckpt, kept, strict=False)
    assert_same_arrays(head, kept.head)
    assert_same_arrays(make_mlp(0).linear1, kept.linear1)
    actions = {e.path: e.action for e in report.entries}
    assert actions == {
        "linear1/bias": "restored",
        "linear1/kernel": "restored",
        "linear2/bias": "restored",
        "linear2/kernel": "restored",
        "head/bias": "kept",
        "head/kernel": "kept",
    }
    zeroed = Bigger(rngs=nnx.Rngs(3))
    report = ncw.restore(mlp_state_ckpt, zeroed, strict=False, missing="zeros")
    np.testing.assert_array_equal(zeroed.head.kernel.get_value(), np.zeros((2, 2), np.float32))
    assert {e.action for e in report.entries if e.status == "missing"} == {"zeros"}
    assert_same_arrays(make_mlp(0).linear2, zeroed.linear2)


def test_missing_typed_keys_become_zero_keys(mlp_state_ckpt):
    class WithRngs(nnx.Module):
        def __init__(self):
            self.linear1 = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
            self.rngs = nnx.Rngs(5)

    target = WithRngs()
    ncw.restore(mlp_state_ckpt, target, strict=False, missing="zeros")
    key = target.rngs.default.key.get_value()
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key), np.zeros(2, np.uint32))


def test_unexpected_ignore_and_error(tmp_path):
    path = save_checkpoint(tmp_path / "c", nnx.state(Bigger(rngs=nnx.Rngs(0))))
    target = make_mlp(1)
    with pytest.raises(ncw.CheckpointMismatchError, match="2 unexpected"):
        ncw.restore(path, target)
    before = snapshot(target)
    with pytest.raises(ncw.CheckpointMismatchError, match="unexpected='ignore'"):
        ncw.restore(path, target, strict=False, unexpected="error")
    assert_same_arrays(before, target)
    report = ncw.restore(path, target, strict=False)
    assert {e.path: e.action for e in report.entries if e.status == "unexpected"} == {
        "head/bias": "ignored",
        "head/kernel": "ignored",
    }
    assert_same_arrays(Bigger(rngs=nnx.Rngs(0)).linear1, target.linear1)


def test_shape_mismatch_raises_even_when_lenient(mlp_state_ckpt):
    target = MLP(din=5, rngs=nnx.Rngs(1))
    before = snapshot(target)
    with pytest.raises(ncw.CheckpointMismatchError, match="shape") as raised:
        ncw.restore(mlp_state_ckpt, target, strict=False, missing="zeros", cast=True)
    assert raised.value.report.shape_mismatched == ["linear1/kernel"]
    assert_same_arrays(before, target)


def test_abstract_target_cannot_keep_missing_values(mlp_state_ckpt):
    target = nnx.eval_shape(lambda: Bigger(rngs=nnx.Rngs(3)))
    with pytest.raises(ncw.CheckpointMismatchError, match="missing='zeros'"):
        ncw.restore(mlp_state_ckpt, target, strict=False)
    assert isinstance(target.linear1.kernel.get_value(), jax.ShapeDtypeStruct)
    ncw.restore(mlp_state_ckpt, target, strict=False, missing="zeros")
    assert isinstance(target.head.kernel.get_value(), jax.Array)
    np.testing.assert_array_equal(target.head.kernel.get_value(), np.zeros((2, 2), np.float32))


def test_rename_with_a_regex(mlp_state_ckpt):
    target = RenamedMLP(rngs=nnx.Rngs(1))
    with pytest.raises(ncw.CheckpointMismatchError):
        ncw.restore(mlp_state_ckpt, target)
    report = ncw.restore(mlp_state_ckpt, target, rename={r"linear(\d)": r"layer\1"})
    assert report.ok
    source = make_mlp(0)
    np.testing.assert_array_equal(
        target.layer1.kernel.get_value(), source.linear1.kernel.get_value()
    )
    np.testing.assert_array_equal(target.layer2.bias.get_value(), source.linear2.bias.get_value())
    assert {e.source for e in report.entries} == {
        "linear1/bias",
        "linear1/kernel",
        "linear2/bias",
        "linear2/kernel",
    }


def test_cast_is_explicit_and_reported(tmp_path):
    source = MLP(rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    path = save_checkpoint(tmp_path / "bf16", nnx.state(source))
    target = make_mlp(1)
    before = snapshot(target)
    for strict in (True, False):
        with pytest.raises(ncw.CheckpointMismatchError, match="cast=True") as raised:
            ncw.restore(path, target, strict=strict)
        assert len(raised.value.report.dtype_mismatched) == 4
        assert_same_arrays(before, target)

    report = ncw.restore(path, target, cast=True)

    assert sorted(e.path for e in report.casts) == [
        "linear1/bias",
        "linear1/kernel",
        "linear2/bias",
        "linear2/kernel",
    ]
    assert all(e.action == "cast" for e in report.entries)
    assert all(e.detail == "checkpoint bfloat16 vs model float32" for e in report.casts)
    assert "cast" in str(report)
    kernel = target.linear1.kernel.get_value()
    assert kernel.dtype == jnp.float32
    expected = np.asarray(source.linear1.kernel.get_value()).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_cast_down_to_bfloat16(mlp_state_ckpt):
    target = MLP(rngs=nnx.Rngs(1), dtype=jnp.bfloat16)
    report = ncw.restore(mlp_state_ckpt, target, cast=True)
    assert len(report.casts) == 4
    expected = np.asarray(make_mlp(0).linear1.kernel.get_value()).astype(ml_dtypes.bfloat16)
    got = np.asarray(target.linear1.kernel.get_value())
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))


def test_restores_onto_the_targets_shardings(mlp_state_ckpt):
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    target = make_mlp(1)
    for _, variable in nnx.to_flat_state(nnx.state(target)):
        value = variable.get_value()
        spec = P(None, "x") if value.ndim == 2 else P()
        variable.set_value(jax.device_put(value, NamedSharding(mesh, spec)))
    shardings = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(target))}

    ncw.restore(mlp_state_ckpt, target)

    after = {p: v.get_value().sharding for p, v in nnx.to_flat_state(nnx.state(target))}
    assert after == shardings
    assert after[("linear1", "kernel")] == NamedSharding(mesh, P(None, "x"))
    assert_same_arrays(make_mlp(0), target)


# --- all or nothing --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_ckpt(ckpt_dir) -> Path:
    """A 64-wide MLP: linear1/kernel (64, 64) is stored as its own chunk outside the B-tree."""
    return save_checkpoint(ckpt_dir / "wide", nnx.state(MLP(64, 64, 2, rngs=nnx.Rngs(0))))


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
@pytest.mark.parametrize(
    "make_target",
    [
        pytest.param(lambda: MLP(64, 64, 2, rngs=nnx.Rngs(1)), id="model"),
        pytest.param(lambda: nnx.state(MLP(64, 64, 2, rngs=nnx.Rngs(1))), id="state"),
    ],
)
def test_unreadable_data_leaves_the_target_unchanged(tmp_path, wide_ckpt, make_target):
    path = copy_checkpoint(wide_ckpt, tmp_path / "c")
    corrupt_chunks(path, "linear1.kernel.value")
    target = make_target()
    before = snapshot(target)
    with pytest.raises(ncw.CorruptCheckpointError) as raised:
        ncw.restore(path, target)
    assert_same_arrays(before, target)
    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message
    assert "linear1.kernel.value" in message  # the array that failed
    assert "unchanged" in message
    assert raised.value.__cause__ is not None


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
def test_abstract_target_stays_abstract_when_restore_fails(tmp_path, wide_ckpt):
    path = copy_checkpoint(wide_ckpt, tmp_path / "c")
    corrupt_chunks(path, "linear1.kernel.value")
    target = nnx.eval_shape(lambda: MLP(64, 64, 2, rngs=nnx.Rngs(1)))
    with pytest.raises(ncw.CorruptCheckpointError):
        ncw.restore(path, target)
    values = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(target))]
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in values)


def test_bad_arguments_leave_the_target_unchanged(mlp_state_ckpt, tmp_path):
    target = make_mlp(1)
    before = snapshot(target)
    with pytest.raises(ncw.InvalidArgumentError, match="missing must be one of"):
        ncw.restore(mlp_state_ckpt, target, strict=False, missing="random")
    with pytest.raises(ncw.InvalidArgumentError, match="unexpected must be one of"):
        ncw.restore(mlp_state_ckpt, target, strict=False, unexpected="warn")
    with pytest.raises(ncw.InvalidArgumentError):
        ncw.restore(mlp_state_ckpt, target, rename={"(": ""})
    with pytest.raises(ncw.CheckpointNotFoundError):
        ncw.restore(tmp_path / "nothing", target)
    with pytest.raises(ncw.InvalidArgumentError):
        ncw.restore(mlp_state_ckpt, {"linear1": {}})
    assert_same_arrays(before, target)


# --- only the bytes it needs -----------------------------------------------------------------


def _save_without_ocdbt(path: Path, tree) -> Path:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
    return path


def _corrupt_zarr_chunk(path: Path, array_name: str) -> None:
    """Without OCDBT each array is a zarr folder: overwrite its one chunk file."""
    chunk = path / array_name / "0.0"
    size = chunk.stat().st_size
    chunk.write_bytes(np.random.default_rng(0).bytes(size))


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
@pytest.mark.parametrize("layout", ["ocdbt", "zarr-folders"])
def test_partial_restore_reads_only_the_matched_arrays(tmp_path, layout):
    source = MLP(64, 64, 2, rngs=nnx.Rngs(0))
    if layout == "ocdbt":
        path = save_checkpoint(tmp_path / "c", nnx.state(source))
        corrupt_chunks(path, "linear1.kernel.value")
    else:
        path = _save_without_ocdbt(tmp_path / "c", nnx.state(source))
        _corrupt_zarr_chunk(path, "linear1.kernel.value")

    # The target holds only linear2: linear1 is never read, so its damage does not matter.
    half = Half(rngs=nnx.Rngs(1))
    report = ncw.restore(path, half, strict=False)
    assert_same_arrays(source.linear2, half.linear2)
    assert report.restored_arrays == 2
    assert report.restored_bytes == (64 * 2 + 2) * 4
    assert sorted(report.unexpected) == ["linear1/bias", "linear1/kernel"]

    # A full restore needs linear1/kernel and fails cleanly.
    full = MLP(64, 64, 2, rngs=nnx.Rngs(1))
    before = snapshot(full)
    with pytest.raises(ncw.CorruptCheckpointError) as raised:
        ncw.restore(path, full)
    assert str(path) in str(raised.value)
    assert_same_arrays(before, full)


# --- load ------------------------------------------------------------------------------------


def test_load_builds_the_model_from_the_checkpoint(mlp_state_ckpt):
    model = ncw.load(mlp_state_ckpt, lambda: make_mlp(5))
    assert isinstance(model, MLP)
    assert all(isinstance(v.get_value(), jax.Array) for _, v in nnx.to_flat_state(nnx.state(model)))
    assert_same_arrays(make_mlp(0), model)


def test_load_lenient_initialises_missing_keys_from_the_factory(mlp_state_ckpt):
    def factory():
        return Bigger(rngs=nnx.Rngs(5))

    with pytest.raises(ncw.CheckpointMismatchError):
        ncw.load(mlp_state_ckpt, factory)
    model = ncw.load(mlp_state_ckpt, factory, strict=False)
    assert_same_arrays(make_mlp(0).linear1, model.linear1)
    assert_same_arrays(make_mlp(0).linear2, model.linear2)
    assert_same_arrays(factory().head, model.head)
    zeros = ncw.load(mlp_state_ckpt, factory, strict=False, missing="zeros")
    np.testing.assert_array_equal(zeros.head.bias.get_value(), np.zeros(2, np.float32))


def test_load_with_rng_state_and_rename(ckpt_dir):
    source = make_bnnet(0)
    path = save_checkpoint(ckpt_dir / "bnnet_load", nnx.state(source))
    model = ncw.load(path, lambda: BNNet(rngs=nnx.Rngs(7, dropout=8)))
    assert_same_arrays(source, model)
    assert to_numpy(model.rngs.default.key.get_value()).dtype == np.uint32


class Counter(nnx.Module):
    """Python scalars in Variables: Orbax stores them as 0-d int64 / float64 / bool."""

    def __init__(self, n: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)
        self.count = nnx.Variable(n)
        self.scale = nnx.Variable(0.5 * n)
        self.flag = nnx.Variable(n > 2)


def test_python_scalar_variables_round_trip(tmp_path):
    path = save_checkpoint(tmp_path / "c", nnx.state(Counter(3, rngs=nnx.Rngs(0))))
    target = Counter(1, rngs=nnx.Rngs(1))
    assert ncw.compare(path, target).ok
    ncw.restore(path, target)
    values = (target.count.get_value(), target.scale.get_value(), target.flag.get_value())
    assert values == (3, 1.5, True)
    assert [type(v) for v in values] == [int, float, bool]
    assert_same_arrays(Counter(3, rngs=nnx.Rngs(0)).linear, target.linear)

    class WithExtra(Counter):
        def __init__(self):
            super().__init__(5, rngs=nnx.Rngs(2))
            self.extra = nnx.Variable(7)

    lenient = WithExtra()
    ncw.restore(path, lenient, strict=False, missing="zeros")
    assert (lenient.count.get_value(), lenient.extra.get_value()) == (3, 0)
    assert type(lenient.extra.get_value()) is int


def test_python_scalar_variables_into_an_abstract_model_need_cast(tmp_path):
    # nnx.eval_shape turns Python scalars into weak int32 / float32: a dtype difference.
    path = save_checkpoint(tmp_path / "c", nnx.state(Counter(3, rngs=nnx.Rngs(0))))
    with pytest.raises(ncw.CheckpointMismatchError, match="2 dtype mismatched"):
        ncw.load(path, lambda: Counter(1, rngs=nnx.Rngs(1)))
    model = ncw.load(path, lambda: Counter(1, rngs=nnx.Rngs(1)), cast=True)
    assert (int(model.count.get_value()), float(model.scale.get_value())) == (3, 1.5)
    assert bool(model.flag.get_value()) is True


class _Small(nnx.Module):
    def __init__(self, i: int, seed: int):
        rng = np.random.default_rng(seed * 10_000 + i)
        self.kernel = nnx.Param(rng.standard_normal((3, 5)).astype(np.float32))
        self.bias = nnx.Param(rng.standard_normal((7,)).astype(ml_dtypes.bfloat16))
        self.count = nnx.BatchStat(rng.integers(-9, 9, (2,)).astype(np.int32))
        special = np.array([np.nan, -0.0, np.inf, -np.inf], np.float32)
        self.special = nnx.Param(special if i % 2 else rng.standard_normal(4).astype(np.float32))


class _ManySmall(nnx.Module):
    def __init__(self, layers: int, seed: int):
        self.layers = nnx.List([_Small(i, seed) for i in range(layers)])
        # Too large to be stored inline in the OCDBT node: read by Orbax beside the others.
        self.big = nnx.Param(np.random.default_rng(seed).standard_normal((64, 64)).astype("f4"))


def test_many_small_arrays_are_read_from_the_btree_node_bit_for_bit(tmp_path, monkeypatch):
    from nnx_ckpt_widgets.layouts import _pytree

    layers = 150  # 600 small arrays: over the threshold of the one-decode read
    path = save_checkpoint(tmp_path / "many", nnx.state(_ManySmall(layers, 0)))
    decoded: list[int] = []
    real = _pytree._decode_chunks

    def counting(chunks):
        decoded.append(len(chunks))
        return real(chunks)

    monkeypatch.setattr(_pytree, "_decode_chunks", counting)
    model = _ManySmall(layers, 1)
    ncw.restore(path, model)
    assert decoded == [4 * layers]  # every small array in one decode; the big one by Orbax
    saved = jax.tree.leaves(nnx.state(_ManySmall(layers, 0)))
    restored = jax.tree.leaves(nnx.state(model))
    assert len(saved) == len(restored) == 4 * layers + 1
    for want, got in zip(saved, restored, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # NaN, -0.0
    # stats reads the same arrays on host through the same path.
    report = ncw.stats(path, progress=False)
    special = next(e for e in report if e.key.startswith("layers/3/special"))
    assert (special.nan, special.posinf, special.neginf, special.zeros) == (1, 1, 1, 1)


def test_many_small_arrays_damaged_node_leaves_the_model_unchanged(tmp_path):
    layers = 150
    path = save_checkpoint(tmp_path / "many", nnx.state(_ManySmall(layers, 0)))
    model = _ManySmall(layers, 1)
    report = ncw.compare(path, model)  # from the intact metadata
    assert report.ok and len(ncw.inspect(path)) == 4 * layers + 1
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model))]
    for node in (path / "d").iterdir():  # the B+tree's node file: cut it short
        node.write_bytes(node.read_bytes()[: node.stat().st_size // 2])
    with pytest.raises(ncw.CorruptCheckpointError, match="could not be read"):
        ncw.apply_report(report, model)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def test_a_small_chunk_that_does_not_decode_is_left_to_orbax(tmp_path, monkeypatch):
    """A chunk Orbax wrote in the B+tree node decodes to exactly its bytes; cut short, with
    bytes after its frame, or of another size, it is refused (None), and Orbax reads it."""
    import zstandard

    from nnx_ckpt_widgets.layouts import _pytree

    layers = 150
    saved = _ManySmall(layers, 0)
    path = save_checkpoint(tmp_path / "many", nnx.state(saved))
    values = _pytree._root_node_values(path, None)
    raw = values[b"layers.0.kernel.value/0.0"]
    want = np.asarray(saved.layers[0].kernel.get_value()).tobytes()
    zstd = {"id": "zstd", "level": 1}
    decoded = _pytree._decode_chunks(
        [
            (zstd, len(want), raw),
            (zstd, len(want), raw[:-3]),
            (zstd, len(want), raw + raw),
            (zstd, len(want) - 4, raw),
            (None, len(want), want),
            (None, len(want), want[:-1]),
            (zstd, len(want), zstandard.ZstdCompressor(write_content_size=False).compress(want)),
        ]
    )
    assert decoded == [want, None, None, None, want, None, want]

    real = _pytree._decode_chunks
    refused: list[int] = []

    def one_refused(chunks):
        out = real(chunks)
        refused.append(len(chunks))
        return [None, *out[1:]]

    monkeypatch.setattr(_pytree, "_decode_chunks", one_refused)
    model = _ManySmall(layers, 1)
    ncw.restore(path, model)
    assert refused == [4 * layers]
    for want_leaf, got in zip(
        jax.tree.leaves(nnx.state(saved)), jax.tree.leaves(nnx.state(model)), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint8), np.asarray(want_leaf).view(np.uint8)
        )


def _pure(tree: Any) -> Any:
    """``nnx.State`` as nested dicts of NumPy arrays with string keys (what every writer takes)."""
    if not isinstance(tree, dict):
        return np.asarray(tree)
    return {str(k): _pure(v) for k, v in tree.items()}


def _write_many(kind: str, path: Path, state: Any) -> Path:
    """``state`` written the way users write it, by the library of ``kind``."""
    import warnings

    import flax
    from flax.training import checkpoints
    from orbax.checkpoint import v1
    from safetensors.numpy import save_file

    if kind == "v0":
        return save_checkpoint(path, state)
    if kind == "manager":
        return save_manager(path, {1: {"state": state}})
    if kind == "v1":
        v1.save(path, state)
        return path
    tree = _pure(nnx.to_pure_dict(state))
    if kind == "safetensors":
        flat: dict[str, np.ndarray] = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[prefix + key] = value

        walk(tree, "")
        path.mkdir()
        save_file(flat, path / "model.safetensors")
        return path
    assert kind == "msgpack"
    with flax.config.temp_flip_flag("use_orbax_checkpointing", False), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # flax's notice about this writer
        checkpoints.save_checkpoint(path, tree, 1)
    return path


@pytest.mark.parametrize("kind", ["v0", "manager", "v1", "safetensors", "msgpack"])
def test_many_small_arrays_restore_bit_for_bit_on_every_layout(tmp_path, kind):
    """600 small arrays and a larger one, written by each library, restored bit for bit (the
    Orbax layouts through the one-decode read of the B-tree node)."""
    layers = 150
    path = _write_many(kind, tmp_path / "many", nnx.state(_ManySmall(layers, 0)))
    model = _ManySmall(layers, 1)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(model))]
    ncw.restore(path, model)
    saved = jax.tree.leaves(nnx.state(_ManySmall(layers, 0)))
    restored = jax.tree.leaves(nnx.state(model))
    assert len(saved) == len(restored) == 4 * layers + 1
    changed = 0
    for want, got, old in zip(saved, restored, before, strict=True):
        want, got = np.asarray(want), np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # NaN, -0.0
        changed += not np.array_equal(got.view(np.uint8), old.view(np.uint8))
    # Not a no-op: the model held other values (all but the odd layers' NaN/Inf constants and
    # the odd int pair that both seeds drew alike).
    assert changed > 3 * layers
