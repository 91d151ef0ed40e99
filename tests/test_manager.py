"""CheckpointManager roots, end to end: real managers, real training, real interruptions.

What a training script does with Orbax's ``CheckpointManager`` (composite items, metrics, a
keep-policy, asynchronous saves, resuming after a crash) and what the package must do with the
folders it leaves: offer exactly the restorable steps, pick steps and items the same way in
``inspect``, ``compare``, ``restore``, ``load`` and the CLI, and read only the bytes it uses.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import (
    FAILING_READ,
    assert_same_arrays,
    copy_checkpoint,
    corrupt_chunks,
    run_cli,
    snapshot,
)
from flax import nnx

import nnx_ckpt_widgets as ncw

REPO = Path(__file__).resolve().parents[1]


# --- a small training setup ------------------------------------------------------------------


class Regressor(nnx.Module):
    """One hidden layer with dropout: parameters plus RNG state (a typed key and a count)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(1, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.linear2 = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.linear2(self.dropout(nnx.relu(self.linear1(x))))


DEVICE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


# Committed from the start, like restored arrays: the training step compiles once.
@nnx.jit(out_shardings=DEVICE)
def create() -> tuple[Regressor, nnx.Optimizer]:
    model = Regressor(rngs=nnx.Rngs(params=0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(5e-2), wrt=nnx.Param)


@jax.jit
def batch(step):
    x = jax.random.uniform(
        jax.random.fold_in(jax.random.key(7), step), (16, 1), minval=-3, maxval=3
    )
    return x, jnp.sin(x)


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(model, optimizer, first: int, last: int, manager=None, every: int = 4) -> dict:
    """Steps first..last; with a manager, save model and optimizer every ``every`` steps."""
    losses = {}
    model.train()
    for step in range(first, last + 1):
        losses[step] = float(train_step(model, optimizer, *batch(step)))
        if manager is not None and step % every == 0:
            manager.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(nnx.state(model)),
                    optimizer=ocp.args.StandardSave(nnx.state(optimizer)),
                ),
                metrics={"loss": losses[step]},
            )
    return losses


def composite_targets():
    abstract_model, abstract_optimizer = nnx.eval_shape(create)
    return ocp.args.Composite(
        model=ocp.args.StandardRestore(nnx.state(abstract_model)),
        optimizer=ocp.args.StandardRestore(nnx.state(abstract_optimizer)),
    )


@pytest.fixture
def no_orbax_warnings(caplog):
    """Fail on any warning or absl/Orbax log record at WARNING or above (e.g. sharding info)."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        yield
    records = caplog.get_records("setup") + caplog.get_records("call")
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not messages, messages


# --- resuming ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_orbax_warnings")
def test_resume_after_a_crash_is_bit_for_bit(tmp_path):
    total, crash = 20, 14
    reference_model, reference_optimizer = create()
    reference = train(reference_model, reference_optimizer, 1, total)

    root = tmp_path / "run"
    model, optimizer = create()
    with ocp.CheckpointManager(root) as manager:  # asynchronous saves (the default)
        crashed = train(model, optimizer, 1, crash, manager)
        manager.wait_until_finished()
        assert manager.all_steps() == [4, 8, 12]
    assert crashed == {s: reference[s] for s in crashed}
    del model, optimizer

    # The Orbax way: a new process, fresh objects, Composite restore with abstract targets.
    model, optimizer = create()
    with ocp.CheckpointManager(root) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=composite_targets())
        nnx.update(model, restored["model"])
        nnx.update(optimizer, restored["optimizer"])
        assert int(optimizer.step[...]) == step == 12
        resumed = train(model, optimizer, step + 1, total, manager)
        manager.wait_until_finished()
    assert resumed == {s: reference[s] for s in range(13, total + 1)}
    assert_same_arrays(reference_model, model)
    assert_same_arrays(reference_optimizer, optimizer)

    # The package's way, from the same step: restore each item into fresh objects.
    model, optimizer = create()
    model_report = ncw.restore(root, model, step=12, item="model")
    optimizer_report = ncw.restore(root, optimizer, step=12, item="optimizer")
    assert model_report.ok and optimizer_report.ok
    assert (model_report.step, model_report.item) == (12, "model")
    assert int(model.dropout.rngs.count[...]) == 12  # one dropout mask per training step
    again = train(model, optimizer, 13, total)
    assert again == {s: reference[s] for s in range(13, total + 1)}
    assert_same_arrays(reference_model, model)


def test_resume_without_the_rng_state_is_not_exact(tmp_path):
    reference_model, reference_optimizer = create()
    reference = train(reference_model, reference_optimizer, 1, 12)
    model, optimizer = create()
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        train(model, optimizer, 1, 8, manager)
        manager.wait_until_finished()
    model, optimizer = create()
    ncw.restore(tmp_path / "run", model, item="model")
    ncw.restore(tmp_path / "run", optimizer, item="optimizer")
    nnx.update(model, nnx.state(create()[0], nnx.RngState))  # the seed's dropout stream again
    drifted = train(model, optimizer, 9, 12)
    assert all(drifted[s] != reference[s] for s in drifted)


# --- roots with one item and with several -------------------------------------------------


def _states(seed: int) -> tuple[nnx.State, nnx.State]:
    model = Regressor(rngs=nnx.Rngs(params=seed, dropout=seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    return nnx.state(model), nnx.state(optimizer)


@pytest.fixture(scope="module")
def composite_root(tmp_path_factory) -> tuple[Path, dict]:
    """Steps 2, 4 and 6, each with items model and optimizer and a metric; keep the best 2
    plus the latest, so step 2 is deleted by the policy."""
    root = tmp_path_factory.mktemp("manager") / "run"
    losses = {2: 0.5, 4: 0.3, 6: 0.4}
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda m: m["loss"],
        best_mode="min",
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=1),
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m["loss"],
                    reverse=True,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
    )
    saved = {}
    with ocp.CheckpointManager(root, options=options) as manager:
        for step, loss in losses.items():
            model_state, optimizer_state = _states(step)
            saved[step] = {"model": model_state, "optimizer": optimizer_state}
            manager.save(
                step,
                args=ocp.args.Composite(
                    model=ocp.args.StandardSave(model_state),
                    optimizer=ocp.args.StandardSave(optimizer_state),
                ),
                metrics={"loss": loss},
            )
        manager.wait_until_finished()
        assert manager.all_steps() == [4, 6]
    return root, saved


def _fresh(item: str):
    model = Regressor(rngs=nnx.Rngs(params=99, dropout=99))
    if item == "model":
        return model
    return nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


@pytest.mark.usefixtures("no_orbax_warnings")
def test_single_item_root_is_the_default_item(tmp_path):
    root = tmp_path / "run"
    saved = {}
    with ocp.CheckpointManager(root) as manager:
        for step in (1, 2):
            saved[step] = _states(step)[0]
            manager.save(step, args=ocp.args.StandardSave(saved[step]))
        manager.wait_until_finished()
    info = ncw.inspect(root)
    assert (info.step, info.item, info.items) == (2, "default", ("default",))
    assert [s.step for s in info.steps] == [1, 2]
    assert ncw.inspect(root, step=1, item="default").item_dir == root / "1" / "default"

    model = _fresh("model")
    report = ncw.restore(root, model, step=1)
    assert (report.step, report.item, report.ok) == (1, "default", True)
    assert_same_arrays(snapshot(saved[1]), model)
    assert ncw.compare(root, model, step=2).ok
    loaded = ncw.load(root, lambda: _fresh("model"), step=2)
    assert_same_arrays(snapshot(saved[2]), loaded)
    with pytest.raises(ncw.ItemSelectionError, match=r"'model'.*default"):
        ncw.inspect(root, item="model")
    result = run_cli("inspect", str(root), "--step", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(ncw.inspect(root, step=1)) + "\n"


def test_steps_and_metrics_are_what_the_manager_kept(composite_root):
    root, _ = composite_root
    info = ncw.inspect(root, item="model")
    with ocp.CheckpointManager(root) as manager:
        assert [s.step for s in info.steps] == manager.all_steps() == [4, 6]
        assert info.step == manager.latest_step() == 6
        for step_info in info.steps:
            assert dict(step_info.metrics) == manager.metrics(step_info.step)
    assert [dict(s.metrics) for s in info.steps] == [{"loss": 0.3}, {"loss": 0.4}]
    assert all(s.items == ("model", "optimizer") for s in info.steps)


@pytest.mark.usefixtures("no_orbax_warnings")
@pytest.mark.parametrize("item", ["model", "optimizer"])
@pytest.mark.parametrize("step", [4, 6, None])
def test_step_and_item_reach_every_entry_point(composite_root, step, item):
    root, saved = composite_root
    expected = snapshot(saved[step or 6][item])

    info = ncw.inspect(root, step=step, item=item)
    assert (info.step, info.item) == (step or 6, item)
    assert info.item_dir == root / str(step or 6) / item

    report = ncw.compare(root, _fresh(item), step=step, item=item)
    assert report.ok and (report.step, report.item) == (step or 6, item)

    target = _fresh(item)
    report = ncw.restore(root, target, step=step, item=item)
    assert report.restored_arrays == len(info.leaves)
    assert_same_arrays(expected, target)

    loaded = ncw.load(root, lambda: _fresh(item), step=step, item=item)
    assert_same_arrays(expected, loaded)


def test_cli_step_and_item(composite_root):
    root, _ = composite_root
    result = run_cli("inspect", str(root), "--step", "4", "--item", "optimizer")
    assert result.returncode == 0, result.stderr
    assert result.stdout == str(ncw.inspect(root, step=4, item="optimizer")) + "\n"
    assert "step 4" in result.stdout and "opt_state/0/mu/linear1/kernel" in result.stdout

    result = run_cli("inspect", str(root), "--step", "4")
    assert result.returncode == 1
    assert "model, optimizer" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_several_items_without_item_raise_and_name_them(composite_root):
    root, _ = composite_root
    model = _fresh("model")
    before = snapshot(model)
    calls = {
        "inspect": lambda: ncw.inspect(root),
        "compare": lambda: ncw.compare(root, model),
        "restore": lambda: ncw.restore(root, model, step=4),
        "load": lambda: ncw.load(root, lambda: _fresh("model")),
    }
    for name, call in calls.items():
        with pytest.raises(ncw.ItemSelectionError) as raised:
            call()
        assert isinstance(raised.value, ncw.CheckpointError), name
        message = str(raised.value)
        assert "(model, optimizer)" in message and "item=" in message, name
        assert "\n" not in message, name
    assert_same_arrays(before, model)


# --- interrupted saves ---------------------------------------------------------------------


# Orbax 0.12 names the folder of a save in progress "<step>.orbax-checkpoint-tmp"; older
# versions appended a timestamp ("<step>.orbax-checkpoint-tmp-<ns>"). Both must be skipped.
@pytest.mark.parametrize("suffix", [".orbax-checkpoint-tmp", ".orbax-checkpoint-tmp-1700000000"])
def test_an_interrupted_step_is_never_offered(tmp_path, composite_root, suffix):
    root = copy_checkpoint(composite_root[0], tmp_path / "run")
    _, saved = composite_root
    (root / "6").rename(root / f"6{suffix}")

    with ocp.CheckpointManager(root) as manager:
        assert manager.all_steps() == [4]  # Orbax agrees: no step 6
    info = ncw.inspect(root, item="model")
    assert [s.step for s in info.steps] == [4]
    assert info.step == 4  # the latest restorable step, not the interrupted one

    model = _fresh("model")
    before = snapshot(model)
    calls = {
        "inspect": lambda: ncw.inspect(root, step=6, item="model"),
        "compare": lambda: ncw.compare(root, model, step=6, item="model"),
        "restore": lambda: ncw.restore(root, model, step=6, item="model"),
        "load": lambda: ncw.load(root, lambda: _fresh("model"), step=6, item="model"),
    }
    for name, call in calls.items():
        with pytest.raises(ncw.IncompleteCheckpointError, match="interrupted") as raised:
            call()
        assert "restorable: 4" in str(raised.value), name
    assert_same_arrays(before, model)
    with pytest.raises(ncw.IncompleteCheckpointError):
        ncw.inspect(root / f"6{suffix}", item="model")

    ncw.restore(root, model, item="model")  # the default step is the finished one
    assert_same_arrays(snapshot(saved[4]["model"]), model)


@pytest.mark.parametrize(
    ("options", "folder"),
    [
        ({"step_prefix": "checkpoint"}, "checkpoint_{}"),
        ({"step_format_fixed_length": 6}, "{:06d}"),
    ],
)
def test_prefixed_and_padded_step_names(tmp_path, options, folder):
    root = tmp_path / "run"
    saved = {}
    manager_options = ocp.CheckpointManagerOptions(**options)
    with ocp.CheckpointManager(root, options=manager_options) as manager:
        for step in (2, 10, 11):
            saved[step] = _states(step)[0]
            manager.save(step, args=ocp.args.StandardSave(saved[step]))
        manager.wait_until_finished()
    # Step 11 was interrupted; a stray checkpoint named like a step is no step.
    (root / folder.format(11)).rename(root / (folder.format(11) + ".orbax-checkpoint-tmp"))
    copy_checkpoint(root / folder.format(2) / "default", root / "notes_7")
    with ocp.CheckpointManager(root, options=manager_options) as manager:
        assert manager.all_steps() == [2, 10]

    info = ncw.inspect(root)
    assert [s.step for s in info.steps] == [2, 10]  # numeric order, not "10" < "2"
    assert info.item_dir == root / folder.format(10) / "default"
    model = _fresh("model")
    ncw.restore(root, model, step=2)
    assert_same_arrays(snapshot(saved[2]), model)
    assert ncw.inspect(root / folder.format(2)).step == 2  # a step folder on its own
    with pytest.raises(ncw.IncompleteCheckpointError, match="restorable: 2, 10"):
        ncw.inspect(root, step=11)


# --- only the bytes that are used ------------------------------------------------------------


def _damage_every_data_file(item_dir: Path) -> int:
    """Overwrite every OCDBT data file of an item (array bytes and B-tree nodes alike)."""
    rng = np.random.default_rng(0)
    files = [f for f in item_dir.rglob("*") if f.is_file() and f.parent.name == "d"]
    for file in files:
        file.write_bytes(rng.bytes(file.stat().st_size))
    return len(files)


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
def test_restoring_one_item_never_reads_the_other(tmp_path, composite_root):
    root = copy_checkpoint(composite_root[0], tmp_path / "run")
    _, saved = composite_root
    assert _damage_every_data_file(root / "6" / "optimizer") > 0

    # Orbax: a Composite with the model item alone restores.
    abstract = nnx.state(nnx.eval_shape(lambda: _fresh("model")))
    with ocp.CheckpointManager(root) as manager:
        restored = manager.restore(
            6, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract))
        )
    assert_same_arrays(snapshot(saved[6]["model"]), restored["model"])

    # The package: the model item restores; the optimizer item fails cleanly.
    model = _fresh("model")
    ncw.restore(root, model, item="model")
    assert_same_arrays(snapshot(saved[6]["model"]), model)
    optimizer = _fresh("optimizer")
    before = snapshot(optimizer)
    with pytest.raises(ncw.CorruptCheckpointError) as raised:
        ncw.restore(root, optimizer, item="optimizer")
    assert str(root / "6" / "optimizer") in str(raised.value)
    assert_same_arrays(before, optimizer)


class Encoder(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(4, 8, rngs=rngs)
        self.linear2 = nnx.Linear(8, 8, rngs=rngs)


class Classifier(nnx.Module):
    """An encoder and a head large enough that OCDBT keeps its kernel out of the B-tree."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.encoder = Encoder(rngs=rngs)
        self.head = nnx.Linear(8, 256, rngs=rngs)


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
def test_lenient_restore_of_a_submodule_reads_only_its_arrays(tmp_path):
    source = Classifier(rngs=nnx.Rngs(0))
    root = tmp_path / "run"
    with ocp.CheckpointManager(root) as manager:
        manager.save(
            1,
            args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.state(source))),
        )
        manager.wait_until_finished()
    item_dir = root / "1" / "model"
    # OCDBT packs the arrays of an item into shared data files; find the head kernel's own
    # byte range in them and overwrite only that.
    assert corrupt_chunks(item_dir, "head.kernel.value") > 0

    # Raw Orbax partial restore of the encoder: the damaged bytes are never read.
    abstract = nnx.state(nnx.eval_shape(lambda: Classifier(rngs=nnx.Rngs(0))))
    subset = nnx.State({"encoder": abstract["encoder"]})
    restore_args = jax.tree.map(
        lambda leaf: ocp.ArrayRestoreArgs(sharding=DEVICE, dtype=leaf.dtype), subset
    )
    with ocp.PyTreeCheckpointer() as checkpointer:
        partial = checkpointer.restore(
            item_dir,
            args=ocp.args.PyTreeRestore(
                item=subset, restore_args=restore_args, partial_restore=True
            ),
        )
    assert_same_arrays(source.encoder, partial["encoder"])

    # The package, strict=False, into the submodule alone: the head is unexpected and skipped.
    target = Classifier(rngs=nnx.Rngs(1))
    report = ncw.restore(root, target.encoder, item="model", strict=False, rename={"^encoder/": ""})
    assert_same_arrays(source.encoder, target.encoder)
    assert report.restored_arrays == 4
    assert report.restored_bytes == (4 * 8 + 8 + 8 * 8 + 8) * 4
    assert sorted(report.unexpected) == ["head/bias", "head/kernel"]

    # Everything, strictly: the head kernel is needed, and its damage is reported.
    target = Classifier(rngs=nnx.Rngs(1))
    before = snapshot(target)
    with pytest.raises(ncw.CorruptCheckpointError):
        ncw.restore(root, target, item="model")
    assert_same_arrays(before, target)
