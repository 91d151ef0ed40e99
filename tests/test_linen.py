"""A Flax Linen checkpoint, written by real ``flax.linen`` code and Orbax, into its NNX twin."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import nnx_ckpt_widgets as ncw


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(2)(nn.relu(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.dense2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense2(nnx.relu(self.bn(self.dense1(x))))


RENAME = {
    r"^params/Dense_0/": "dense1/",
    r"^params/Dense_1/": "dense2/",
    r"^(params|batch_stats)/BatchNorm_0/": "bn/",
}
X = jax.random.normal(jax.random.key(1), (5, 3))


@pytest.fixture(scope="module")
def linen_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    """Linen variables after 3 training steps (so batch_stats moved), saved with Orbax."""
    model = LinenNet()
    variables = model.init(jax.random.key(0), X, train=False)
    for step in range(3):
        batch = jax.random.normal(jax.random.key(10 + step), (16, 3))
        _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
        variables = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    path = tmp_path_factory.mktemp("linen") / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, variables)
    return path, variables


def test_report_makes_the_linen_mapping_obvious(linen_ckpt):
    path, _ = linen_ckpt
    report = ncw.compare(path, NNXNet(nnx.Rngs(0)))
    assert "params/{Dense_0,Dense_1}" not in str(report)  # class names are not indices
    assert set(report.unexpected) >= {"params/Dense_0/kernel", "batch_stats/BatchNorm_0/mean"}
    assert set(report.missing) >= {"dense1/kernel", "bn/mean"}
    advice = report.advice
    assert "Flax Linen checkpoint (collections batch_stats, params" in advice
    valid = (
        "{r'^params/Dense_0/': 'dense1/'}",
        "{r'^params/Dense_1/': 'dense2/'}",
        "{r'^params/BatchNorm_0/': 'bn/'}",
    )
    assert any(f"e.g. {example}." in advice for example in valid), advice


def test_rename_carries_it_over_and_outputs_are_identical(linen_ckpt):
    path, variables = linen_ckpt
    model = NNXNet(nnx.Rngs(0))
    report = ncw.compare(path, model, rename=RENAME)
    assert report.ok, str(report)
    ncw.restore(path, model, rename=RENAME)
    # batch_stats land in nnx.BatchStat variables, params in nnx.Param ones.
    assert isinstance(model.bn.mean, nnx.BatchStat) and isinstance(model.bn.scale, nnx.Param)
    np.testing.assert_array_equal(
        np.asarray(model.bn.mean[...]), np.asarray(variables["batch_stats"]["BatchNorm_0"]["mean"])
    )
    assert float(jnp.abs(model.bn.mean[...]).sum()) > 0  # training moved them from zero
    model.eval()
    expected = LinenNet().apply(variables, X, train=False)
    np.testing.assert_array_equal(np.asarray(model(X)), np.asarray(expected))


def test_load_builds_the_twin_from_the_linen_checkpoint(linen_ckpt):
    path, variables = linen_ckpt
    model = ncw.load(path, lambda: NNXNet(nnx.Rngs(5)), rename=RENAME)
    model.eval()
    expected = LinenNet().apply(variables, X, train=False)
    np.testing.assert_array_equal(np.asarray(model(X)), np.asarray(expected))
