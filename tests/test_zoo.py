"""A zoo of checkpoints written by each Orbax API and option, each through every entry point.

Writers: Orbax v0 (``StandardCheckpointer``, ``CheckpointManager``) and v1 (``ocp.v1.save``,
``save_checkpointables``, ``training.Checkpointer``), each of an ``nnx.State`` and of a pure
dict. Models: a plain MLP, an ``nnx.List`` of layers, ``nnx.vmap``-stacked layers, and a model
with BatchNorm statistics and RNG state. Entry points: ``inspect``, ``compare``, ``restore``,
``load``, the ``CheckpointBrowser`` and the CLI. Every restore is compared bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import BNNet, Stack, assert_same_arrays, make_bnnet, run_cli, snapshot
from flax import nnx
from orbax.checkpoint import v1

import nnx_ckpt_widgets as ncw


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)


class Scanned(nnx.Module):
    """Three layers stacked on a leading axis by ``nnx.vmap``: one (3, 4, 4) kernel."""

    def __init__(self, *, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs: nnx.Rngs) -> nnx.Linear:
            return nnx.Linear(4, 4, rngs=rngs)

        self.layers = create(rngs)


MODELS: dict[str, Callable[[int], Any]] = {
    "mlp": lambda seed: MLP(rngs=nnx.Rngs(seed)),
    "list": lambda seed: Stack(3, 2, rngs=nnx.Rngs(seed)),
    "vmap": lambda seed: Scanned(rngs=nnx.Rngs(seed)),
    "rng": make_bnnet,
}


@dataclasses.dataclass(frozen=True)
class Written:
    path: Path  # what the user passes
    layout: str  # what inspect must call it
    step: int | None = None
    item: str | None = None
    pure_dict: bool = False


def _tree(model: Any, pure: bool) -> Any:
    state = nnx.state(model)
    return nnx.to_pure_dict(state) if pure else state


def _v0_standard(root: Path, model: Any, pure: bool) -> Written:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "ckpt", _tree(model, pure))
    return Written(root / "ckpt", "Orbax v0 checkpoint", pure_dict=pure)


def _v0_manager(root: Path, model: Any, pure: bool) -> Written:
    with ocp.CheckpointManager(root / "run") as manager:
        for step in (10, 20):
            manager.save(step, args=ocp.args.StandardSave(_tree(model, pure)))
        manager.wait_until_finished()
    return Written(root / "run", "CheckpointManager root", step=20, item="default", pure_dict=pure)


def _v1_save(root: Path, model: Any, pure: bool) -> Written:
    v1.save(root / "ckpt", _tree(model, pure), custom_metadata={"run": "zoo", "epoch": 3})
    return Written(root / "ckpt", "Orbax v1 checkpoint", item="state", pure_dict=pure)


def _v1_checkpointables(root: Path, model: Any, pure: bool) -> Written:
    extra = {"count": np.arange(3, dtype=np.int32)}
    v1.save_checkpointables(root / "ckpt", {"model": _tree(model, pure), "extra": extra})
    return Written(root / "ckpt", "Orbax v1 checkpoint", item="model", pure_dict=pure)


def _v1_training(root: Path, model: Any, pure: bool) -> Written:
    with v1.training.Checkpointer(root / "train") as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, _tree(model, pure), metrics={"loss": 1.0 / step})
    return Written(
        root / "train", "training.Checkpointer root", step=3, item="state", pure_dict=pure
    )


WRITERS = {
    "v0-standard": _v0_standard,
    "v0-manager": _v0_manager,
    "v1-save": _v1_save,
    "v1-checkpointables": _v1_checkpointables,
    "v1-training": _v1_training,
}
CASES = [
    (writer, model, pure)
    for writer in WRITERS
    for model in MODELS
    for pure in (False, True)
    # A pure dict drops the Variable types that tell RNG state apart: the guide saves RNG
    # state as an nnx.State, and so does the zoo.
    if not (pure and model == "rng")
]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[tuple[str, str, bool], tuple[Written, Any]]:
    out = {}
    for writer, model_name, pure in CASES:
        root = tmp_path_factory.mktemp(f"{writer}-{model_name}-{'dict' if pure else 'state'}")
        model = MODELS[model_name](0)
        out[writer, model_name, pure] = (WRITERS[writer](root, model, pure), snapshot(model))
    return out


def _ids(case: tuple[str, str, bool]) -> str:
    writer, model, pure = case
    return f"{writer}-{model}-{'dict' if pure else 'state'}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_every_entry_point(zoo, case):
    written, saved = zoo[case]
    writer, model_name, _ = case
    factory = MODELS[model_name]
    # Defaults pick the latest step and the only item (save_checkpointables holds two).
    pick = {"item": written.item} if writer == "v1-checkpointables" else {}

    info = ncw.inspect(written.path, **pick)
    assert info.layout == written.layout
    assert (info.step, info.item) == (written.step, written.item)
    assert ncw.inspect(written.path, step=written.step, item=written.item).leaves == info.leaves
    assert info.format == ("pure dict" if written.pure_dict else "nnx.State")
    fresh = factory(1)
    assert {leaf.path for leaf in info} == {
        tuple(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(fresh))
    }

    report = ncw.compare(written.path, nnx.eval_shape(lambda: factory(1)), **pick)
    assert report.ok, str(report)

    before = snapshot(fresh)
    assert before.keys() == saved.keys()
    result = ncw.restore(written.path, fresh, **pick)
    assert result.action_counts["restored"] == len(saved)
    assert_same_arrays(saved, fresh)

    loaded = ncw.load(written.path, lambda: factory(2), **pick)
    assert_same_arrays(saved, loaded)

    target = factory(3)
    browser = ncw.CheckpointBrowser(written.path, target, **pick)
    assert written.layout in str(browser.info)
    browser.restore_button.click()
    browser.wait(60)
    assert browser.panel is not None and browser.panel.error is None, browser.panel.error
    assert browser.status.startswith("Restored")
    assert_same_arrays(saved, target)


@pytest.mark.parametrize("writer", list(WRITERS))
def test_cli_inspect_every_writer(zoo, writer):
    written, _ = zoo[writer, "mlp", False]
    pick = ["--item", written.item] if writer == "v1-checkpointables" and written.item else []
    done = run_cli("inspect", str(written.path), *pick)
    assert done.returncode == 0, done.stderr
    assert written.layout in done.stdout
    assert "linear1/kernel" in done.stdout and "(3, 4)" in done.stdout


def test_v1_custom_metadata_is_shown(zoo):
    written, _ = zoo["v1-save", "mlp", False]
    info = ncw.inspect(written.path)
    assert info.custom_metadata == {"run": "zoo", "epoch": 3}
    assert 'custom metadata: epoch=3, run="zoo"' in str(info)
    assert "custom metadata: epoch=3, run=&quot;zoo&quot;" in info._repr_html_()


def test_v1_checkpointables_ambiguous_lists_items(zoo):
    written, _ = zoo["v1-checkpointables", "mlp", False]
    # Only the PyTree checkpointables are items; both are named, like a manager step's.
    info = ncw.inspect(written.path, item="extra")
    assert info.items == ("extra", "model")
    assert info.leaves[("count",)].dtype == "int32"
    (written.path / "more").mkdir()  # a stray folder is not an item
    assert ncw.inspect(written.path, item="model").items == ("extra", "model")


def test_v1_save_checkpointables_needs_item_when_ambiguous(tmp_path):
    model = MLP(rngs=nnx.Rngs(0))
    optimizer = {"mu": jnp.zeros((3,)), "count": jnp.zeros((), jnp.int32)}
    v1.save_checkpointables(tmp_path / "c", {"model": nnx.state(model), "optimizer": optimizer})
    with pytest.raises(ncw.ItemSelectionError, match=r"several items \(model, optimizer\)"):
        ncw.inspect(tmp_path / "c")
    with pytest.raises(ncw.ItemSelectionError, match="pick one of: model, optimizer"):
        ncw.restore(tmp_path / "c", model, item="opt")
    assert ncw.inspect(tmp_path / "c", item="optimizer").leaves[("count",)].shape == ()


def test_v1_training_steps_and_metrics(zoo):
    written, saved = zoo["v1-training", "mlp", False]
    info = ncw.inspect(written.path, step=1)
    assert [s.step for s in info.steps] == [1, 2, 3]
    assert [s.metrics for s in info.steps] == [{"loss": 1.0}, {"loss": 0.5}, {"loss": 1 / 3}]
    assert info.best_step("loss") == 3
    assert "steps: 1 (loss=1), 2 (loss=0.5), 3 (loss=0.3333)" in str(info)
    with pytest.raises(ncw.CheckpointNotFoundError, match="pick one of: 1, 2, 3"):
        ncw.inspect(written.path, step=4)
    # One step folder on its own reads as that step.
    step_dir = ncw.inspect(written.path / "2")
    assert step_dir.step == 2 and step_dir.layout == "training.Checkpointer step folder"
    model = MLP(rngs=nnx.Rngs(9))
    ncw.restore(written.path / "2", model)
    assert_same_arrays(saved, model)


def test_rng_state_round_trips_as_keys(zoo):
    written, saved = zoo["v1-save", "rng", False]
    model = BNNet(rngs=nnx.Rngs(7, dropout=8))
    ncw.restore(written.path, model)
    key = model.rngs.default.key.get_value()
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    assert_same_arrays(saved, model)


def test_v1_restore_matches_orbax_v1_load(zoo):
    """The package's restore of a v1 checkpoint equals Orbax v1's own ``load``."""
    written, _ = zoo["v1-save", "mlp", False]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.state(nnx.eval_shape(lambda: MLP(rngs=nnx.Rngs(0)))),
    )
    reference = v1.load(written.path, abstract)
    model = MLP(rngs=nnx.Rngs(5))
    ncw.restore(written.path, model)
    ours = nnx.state(model)
    jax.tree.map(np.testing.assert_array_equal, reference, ours)
