"""Property-based tests on random nested trees saved as pure-dict checkpoints.

Each example saves a random tree of small float32/int32 arrays (names include digit keys),
then builds an ``nnx.State`` target from a random variant of it: keys dropped (unexpected),
keys added (missing), shapes or dtypes changed. Levels whose keys are all digits get integer
keys in the target, as ``nnx.List`` state does. Checkpoints go to a ``tempfile`` folder: a
function-scoped ``tmp_path`` would be shared by every example.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import assert_same_arrays, snapshot
from flax import nnx
from hypothesis import example, given, settings
from hypothesis import strategies as st

import nnx_ckpt_widgets as ncw

# No '.', '/' (Orbax and reports join keys with them) and no 'value' (the nnx.State level).
NAMES = st.one_of(st.text("abxy_", min_size=1, max_size=3), st.integers(0, 11).map(str))
SHAPES = st.lists(st.integers(1, 3), max_size=2).map(tuple)
LEAVES = st.tuples(SHAPES, st.sampled_from(["float32", "int32"]))


def _dicts(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=3)


TREES = _dicts(st.recursive(LEAVES, _dicts, max_leaves=6))
SETTINGS = settings(max_examples=20, deadline=None)

Spec = dict[tuple[str, ...], tuple[tuple[int, ...], str]]


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> Spec:
    flat: Spec = {}
    for name, child in tree.items():
        path = (*prefix, name)
        if isinstance(child, dict):
            flat.update(_flatten(child, path))
        else:
            flat[path] = child
    return flat


def _values(spec: Spec, seed: int) -> dict[tuple[str, ...], np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for path, (shape, dtype) in spec.items():
        if dtype == "float32":
            out[path] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[path] = rng.integers(-1000, 1000, shape).astype(np.int32)
    return out


def _nest(flat: dict[tuple, object]) -> dict:
    root: dict = {}
    for path, value in flat.items():
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return root


def _target_keys(flat: dict[tuple[str, ...], object]) -> dict[tuple, object]:
    """Integer keys at levels whose keys are all digits, as nnx.List state has them."""
    children: dict[tuple[str, ...], set[str]] = {}
    for path in flat:
        for depth in range(len(path)):
            children.setdefault(path[:depth], set()).add(path[depth])
    digit_levels = {prefix for prefix, names in children.items() if all(n.isdigit() for n in names)}
    out = {}
    for path, value in flat.items():
        out[
            tuple(
                int(part) if path[:depth] in digit_levels else part
                for depth, part in enumerate(path)
            )
        ] = value
    return out


def _save(folder: Path, values: dict[tuple[str, ...], np.ndarray]) -> Path:
    path = folder / "ckpt"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _nest(values))
    return path


def _state(values: dict[tuple[str, ...], np.ndarray]) -> nnx.State:
    params = {p: nnx.Param(jnp.asarray(v)) for p, v in _target_keys(values).items()}
    return nnx.State(_nest(params))


@st.composite
def variants(draw, force_blocking: bool = False):
    """A checkpoint spec and a target spec derived from it."""
    saved = _flatten(draw(TREES))
    target: Spec = {}
    changes = ["keep", "keep", "keep", "drop", "reshape", "retype"]
    for path, (shape, dtype) in saved.items():
        change = draw(st.sampled_from(changes))
        if change == "keep":
            target[path] = (shape, dtype)
        elif change == "reshape":
            target[path] = ((shape[0] + 1, *shape[1:]) if shape else (1,), dtype)
        elif change == "retype":
            target[path] = (shape, "int32" if dtype == "float32" else "float32")
    if force_blocking:
        path = draw(st.sampled_from(sorted(saved)))
        shape, dtype = saved[path]
        target[path] = ((*shape, 2), dtype)
    # New keys: under a fresh top-level name, or as a new index next to existing ones.
    for n, (shape, dtype) in enumerate(draw(st.lists(LEAVES, max_size=2))):
        anchor = draw(st.sampled_from(sorted(saved)))
        siblings = {p[len(anchor) - 1] for p in saved if p[: len(anchor) - 1] == anchor[:-1]}
        if anchor[-1].isdigit() and str(20 + n) not in siblings:
            target[(*anchor[:-1], str(20 + n))] = (shape, dtype)
        else:
            target[("new", f"k{n}")] = (shape, dtype)
    return saved, target


def _expected_statuses(saved: Spec, target: Spec) -> dict[str, str]:
    out = {}
    for path, (shape, dtype) in target.items():
        if path not in saved:
            out["/".join(path)] = "missing"
        elif saved[path][0] != shape:
            out["/".join(path)] = "shape mismatch"
        elif saved[path][1] != dtype:
            out["/".join(path)] = "dtype mismatch"
        else:
            out["/".join(path)] = "matched"
    for path in saved.keys() - target.keys():
        out["/".join(path)] = "unexpected"
    return out


@SETTINGS
@given(variants(), st.integers(0, 2**16))
def test_report_partitions_the_keys(variant, seed):
    saved, target = variant
    with tempfile.TemporaryDirectory() as folder:
        path = _save(Path(folder), _values(saved, seed))
        report = ncw.compare(path, _state(_values(target, seed + 1)))
    paths = [e.path for e in report.entries]
    assert len(paths) == len(set(paths))  # every key exactly once
    expected = _expected_statuses(saved, target)
    assert {e.path: e.status for e in report.entries} == expected
    assert sorted(
        report.matched
        + report.missing
        + report.unexpected
        + report.shape_mismatched
        + report.dtype_mismatched
    ) == sorted(expected)
    assert report.ok == all(s == "matched" for s in expected.values())
    assert sum(report.counts.values()) == len(expected)
    for entry in report.entries:
        assert (entry.checkpoint is None) == (entry.status == "missing")
        assert (entry.target_shape is None) == (entry.status == "unexpected")


@SETTINGS
@given(variants(), st.integers(0, 2**16))
@example(({("_",): ((), "float32")}, {}), 0)  # every key dropped: nothing to restore
def test_restore_after_save_is_exact(variant, seed):
    saved, target = variant
    # Only key differences: shapes and dtypes as saved.
    target = {p: saved.get(p, spec) for p, spec in target.items()}
    values = _values(saved, seed)
    with tempfile.TemporaryDirectory() as folder:
        path = _save(Path(folder), values)
        same = _state(_values(saved, seed + 1))
        ncw.restore(path, same)
        assert_same_arrays(_state(values), same)

        lenient = _state(_values(target, seed + 2))
        before = snapshot(lenient)
        if saved.keys() & target.keys():
            restored = ncw.restore(path, lenient, strict=False).restored_arrays
        else:  # even a lenient restore refuses a checkpoint that matches nothing
            with pytest.raises(ncw.CheckpointMismatchError, match="nothing in this checkpoint"):
                ncw.restore(path, lenient, strict=False)
            restored = 0
    after = snapshot(lenient)
    by_target_path = dict(zip(_target_keys(target), target, strict=True))
    for key, (array, _) in after.items():
        source = by_target_path[key]
        if source in saved:
            np.testing.assert_array_equal(array, values[source], strict=True)
        else:
            np.testing.assert_array_equal(array, before[key][0], strict=True)
    assert restored == len(saved.keys() & target.keys())


@SETTINGS
@given(
    variants(force_blocking=True),
    st.integers(0, 2**16),
    st.booleans(),
    st.sampled_from(["keep", "zeros"]),
    st.sampled_from(["ignore", "error"]),
)
def test_failing_restore_leaves_the_target_unchanged(variant, seed, strict, missing, unexpected):
    saved, target = variant
    with tempfile.TemporaryDirectory() as folder:
        path = _save(Path(folder), _values(saved, seed))
        state = _state(_values(target, seed + 1))
        before = snapshot(state)
        with pytest.raises(ncw.CheckpointMismatchError) as raised:
            ncw.restore(path, state, strict=strict, missing=missing, unexpected=unexpected)
    assert_same_arrays(before, state)
    assert raised.value.report.shape_mismatched


# Key paths in any order (a parent's leaves need not be adjacent), for the tree views' maps.
PATHS = st.dictionaries(
    st.lists(st.sampled_from(["a", "b", "0", "1", "kernel"]), min_size=1, max_size=4).map(tuple),
    LEAVES,
    max_size=12,
)


@given(PATHS)
@SETTINGS
def test_children_and_totals_match_their_definitions(spec):
    """``_text.children`` and ``CheckpointInfo.totals`` walk each parent's prefixes once per
    run of its leaves; they must equal the plain walk over every prefix of every path."""
    from nnx_ckpt_widgets import _text
    from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo

    leaves = {p: LeafInfo(p, p, shape, dtype) for p, (shape, dtype) in spec.items()}
    children: dict[tuple, list] = {}
    totals: dict[tuple, tuple[int, int]] = {(): (0, 0)}
    for path, leaf in leaves.items():
        for depth in range(len(path)):
            names = children.setdefault(path[:depth], [])
            if path[depth] not in names:
                names.append(path[depth])
            params, nbytes = totals.get(path[:depth], (0, 0))
            totals[path[:depth]] = (params + leaf.size, nbytes + leaf.size * 4)
    assert _text.children(leaves) == children
    info = CheckpointInfo(path="ckpt", item_dir="ckpt", format="pure dict", leaves=leaves)
    assert info.totals == totals
