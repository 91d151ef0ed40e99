"""``stats``: every statistic against NumPy on the same arrays, read from real Orbax checkpoints.

NaN, +Inf and -Inf, ints (int64 beyond 2**31 included), bools, bfloat16, PRNG keys; v0, v1 and
manager roots; select; bounded batches; folding; HTML escaping; the CLI; bad input; and a
property test on random trees.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from conftest import run_cli, save_checkpoint, save_manager
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nnx_ckpt_widgets as nw
from nnx_ckpt_widgets import _values
from nnx_ckpt_widgets.__main__ import NAN_EXIT, main
from nnx_ckpt_widgets._values import array_stats


def folder_state(path: Path) -> dict[str, tuple[int, float]]:
    """Every file under ``path`` with its size and mtime: a checkpoint must stay as it was."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            st_ = file.stat()
            out[str(file.relative_to(path))] = (st_.st_size, st_.st_mtime_ns)
    return out


def expected_float(a: np.ndarray) -> dict:
    """The statistics, by NumPy, the way ``stats`` defines them: over finite values."""
    x = a.astype(np.float64).reshape(-1)
    finite = x[np.isfinite(x)]
    out = {
        "nan": int(np.isnan(x).sum()),
        "posinf": int((x == np.inf).sum()),
        "neginf": int((x == -np.inf).sum()),
        "zeros": int((x == 0).sum()),
    }
    if finite.size:
        out.update(
            min=finite.min(),
            max=finite.max(),
            mean=finite.mean(),
            std=finite.std(),
            norm=np.linalg.norm(finite),
        )
    return out


def check_float(entry: nw.ArrayStats, a: np.ndarray) -> None:
    want = expected_float(a)
    for name in ("nan", "posinf", "neginf", "zeros"):
        assert getattr(entry, name) == want[name], (entry.key, name)
    if "min" not in want:
        assert entry.min is entry.max is entry.mean is None
        return
    assert entry.min == want["min"] and entry.max == want["max"]  # exact: values as stored
    scale = max(1.0, float(np.abs(a[np.isfinite(a)]).max()))
    for name in ("mean", "std", "norm"):
        got = getattr(entry, name)
        assert math.isclose(got, want[name], rel_tol=1e-9, abs_tol=1e-12 * scale), (name, got)
    assert entry.zero_fraction == want["zeros"] / a.size


ARRAYS = {
    "plain": np.random.default_rng(0).standard_normal((37, 11)).astype(np.float32),
    "with_nan": np.array([1.0, np.nan, -2.0, 0.0, np.nan], np.float32),
    "with_inf": np.array([np.inf, -np.inf, 3.0, 0.0, np.inf], np.float64),
    "all_nan": np.full((3,), np.nan, np.float32),
    "big_offset": (1e6 + np.random.default_rng(1).standard_normal(1000)).astype(np.float64),
    "bf16": np.array([1.5, -2.25, 0.0, np.nan, np.inf], ml_dtypes.bfloat16),
    "f16": np.array([[0.5, 0.0], [-65504.0, 1.0]], np.float16),
    "i64": np.array([0, 2**40, -(2**41), 7, 0], np.int64),
    "i8": np.array([-128, 127, 0, 3], np.int8),
    "u32": np.array([0, 4_000_000_000, 1], np.uint32),
    "bools": np.array([True, False, True, True]),
    "scalar": np.float32(2.5),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    tree = dict(ARRAYS)
    tree["key"] = jax.random.key(0)
    tree["keys"] = jax.random.split(jax.random.key(1), 5)
    return save_checkpoint(tmp_path_factory.mktemp("zoo") / "ckpt", tree)


def test_every_statistic_matches_numpy(zoo):
    before = folder_state(zoo)
    report = nw.stats(zoo, progress=False)
    assert len(report) == len(ARRAYS) + 2
    for name, a in ARRAYS.items():
        entry = report[name]
        a = np.asarray(a)
        assert entry.shape == a.shape and entry.dtype == a.dtype.name and entry.size == a.size
        if a.dtype == np.bool_:
            assert entry.kind == "bool" and entry.std is None and entry.mean is None
            assert entry.trues == int(a.sum()) and entry.zeros == int((~a).sum())
            assert (entry.min, entry.max) == (bool(a.min()), bool(a.max()))
        elif np.issubdtype(a.dtype, np.integer):
            assert entry.kind == "int"
            assert entry.min == int(a.min()) and entry.max == int(a.max())
            assert isinstance(entry.min, int)  # exact: int64 beyond 2**31 is not narrowed
            assert entry.zeros == int((a == 0).sum()) and entry.nan == 0
            x = a.astype(np.float64)
            assert math.isclose(entry.mean, x.mean(), rel_tol=1e-12)
            assert math.isclose(entry.std, x.std(), rel_tol=1e-9)
            assert math.isclose(entry.norm, np.linalg.norm(x), rel_tol=1e-12)
        else:
            assert entry.kind == "float"
            check_float(entry, a)
    assert folder_state(zoo) == before  # nothing written to the checkpoint folder


def test_prng_keys_are_listed_as_keys(zoo):
    report = nw.stats(zoo, select="^key", progress=False)
    assert [e.key for e in report] == ["key", "keys"]
    single, many = report["key"], report["keys"]
    assert (single.kind, single.shape, single.size) == ("key", (), 1)
    assert (many.kind, many.shape, many.size) == ("key", (5,), 5)
    assert many.dtype == "key<threefry2x32>" and many.mean is None and many.min is None
    line = next(line for line in str(report).splitlines() if line.startswith("keys"))
    assert "key<threefry2x32>" in line and "(5,)" in line


def test_nan_and_inf_are_reported(zoo):
    report = nw.stats(zoo, progress=False)
    assert not report.ok
    assert report.with_nan == ["all_nan", "bf16", "with_nan"]
    assert report.with_inf == ["bf16", "with_inf"]
    text = str(report)
    assert "with_nan: 2 NaN of 5 values" in text
    assert "with_inf: 2 +Inf, 1 -Inf of 5 values" in text
    # Saved order, and no "first": the arrays of one step carry no order in time.
    assert report.summary() == (
        "14 arrays (9.6 KiB): NaN in 3 of 14 arrays: all_nan, bf16, with_nan; "
        "Inf in 2 of 14 arrays: bf16, with_inf."
    )
    assert "first" not in report.summary()
    data = json.loads(json.dumps(report.as_dict()))  # valid JSON: no NaN literals
    assert data["with_nan"] == report.with_nan and data["ok"] is False


def test_empty_array_has_no_statistics():
    """Orbax refuses to save empty arrays; safetensors files can hold them."""
    entry = array_stats("e", np.zeros((0, 3), np.float32))
    assert entry.size == 0 and entry.min is None and entry.zero_fraction is None


def test_prng_keys_are_keys_when_orbax_reads_the_metadata(tmp_path):
    """Without OCDBT the fast metadata reader steps aside for Orbax's, which gives a key
    array's uint32 data; the keys are still listed as keys, and restore as keys."""
    from nnx_ckpt_widgets.layouts import _pytree

    path = tmp_path / "ckpt"
    saved = nnx.Rngs(3)
    saved.default()  # the key and the counter differ from a fresh Rngs(0)'s
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(nnx.state(saved)))
    with pytest.raises(_pytree.Unrecognised):
        _pytree.read_fast(path)
    entry = nw.stats(path, progress=False)["default/key"]
    assert (entry.kind, entry.shape, entry.dtype) == ("key", (), "key<threefry2x32>")
    target = nnx.Rngs(0)
    nw.restore(path, target)
    key_data = jax.random.key_data
    np.testing.assert_array_equal(
        key_data(target.default.key[...]), key_data(saved.default.key[...])
    )
    np.testing.assert_array_equal(target.default.count[...], saved.default.count[...])


def test_chunked_moments_equal_one_pass(monkeypatch):
    """Chunks of 7 elements merged with Chan's formula give NumPy's figures."""
    monkeypatch.setattr(_values, "CHUNK", 7)
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(1000) * 5 + 1e4).astype(np.float64)
    a[[3, 500]] = np.nan
    a[77] = -np.inf
    check_float(array_stats("a", a), a)
    ints = rng.integers(-(2**40), 2**40, 999)
    entry = array_stats("i", ints)
    assert (entry.min, entry.max) == (int(ints.min()), int(ints.max()))
    assert math.isclose(entry.std, ints.astype(np.float64).std(), rel_tol=1e-9)


def test_state_checkpoint_v1_and_manager_roots(tmp_path):
    model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    kernel = np.asarray(model.kernel[...])
    v0 = save_checkpoint(tmp_path / "v0", state)
    ocp.v1.save(tmp_path / "v1", state)
    root = save_manager(tmp_path / "root", {1: {"state": state}, 2: {"state": state}})
    for path, kwargs in ((v0, {}), (tmp_path / "v1", {}), (root, {"step": 1})):
        report = nw.stats(path, progress=False, **kwargs)
        assert [e.key for e in report] == ["bias", "kernel"]  # the value level is not shown
        check_float(report["kernel"], kernel)
        assert report["bias"].zeros == 4 and report["bias"].zero_fraction == 1.0
    assert nw.stats(root, step=1, progress=False).step == 1


def test_safetensors_file(tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "model.embed.weight": np.random.default_rng(5).standard_normal((8, 4)).astype(np.float32),
        "model.steps": np.array([3, 0, 7], np.int32),
        "model.tokens": np.array([-(2**40), 5, 2**40 + 1], np.int64),  # beyond 32 bits
    }
    save_file(tensors, tmp_path / "model.safetensors")
    report = nw.stats(tmp_path / "model.safetensors", progress=False)
    check_float(report["model/embed/weight"], tensors["model.embed.weight"])
    steps = report["model/steps"]
    assert (steps.kind, steps.min, steps.max, steps.zeros) == ("int", 0, 7, 1)
    tokens = report["model/tokens"]  # read on the host: not narrowed to JAX's int32
    assert (tokens.dtype, tokens.min, tokens.max) == ("int64", -(2**40), 2**40 + 1)


def test_select_reads_only_the_selected_arrays(zoo, monkeypatch):
    read: list[tuple] = []
    layout = type(nw.inspect(zoo).location.layout)
    real = layout.read

    def spy(self, location, requests):
        read.extend(request.stored_path for request in requests)
        return real(self, location, requests)

    monkeypatch.setattr(layout, "read", spy)
    report = nw.stats(zoo, select=r"^i\d+$", progress=False)
    assert read == [("i64",), ("i8",)]
    assert [e.key for e in report] == ["i64", "i8"] and report.skipped == len(ARRAYS)
    assert report.select == r"^i\d+$" and "2 arrays (44 B), 12 not selected" in str(report)


def test_batches_are_bounded_and_progress_is_reported(zoo, monkeypatch):
    batches: list[int] = []
    info = nw.inspect(zoo)
    layout = info.location.layout
    real = type(layout).read

    def counting(self, location, requests):
        batches.append(len(requests))
        return real(self, location, requests)

    monkeypatch.setattr(type(layout), "read", counting)
    monkeypatch.setattr(_values, "BATCH_BYTES", 64)
    calls: list[tuple[int, int]] = []
    leaves = list(info.leaves.values())
    nw.stats(zoo, progress=lambda done, total: calls.append((done, total)))
    assert len(batches) > 3 and sum(batches) == len(leaves)
    total = sum(leaf.nbytes for leaf in leaves)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.fixture(scope="module")
def budget_ckpt(tmp_path_factory) -> Path:
    """Eight 1 MiB arrays and a small one."""
    rng = np.random.default_rng(3)
    tree = {f"w{i}": rng.standard_normal((256, 1024)).astype(np.float32) for i in range(8)}
    tree["bias"] = np.arange(4, dtype=np.float32)
    return save_checkpoint(tmp_path_factory.mktemp("budget") / "ckpt", tree)


def test_a_budget_too_small_for_the_largest_array_is_refused_before_any_read(
    budget_ckpt, monkeypatch, tmp_path
):
    info = nw.inspect(budget_ckpt)
    layout = type(info.location.layout)
    reads: list[int] = []
    real = layout.read

    def counting(self, location, requests):
        reads.append(len(requests))
        return real(self, location, requests)

    monkeypatch.setattr(layout, "read", counting)
    with pytest.raises(nw.InvalidArgumentError) as raised:
        nw.stats(budget_ckpt, progress=False, max_memory="33MiB")
    message = str(raised.value)
    assert "max_memory=33.0 MiB is too small" in message and "w0 (1.0 MiB)" in message
    need = int(message.split("(")[2].split(" bytes")[0])
    assert need > 33 * 2**20 and str(budget_ckpt) in message
    with pytest.raises(nw.InvalidArgumentError, match=r"largest array, w0 \(1.0 MiB\)"):
        nw.diff(budget_ckpt, budget_ckpt, progress=False, max_memory=need)
    assert reads == []
    # The budget it names is enough: the same call then reads every array.
    report = nw.stats(budget_ckpt, progress=False, max_memory=need)
    assert len(report) == 9 and sum(reads) == 9
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((256, 1024)).astype(np.float32)
    assert report["w0"].max == float(w0.max()) and report["w0"].min == float(w0.min())
    assert main(["stats", str(budget_ckpt), "--no-progress", "--max-memory", "33MiB"]) == 1
    assert main(["stats", str(budget_ckpt), "--no-progress", "--max-memory", str(need)]) == 0
    # convert refuses too, before it writes anything, dry run or not.
    dst, reads[:] = tmp_path / "out", []
    for dry_run in (True, False):
        with pytest.raises(nw.InvalidArgumentError, match=r"too small for convert of .*w0"):
            nw.convert(budget_ckpt, dst, to="safetensors", max_memory="33MiB", dry_run=dry_run)
    assert reads == [] and list(tmp_path.iterdir()) == []
    with pytest.raises(nw.InvalidArgumentError, match="'lots' is not a size"):
        nw.stats(budget_ckpt, max_memory="lots")
    with pytest.raises(nw.InvalidArgumentError, match="must be positive"):
        nw.stats(budget_ckpt, max_memory=0)


def test_a_larger_budget_gives_more_reads_in_flight(budget_ckpt, monkeypatch, tmp_path):
    monkeypatch.setattr(_values, "cores", lambda: 4)  # the same figures on any machine
    # Batches of one array: each read in flight then counts 1 MiB x 2.2, on 32 MiB reserved
    # and the 1 MiB being summed up.
    monkeypatch.setattr(_values, "BATCH_BYTES", 2**20)

    def reads_in_flight(function, **kwargs) -> set[int]:
        seen: set[int] = set()

        def progress(done: int, total: int, *, reads_in_flight: int) -> None:
            seen.add(reads_in_flight)

        function(budget_ckpt, progress=progress, **kwargs)
        return seen

    assert reads_in_flight(nw.stats, max_memory="36MiB") == {1}
    assert reads_in_flight(nw.stats, max_memory="38MiB") == {2}
    # At most two per core, and never more than there are batches (8 arrays, 1 MiB each).
    assert reads_in_flight(nw.stats, max_memory="1GiB") == {8}
    # diff shares its budget and the cores between its two sides, each with its own reads.
    assert reads_in_flight(lambda p, **kw: nw.diff(p, p, **kw), max_memory="72MiB") == {2}
    assert reads_in_flight(lambda p, **kw: nw.diff(p, p, **kw), max_memory="1GiB") == {8}
    # convert reads as stats does, and writes the arrays in their order whatever the reads.
    written = {}
    for budget, expected in (("36MiB", {1}), ("1GiB", {8})):
        dst = tmp_path / budget  # three shards of 3 MiB
        convert = functools.partial(nw.convert, dst=dst, to="safetensors", max_shard_size="3MiB")
        assert reads_in_flight(convert, max_memory=budget) == expected
        written[budget] = {}
        for file in sorted(dst.glob("*.safetensors")):
            with safetensors.safe_open(file, framework="numpy") as f:
                written[budget].update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        assert len(written[budget]) == 9
    rng = np.random.default_rng(3)
    for i in range(8):
        w = rng.standard_normal((256, 1024)).astype(np.float32)
        for budget in written:
            np.testing.assert_array_equal(written[budget][f"w{i}"], w)
    # A callable without the keyword is called as before.
    calls: list[tuple[int, int]] = []
    nw.stats(budget_ckpt, progress=lambda d, t: calls.append((d, t)), max_memory="1GiB")
    assert calls[-1][0] == calls[-1][1] == nw.inspect(budget_ckpt).nbytes


def test_default_budget_is_a_capped_share_of_available_memory(monkeypatch):
    monkeypatch.setattr(_values, "available_memory", lambda: 8 * 2**30)
    assert _values.default_budget() == 2 * 2**30
    monkeypatch.setattr(_values, "available_memory", lambda: 64 * 2**30)
    assert _values.default_budget() == 4 * 2**30
    assert _values.parse_memory("512MiB") == 512 * 2**20
    assert _values.parse_memory("1.5 GB") == 1_500_000_000 and _values.parse_memory(7) == 7


def test_repeated_layers_fold_with_their_nan_members(tmp_path):
    layers = {str(i): {"kernel": np.full((2, 2), float(i), np.float32)} for i in range(48)}
    layers["17"]["kernel"][0, 0] = np.nan
    layers["18"]["kernel"][1, 1] = np.nan
    path = save_checkpoint(tmp_path / "c", {"layers": layers})
    report = nw.stats(path, progress=False)
    text = str(report)
    assert report.findings() == ["layers/{0..47}/kernel: 2 with NaN (layers/17, layers/18)"]
    row = next(line for line in text.splitlines() if line.startswith("layers/{0..47}/kernel"))
    cells = row.split()
    assert cells[1:5] == ["48", "×", "(2,", "2)"]
    values = np.stack([layers[str(i)]["kernel"] for i in range(48)])
    finite = values[np.isfinite(values)]
    # min, max, mean, std, norm of the folded row are those of all 48 arrays together
    stats = (0, 47, finite.mean(), finite.std(), np.linalg.norm(finite))
    assert cells[5:11] == ["float32", *(f"{x:.4g}" for x in stats)]
    assert cells[11:13] == ["2", "0"]  # NaN and Inf counts over the 48 arrays


def test_html_escapes_every_name(tmp_path):
    hostile = "<img src=x onerror=alert(1)>"
    path = save_checkpoint(tmp_path / "c", {hostile: np.array([np.nan, 1.0], np.float32)})
    report = nw.stats(path, progress=False)
    html = report._repr_html_()
    assert hostile not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<img" not in html


def test_bad_input(zoo, tmp_path):
    with pytest.raises(nw.InvalidArgumentError, match=r"select='\(\[' is not a valid regex"):
        nw.stats(zoo, select="([")
    with pytest.raises(nw.InvalidArgumentError) as raised:
        nw.stats(zoo, select="^nothing$")
    assert str(zoo) in str(raised.value) and "matches none of the 14 arrays" in str(raised.value)
    with pytest.raises(nw.CheckpointNotFoundError):
        nw.stats(tmp_path / "missing")


def test_cli_stats_json_and_fail_on_nan(zoo):
    process = run_cli("stats", str(zoo), "--json", "--select", "^(plain|i8)$")
    assert process.returncode == 0, process.stderr
    data = json.loads(process.stdout)
    assert [e["key"] for e in data["entries"]] == ["i8", "plain"] and data["ok"] is True
    assert main(["stats", str(zoo), "--fail-on-nan", "--select", "plain"]) == 0
    assert main(["stats", str(zoo), "--fail-on-nan", "--select", "nan"]) == NAN_EXIT
    assert main(["stats", str(zoo), "--select", "nan"]) == 0
    bad = run_cli("stats", str(zoo), "--select", "([")
    assert bad.returncode == 1 and bad.stderr.startswith("error: select='(['")
    assert "Traceback" not in bad.stderr


# --- property test --------------------------------------------------------------------------

DTYPES = st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_])


@st.composite
def trees(draw):
    n = draw(st.integers(1, 5))
    tree = {}
    for i in range(n):
        dtype = draw(DTYPES)
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=6))
        elements = None
        if np.issubdtype(dtype, np.floating):
            width = np.dtype(dtype).itemsize * 8
            elements = st.floats(-1e4, 1e4, width=width) | st.sampled_from(
                [math.nan, math.inf, -math.inf, 0.0]
            )
        elif np.issubdtype(dtype, np.integer):
            elements = st.integers(-(2**20), 2**20)
        tree[f"a{i}"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return tree


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tree=trees())
def test_property_stats_of_random_trees(tmp_path_factory, tree):
    path = save_checkpoint(tmp_path_factory.mktemp("prop") / "c", tree)
    report = nw.stats(path, progress=False)
    assert sorted(e.key for e in report) == sorted(tree)
    for name, a in tree.items():
        entry = report[name]
        assert entry.shape == a.shape and entry.dtype == a.dtype.name
        if a.dtype == np.bool_:
            assert entry.trues == int(a.sum())
        elif np.issubdtype(a.dtype, np.integer):
            assert (entry.min, entry.max) == (int(a.min()), int(a.max()))
        else:
            check_float(entry, a)
    assert report.ok == all(np.isfinite(a).all() for a in tree.values() if a.dtype != np.bool_)


def test_one_array_and_one_value_are_singular(tmp_path):
    path = save_checkpoint(tmp_path / "one", {"x": np.array([np.nan], np.float32)})
    report = nw.stats(path, progress=False)
    assert report.summary() == "1 array (4 B): NaN in x."
    assert report.findings() == ["x: 1 NaN of 1 value"]
    every = save_checkpoint(tmp_path / "every", {"x": np.full(2, np.nan), "y": np.full(3, np.inf)})
    report = nw.stats(every, progress=False)
    assert report.summary() == "2 arrays (40 B): NaN in 1 of 2 arrays: x; Inf in 1 of 2 arrays: y."
    assert report.findings() == ["x: 2 NaN of 2 values", "y: 3 +Inf of 3 values"]
