"""``diff``: two checkpoints, or two steps of a root, array by array, against NumPy."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import run_cli, save_checkpoint, save_manager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_stats import folder_state

import nnx_ckpt_widgets as nw
from nnx_ckpt_widgets.__main__ import NAN_EXIT, main

RNG = np.random.default_rng(0)


def layers(n: int, shift: float, frozen: int) -> dict:
    """``n`` layers; the first ``frozen`` are the same at every step, the others move."""
    out = {}
    for i in range(n):
        base = np.random.default_rng(i).standard_normal((4, 3)).astype(np.float32)
        out[str(i)] = {"kernel": base if i < frozen else base + np.float32(shift)}
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Steps 100 and 200 of a run: 48 layers, 3 frozen; the head goes NaN at step 200."""
    head_100 = np.ones((3, 2), np.float32)
    head_200 = head_100.copy()
    head_200[1, 1] = np.nan
    steps = {
        100: {"state": {"layers": layers(48, 0.0, 3), "head": {"kernel": head_100}}},
        200: {"state": {"layers": layers(48, 0.5, 3), "head": {"kernel": head_200}}},
    }
    return save_manager(tmp_path_factory.mktemp("run") / "root", steps)


def test_two_steps_of_a_root(run):
    before = folder_state(run)
    report = nw.diff(run, steps=(100, 200), progress=False)
    assert report.summary().startswith(
        "NaN appeared in head/kernel; 3 of 49 arrays unchanged: layers/{0..2}/kernel (frozen?); "
    )
    assert report.unchanged == [f"layers/{i}/kernel" for i in range(3)]
    assert report.nan_appeared == ["head/kernel"] and report.nonfinite_b == ["head/kernel"]
    for i in range(3, 48):
        a = layers(48, 0.0, 3)[str(i)]["kernel"].astype(np.float64)
        b = layers(48, 0.5, 3)[str(i)]["kernel"].astype(np.float64)
        entry = next(e for e in report.entries if e.key == f"layers/{i}/kernel")
        d = entry.diff
        assert d is not None and not d.identical
        assert math.isclose(d.rel_change, np.linalg.norm(a - b) / np.linalg.norm(a), rel_tol=1e-12)
        assert math.isclose(d.max_abs, np.abs(a - b).max(), rel_tol=1e-12)
    head = next(e for e in report.entries if e.key == "head/kernel").diff
    assert head.nan_a == 0 and head.nan_b == 1 and math.isnan(head.rel_change)
    text = str(report)
    assert "unchanged  layers/{0..2}/kernel   3 × (4, 3) float32" in text
    assert "changed    layers/{3..47}/kernel  45 × (4, 3) float32" in text
    assert "NaN appeared" in text
    assert folder_state(run) == before  # nothing written
    largest = max(
        (e for e in report.entries if e.diff and not math.isnan(e.diff.rel_change)),
        key=lambda e: e.diff.rel_change,
    )
    assert report.summary().endswith(
        f"largest relative change {largest.diff.rel_change:.3g} ({largest.key})."
    )


def test_one_sided_and_changed_arrays_are_listed_like_compare(tmp_path):
    a = save_checkpoint(
        tmp_path / "a",
        {
            "same": np.arange(4.0),
            "gone": np.zeros(2),
            "grown": np.zeros((2, 2), np.float32),
            "cast": np.zeros(3, np.float32),
        },
    )
    b = save_checkpoint(
        tmp_path / "b",
        {
            "same": np.arange(4.0),
            "new": np.zeros(2),
            "grown": np.zeros((3, 2), np.float32),
            "cast": np.zeros(3, ml_dtypes.bfloat16),
        },
    )
    report = nw.diff(a, b, progress=False)
    assert report.only_in_a == ["gone"] and report.only_in_b == ["new"]
    assert report.shape_mismatched == ["grown"] and report.dtype_mismatched == ["cast"]
    assert report.unchanged == ["same"] and not report.identical
    text = str(report)
    assert "shape mismatch  grown" in text and "a (2, 2) vs b (3, 2)" in text
    assert "dtype mismatch  cast" in text and "a float32 vs b bfloat16" in text
    assert report.summary() == (
        "the array compared is bit-identical; 1 only in a, 1 only in b, 1 changed shape, "
        "1 changed dtype."
    )


def test_nothing_in_common_says_so(tmp_path):
    a = save_checkpoint(tmp_path / "a", {"x": np.zeros(2)})
    b = save_checkpoint(tmp_path / "b", {"y": np.zeros(2), "z": np.ones(1)})
    report = nw.diff(a, b, progress=False)
    assert report.summary() == (
        "Nothing in common: 1 only in a, 2 only in b; no array could be compared."
    )
    assert not report.compared


def test_ints_bf16_and_keys(tmp_path):
    ints = np.array([0, 2**40, 5], np.int64)
    bf = np.array([1.0, 2.0, -3.0], ml_dtypes.bfloat16)
    key = jax.random.key(0)
    a = save_checkpoint(tmp_path / "a", {"i": ints, "bf": bf, "k": key, "k2": key})
    b = save_checkpoint(
        tmp_path / "b",
        {"i": ints + 1, "bf": bf, "k": key, "k2": jax.random.key(1)},
    )
    report = nw.diff(a, b, progress=False)
    by_key = {e.key: e.diff for e in report.entries}
    assert by_key["bf"].identical and by_key["k"].identical and not by_key["k2"].identical
    assert by_key["k2"].rel_change is None  # keys: identity only
    i = by_key["i"]
    x = ints.astype(np.float64)
    assert math.isclose(i.rel_change, np.linalg.norm(np.ones(3)) / np.linalg.norm(x))
    assert i.max_abs == 1.0


def test_bad_input(run, tmp_path):
    with pytest.raises(nw.InvalidArgumentError, match="needs a second side"):
        nw.diff(run)
    with pytest.raises(nw.InvalidArgumentError, match=r"steps must be a pair"):
        nw.diff(run, steps=(100,))
    with pytest.raises(nw.InvalidArgumentError, match=r"select='\*' is not a valid regex"):
        nw.diff(run, steps=(100, 200), select="*")
    with pytest.raises(nw.CheckpointError, match="step 150"):
        nw.diff(run, steps=(100, 150))
    report = nw.diff(run, steps=(100, 200), select=r"^head/", progress=False)
    assert [e.key for e in report.entries] == ["head/kernel"] and report.select == "^head/"


def test_one_item_per_side(run, tmp_path):
    """A plain checkpoint against the ``state`` item of a root's step: one item per side."""
    exported = {"layers": layers(48, 0.5, 3), "head": {"kernel": np.ones((3, 2), np.float32)}}
    plain = save_checkpoint(tmp_path / "export", exported)
    with pytest.raises(nw.ItemSelectionError, match="drop item="):
        nw.diff(plain, run, steps=(None, 200), item="state", progress=False)
    report = nw.diff(plain, run, steps=(None, 200), item=(None, "state"), progress=False)
    assert report.nan_appeared == ["head/kernel"] and len(report.compared) == 49
    assert sorted(report.unchanged) == sorted(f"layers/{i}/kernel" for i in range(48))
    with pytest.raises(nw.InvalidArgumentError, match=r"pair \(item_a, item_b\)"):
        nw.diff(plain, run, item=("state",))
    cli = ["diff", str(plain), str(run), "--steps", "-", "200", "--item", "-", "state", "--json"]
    process = run_cli(*cli)
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["nan_appeared"] == ["head/kernel"]
    bad = run_cli("diff", str(plain), str(run), "--item", "-", "state", "model")
    assert bad.returncode == 1 and "--item takes one name (both sides) or two" in bad.stderr


def test_cli_diff(run):
    process = run_cli("diff", str(run), "--steps", "100", "200", "--json", "--select", "layers/1/")
    assert process.returncode == 0, process.stderr
    data = json.loads(process.stdout)
    assert data["unchanged"] == ["layers/1/kernel"] and data["nan_appeared"] == []
    assert main(["diff", str(run), "--steps", "100", "200", "--fail-on-nan"]) == NAN_EXIT
    assert main(["diff", str(run), "--steps", "100", "200", "--select", "layers"]) == 0
    bad = run_cli("diff", str(run))
    assert bad.returncode == 1 and "needs a second side" in bad.stderr
    assert "Traceback" not in bad.stderr


# --- property test --------------------------------------------------------------------------


@st.composite
def pairs(draw):
    n = draw(st.integers(1, 4))
    a, b = {}, {}
    for i in range(n):
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
        dtype = draw(st.sampled_from([np.float32, np.float64, np.int32]))
        elements = st.integers(-1000, 1000) if dtype == np.int32 else st.floats(-1e3, 1e3, width=32)
        x = draw(hnp.arrays(dtype, shape, elements=elements))
        change = draw(st.sampled_from(["same", "moved", "nan"]))
        y = x.copy()
        if change == "moved":
            y.reshape(-1)[0] += 1
        elif change == "nan" and dtype != np.int32:
            y.reshape(-1)[-1] = np.nan
        a[f"w{i}"], b[f"w{i}"] = x, y
    return a, b


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(pair=pairs())
def test_property_diff_of_random_trees(tmp_path_factory, pair):
    tree_a, tree_b = pair
    folder = tmp_path_factory.mktemp("prop")
    report = nw.diff(
        save_checkpoint(folder / "a", tree_a), save_checkpoint(folder / "b", tree_b), progress=False
    )
    for entry in report.entries:
        x, y = tree_a[entry.key], tree_b[entry.key]
        d = entry.diff
        assert d.identical == (x.tobytes() == y.tobytes())
        assert d.nan_appeared == (not np.isnan(x).any() and np.isnan(y).any())
        if d.identical or np.isnan(y).any():
            continue
        x64, y64 = x.astype(np.float64), y.astype(np.float64)
        norm = np.linalg.norm(x64)
        want = np.linalg.norm(x64 - y64) / norm if norm else math.inf
        assert math.isclose(d.rel_change, want, rel_tol=1e-9)
        assert d.max_abs == np.abs(x64 - y64).max()
    assert report.unchanged == [k for k in tree_a if tree_a[k].tobytes() == tree_b[k].tobytes()]


def test_v1_training_checkpointer_root(tmp_path, capsys):
    """Two steps of an Orbax v1 ``training.Checkpointer`` root, through the library and CLI."""
    from orbax.checkpoint import v1

    root = tmp_path / "v1run"
    first = {"w": np.arange(6, dtype=np.float32), "frozen": np.ones(3, np.float32)}
    second = {"w": first["w"] * 2, "frozen": first["frozen"]}
    with v1.training.Checkpointer(root) as checkpointer:
        checkpointer.save(1, first)
        checkpointer.save(2, second)
    report = nw.diff(root, steps=(1, 2), progress=False)
    assert report.unchanged == ["frozen"] and report.changed == ["w"]
    w = next(e.diff for e in report.entries if e.key == "w")
    assert math.isclose(w.rel_change, 1.0) and w.max_abs == 5.0
    assert main(["stats", str(root), "--step", "1", "--select", "^w$", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["step"] == 1 and data["entries"][0]["max"] == 5.0


def test_a_blow_up_is_flagged_and_nan_names_no_first(tmp_path):
    """A relative change of 1e13 is a blow-up, never shown as fine; NaN appearing in several
    arrays between two steps is listed in saved order, with no claim of which came first."""
    base = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    zeros = np.zeros(4, np.float32)
    steps = {
        20: {"model": {"w": base, "v": base, "b": zeros, "n1": base, "n2": base}},
        25: {
            "model": {
                "w": base * np.float32(1e13),  # the spike
                "v": base * np.float32(1.01),  # an ordinary step
                "b": zeros + np.float32(1.0),  # from zeros: infinite, not a blow-up
                "n1": np.full((4, 4), np.nan, np.float32),
                "n2": np.full((4, 4), np.nan, np.float32),
            }
        },
    }
    root = save_manager(tmp_path / "run", steps)
    report = nw.diff(root, steps=(20, 25), item="model", progress=False)
    assert report.large_changes == ["w"]
    assert report.largest_change is not None and report.largest_change.key == "w"
    assert not report.ok
    summary = report.summary()
    assert summary.startswith(
        "NaN appeared in 2 of 5 arrays: n1, n2; all 5 arrays compared changed"
    )
    assert "first" not in summary
    rel = next(e for e in report.entries if e.key == "w").diff.rel_change
    assert math.isclose(rel, 1e13 - 1, rel_tol=1e-6)
    assert summary.endswith(
        f"largest relative change {rel:.3g} (w), over 100: the weights blew up."
    )
    html = report._repr_html_()
    row = next(r for r in html.split("<tr") if re.search(r"<td[^>]*>w</td>", r))
    assert "color:" in row and "change over 100" in row  # drawn in the error colour
    fine = next(r for r in html.split("<tr") if re.search(r"<td[^>]*>v</td>", r))
    assert "color:" not in fine
    # An ordinary step alone is fine.
    calm = nw.diff(root, steps=(20, 25), item="model", select="^v$", progress=False)
    assert calm.ok and calm.large_changes == [] and "blew up" not in calm.summary()
    assert calm.summary().startswith("the array compared changed; largest relative change 0.01")
    # The browser's compare-with-step view: a blow-up is a warning, never green.
    from nnx_ckpt_widgets import CheckpointBrowser

    browser = CheckpointBrowser(root, step=25, item="model")
    browser.tree.select("w")
    browser.values.other_step.value = 20
    browser.values.diff_button.click()
    browser.wait(30)
    assert browser.values.diff_report.large_changes == ["w"]
    assert 'data-state="warn"' in browser.values.status_html.value
    assert browser.values.status.endswith("over 100: the weights blew up.")
