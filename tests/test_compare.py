"""``compare``: one status per key, the same for nnx.State and pure-dict checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    MLP,
    RenamedMLP,
    Stack,
    make_bnnet,
    make_mlp,
    save_checkpoint,
)
from flax import nnx

import nnx_ckpt_widgets as ncw

MLP_KEYS = ["linear1/bias", "linear1/kernel", "linear2/bias", "linear2/kernel"]


def _statuses(report: ncw.LoadReport) -> dict[str, str]:
    return {e.path: e.status for e in report.entries}


@pytest.mark.parametrize(
    "make_target",
    [
        pytest.param(lambda: make_mlp(7), id="concrete"),
        pytest.param(lambda: nnx.eval_shape(lambda: make_mlp(7)), id="abstract"),
        pytest.param(lambda: nnx.state(make_mlp(7)), id="state"),
        pytest.param(lambda: nnx.state(make_mlp(7), nnx.Param), id="filtered-state"),
    ],
)
def test_compare_matches_every_kind_of_target(mlp_state_ckpt, make_target):
    report = ncw.compare(mlp_state_ckpt, make_target())
    assert report.ok
    assert sorted(report.matched) == MLP_KEYS
    assert report.missing == report.unexpected == []
    assert report.shape_mismatched == report.dtype_mismatched == []
    assert report.format == "nnx.State"
    assert report.counts == {
        "matched": 4,
        "missing": 0,
        "unexpected": 0,
        "shape mismatch": 0,
        "dtype mismatch": 0,
    }


def test_state_and_pure_dict_checkpoints_give_the_same_report(mlp_state_ckpt, mlp_dict_ckpt):
    target = MLP(din=5, rngs=nnx.Rngs(0))  # linear1/kernel differs in shape
    a, b = ncw.compare(mlp_state_ckpt, target), ncw.compare(mlp_dict_ckpt, target)
    assert (a.format, b.format) == ("nnx.State", "pure dict")

    def key(report):
        return [(e.path, e.status, e.target_shape, e.target_dtype) for e in report.entries]

    assert key(a) == key(b)
    assert a.shape_mismatched == ["linear1/kernel"]
    assert [e.checkpoint.shape for e in a.entries if e.status == "shape mismatch"] == [(3, 4)]
    assert not any("value" in e.path.split("/") for e in a.entries)


def test_every_status(tmp_path):
    saved = {
        "a": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3, np.float32)},
        "b": {"kernel": np.ones((3, 3), np.float32)},
        "old": {"w": np.ones(1, np.float32)},
    }
    path = save_checkpoint(tmp_path / "c", saved)
    target = nnx.State(
        {
            "a": {
                "kernel": nnx.Param(jnp.zeros((2, 3), jnp.float32)),  # matched
                "bias": nnx.Param(jnp.zeros(3, jnp.bfloat16)),  # dtype mismatch
            },
            "b": {"kernel": nnx.Param(jnp.zeros((3, 4), jnp.float32))},  # shape mismatch
            "new": {"w": nnx.Param(jnp.zeros(2, jnp.int32))},  # missing
        }
    )
    report = ncw.compare(path, target)
    assert _statuses(report) == {
        "a/kernel": "matched",
        "a/bias": "dtype mismatch",
        "b/kernel": "shape mismatch",
        "new/w": "missing",
        "old/w": "unexpected",
    }
    assert not report.ok
    assert report.matched == ["a/kernel"]
    assert report.dtype_mismatched == ["a/bias"]
    assert report.shape_mismatched == ["b/kernel"]
    assert report.missing == ["new/w"]
    assert report.unexpected == ["old/w"]
    entries = {e.path: e for e in report.entries}
    assert entries["a/bias"].detail == "checkpoint float32 vs model bfloat16"
    assert entries["b/kernel"].detail == "checkpoint (3, 3) vs model (3, 4)"
    assert entries["new/w"].detail == "model (2,) int32"
    assert entries["new/w"].checkpoint is None
    assert entries["old/w"].target_shape is None
    text = str(report)
    for line in (
        "shapes differ under matching names: change the model, or reshape the arrays on load "
        "with transform={pattern: function}",
        "strict=False",
        "rename=",
        "cast=True",
    ):
        assert line in text.splitlines()[-1]
    # rename= is offered for the unexpected key only, never for the shape mismatch.
    assert text.splitlines()[-1].count("rename=") == 1


def test_integer_keys_of_nnx_list_compare_with_string_keys(tmp_path):
    path = save_checkpoint(tmp_path / "c", nnx.state(Stack(3, rngs=nnx.Rngs(0))))
    report = ncw.compare(path, Stack(3, rngs=nnx.Rngs(1)))
    assert report.ok
    assert "layers/2/kernel" in report.matched
    longer = ncw.compare(path, Stack(4, rngs=nnx.Rngs(1)))
    assert longer.missing == ["layers/3/bias", "layers/3/kernel"]
    assert len(longer.matched) == 6
    shorter = ncw.compare(path, nnx.eval_shape(lambda: Stack(2, rngs=nnx.Rngs(1))))
    assert shorter.unexpected == ["layers/2/bias", "layers/2/kernel"]


def test_str_folds_layer_indices_and_ends_with_what_to_do(tmp_path):
    rng = np.random.default_rng(0)
    saved = {"layers": {str(i): {"w": rng.random((2, 2), np.float32)} for i in range(48)}}
    path = save_checkpoint(tmp_path / "c", saved)
    target = nnx.State(
        {"layers": {i: {"w": nnx.Param(jnp.zeros((2, 2)))} for i in range(50)}}  # 48, 49 extra
    )
    report = ncw.compare(path, target)
    lines = str(report).splitlines()
    assert lines[0] == f"Load report for {path} (pure dict)"
    assert any(
        line.split() == ["matched", "layers/{0..47}/w", "(2,", "2)", "float32"] for line in lines
    )
    assert any(line.split()[:2] == ["missing", "layers/{48..49}/w"] for line in lines)
    assert len(lines) < 10  # folded, not one line per layer
    assert lines[-2] == "48 matched, 2 missing, 0 unexpected, 0 shape mismatch, 0 dtype mismatch"
    assert lines[-1] == "To load it: keep the model's values for missing keys with strict=False."
    ok = ncw.compare(
        path, nnx.State({"layers": {i: {"w": nnx.Param(jnp.zeros((2, 2)))} for i in range(48)}})
    )
    assert str(ok).splitlines()[-1] == "All 48 keys match: restore(path, model) will load them."


def test_repr_html_is_colour_coded_and_escaped(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    path = save_checkpoint(
        tmp_path / "c", {evil: np.ones(2, np.float32), "w": np.ones(1, np.float32)}
    )
    report = ncw.compare(
        path, nnx.State({"w": nnx.Param(jnp.zeros(1)), "m": nnx.Param(jnp.zeros(1))})
    )
    html = report._repr_html_()
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "matched" in html and "missing" in html and "unexpected" in html
    assert html.count("<tr>") == 4  # header + one row per status
    assert html.startswith("<div") and html.endswith("</div>")


def test_rng_state_and_batch_stats(tmp_path):
    path = save_checkpoint(tmp_path / "c", nnx.state(make_bnnet(0)))
    report = ncw.compare(path, make_bnnet(3))
    assert report.ok
    assert {"bn/mean", "bn/var", "rngs/default/key", "dropout/rngs/key"} <= set(report.matched)
    key = next(e for e in report.entries if e.path == "rngs/default/key")
    # A typed key<fry> is stored as its uint32 key data.
    assert (key.target_shape, key.target_dtype, key.checkpoint.dtype) == ((2,), "uint32", "uint32")
    abstract = ncw.compare(path, nnx.eval_shape(lambda: make_bnnet(3)))
    assert abstract.ok


def test_optimizer_target(manager_ckpt):
    model = make_mlp(3)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    report = ncw.compare(manager_ckpt, optimizer, item="optimizer")
    assert report.ok
    assert "opt_state/0/mu/linear1/kernel" in report.matched
    assert "step" in report.matched
    assert (report.step, report.item) == (10, "optimizer")
    # The model checkpoint does not fit an optimizer: nothing in common.
    other = ncw.compare(manager_ckpt, optimizer, item="model", step=1)
    assert other.matched == []
    assert set(other.unexpected) == set(MLP_KEYS)
    assert other.step == 1


def test_rename_maps_checkpoint_keys(mlp_state_ckpt):
    target = RenamedMLP(rngs=nnx.Rngs(0))
    plain = ncw.compare(mlp_state_ckpt, target)
    assert sorted(plain.missing) == ["layer1/bias", "layer1/kernel", "layer2/bias", "layer2/kernel"]
    assert sorted(plain.unexpected) == MLP_KEYS
    renamed = ncw.compare(mlp_state_ckpt, target, rename={r"linear(\d)": r"layer\1"})
    assert renamed.ok
    assert {e.path: e.source for e in renamed.entries}["layer1/kernel"] == "linear1/kernel"
    assert "(from linear1/kernel)" in str(renamed)


def test_rename_errors(mlp_state_ckpt):
    target = RenamedMLP(rngs=nnx.Rngs(0))
    with pytest.raises(ncw.InvalidArgumentError, match="not a valid regular expression"):
        ncw.compare(mlp_state_ckpt, target, rename={"linear(": "x"})
    with pytest.raises(ncw.InvalidArgumentError, match="maps both"):
        ncw.compare(mlp_state_ckpt, target, rename={r"linear\d": "layer"})


def test_not_a_target(mlp_state_ckpt):
    for bad in ({"linear1": {"kernel": np.ones((3, 4))}}, np.ones(3), None):
        with pytest.raises(ncw.InvalidArgumentError) as raised:
            ncw.compare(mlp_state_ckpt, bad)
        assert isinstance(raised.value, ncw.CheckpointError)
        assert "nnx.State" in str(raised.value)


def test_advice_after_a_rename_names_transform_not_rename(mlp_state_ckpt):
    """Names that match after rename= but shapes that differ need transform=, not more rename."""

    class Transposed(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
            self.layer1 = nnx.Linear(4, 3, rngs=rngs)  # the checkpoint's (3, 4), transposed
            self.layer2 = nnx.Linear(4, 2, rngs=rngs)

    rename = {r"linear(\d)": r"layer\1"}
    report = ncw.compare(mlp_state_ckpt, Transposed(rngs=nnx.Rngs(0)), rename=rename)
    assert report.shape_mismatched == ["layer1/bias", "layer1/kernel"]
    assert report.advice == (
        "To load it: shapes differ under matching names: change the model, or reshape the "
        "arrays on load with transform={pattern: function}."
    )
    wrong = {r"layer1/bias$": lambda b: b}  # leaves the bias as it was: still (4,)
    fixed = {r"layer1/kernel$": lambda w: w.T, **wrong}
    report = ncw.compare(
        mlp_state_ckpt, Transposed(rngs=nnx.Rngs(0)), rename=rename, transform=fixed
    )
    assert report.shape_mismatched == ["layer1/bias"]
    assert report.advice == (
        "To load it: shapes still differ after transform=: fix its function or the model."
    )
