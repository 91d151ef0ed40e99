"""The checkpoints people actually hold, written by the libraries that write them (issue 24).

Every fixture here comes from the real writer: flax 0.12's ``flax.training.checkpoints``
(its default Orbax backend), hand-written ``StandardCheckpointer`` loops, a Linen
``TrainState`` holding optax states (lists and tuples), ``nnx.Optimizer``, Orbax's
``PyTreeCheckpointer`` for Gemma's flat ``/`` keys, and ``pickle`` for PyTorch-style files.
Each goes through inspect, compare, restore, stats, diff, the browser and the CLI, and every
restore is compared bit for bit with the writer's own arrays.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path

import flax
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import assert_same_arrays, run_cli, snapshot
from flax import linen as nn
from flax import nnx
from flax.training import checkpoints as flax_checkpoints
from flax.training import train_state

import nnx_ckpt_widgets as nw
from nnx_ckpt_widgets import CheckpointBrowser
from nnx_ckpt_widgets.__main__ import main

# Never a CorruptCheckpointError or IncompleteCheckpointError for a valid checkpoint.
BROKEN = (nw.CorruptCheckpointError, nw.IncompleteCheckpointError)


class Net(nnx.Module):
    """Two layers in an nnx.List: the list indices are keys too."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def net(seed: int) -> Net:
    return Net(rngs=nnx.Rngs(seed))


def pure(seed: int) -> dict:
    """The pure dict of a model's parameters, as flax's save_checkpoint is given it."""
    return nnx.to_pure_dict(nnx.state(net(seed), nnx.Param))


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: nothing may be written into a checkpoint."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# --- 1. roots of step folders, each one plain checkpoint ------------------------------------------


def flax_root(root: Path) -> Path:
    """flax 0.12's save_checkpoint, default (Orbax) backend: root/checkpoint_<n>/."""
    for step in (100, 200, 300):
        flax_checkpoints.save_checkpoint(root, pure(step), step=step, keep=10)
    return root


def loop_root(root: Path, spelling: str) -> Path:
    """The hand-written loop: StandardCheckpointer().save(root / f"{step}", state)."""
    with ocp.StandardCheckpointer() as checkpointer:
        for step in (100, 200, 300):
            checkpointer.save(root.absolute() / spelling.format(step), nnx.state(net(step)))
    return root


WRITERS = {
    "flax-save_checkpoint": lambda root: flax_root(root),
    "loop-<n>": lambda root: loop_root(root, "{}"),
    "loop-step_<n>": lambda root: loop_root(root, "step_{}"),
}
FOLDER = {"flax-save_checkpoint": "checkpoint_{}", "loop-<n>": "{}", "loop-step_<n>": "step_{}"}


@pytest.fixture(scope="module", params=sorted(WRITERS))
def step_root(request, tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("roots") / request.param
    return request.param, WRITERS[request.param](root)


def test_root_of_plain_steps_through_every_entry_point(step_root, capfd):
    writer, root = step_root
    assert sorted(os.listdir(root)) == [FOLDER[writer].format(s) for s in (100, 200, 300)]
    before = folder_bytes(root)

    info = nw.inspect(root)
    assert [s.step for s in info.steps] == [100, 200, 300] and info.step == 300
    assert info.item_dir == root / FOLDER[writer].format(300)
    assert info.layout == "root of step folders, each one Orbax v0 checkpoint"
    assert info.unrestorable == ()
    assert "layers/1/kernel" in str(info) and "ocdbt" not in str(info)
    assert nw.inspect(root, step=100).item_dir == root / FOLDER[writer].format(100)

    model = net(7)
    report = nw.compare(root, model, step=200)
    assert report.ok and len(report.matched) == 4
    nw.restore(root, model, step=200)
    assert_same_arrays(snapshot(net(200)), model)
    loaded = nw.load(root, lambda: net(0))  # the latest step by default
    assert_same_arrays(snapshot(net(300)), loaded)

    values = nw.stats(root, step=100, progress=False)
    kernel = np.asarray(net(100).layers[0].kernel[...])
    row = next(e for e in values.entries if e.key.startswith("layers/0/kernel"))
    assert row.max == float(kernel.max()) and row.min == float(kernel.min())

    diff = nw.diff(root, steps=(100, 300), progress=False)
    # nnx.Linear's biases start at zero whatever the seed: unchanged between steps.
    assert diff.changed == ["layers/0/kernel", "layers/1/kernel"]
    assert diff.unchanged == ["layers/0/bias", "layers/1/bias"]
    assert nw.diff(root, steps=(200, 200), progress=False).changed == []

    browser = CheckpointBrowser(root, net(9))
    assert [value for _, value in browser.step_selector.options] == [100, 200, 300]
    browser.step_selector.value = 100
    assert browser.info.step == 100 and browser.error is None
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status.startswith("Restored "), browser.status

    assert main(["inspect", str(root), "--step", "200", "--json"]) == 0
    data = json.loads(capfd.readouterr().out)
    assert data["step"] == 200 and [s["step"] for s in data["steps"]] == [100, 200, 300]
    assert main(["diff", str(root), "--steps", "100", "300", "--json", "--no-progress"]) == 0
    data = json.loads(capfd.readouterr().out)
    assert sorted(data["changed"]) == ["layers/0/kernel", "layers/1/kernel"]
    assert main(["stats", str(root), "--step", "100", "--json", "--no-progress"]) == 0
    assert len(json.loads(capfd.readouterr().out)["entries"]) == 4
    assert folder_bytes(root) == before  # nothing written


def test_flax_restore_checkpoint_agrees(step_root):
    """The writer's own reader gives the same arrays as ours, bit for bit."""
    writer, root = step_root
    if writer != "flax-save_checkpoint":
        pytest.skip("flax's reader is for flax's roots")
    with warnings.catch_warnings():  # flax restores without a target: Orbax warns
        warnings.simplefilter("ignore", UserWarning)
        theirs = flax_checkpoints.restore_checkpoint(root, target=None, step=200)
    model = net(1)
    nw.restore(root, model, step=200)
    ours = {tuple(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}
    theirs = {tuple(map(str, p)): v for p, v in flax.traverse_util.flatten_dict(theirs).items()}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(value), strict=True)


def test_one_step_folder_alone_and_cli_in_a_fresh_interpreter(step_root):
    writer, root = step_root
    folder = root / FOLDER[writer].format(100)
    assert nw.inspect(folder).item_dir == folder
    done = run_cli("inspect", str(root), "--step", "100")
    assert done.returncode == 0, done.stderr
    assert "step 100 (3 steps, latest 300)" in done.stdout and "ocdbt" not in done.stdout


def test_any_single_checkpoint_layout_serves_as_a_step_or_an_item(tmp_path):
    """The step-root code asks the registry, so a layout added there (older Orbax formats)
    reads step folders and items too: shown here with safetensors, written by safetensors."""
    from safetensors.numpy import save_file

    weights = {s: {"w": np.full(3, s, np.float32)} for s in (1, 2)}
    for s, tensors in weights.items():
        (tmp_path / "plain" / f"step_{s}").mkdir(parents=True)
        save_file(tensors, tmp_path / "plain" / f"step_{s}" / "model.safetensors")
        (tmp_path / "items" / str(s) / "weights").mkdir(parents=True)
        save_file(tensors, tmp_path / "items" / str(s) / "weights" / "model.safetensors")
    plain = nw.inspect(tmp_path / "plain", step=1)
    assert [s.step for s in plain.steps] == [1, 2] and plain.layout.endswith("safetensors")
    items = nw.inspect(tmp_path / "items", step=1)
    assert [s.step for s in items.steps] == [1, 2] and items.item == "weights"
    for root in ("plain", "items"):
        assert nw.stats(tmp_path / root, step=1, progress=False)["w"].max == 1.0
        assert nw.stats(tmp_path / root, progress=False)["w"].max == 2.0
        assert nw.diff(tmp_path / root, steps=(1, 2), progress=False).changed == ["w"]


# --- 2. a damaged, empty or stray step, or a link loop, never blocks the intact ones --------------


def manager_root(root: Path) -> Path:
    with ocp.CheckpointManager(root.absolute()) as manager:
        for step in (1, 2, 3):
            manager.save(step, args=ocp.args.StandardSave(nnx.state(net(step))))
        manager.wait_until_finished()
    return root


def training_root(root: Path) -> Path:
    from orbax.checkpoint import v1

    with v1.training.Checkpointer(root.absolute()) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, nnx.state(net(step)))
    return root


def flax_small_root(root: Path) -> Path:
    for step in (1, 2, 3):
        flax_checkpoints.save_checkpoint(root, nnx.state(net(step)), step=step, keep=10)
    return root


ROOTS = {
    "CheckpointManager": (manager_root, "{}"),
    "training.Checkpointer": (training_root, "{}"),
    "flax-save_checkpoint": (flax_small_root, "checkpoint_{}"),
}


def _step_metadata_one(folder: Path) -> None:
    folder.mkdir()
    (folder / "_CHECKPOINT_METADATA").write_text("[1]")


def _empty(folder: Path) -> None:
    folder.mkdir()


def _stray(folder: Path) -> None:
    folder.mkdir()
    (folder / "notes.txt").write_text("loss went down")


def _link_loop(folder: Path) -> None:
    folder.symlink_to(folder.name)  # the link points at itself


def _tree_metadata(folder: Path) -> None:
    (folder / "ocdbt.process_0").mkdir(parents=True)
    (folder / "manifest.ocdbt").write_bytes(b"")
    (folder / "_METADATA").write_text("garbage")


DAMAGE = {
    "metadata-[1]": (_step_metadata_one, nw.CorruptCheckpointError, "_CHECKPOINT_METADATA"),
    "empty": (_empty, nw.CorruptCheckpointError, "empty"),
    "stray": (_stray, nw.CorruptCheckpointError, "notes.txt"),
    "link-loop": (_link_loop, nw.CheckpointError, "symbolic links"),
    "tree-metadata": (_tree_metadata, nw.CorruptCheckpointError, "_METADATA"),
}


@pytest.fixture(scope="module", params=sorted(ROOTS))
def intact_root(request, tmp_path_factory) -> tuple[str, Path]:
    write, _ = ROOTS[request.param]
    return request.param, write(tmp_path_factory.mktemp("intact") / "run")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_bad_newest_step_is_listed_and_the_intact_ones_open(tmp_path, intact_root, damage, capfd):
    kind, source = intact_root
    root = tmp_path / "run"
    shutil.copytree(source, root, symlinks=True)
    spelling = ROOTS[kind][1]
    make, error, words = DAMAGE[damage]
    if damage == "tree-metadata" and kind != "flax-save_checkpoint":
        pytest.skip("a plain step folder's own tree metadata: flax roots")
    make(root / spelling.format(9))

    info = nw.inspect(root)
    assert info.step == 3 and [s.step for s in info.steps] == [1, 2, 3]
    ((bad,),) = [[s for s in info.unrestorable]]
    assert bad.step == 9 and words in bad.reason and str(root / spelling.format(9)) in bad.reason
    assert "not restorable: step 9" in str(info) and "not restorable: step 9" in info._repr_html_()
    for step in (1, 2, 3):
        model = net(0)
        nw.restore(root, model, step=step)
        assert_same_arrays(snapshot(net(step)), model)
    model = net(0)
    nw.restore(root, model)  # the latest intact step by default
    assert_same_arrays(snapshot(net(3)), model)
    with pytest.raises(error) as raised:
        nw.inspect(root, step=9)
    assert str(root / spelling.format(9)) in str(raised.value)
    assert nw.diff(root, steps=(1, 3), progress=False).changed
    assert len(nw.stats(root, progress=False).entries) == 4
    browser = CheckpointBrowser(root, net(0))
    assert [value for _, value in browser.step_selector.options] == [1, 2, 3]
    assert "not restorable: step 9" in browser.header.value
    assert main(["inspect", str(root), "--json"]) == 0
    data = json.loads(capfd.readouterr().out)
    assert data["step"] == 3 and [s["step"] for s in data["unrestorable_steps"]] == [9]


def test_a_damaged_step_in_the_middle_is_listed_too(tmp_path):
    root = manager_root(tmp_path / "run")
    (root / "2" / "_CHECKPOINT_METADATA").write_text("[1]")
    info = nw.inspect(root)
    assert [s.step for s in info.steps] == [1, 3] and [s.step for s in info.unrestorable] == [2]
    with pytest.raises(nw.CorruptCheckpointError, match="_CHECKPOINT_METADATA"):
        nw.inspect(root, step=2)


def test_only_bad_steps_name_the_newest_damage_and_hollow_ones_are_no_root(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    _empty(root / "4")
    _stray(root / "5")
    with pytest.raises(nw.UnknownLayoutError, match="hold no checkpoint") as raised:
        nw.inspect(root)
    assert not isinstance(raised.value, nw.CorruptCheckpointError)
    _step_metadata_one(root / "3")
    with pytest.raises(nw.CorruptCheckpointError, match="_CHECKPOINT_METADATA") as raised:
        nw.inspect(root)
    assert str(root / "3") in str(raised.value)


# --- 3. lists and tuples in saved trees -----------------------------------------------------------


class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.Dense(4)(x))


def _trained_state(tx: optax.GradientTransformation) -> train_state.TrainState:
    module = Dense()
    params = module.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    state = train_state.TrainState.create(apply_fn=module.apply, params=params, tx=tx)

    def loss(p, x):
        return jnp.sum(module.apply({"params": p}, x) ** 2)

    for i in range(2):  # optimizer moments that are not zero
        x = jax.random.normal(jax.random.key(i), (5, 2))
        state = state.apply_gradients(grads=jax.grad(loss)(state.params, x))
    return state


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "masked": lambda: optax.chain(
        optax.masked(optax.adam(1e-2), lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
        optax.sgd(1e-2),
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_linen_train_state_with_optax_lists_restores_stats_and_diffs(tmp_path, name):
    state = _trained_state(OPTIMIZERS[name]())
    path = tmp_path / "ts"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), state)
    saved = flax.serialization.to_state_dict(state)  # the writer's arrays, lists as dicts
    # The checkpoint holds sequences (Orbax's key_type 1): optax's tuples and lists.
    tree = json.loads((path / "_METADATA").read_text())["tree_metadata"]
    assert any(key["key_type"] == 1 for e in tree.values() for key in e["key_metadata"])

    target = nnx.State(jax.tree.map(jnp.zeros_like, saved))
    report = nw.restore(path, target, cast=True)  # step: int64 on disk, int32 here
    assert not report.unexpected and not report.missing and not report.shape_mismatched
    assert [e.path for e in report.casts] == ["step"]
    flat_saved = {
        tuple(str(k.key) for k in p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    flat_ours = {tuple(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(target)}
    assert flat_saved.keys() == flat_ours.keys()
    for key, value in flat_saved.items():
        if key == ("step",):
            assert int(flat_ours[key]) == int(value)
            continue
        np.testing.assert_array_equal(flat_ours[key], value, strict=True)

    values = nw.stats(path, progress=False)
    mu = next(e for e in values.entries if e.key.endswith("mu/Dense_0/kernel"))
    stored = next(v for k, v in flat_saved.items() if "/".join(k).endswith("mu/Dense_0/kernel"))
    assert mu.max == float(stored.max())
    assert nw.diff(path, path, progress=False).changed == []


def test_nnx_optimizer_and_nnx_list_pure_dict(tmp_path):
    model = net(3)
    optimizer = nnx.Optimizer(model, optax.chain(optax.clip(1.0), optax.adam(1e-2)), wrt=nnx.Param)
    x = jnp.ones((2, 3))
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save((tmp_path / "opt").absolute(), nnx.state(optimizer))
        checkpointer.save((tmp_path / "list").absolute(), nnx.to_pure_dict(nnx.state(model)))
    fresh = nnx.Optimizer(net(0), optax.chain(optax.clip(1.0), optax.adam(1e-2)), wrt=nnx.Param)
    nw.restore(tmp_path / "opt", fresh)
    assert_same_arrays(snapshot(optimizer), snapshot(fresh))
    other = net(0)
    nw.restore(tmp_path / "list", other)
    assert_same_arrays(snapshot(model), other)
    assert nw.diff(tmp_path / "opt", tmp_path / "opt", progress=False).changed == []
    assert len(nw.stats(tmp_path / "list", progress=False).entries) == 4


# --- 4. paths: .., ~, relative, symlinked folders -------------------------------------------------


def test_paths_are_normalised_for_orbax_and_shown_as_given(tmp_path, monkeypatch):
    root = flax_small_root(tmp_path / "out" / "ckpt")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "linked").symlink_to(root)
    monkeypatch.chdir(work)
    for given in ("../out/ckpt", "../out/../out/ckpt/", "../linked", str(tmp_path / "linked")):
        info = nw.inspect(given)
        assert str(info.path) == str(Path(given)) and info.step == 3
        model = net(0)
        nw.restore(given, model, step=2)
        assert_same_arrays(snapshot(net(2)), model)
        assert nw.stats(given, progress=False).entries
    single = "../out/ckpt/checkpoint_1"
    assert str(nw.inspect(single).path) == single
    monkeypatch.setenv("HOME", str(tmp_path))
    info = nw.inspect("~/out/ckpt")
    assert (
        info.step == 3 and str(info.path) == "~/out/ckpt" and "Checkpoint ~/out/ckpt," in str(info)
    )
    model = net(0)
    nw.restore("~/out/ckpt", model, step=1)
    assert_same_arrays(snapshot(net(1)), model)
    # Errors spell the path as given too, not as it expands.
    with pytest.raises(nw.CheckpointNotFoundError) as missing:
        nw.inspect("~/out/elsewhere")
    assert "No checkpoint at ~/out/elsewhere:" in str(missing.value)
    assert str(tmp_path) not in str(missing.value)
    with pytest.raises(nw.CheckpointNotFoundError, match=r"~/out/ckpt.*step 9"):
        nw.restore("~/out/ckpt", model, step=9)


# --- 5. keys holding "/" (Gemma's release format) -------------------------------------------------


class Gemmaish(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.transformer = nnx.Dict(
            layer_0=nnx.Dict(attn=nnx.Dict(q_einsum=nnx.Dict(w=nnx.Param(jnp.zeros((2, 3)))))),
            embedder=nnx.Dict(input_embedding=nnx.Param(jnp.zeros((5, 2)))),
        )


def test_keys_holding_a_slash_are_quoted_and_matched_to_nested_keys(tmp_path):
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    emb = np.arange(10, dtype=np.float32).reshape(5, 2)
    path = tmp_path / "gemma"
    ocp.PyTreeCheckpointer().save(
        path.absolute(),
        {
            "transformer/layer_0/attn/q_einsum": {"w": w},
            "transformer/embedder": {"input_embedding": emb},
        },
    )
    info = nw.inspect(path)
    text = str(info)
    assert "'transformer/layer_0/attn/q_einsum'/w" in text
    assert "'transformer/embedder'/input_embedding" in text
    assert "&#x27;transformer/embedder&#x27;" in info._repr_html_()

    model = Gemmaish(rngs=nnx.Rngs(0))
    report = nw.compare(path, model)
    assert report.ok and sorted(report.matched) == [
        "transformer/embedder/input_embedding",
        "transformer/layer_0/attn/q_einsum/w",
    ]
    assert report.unexpected == [] and report.missing == []
    (note,) = report.notes
    assert "keys holding '/'" in note and "nested keys" in note and note in str(report)
    nw.restore(path, model)
    np.testing.assert_array_equal(model.transformer["layer_0"]["attn"]["q_einsum"]["w"][...], w)
    np.testing.assert_array_equal(
        model.transformer["embedder"]["input_embedding"][...], emb, strict=True
    )


# --- 6. PyTorch pickles and object .npz: refused, never unpickled ---------------------------------


class _Payload:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickles(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, protocol in (
        ("pytorch_model.bin", 2),
        ("model.pt", 4),
        ("weights.pth", 5),
        ("last.ckpt", 3),
    ):
        files[name] = folder / name
        files[name].write_bytes(pickle.dumps({"w": _Payload(marker)}, protocol=protocol))
    # torch.save's default format: a zip holding data.pkl.
    with zipfile.ZipFile(folder / "zipped.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _Payload(marker)}))
    files["zipped.pt"] = folder / "zipped.pt"
    np.savez(folder / "objects.npz", a=np.array([_Payload(marker)], dtype=object))
    files["objects.npz"] = folder / "objects.npz"
    return files


def test_pickles_are_refused_by_name_and_magic_never_unpickled(tmp_path, capfd):
    marker = tmp_path / "UNPICKLED"
    files = _pickles(tmp_path / "files", marker)
    assert not marker.exists()
    for name, file in files.items():
        for call in (nw.inspect, nw.stats, lambda p: nw.compare(p, net(0))):
            with pytest.raises(nw.UnsafeFormatError) as raised:
                call(file)
            message = str(raised.value)
            assert str(file) in message and "runs whatever code" in message
            assert "safetensors" in message
            kind = "NumPy .npz" if name.endswith(".npz") else "PyTorch checkpoint"
            assert kind in message, message
        assert main(["inspect", str(file)]) == 1
        assert "runs whatever code" in capfd.readouterr().err
    only = tmp_path / "only"
    only.mkdir()
    (only / "pytorch_model.bin").write_bytes(files["pytorch_model.bin"].read_bytes())
    with pytest.raises(nw.UnsafeFormatError, match=r"pytorch_model\.bin"):
        nw.inspect(only)
    assert not marker.exists()


def test_safetensors_beside_pickles_is_read_and_the_pickles_noted(tmp_path):
    from safetensors.numpy import save_file

    marker = tmp_path / "UNPICKLED"
    folder = tmp_path / "hub"
    folder.mkdir()
    weights = {"w": np.arange(3, dtype=np.float32)}
    save_file(weights, folder / "model.safetensors")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(marker)}))
    info = nw.inspect(folder)
    (note,) = info.notes
    assert "pytorch_model.bin was ignored" in note and "runs code" in note
    assert f"note: {note}" in str(info) and "pytorch_model.bin was ignored" in info._repr_html_()
    assert [leaf.name for leaf in info] == ["w"]
    assert nw.stats(folder, progress=False).entries[0].max == 2.0
    assert not marker.exists()


def test_a_binary_that_is_no_pickle_is_not_called_one(tmp_path):
    file = tmp_path / "data.bin"
    file.write_bytes(b"\x00\x01\x02\x03 raw floats")
    with pytest.raises(nw.CheckpointNotFoundError, match="file, not a folder") as raised:
        nw.inspect(file)
    assert not isinstance(raised.value, nw.UnsafeFormatError)
