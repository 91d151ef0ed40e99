"""Scanned and per-layer models: ``stack=`` and ``unstack=``, their refusals, and the report's
suggestion, on checkpoints written by the real code (``nnx.vmap``, ``nnx.scan``, ``nnx.List``,
Linen ``nn.scan``)."""

from __future__ import annotations

import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import assert_same_arrays, save_checkpoint, snapshot
from flax import nnx
from flax.training import train_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nnx_ckpt_widgets as ncw

LAYERS = 4
UNSTACK = {r"^layers/(\d+/)": 0}


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.wi = nnx.Linear(4, 8, rngs=rngs)
        self.wo = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return x + self.wo(jax.nn.relu(self.wi(x)))


class PerLayer(nnx.Module):
    """``nnx.List`` of blocks: keys ``layers/0/wi/kernel``, ...."""

    def __init__(self, rngs: nnx.Rngs, n: int = LAYERS):
        self.layers = nnx.List([Block(rngs) for _ in range(n)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Scanned(nnx.Module):
    """The same blocks made by ``nnx.vmap``: keys ``layers/wi/kernel`` with the layer first."""

    def __init__(self, rngs: nnx.Rngs, n: int = LAYERS):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(layer: Block, x):
            return layer(x)

        return step(self.layers, x)


class ScannedByScan(nnx.Module):
    """Blocks made by ``nnx.scan`` (another writer of stacked layers)."""

    def __init__(self, rngs: nnx.Rngs, n: int = LAYERS):
        @nnx.split_rngs(splits=n)
        @nnx.scan(in_axes=(0,), out_axes=0, length=n)
        def make(rngs: nnx.Rngs) -> Block:
            return Block(rngs)

        self.layers = make(rngs)


def assert_layers_equal(per_layer: PerLayer, scanned: nnx.Module, axis: int = 0) -> None:
    for i, layer in enumerate(per_layer.layers):
        for name in ("wi", "wo"):
            for leaf in ("kernel", "bias"):
                got = np.asarray(getattr(getattr(layer, name), leaf)[...])
                stacked = np.asarray(getattr(getattr(scanned.layers, name), leaf)[...])
                want = np.take(stacked, i, axis=axis)
                assert got.tobytes() == want.tobytes() and got.shape == want.shape, (i, name)


@pytest.fixture(scope="module")
def scanned_ckpt(tmp_path_factory) -> tuple[Path, Scanned]:
    model = Scanned(nnx.Rngs(0))
    return save_checkpoint(tmp_path_factory.mktemp("layers") / "scanned", nnx.state(model)), model


@pytest.fixture(scope="module")
def per_layer_ckpt(tmp_path_factory) -> tuple[Path, PerLayer]:
    model = PerLayer(nnx.Rngs(1))
    path = tmp_path_factory.mktemp("layers") / "per_layer"
    return save_checkpoint(path, nnx.state(model)), model


def test_unstack_scanned_checkpoint_into_per_layer_model(scanned_ckpt):
    path, scanned = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    report = ncw.compare(path, model, unstack=UNSTACK)
    assert report.ok and len(report.matched) == 4 * LAYERS
    # The plan reads each stacked array once: the bytes are the checkpoint's, not 4x them.
    assert report.read_bytes == sum(leaf.nbytes for leaf in ncw.inspect(path))
    text = str(report)
    assert "layers/{0..3}/wi/kernel" in text and "← layers/wi/kernel[i, :, :]" in text
    plan = report.plan()
    sources = {k.key: k.sources for k in plan.keys}
    assert sources["layers/2/wi/kernel"] == ("layers/wi/kernel[2, :, :]",)
    result = ncw.restore(path, model, unstack=UNSTACK)
    assert result.restored_arrays == 4 * LAYERS
    assert_layers_equal(model, scanned)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(model(x), scanned(x))


def test_stack_per_layer_checkpoint_into_scanned_model(per_layer_ckpt):
    path, per_layer = per_layer_ckpt
    for make in (Scanned, ScannedByScan):
        model = make(nnx.Rngs(9))
        report = ncw.compare(path, model, stack=UNSTACK)
        assert report.ok and len(report.matched) == 4, report
        assert "layers/{0..3}/wi/kernel stacked on axis 0" in str(report)
        ncw.restore(path, model, stack=UNSTACK)
        assert_layers_equal(per_layer, model)


def test_round_trip_through_both_directions(tmp_path, scanned_ckpt):
    """nnx.vmap model -> per-layer model -> its own checkpoint -> a scanned model again."""
    path, scanned = scanned_ckpt
    per_layer = ncw.load(path, lambda: PerLayer(nnx.Rngs(3)), unstack=UNSTACK)
    back_path = save_checkpoint(tmp_path / "per", nnx.state(per_layer))
    again = ncw.load(back_path, lambda: Scanned(nnx.Rngs(4)), stack=UNSTACK)
    assert_same_arrays(scanned, again)


def test_transform_sees_each_layer_after_unstack(scanned_ckpt):
    path, scanned = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    seen: list[tuple[int, ...]] = []

    def double(w):
        seen.append(tuple(w.shape))
        return w * 2

    ncw.restore(path, model, unstack=UNSTACK, transform={r"wi/kernel$": double})
    assert (4, 8) in seen and (LAYERS, 4, 8) not in seen
    for i, layer in enumerate(model.layers):
        want = np.asarray(scanned.layers.wi.kernel[...])[i] * 2
        np.testing.assert_array_equal(np.asarray(layer.wi.kernel[...]), want)


def test_compare_suggests_unstack_and_the_suggestion_restores(scanned_ckpt):
    path, scanned = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    report = ncw.compare(path, model)
    assert report.suggestion is not None
    assert report.suggestion.code == r'unstack={r"^layers/(\d+/)": 0}'
    assert report.advice.endswith(f"pass {report.suggestion.code}.")
    ncw.restore(path, model, **report.suggestion.kwargs)
    assert_layers_equal(model, scanned)


def test_compare_suggests_stack_and_the_suggestion_restores(per_layer_ckpt):
    path, per_layer = per_layer_ckpt
    model = Scanned(nnx.Rngs(9))
    report = ncw.compare(path, model)
    assert report.suggestion is not None and "stack" in report.suggestion.kwargs
    ncw.restore(path, model, **report.suggestion.kwargs)
    assert_layers_equal(per_layer, model)


# --- MaxText's shape: Linen nn.scan with the layers on axis 1, under params/params/ ---------


class MlpBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(16, name="wi")(x)
        return x + nn.Dense(8, name="wo")(nn.relu(h)), None


class LinenDecoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            MlpBlock,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            length=LAYERS,
        )
        x, _ = scan(name="layers")(x, None)
        return x


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenDecoder(name="decoder")(x)


class NBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.wi = nnx.Linear(8, 16, rngs=rngs)
        self.wo = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x):
        return x + self.wo(jax.nn.relu(self.wi(x)))


class NDecoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([NBlock(rngs) for _ in range(LAYERS)])


class NModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.decoder = NDecoder(rngs)

    def __call__(self, x):
        for layer in self.decoder.layers:
            x = layer(x)
        return x


@pytest.fixture(scope="module")
def maxtext_ckpt(tmp_path_factory):
    model = LinenModel()
    variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
    path = tmp_path_factory.mktemp("maxtext") / "ckpt"
    # MaxText saves a TrainState, whose params hold the Linen variables (params/params/...),
    # next to optax's state: tuples and lists, and moments with the parameters' own shapes.
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables, tx=optax.adam(1e-2)
    )
    grads = jax.tree.map(jnp.ones_like, variables)
    state = state.apply_gradients(grads=grads)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
    return path, model, state.params


def test_maxtext_scanned_checkpoint_into_per_layer_nnx_model(maxtext_ckpt):
    path, linen, variables = maxtext_ckpt
    model = NModel(nnx.Rngs(0))
    report = ncw.compare(path, model)
    assert len(report.matched) == 0
    found = report.suggestion
    assert found is not None
    assert found.code == (
        r'rename={r"^params/params/": r""}, unstack={r"^decoder/layers/(\d+/)": 1}'
    )
    assert "4 layers on axis 1" in report.advice
    ncw.restore(path, model, strict=False, **found.kwargs)
    kernel = np.asarray(variables["params"]["decoder"]["layers"]["wi"]["kernel"])
    for i, layer in enumerate(model.decoder.layers):
        assert np.asarray(layer.wi.kernel[...]).tobytes() == kernel[:, i].tobytes()
    x = jnp.linspace(-1, 1, 16).reshape(2, 8)
    np.testing.assert_array_equal(model(x), linen.apply(variables, x))


def test_layers_underscore_against_slash_is_suggested(tmp_path):
    """MaxText #4504: a checkpoint with layers_0/... for a model with layers/0/...."""
    model = PerLayer(nnx.Rngs(0))
    flat = {
        f"layers_{i}": {"wi": {"kernel": np.asarray(layer.wi.kernel[...])}}
        for i, layer in enumerate(model.layers)
    }
    path = save_checkpoint(tmp_path / "underscored", flat)
    target = PerLayer(nnx.Rngs(5))
    report = ncw.compare(path, target)
    assert report.suggestion is not None and "rename" in report.suggestion.kwargs
    ncw.restore(path, target, strict=False, **report.suggestion.kwargs)
    for mine, theirs in zip(target.layers, model.layers, strict=True):
        np.testing.assert_array_equal(mine.wi.kernel[...], theirs.wi.kernel[...])


# --- refusals, each naming the key and the layer ---------------------------------------------


@pytest.mark.parametrize(
    ("option", "words"),
    [
        ({r"^layers/\d+/": 0}, "0 capture groups"),
        ({r"^(layers)/(\d+/)": 0}, "2 capture groups"),
        ({r"^layers/(\d+/)": 3}, "axis 3 is out of range for 'layers/wi/bias'"),
        ({r"^layers/(\d+/)": "0"}, "must be an integer axis"),
        ({r"^layers/([": 0}, "not a valid regular expression"),
    ],
)
def test_bad_unstack_options_raise(scanned_ckpt, option, words):
    path, _ = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    before = snapshot(model)
    with pytest.raises(ncw.InvalidArgumentError, match=re.escape(words)):
        ncw.restore(path, model, unstack=option)
    assert_same_arrays(before, model)


def test_layer_count_that_differs_is_refused_naming_the_layer(scanned_ckpt):
    path, _ = scanned_ckpt
    model = PerLayer(nnx.Rngs(7), n=LAYERS - 1)  # 3 layers for a 4-layer checkpoint
    report = ncw.compare(path, model, unstack=UNSTACK)
    assert report.layer_problems and "layer 3 of 0..3 is missing" in report.layer_problems[0]
    before = snapshot(model)
    with pytest.raises(ncw.CheckpointMismatchError, match=r"layer 3 of 0\.\.3 is missing"):
        ncw.restore(path, model, unstack=UNSTACK, strict=False)
    assert_same_arrays(before, model)


def test_stacking_layers_with_a_gap_is_refused(tmp_path):
    model = PerLayer(nnx.Rngs(0))
    state = nnx.state(model)
    flat = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(state)}
    gapped = {k: np.asarray(v) for k, v in flat.items() if not k.startswith("layers/2/")}
    tree: dict = {}
    for key, value in gapped.items():
        node = tree
        *heads, last = key.split("/")
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = value
    path = save_checkpoint(tmp_path / "gap", tree)
    report = ncw.compare(path, Scanned(nnx.Rngs(1), n=3), stack=UNSTACK)
    assert any("layer 2" in p for p in report.layer_problems), report.layer_problems
    assert not report.plan(strict=False).ok


def test_stack_and_unstack_on_the_same_key_raise(per_layer_ckpt):
    path, _ = per_layer_ckpt
    with pytest.raises(ncw.InvalidArgumentError, match="stack and unstack both match"):
        ncw.compare(path, Scanned(nnx.Rngs(1)), stack=UNSTACK, unstack={r"^layers/(\d+/)wi/": 0})


# --- property: random layer counts, axes and shapes ------------------------------------------


class Holder(nnx.Module):
    def __init__(self, arrays: dict[str, np.ndarray]):
        for name, value in arrays.items():
            setattr(self, name, nnx.Param(jnp.asarray(value)))


class ListHolder(nnx.Module):
    def __init__(self, layers: list[np.ndarray]):
        self.layers = nnx.List([Holder({"w": layer}) for layer in layers])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 5),
    shape=st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_unstack_then_stack_is_exact_for_any_layers(tmp_path_factory, n, shape, data, seed):
    axis = data.draw(st.integers(0, len(shape)), label="axis")
    rng = np.random.default_rng(seed)
    stacked = rng.standard_normal((*shape[:axis], n, *shape[axis:])).astype(np.float32)
    folder = tmp_path_factory.mktemp("prop")
    path = save_checkpoint(folder / "stacked", {"layers": {"w": stacked}})
    zeros = [np.zeros(shape, np.float32) for _ in range(n)]
    per_layer = ListHolder(zeros)
    ncw.restore(path, per_layer, unstack={r"^layers/(\d+/)": axis})
    for i, layer in enumerate(per_layer.layers):
        want = np.take(stacked, i, axis=axis)
        assert np.asarray(layer.w[...]).tobytes() == want.tobytes()
    back = save_checkpoint(folder / "per_layer", nnx.state(per_layer))
    target = Holder({"w": np.zeros_like(stacked)})
    target.layers = Holder({"w": np.zeros_like(stacked)})
    del target.w
    ncw.restore(back, target, stack={r"^layers/(\d+/)": axis})
    assert np.asarray(target.layers.w[...]).tobytes() == stacked.tobytes()


# --- the browser and the CLI -----------------------------------------------------------------


def test_panel_shows_and_runs_the_unstack_plan(scanned_ckpt):
    from nnx_ckpt_widgets._restore_panel import RestorePanel

    path, scanned = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    panel = RestorePanel(ncw.inspect(path), model, unstack=UNSTACK)
    assert panel.phase == "ready" and panel.status.startswith("Ready to restore 16 arrays")
    assert "← layers/wi/kernel[i, :, :]" in panel.report_html.value
    panel.button.click()
    assert panel.wait(60) is not None, panel.status
    assert_layers_equal(model, scanned)


def test_browser_takes_unstack(scanned_ckpt):
    path, scanned = scanned_ckpt
    model = PerLayer(nnx.Rngs(7))
    browser = ncw.CheckpointBrowser(path, model, unstack=UNSTACK)
    assert browser.status.startswith("Ready to restore 16 arrays"), browser.status
    browser.restore_button.click()
    assert browser.wait(60) is not None, browser.status
    assert_layers_equal(model, scanned)


def test_cli_compare_takes_unstack_and_rename(scanned_ckpt, tmp_path):
    from conftest import run_cli

    path, _ = scanned_ckpt
    (tmp_path / "layer_models.py").write_text(
        "from flax import nnx\n"
        "class Block(nnx.Module):\n"
        "    def __init__(self, rngs):\n"
        "        self.wi = nnx.Linear(4, 8, rngs=rngs)\n"
        "        self.wo = nnx.Linear(8, 4, rngs=rngs)\n"
        "class PerLayer(nnx.Module):\n"
        "    def __init__(self, rngs):\n"
        "        self.layers = nnx.List([Block(rngs) for _ in range(4)])\n"
        "def make():\n"
        "    return PerLayer(nnx.Rngs(0))\n"
    )
    args = ("compare", str(path), "--model", "layer_models:make")
    before = run_cli(*args, pythonpath=tmp_path)
    assert before.returncode == 0, before.stderr
    assert r'unstack={r"^layers/(\d+/)": 0}' in before.stdout
    after = run_cli(*args, "--unstack", r"^layers/(\d+/)", "0", pythonpath=tmp_path)
    assert after.returncode == 0, after.stderr
    assert "16 matched, 0 missing" in after.stdout
    assert after.stdout.splitlines()[-1] == "Plan (strict): Ready to restore 16 arrays (1.2 KiB)."


# --- convert: the same options on the way out ------------------------------------------------


def test_convert_unstacks_a_scanned_checkpoint_into_per_layer_safetensors(scanned_ckpt, tmp_path):
    from safetensors import safe_open

    path, scanned = scanned_ckpt
    plan = ncw.convert(path, tmp_path / "out", to="safetensors", unstack=UNSTACK, dry_run=True)
    assert {k.key for k in plan.keys} == {
        f"layers.{i}.{name}.{leaf}"
        for i in range(LAYERS)
        for name in ("wi", "wo")
        for leaf in ("kernel", "bias")
    }
    ncw.convert(path, tmp_path / "out", to="safetensors", unstack=UNSTACK)
    stacked = nnx.to_pure_dict(nnx.state(scanned))["layers"]
    with safe_open(tmp_path / "out" / "model.safetensors", framework="numpy") as f:
        for i in range(LAYERS):
            got = f.get_tensor(f"layers.{i}.wi.kernel")
            assert got.tobytes() == np.asarray(stacked["wi"]["kernel"])[i].tobytes()
    # And back: the per-layer model loads the written files bit for bit.
    model = PerLayer(nnx.Rngs(8))
    ncw.restore(tmp_path / "out", model)
    assert_layers_equal(model, scanned)


def test_convert_stacks_a_live_per_layer_model_into_orbax(tmp_path):
    per_layer = PerLayer(nnx.Rngs(2))
    ncw.convert(per_layer, tmp_path / "scanned", to="orbax", stack=UNSTACK)
    info = ncw.inspect(tmp_path / "scanned")
    assert {leaf.name for leaf in info} == {
        "layers/wi/bias",
        "layers/wi/kernel",
        "layers/wo/bias",
        "layers/wo/kernel",
    }
    scanned = Scanned(nnx.Rngs(3))
    ncw.restore(tmp_path / "scanned", scanned)
    assert_layers_equal(per_layer, scanned)


# --- a peer check on a real model's weights ---------------------------------------------------

HF_BERT = Path(__file__).parent / "data" / "hf_flax"
BERT_LAYERS = {r"^encoder/layer/(\d+/)": 0}


def _bert_expected() -> dict[str, np.ndarray]:
    """The tiny FlaxBertModel's weights as transformers' own from_pretrained read them."""
    return {
        p.stem.replace(".", "/"): np.load(p) for p in sorted((HF_BERT / "expected").glob("*.npy"))
    }


def _state_of(arrays: dict[str, np.ndarray]) -> nnx.State:
    """An nnx.State of zero Params shaped like ``arrays`` (keys ``a/b/c``)."""
    nested: dict = {}
    for key, value in arrays.items():
        *heads, last = key.split("/")
        node = nested
        for head in heads:
            node = node.setdefault(head, {})
        node[last] = nnx.Param(jnp.zeros(value.shape, value.dtype))
    return nnx.State(nested)


def test_bert_per_layer_weights_stacked_and_unstacked_are_bit_identical(tmp_path):
    """transformers' FlaxBertModel (per-layer encoder/layer/<i>/...): stacked into a scanned
    Orbax checkpoint by convert, then loaded back per layer with unstack=: every weight is
    the one transformers itself loads, bit for bit."""
    expected = _bert_expected()
    layers = sorted({k.split("/")[2] for k in expected if k.startswith("encoder/layer/")})
    assert layers == ["0", "1"]
    scanned = tmp_path / "scanned"
    ncw.convert(HF_BERT / "single", scanned, to="orbax", stack=BERT_LAYERS)
    stacked = {leaf.name: leaf.shape for leaf in ncw.inspect(scanned)}
    assert "encoder/layer/attention/self/query/kernel" in stacked
    assert stacked["encoder/layer/attention/self/query/kernel"][0] == len(layers)
    # The scanned checkpoint into a per-layer target, through compare's suggestion.
    target = _state_of(expected)
    report = ncw.compare(scanned, target)
    assert report.suggestion is not None and "unstack" in report.suggestion.kwargs
    ncw.restore(scanned, target, **report.suggestion.kwargs)
    got = {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(target)}
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert got[key].dtype == want.dtype and got[key].tobytes() == want.tobytes(), key


def test_a_layer_index_that_is_no_integer_is_refused_naming_the_key(tmp_path):
    """A capture group that catches a name rather than a number (``layers/(\\w+/)``)."""
    path = save_checkpoint(
        tmp_path / "named", {"layers": {"first": {"w": np.zeros(2, np.float32)}}}
    )
    target = Holder({"w": np.zeros((1, 2), np.float32)})
    target.layers = Holder({"w": np.zeros((1, 2), np.float32)})
    del target.w
    report = ncw.compare(path, target, stack={r"^layers/(\w+/)": 0})
    assert report.layer_problems == (
        "stack into 'layers/w': 'layers/first/w' has no integer layer",
    )
    with pytest.raises(ncw.CheckpointMismatchError, match="'layers/first/w' has no integer layer"):
        ncw.restore(path, target, stack={r"^layers/(\w+/)": 0}, strict=False)
