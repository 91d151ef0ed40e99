"""The benchmark cases of issue 7, each a ratio of two sides measured in the same run."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._measure import Result, alternate, run_python

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Size:
    arrays: int  # arrays in the "1 GiB" checkpoint
    side: int  # each array is side x side float32 (4096 -> 64 MiB)
    leaves: int  # leaves in the many-leaf checkpoint
    repeats: int
    slow_repeats: int  # for the references that take many seconds each (treescope)
    notebooks: bool
    # case 20: leaves of the small and the large many-layer checkpoint (4 arrays a layer)
    layers_leaves: tuple[int, int] = (10_000, 100_000)


FULL = Size(arrays=16, side=4096, leaves=10_000, repeats=5, slow_repeats=5, notebooks=True)
SMOKE = Size(
    arrays=16,
    side=64,
    leaves=400,
    repeats=1,
    slow_repeats=1,
    notebooks=False,
    layers_leaves=(20, 200),
)

_cache: dict[str, Path] = {}


def _big_model(size: Size, names: list[str] | None = None):
    from flax import nnx

    class Big(nnx.Module):
        def __init__(self, names: list[str], seed: int):
            rng = np.random.default_rng(seed)
            for name in names:
                data = rng.standard_normal((size.side, size.side), dtype=np.float32)
                setattr(self, name, nnx.Param(data))

    all_names = [f"w{i:02d}" for i in range(size.arrays)]
    return Big, all_names if names is None else names


def _abstract_state(model_cls, names):
    import jax
    from flax import nnx

    abstract = nnx.eval_shape(lambda: model_cls(names, 1))
    graphdef, state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), state)
    return graphdef, state


def big_checkpoint(tmp: Path, size: Size, name: str = "big") -> Path:
    if name not in _cache:
        import orbax.checkpoint as ocp
        from flax import nnx

        model_cls, names = _big_model(size)
        path = tmp / name
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, nnx.state(model_cls(names, 0)))
        _cache[name] = path
    return _cache[name]


def big_v1_checkpoint(tmp: Path, size: Size) -> Path:
    """The same arrays as :func:`big_checkpoint`, saved with Orbax v1's ``ocp.v1.save``."""
    if "big_v1" not in _cache:
        from flax import nnx
        from orbax.checkpoint import v1

        model_cls, names = _big_model(size)
        path = tmp / "big_v1"
        v1.save(path, nnx.state(model_cls(names, 0)))
        _cache["big_v1"] = path
    return _cache["big_v1"]


def case_inspect_big(tmp: Path, size: Size) -> list[Result]:
    """inspect on a 1 GiB checkpoint vs a full bare restore (v0 and v1)."""
    import orbax.checkpoint as ocp

    import nnx_ckpt_widgets as nw

    path = big_checkpoint(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    checkpointer = ocp.StandardCheckpointer()
    info = nw.inspect(path)
    assert len(info) == size.arrays and info.nbytes == size.arrays * size.side**2 * 4
    ours, ref = alternate(
        lambda: nw.inspect(path), lambda: checkpointer.restore(path, abstract), size.repeats
    )
    gib = size.arrays * size.side**2 * 4 / 2**30
    from orbax.checkpoint import v1

    path_v1 = big_v1_checkpoint(tmp, size)
    assert nw.inspect(path_v1).nbytes == info.nbytes
    ours_v1, ref_v1 = alternate(
        lambda: nw.inspect(path_v1), lambda: v1.load(path_v1, abstract), size.repeats
    )
    return [
        Result(1, f"inspect, {gib:.3g} GiB checkpoint", ours, ref, target=0.02),
        Result(1, f"inspect, {gib:.3g} GiB, v1 (vs ocp.v1.load)", ours_v1, ref_v1, target=0.02),
    ]


def case_restore(tmp: Path, size: Size) -> list[Result]:
    """Full restore into a live model vs bare restore + nnx.update; partial restore of 2."""
    import orbax.checkpoint as ocp
    from flax import nnx

    import nnx_ckpt_widgets as nw

    path = big_checkpoint(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    model = model_cls(names, 1)
    small = model_cls(names[:2], 1)
    checkpointer = ocp.StandardCheckpointer()

    def bare():
        nnx.update(model, checkpointer.restore(path, abstract))

    def ours():
        nw.restore(path, model)

    ours_t, bare_t = alternate(ours, bare, size.repeats)
    expected = model_cls(names[:1], 0)
    np.testing.assert_array_equal(model.w00[...], expected.w00[...])

    def partial():
        nw.restore(path, small, strict=False)

    partial_t, full_t = alternate(partial, ours, size.repeats)
    np.testing.assert_array_equal(small.w00[...], expected.w00[...])
    return [
        Result(2, "restore into a live model", ours_t, bare_t, target=1.10),
        Result(
            3, f"restore 2 of {size.arrays} arrays (strict=False)", partial_t, full_t, target=0.25
        ),
    ]


def many_leaf_checkpoint(tmp: Path, size: Size) -> Path:
    if "many" not in _cache:
        import orbax.checkpoint as ocp

        path = tmp / "many"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, _many_leaf_tree(size))
        _cache["many"] = path
    return _cache["many"]


def _many_leaf_tree(size: Size) -> dict:
    return {"blocks": {str(i): {"bias": np.full((2,), i, np.float32)} for i in range(size.leaves)}}


def case_inspect_many(tmp: Path, size: Size) -> list[Result]:
    """inspect on a many-leaf checkpoint vs StandardCheckpointer().metadata."""
    import orbax.checkpoint as ocp

    import nnx_ckpt_widgets as nw

    path = many_leaf_checkpoint(tmp, size)
    checkpointer = ocp.StandardCheckpointer()
    assert len(nw.inspect(path)) == size.leaves
    ours, ref = alternate(
        lambda: nw.inspect(path), lambda: checkpointer.metadata(path), size.repeats
    )
    from orbax.checkpoint import v1

    path_v1 = tmp / "many_v1"
    if not path_v1.exists():
        v1.save(path_v1, _many_leaf_tree(size))
    assert len(nw.inspect(path_v1)) == size.leaves
    ours_v1, ref_v1 = alternate(
        lambda: nw.inspect(path_v1), lambda: v1.metadata(path_v1), size.repeats
    )
    return [
        Result(4, f"inspect, {size.leaves:,} leaves", ours, ref, target=0.2),
        Result(
            4,
            f"inspect, {size.leaves:,} leaves, v1 (vs ocp.v1.metadata)",
            ours_v1,
            ref_v1,
            target=0.2,
        ),
    ]


def case_v1_restore_path(tmp: Path, size: Size) -> list[Result]:
    """How restore reads a v1 checkpoint: Orbax's v0 PyTree handler on its ``state/`` folder
    (what the package does) vs ``ocp.v1.load``, full and partial (``PLACEHOLDER``)."""
    import jax
    from flax import nnx
    from orbax.checkpoint import v1

    import nnx_ckpt_widgets as nw

    path = big_v1_checkpoint(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    model = model_cls(names, 1)
    small = model_cls(names[:2], 1)

    def v1_full():
        nnx.update(model, v1.load(path, abstract))

    ours_full, ref_full = alternate(lambda: nw.restore(path, model), v1_full, size.repeats)
    partial = jax.tree.map(lambda _: v1.PLACEHOLDER, abstract)
    for name in names[:2]:
        partial[name] = abstract[name]

    def v1_partial():
        v1.load(path, partial)

    ours_part, ref_part = alternate(
        lambda: nw.restore(path, small, strict=False), v1_partial, size.repeats
    )
    expected = model_cls(names[:1], 0)
    np.testing.assert_array_equal(small.w00[...], expected.w00[...])
    return [
        Result(10, "restore v1, full: ours vs ocp.v1.load", ours_full, ref_full, target=1.10),
        Result(10, "restore v1, 2 of 16: ours vs v1 PLACEHOLDER", ours_part, ref_part, target=1.10),
    ]


def big_safetensors(tmp: Path, size: Size) -> Path:
    """The arrays of :func:`big_checkpoint`, as one file written by the ``safetensors`` package."""
    if "big_st" not in _cache:
        from flax import nnx
        from safetensors.numpy import save_file

        model_cls, names = _big_model(size)
        state = nnx.state(model_cls(names, 0))
        path = tmp / "big.safetensors"
        save_file({name: np.asarray(state[name][...]) for name in names}, path)
        _cache["big_st"] = path
    return _cache["big_st"]


def case_safetensors(tmp: Path, size: Size) -> list[Result]:
    """Safetensors: inspect vs a full restore; restore vs ``safetensors.numpy.load_file`` plus
    ``nnx.update``; and the ``safetensors`` package's own lazy reader, the alternative to
    Orbax v1's layout for the package's reads."""
    import jax
    from flax import nnx
    from safetensors import safe_open
    from safetensors.numpy import load_file

    import nnx_ckpt_widgets as nw

    path = big_safetensors(tmp, size)
    model_cls, names = _big_model(size)
    model = model_cls(names, 1)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    assert nw.inspect(path).nbytes == size.arrays * size.side**2 * 4

    def ours():
        nw.restore(path, model)

    def update(arrays: dict) -> None:
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, arrays)
        nnx.update(model, state)

    def reference():
        update(load_file(path))

    def package_reader():
        with safe_open(path, framework="numpy") as handle:
            update({n: jax.device_put(handle.get_tensor(n), device) for n in names})

    inspect_t, restore_t = alternate(lambda: nw.inspect(path), ours, size.repeats)
    ours_t, ref_t = alternate(ours, reference, size.repeats)
    _, package_t = alternate(ours, package_reader, size.repeats)
    np.testing.assert_array_equal(model.w00[...], model_cls(names[:1], 0).w00[...])
    mib = size.arrays * size.side**2 * 4 / 2**20
    return [
        Result(11, f"inspect safetensors, {mib:.0f} MiB", inspect_t, restore_t, target=0.05),
        Result(11, "restore safetensors vs load_file + nnx.update", ours_t, ref_t, target=1.10),
        Result(11, "restore safetensors vs safe_open + device_put", ours_t, package_t),
    ]


# The child's peak resident set in KiB. VmHWM, not getrusage's ru_maxrss: after fork and exec,
# ru_maxrss keeps the parent's high-water mark, which here holds the 1 GiB test arrays.
PEAK_KIB = (
    "print(next(int(line.split()[1]) for line in open('/proc/self/status') "
    "if line.startswith('VmHWM:')))"
)

_RSS_ST_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
import jax, numpy as np
from flax import nnx
from benchmarks.cases import Size, _big_model
size = Size(**json.loads({size!r}))
model_cls, names = _big_model(size)
model = model_cls(names, 1)
if {ours!r}:
    import nnx_ckpt_widgets as nw
    nw.restore({path!r}, model)
else:
    from safetensors.numpy import load_file
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, load_file({path!r}))
    nnx.update(model, state)
    del state
jax.block_until_ready(model.w00[...])
{peak}
"""


def case_safetensors_rss(tmp: Path, size: Size) -> list[Result]:
    """Peak RSS of a safetensors restore vs load_file + nnx.update, each in a fresh process."""
    path = str(big_safetensors(tmp, size))
    size_json = json.dumps(dataclasses.asdict(size))
    peaks: dict[bool, list[int]] = {True: [], False: []}
    for i in range(3 if size.repeats > 1 else 1):
        for ours in (True, False) if i % 2 == 0 else (False, True):
            code = _RSS_ST_CODE.format(
                repo=str(REPO), size=size_json, ours=ours, path=path, peak=PEAK_KIB
            )
            peaks[ours].append(int(run_python(code).split()[-1]))
    ours_kib, ref_kib = (sorted(p)[len(p) // 2] for p in (peaks[True], peaks[False]))
    return [
        Result(12, "peak RSS, safetensors restore", ours_kib / 1024, ref_kib / 1024, "MiB", 1.10)
    ]


def case_browser(tmp: Path, size: Size) -> list[Result]:
    """Building CheckpointBrowser vs treescope.render_to_html of the metadata tree."""
    import orbax.checkpoint as ocp
    import treescope

    try:
        from nnx_ckpt_widgets import CheckpointBrowser
    except ImportError:
        return [Result(5, "CheckpointBrowser (not built yet)", None, None)]
    path = many_leaf_checkpoint(tmp, size)
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    ours, ref = alternate(
        lambda: CheckpointBrowser(path),
        lambda: treescope.render_to_html(tree),
        size.slow_repeats,
    )
    name = f"build CheckpointBrowser, {size.leaves:,} leaves"
    return [Result(5, name, ours, ref, target=0.05, absolute_limit=1.0)]


_RSS_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
import jax, numpy as np
from flax import nnx
from benchmarks.cases import Size, _big_model, _abstract_state
size = Size(**json.loads({size!r}))
model_cls, names = _big_model(size)
graphdef, abstract = _abstract_state(model_cls, names)
if {ours!r}:
    import nnx_ckpt_widgets as nw
    model = nnx.eval_shape(lambda: model_cls(names, 1))
    nw.restore({path!r}, model)
else:
    import orbax.checkpoint as ocp
    model = nnx.merge(graphdef, ocp.StandardCheckpointer().restore({path!r}, abstract))
jax.block_until_ready(model.w00[...])
{peak}
"""


def case_rss(tmp: Path, size: Size) -> list[Result]:
    """Peak RSS of restore vs bare restore, each in a fresh process."""
    path = str(big_checkpoint(tmp, size))
    size_json = json.dumps(dataclasses.asdict(size))
    peaks: dict[bool, list[int]] = {True: [], False: []}
    for i in range(max(3, size.repeats) if size.repeats > 1 else 1):
        for ours in (True, False) if i % 2 == 0 else (False, True):
            code = _RSS_CODE.format(
                repo=str(REPO), size=size_json, ours=ours, path=path, peak=PEAK_KIB
            )
            peaks[ours].append(int(run_python(code).split()[-1]))
    ours_kib, ref_kib = (sorted(p)[len(p) // 2] for p in (peaks[True], peaks[False]))
    return [Result(6, "peak RSS of restore", ours_kib / 1024, ref_kib / 1024, "MiB", 1.10)]


def case_import(tmp: Path, size: Size) -> list[Result]:
    """python -c 'import nnx_ckpt_widgets' vs 'import flax.nnx, orbax.checkpoint'."""

    def timed(code: str):
        def run():
            subprocess.run([sys.executable, "-c", code], check=True)

        return run

    ours, ref = alternate(
        timed("import nnx_ckpt_widgets"),
        timed("import flax.nnx, orbax.checkpoint"),
        size.repeats,
    )
    return [Result(7, "import nnx_ckpt_widgets", ours, ref, target=1.15)]


def case_orbax_vs_numpy(tmp: Path, size: Size) -> list[Result]:
    """Bare Orbax save and restore vs numpy save and load of the same bytes."""
    import orbax.checkpoint as ocp
    from flax import nnx

    model_cls, names = _big_model(size)
    state = nnx.state(model_cls(names, 0))
    arrays = {name: np.asarray(state[name][...]) for name in names}
    _, abstract = _abstract_state(model_cls, names)
    counter = iter(range(10**6))

    def orbax_save():
        target = tmp / f"save-{next(counter)}"
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(target, state)
        shutil.rmtree(target)

    def numpy_save():
        target = tmp / f"np-{next(counter)}"
        target.mkdir()
        for name, array in arrays.items():
            np.save(target / f"{name}.npy", array)
        shutil.rmtree(target)

    save_o, save_n = alternate(orbax_save, numpy_save, size.repeats)
    path = big_checkpoint(tmp, size)
    npdir = tmp / "np-ref"
    npdir.mkdir(exist_ok=True)
    for name, array in arrays.items():
        np.save(npdir / f"{name}.npy", array)
    checkpointer = ocp.StandardCheckpointer()
    restore_o, restore_n = alternate(
        lambda: checkpointer.restore(path, abstract),
        lambda: [np.load(npdir / f"{name}.npy") for name in names],
        size.repeats,
    )

    # The one Orbax option that changed much here: zstd compression. Random-like float weights
    # barely compress, so it costs time for little space.
    def handler(**options):
        return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**options))

    def save_with(**options):
        def save():
            target = tmp / f"save-{next(counter)}"
            with handler(**options) as checkpointer:
                checkpointer.save(target, args=ocp.args.PyTreeSave(state))
            sizes[options["use_compression"]] = sum(
                f.stat().st_size for f in target.rglob("*") if f.is_file()
            )
            shutil.rmtree(target)

        return save

    sizes: dict[bool, int] = {}
    plain_o, zstd_o = alternate(
        save_with(use_compression=False), save_with(use_compression=True), size.repeats
    )
    plain_path, zstd_path = tmp / "plain", tmp / "zstd"
    for path, compress in ((plain_path, False), (zstd_path, True)):
        with handler(use_compression=compress) as writer:
            writer.save(path, args=ocp.args.PyTreeSave(state))
    restore_plain, restore_zstd = alternate(
        lambda: checkpointer.restore(plain_path, abstract),
        lambda: checkpointer.restore(zstd_path, abstract),
        size.repeats,
    )
    space = f"{sizes[True] / 2**20:.0f} vs {sizes[False] / 2**20:.0f} MiB"
    return [
        Result(8, "bare Orbax save vs numpy save", save_o, save_n),
        Result(8, "bare Orbax restore vs numpy load", restore_o, restore_n),
        Result(8, "save, use_compression=False vs zstd", plain_o, zstd_o, note=space),
        Result(8, "restore of it vs of zstd", restore_plain, restore_zstd),
    ]


def case_notebooks(tmp: Path, size: Size) -> list[Result]:
    """Each notebook's wall time under strict nbval."""
    if not size.notebooks:
        return []
    results = []
    total = 0.0
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "--nbval",
                str(notebook),
                "--nbval-sanitize-with",
                str(REPO / "tests" / "nbval_sanitize.cfg"),
                "-p",
                "no:cacheprovider",
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        elapsed = time.perf_counter() - start
        total += elapsed
        results.append(Result(9, f"nbval {notebook.name}", elapsed, None))
    results.append(Result(9, "nbval, all notebooks", total, None))
    return results


def big_run(tmp: Path, size: Size) -> Path:
    """A CheckpointManager root with two steps of the "1 GiB" model: different values."""
    if "big_run" not in _cache:
        import orbax.checkpoint as ocp
        from flax import nnx

        model_cls, names = _big_model(size)
        root = tmp / "big_run"
        with ocp.CheckpointManager(root) as manager:
            for step in (1, 2):
                state = nnx.state(model_cls(names, step))
                manager.save(step, args=ocp.args.StandardSave(state))
                del state
        _cache["big_run"] = root
    return _cache["big_run"]


# Peak RSS is the kernel's high-water mark of this process (VmHWM), read in a fresh process.
_VALUES_RSS_CODE = """
import sys
sys.path.insert(0, {repo!r})
import jax, numpy as np
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
if {ours!r}:
    import nnx_ckpt_widgets as nw
    print("baseline", rss_kib())
    report = nw.stats({path!r}, progress=False, max_memory={budget!r})
    assert len(report) == {arrays!r} and report.ok
else:
    import orbax.checkpoint as ocp
    from benchmarks.cases import Size, _big_model, _abstract_state
    import json
    size = Size(**json.loads({size!r}))
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    restored = ocp.StandardCheckpointer().restore({path!r}, abstract)
    jax.block_until_ready(restored)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]))
"""


def case_stats(tmp: Path, size: Size) -> list[Result]:
    """stats over the 1 GiB checkpoint vs a bare Orbax restore; its peak RSS."""
    import orbax.checkpoint as ocp

    import nnx_ckpt_widgets as nw
    from nnx_ckpt_widgets import _values

    path = big_checkpoint(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    checkpointer = ocp.StandardCheckpointer()
    report = nw.stats(path, progress=False)
    expected = model_cls(names[:1], 0).w00[...]
    first = report["w00"]
    assert first.min == float(expected.min()) and first.max == float(expected.max())
    ours, ref = alternate(
        lambda: nw.stats(path, progress=False),
        lambda: checkpointer.restore(path, abstract),
        size.repeats,
    )
    gib = size.arrays * size.side**2 * 4 / 2**30
    largest = size.side**2 * 4 / 2**20
    size_json = json.dumps(dataclasses.asdict(size))
    limit = 2 * largest + 300
    budget = int(limit * 2**20)
    peaks: dict[bool, list[int]] = {True: [], False: []}
    baselines: list[int] = []
    for i in range(3 if size.repeats > 1 else 1):
        for side in (True, False) if i % 2 == 0 else (False, True):
            code = _VALUES_RSS_CODE.format(
                repo=str(REPO),
                ours=side,
                path=str(path),
                arrays=size.arrays,
                size=size_json,
                budget=budget,
            )
            out = run_python(code).split()
            peaks[side].append(int(out[-1]))
            if side:
                baselines.append(int(out[out.index("baseline") + 1]))
    ours_kib, ref_kib = (sorted(p)[len(p) // 2] for p in (peaks[True], peaks[False]))
    baseline = sorted(baselines)[len(baselines) // 2] / 1024
    above = [(p - b) / 1024 for p, b in zip(peaks[True], baselines, strict=True)]
    above_mib = sorted(above)[len(above) // 2]
    info = nw.inspect(path)
    plan, default = (
        _values.plan_reads(
            list(info.leaves.values()),
            limit,
            what="stats",
            where=str(path),
            location=info.location,
        )
        for limit in (budget, None)
    )
    # The same bytes in arrays a quarter the size, which fit two to a read batch.
    small = dataclasses.replace(size, arrays=size.arrays * 4, side=size.side // 2)
    small_path = big_checkpoint(tmp, small, "big_small_arrays")
    small_cls, small_names = _big_model(small)
    _, small_abstract = _abstract_state(small_cls, small_names)
    assert len(nw.stats(small_path, progress=False)) == small.arrays
    small_ours, small_ref = alternate(
        lambda: nw.stats(small_path, progress=False),
        lambda: checkpointer.restore(small_path, small_abstract),
        size.repeats,
    )
    return [
        Result(
            15,
            f"stats, {gib:.3g} GiB ({size.arrays} arrays), default budget",
            ours,
            ref,
            target=1.3,
            note=f"{default.reads_in_flight} reads in flight "
            f"(budget {default.budget / 2**20:.0f} MiB)",
        ),
        Result(
            15,
            f"the same bytes as {small.arrays} arrays",
            small_ours,
            small_ref,
            note="report: arrays that fit two to a read batch",
        ),
        Result(
            15,
            f"peak RSS above the baseline, stats(max_memory={limit:.0f} MiB)",
            above_mib,
            float(limit),
            "MiB",
            target=1.0,
            note=f"budget = largest array x 2 + 300 MiB; {plan.reads_in_flight} reads in "
            f"flight; baseline at the call {baseline:.0f} MiB",
        ),
        Result(
            15,
            "peak RSS of that stats (VmHWM, fresh process each)",
            ours_kib / 1024,
            ref_kib / 1024,
            "MiB",
            note=f"vs bare restore; budget + baseline = {limit + baseline:.0f} MiB",
        ),
    ]


def case_diff(tmp: Path, size: Size) -> list[Result]:
    """diff of two 1 GiB steps of a manager root vs one bare restore."""
    import orbax.checkpoint as ocp

    import nnx_ckpt_widgets as nw

    root = big_run(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    step_dir = root / "1" / "default"
    checkpointer = ocp.StandardCheckpointer()
    report = nw.diff(root, steps=(1, 2), progress=False)
    assert len(report.changed) == size.arrays and not report.nan_appeared
    ours, ref = alternate(
        lambda: nw.diff(root, steps=(1, 2), progress=False),
        lambda: checkpointer.restore(step_dir, abstract),
        size.repeats,
    )
    gib = size.arrays * size.side**2 * 4 / 2**30
    return [Result(16, f"diff of two {gib:.3g} GiB steps", ours, ref, target=2.6)]


def case_stats_select(tmp: Path, size: Size) -> list[Result]:
    """stats with select on 2 of the 16 arrays vs full stats."""
    import nnx_ckpt_widgets as nw

    path = big_checkpoint(tmp, size)
    assert len(nw.stats(path, select=r"^w0[01]$", progress=False)) == 2
    ours, ref = alternate(
        lambda: nw.stats(path, select=r"^w0[01]$", progress=False),
        lambda: nw.stats(path, progress=False),
        size.repeats,
    )
    return [Result(17, f"stats, select 2 of {size.arrays} arrays", ours, ref, target=0.25)]


_emulator: list = []


def _bucket(tmp: Path) -> str:
    """A bucket on the GCS emulator, whose objects live in the run's temporary folder; started
    once per benchmark run (TensorStore reads the emulator's address once per process) and
    stopped when the run ends."""
    if not _emulator:
        import atexit

        from nnx_ckpt_widgets.emulator import GCSEmulator

        emulator = GCSEmulator(buckets=["bench"], root=tmp / "gcs").start()
        atexit.register(emulator.close)
        _emulator.append(emulator)
    return "gs://bench"


def _traffic(fn) -> tuple[int, int]:
    """Requests and bytes received by one call of ``fn`` (through the emulator's relay)."""
    with _emulator[0].count() as traffic:
        fn()
    return len(traffic.requests), traffic.bytes_received


def _traffic_results(number: int, what: str, ours, reference, ref_name: str) -> list[Result]:
    (our_requests, our_bytes), (ref_requests, ref_bytes) = _traffic(ours), _traffic(reference)
    return [
        Result(
            number,
            f"requests of {what}",
            our_requests,
            ref_requests,
            unit="requests",
            note=f"vs {ref_name}",
        ),
        Result(
            number,
            f"bytes received by {what}",
            our_bytes,
            ref_bytes,
            unit="B",
            note=f"vs {ref_name}",
        ),
    ]


def case_bucket_many(tmp: Path, size: Size) -> list[Result]:
    """inspect of a many-leaf checkpoint in a gs:// bucket vs Orbax metadata() there."""
    import orbax.checkpoint as ocp

    import nnx_ckpt_widgets as nw

    url = f"{_bucket(tmp)}/many"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, _many_leaf_tree(size))
    checkpointer = ocp.StandardCheckpointer()
    assert len(nw.inspect(url)) == size.leaves
    ours, ref = alternate(lambda: nw.inspect(url), lambda: checkpointer.metadata(url), size.repeats)
    what = f"inspect, {size.leaves:,} leaves on gs://"
    return [
        Result(13, f"{what} (vs Orbax metadata())", ours, ref, target=0.2),
        *_traffic_results(
            13, what, lambda: nw.inspect(url), lambda: checkpointer.metadata(url), "metadata()"
        ),
    ]


def case_bucket_big(tmp: Path, size: Size) -> list[Result]:
    """inspect of a 1 GiB checkpoint in a gs:// bucket vs a full restore from there."""
    import orbax.checkpoint as ocp
    from flax import nnx

    import nnx_ckpt_widgets as nw

    url = f"{_bucket(tmp)}/big"
    model_cls, names = _big_model(size)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, nnx.state(model_cls(names, 0)))
    _, abstract = _abstract_state(model_cls, names)
    checkpointer = ocp.StandardCheckpointer()
    info = nw.inspect(url)
    assert len(info) == size.arrays and info.nbytes == size.arrays * size.side**2 * 4
    restored = checkpointer.restore(url, abstract)
    np.testing.assert_array_equal(restored["w00"].get_value(), model_cls(names[:1], 0).w00[...])
    ours, ref = alternate(
        lambda: nw.inspect(url), lambda: checkpointer.restore(url, abstract), size.repeats
    )
    gib = size.arrays * size.side**2 * 4 / 2**30
    what = f"inspect, {gib:.3g} GiB on gs://"
    return [
        Result(14, f"{what} (vs a full restore)", ours, ref, target=0.05),
        *_traffic_results(
            14,
            what,
            lambda: nw.inspect(url),
            lambda: checkpointer.restore(url, abstract),
            "full restore",
        ),
    ]


def hostile_headers(tmp: Path, size: Size) -> tuple[Path, Path]:
    """A safetensors file of :func:`_header_entries` one-element tensors (a header of about
    60 MB at full size) written by the ``safetensors`` package, and a copy whose header
    gains one last entry of the unknown dtype ``Q7``."""
    if "hostile" not in _cache:
        from safetensors.numpy import save_file

        count = _header_entries(size)
        valid = tmp / "many.safetensors"
        save_file({f"h.{i}": np.zeros(1, np.float32) for i in range(count)}, valid)
        raw = valid.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header = raw[8 : 8 + length].rstrip()
        header = header[:-1] + b',"z":{"dtype":"Q7","shape":[0],"data_offsets":[0,0]}}'
        header += b" " * (-len(header) % 8)
        hostile = tmp / "hostile.safetensors"
        hostile.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + length :])
        _cache["hostile"] = valid
        _cache["hostile_q7"] = hostile
    return _cache["hostile"], _cache["hostile_q7"]


def _header_entries(size: Size) -> int:
    return 10**6 if size.leaves >= 10_000 else 2_000


def _header_json(path: Path) -> object:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


# The child's memory growth in KiB over one call: its peak (VmHWM, reset just before through
# /proc/self/clear_refs) less its resident set before the call.
_GROWTH_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy
import nnx_ckpt_widgets as nw
from benchmarks.cases import _header_json
from collections.abc import Callable
from typing import Any
from pathlib import Path

def kib(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = kib("VmRSS")
if {side!r} == "json.loads":
    kept = _header_json(Path({path!r}))
elif {side!r} == "inspect":
    kept = nw.inspect({path!r})
else:
    try:
        nw.inspect({path!r})
    except nw.CorruptCheckpointError:
        pass
    else:
        raise SystemExit("the hostile header was accepted")
print(kib("VmHWM") - before)
"""


def case_hostile_header(tmp: Path, size: Size) -> list[Result]:
    """A hostile safetensors header (10^6 valid entries, then one of dtype Q7) fails, and the
    valid one inspects, against ``json.loads`` of the same bytes: time and memory growth."""
    import gc

    import nnx_ckpt_widgets as nw

    valid, hostile = hostile_headers(tmp, size)
    count = _header_entries(size)
    assert len(nw.inspect(valid)) == count

    def refused() -> None:
        try:
            nw.inspect(hostile)
        except nw.CorruptCheckpointError as err:
            assert "Q7" in str(err)
        else:
            raise AssertionError("the hostile header was accepted")

    def loads_without_gc() -> None:
        gc.disable()
        try:
            _header_json(hostile)
        finally:
            gc.enable()

    repeats = min(size.repeats, 3)
    fail_t, loads_t = alternate(refused, lambda: _header_json(hostile), repeats)
    inspect_t, loads_valid_t = alternate(
        lambda: nw.inspect(valid), lambda: _header_json(valid), repeats
    )
    _, loads_nogc_t = alternate(refused, loads_without_gc, 1, warmup=0)
    growth: dict[str, list[int]] = {"json.loads": [], "inspect": [], "refused": []}
    for i in range(3 if size.repeats > 1 else 1):
        for side in ("json.loads", "refused", "inspect")[:: 1 if i % 2 == 0 else -1]:
            path = hostile if side != "inspect" else valid
            code = _GROWTH_CODE.format(repo=str(REPO), side=side, path=str(path))
            growth[side].append(int(run_python(code).split()[-1]))
    fail_kib, ref_kib, inspect_kib = (
        sorted(growth[k])[len(growth[k]) // 2] for k in ("refused", "json.loads", "inspect")
    )
    mb = hostile.stat().st_size / 1e6
    what = f"{count:,} entries, {mb:.0f} MB"
    return [
        Result(30, f"hostile header refused ({what}) vs json.loads", fail_t, loads_t, target=1.5),
        Result(
            30,
            "hostile header refused: memory growth vs json.loads",
            fail_kib / 1024,
            ref_kib / 1024,
            "MiB",
            2.0,
        ),
        Result(
            30,
            f"valid header inspected ({what}) vs json.loads",
            inspect_t,
            loads_valid_t,
            target=2.0,
        ),
        Result(
            30,
            "valid header inspected: memory growth vs json.loads",
            inspect_kib / 1024,
            ref_kib / 1024,
            "MiB",
        ),
        Result(
            30,
            "json.loads with the garbage collector paused, vs json.loads",
            loads_nogc_t,
            loads_t,
            note="what pausing the collector (as the header reader does) is worth on its own",
        ),
    ]


# --- issue 25: unstack a scanned checkpoint into a per-layer model ---------------------------

LAYER_COUNT = 8
LAYER_NAMES = ("wq", "wk", "wv", "wo")


def _layer_models(size: Size):
    """A scanned model (each of 4 arrays stacked over 8 layers: 1 GiB at full size) and the
    per-layer model of the same weights."""
    from flax import nnx

    rows = size.side // 2

    class Scanned(nnx.Module):
        def __init__(self, seed: int):
            rng = np.random.default_rng(seed)
            for name in LAYER_NAMES:
                shape = (LAYER_COUNT, rows, size.side)
                setattr(self, name, nnx.Param(rng.standard_normal(shape, dtype=np.float32)))

    class Layer(nnx.Module):
        def __init__(self):
            for name in LAYER_NAMES:
                setattr(self, name, nnx.Param(np.zeros((rows, size.side), np.float32)))

    class PerLayer(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([Layer() for _ in range(LAYER_COUNT)])

    return Scanned, PerLayer


def scanned_checkpoint(tmp: Path, size: Size) -> Path:
    if "scanned" not in _cache:
        import orbax.checkpoint as ocp
        from flax import nnx

        scanned_cls, _ = _layer_models(size)
        path = tmp / "scanned"
        # Saved as a per-layer model's stacked twin: layers/wq holds all 8 layers on axis 0.
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, {"layers": nnx.to_pure_dict(nnx.state(scanned_cls(0)))})
        _cache["scanned"] = path
    return _cache["scanned"]


UNSTACK = {r"^layers/(\d+/)": 0}

_LAYERS_RSS_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
import jax, numpy as np
from flax import nnx
import nnx_ckpt_widgets as nw
from benchmarks.cases import Size, _layer_models, UNSTACK
size = Size(**json.loads({size!r}))
scanned_cls, per_layer_cls = _layer_models(size)
if {ours!r}:
    model = nnx.eval_shape(per_layer_cls)
    nw.restore({path!r}, model, unstack=UNSTACK)
    jax.block_until_ready(model.layers[0].wq[...])
else:
    model = nnx.eval_shape(lambda: scanned_cls(1))
    nw.restore({path!r}, model, rename={{"^layers/": ""}})
    jax.block_until_ready(model.wq[...])
{peak}
"""


def case_unstack(tmp: Path, size: Size) -> list[Result]:
    """Unstack an 8-layer scanned checkpoint into a per-layer model vs a plain restore of it."""
    from flax import nnx

    import nnx_ckpt_widgets as nw

    path = scanned_checkpoint(tmp, size)
    scanned_cls, per_layer_cls = _layer_models(size)
    per_layer = per_layer_cls()
    scanned = nnx.eval_shape(lambda: scanned_cls(1))

    def ours():
        nw.restore(path, per_layer, unstack=UNSTACK)

    def plain():
        nw.restore(path, scanned, rename={"^layers/": ""})

    ours_t, plain_t = alternate(ours, plain, size.repeats)
    for i, layer in enumerate(per_layer.layers):  # bit for bit, every layer
        np.testing.assert_array_equal(layer.wq[...], np.asarray(scanned.wq[...])[i])
    size_json = json.dumps(dataclasses.asdict(size))
    peaks: dict[bool, list[int]] = {True: [], False: []}
    for i in range(3 if size.repeats > 1 else 1):
        for side in (True, False) if i % 2 == 0 else (False, True):
            code = _LAYERS_RSS_CODE.format(
                repo=str(REPO), size=size_json, ours=side, path=str(path), peak=PEAK_KIB
            )
            peaks[side].append(int(run_python(code).split()[-1]))
    ours_kib, ref_kib = (sorted(p)[len(p) // 2] for p in (peaks[True], peaks[False]))
    return [
        Result(25, "unstack 8 layers into a per-layer model", ours_t, plain_t, target=1.2),
        Result(
            25, "peak RSS of that unstack (VmHWM)", ours_kib / 1024, ref_kib / 1024, "MiB", 1.15
        ),
    ]


def _layers_model(leaves: int, seed: int):
    """An NNX model of ``leaves // 4`` layers, each 4 small arrays (a kernel, a bias, a scale
    and an int32 counter), as unscanned LLMs and their optimizer states have them."""
    from flax import nnx

    class Layer(nnx.Module):
        def __init__(self, i: int):
            self.kernel = nnx.Param(np.full((4, 4), i, np.float32))
            self.bias = nnx.Param(np.full((4,), i, np.float32))
            self.scale = nnx.Param(np.full((4,), 1.0 + i, np.float32))
            self.count = nnx.BatchStat(np.array([i], np.int32))

    class Layers(nnx.Module):
        def __init__(self, n: int):
            self.layers = nnx.List([Layer(i + seed) for i in range(n)])

    return Layers(leaves // 4)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _layers_saved(tmp: Path, leaves: int):
    """A checkpoint of ``leaves`` leaves (seed 0) and a live model of the same shape (seed 1)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    import nnx_ckpt_widgets as nw

    path = tmp / f"layers_{leaves}"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, nnx.state(_layers_model(leaves, 0)))
    assert len(nw.inspect(path)) == leaves
    return path, _layers_model(leaves, 1)


def _orbax_references(path: Path, leaves: int, like: Any) -> dict[str, float]:
    """Seconds of Orbax's metadata() and of its restore + nnx.update, checked bit for bit."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    checkpointer = ocp.StandardCheckpointer()
    reference = {"metadata": _seconds(lambda: checkpointer.metadata(path))}
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.state(like)
    )
    other = _layers_model(leaves, 2)
    reference["restore"] = _seconds(lambda: nnx.update(other, checkpointer.restore(path, abstract)))
    expected = nnx.state(_layers_model(leaves, 0))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(other), expected)
    return reference


def _fresh_process_state() -> None:
    import ipywidgets

    ipywidgets.Widget.close_all()
    gc.collect()


def case_many_layers(tmp: Path, size: Size) -> list[Result]:
    """inspect, compare, the browser's first view and restore at 10k and 100k leaves (4 small
    arrays a layer): growth against linear, and against Orbax's metadata() and restore."""
    import jax
    from flax import nnx

    import nnx_ckpt_widgets as nw

    small, large = size.layers_leaves
    # Both sizes saved and alive first; then each step's runs alternate the sizes after a
    # warm-up of each, and each figure is the median of 3. Measured one size after the other,
    # a machine that slowed for a few minutes (Orbax's own reference 25% slower) moved the
    # growth by 12-15%; a cold first run against warm ones, by 10-20%. Orbax's sides run once
    # each (minutes each).
    runs = 3 if size.repeats > 1 else 1
    saved = {n: _layers_saved(tmp, n) for n in (small, large)}
    steps = {
        "inspect": lambda path, model: nw.inspect(path),
        "compare": lambda path, model: nw.compare(path, model),
        "browser": lambda path, model: nw.CheckpointBrowser(path),
        "restore": lambda path, model: nw.restore(path, model),
    }
    figures: dict[tuple[str, int], float] = {}
    for name, step in steps.items():
        # Before each run, untimed: the last run's widgets closed (ipywidgets keeps every open
        # widget, so each 100k browser stayed in memory) and its cyclic garbage collected, so a
        # 100k run's leftovers are not paid by the runs after it.
        figures[name, large], figures[name, small] = alternate(
            functools.partial(step, *saved[large]),
            functools.partial(step, *saved[small]),
            runs,
            setup=_fresh_process_state,
        )
    for n, (_, model) in saved.items():
        jax.tree.map(
            np.testing.assert_array_equal,
            nnx.state(model),
            nnx.state(_layers_model(n, 0)),
        )
    reference = _orbax_references(saved[large][0], large, saved[large][1])
    for path, _ in saved.values():
        shutil.rmtree(path)
    results = []
    what = {
        "inspect": "inspect",
        "compare": "compare",
        "browser": "build CheckpointBrowser (first view)",
        "restore": "restore into a live model",
    }
    for name, text in what.items():
        results.append(
            Result(
                20,
                f"{text}, {large:,} vs {small:,} leaves",
                figures[name, large],
                figures[name, small],
                target=12.0,
                note="growth; linear = 10",
            )
        )
    results.append(
        Result(
            20,
            f"inspect, {large:,} leaves (vs Orbax metadata())",
            figures["inspect", large],
            reference["metadata"],
            target=0.1,
        )
    )
    results.append(
        Result(
            20,
            f"restore, {large:,} leaves (vs bare Orbax restore + nnx.update)",
            figures["restore", large],
            reference["restore"],
            target=0.5,
        )
    )
    return results


ALL = [
    (1, case_inspect_big),
    (2, case_restore),
    (4, case_inspect_many),
    (5, case_browser),
    (6, case_rss),
    (7, case_import),
    (8, case_orbax_vs_numpy),
    (9, case_notebooks),
    (10, case_v1_restore_path),
    (11, case_safetensors),
    (12, case_safetensors_rss),
    (13, case_bucket_many),
    (14, case_bucket_big),
    (15, case_stats),
    (16, case_diff),
    (17, case_stats_select),
    (20, case_many_layers),
    (25, case_unstack),
    (30, case_hostile_header),
]


def _fresh(path: Path) -> Path:
    """``path``, after removing what the last run of a side wrote there."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def _clean_slate(*paths: Path) -> Callable[[], None]:
    """Before each timed write: remove the last outputs and flush the page cache's dirty
    pages to disk, so neither side pays for the other's write-back (its timing varied 3x)."""

    def setup() -> None:
        for path in paths:
            _fresh(path)
        os.sync()

    return setup


def case_convert(tmp: Path, size: Size) -> list[Result]:
    """convert of 1 GiB (Orbax -> safetensors, and a live model's export) vs save_file.

    The references: a bare restore plus ``safetensors.numpy.save_file``, which holds the whole
    GiB; ``save_file`` of the live model's flattened state."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    import nnx_ckpt_widgets as nw
    from nnx_ckpt_widgets import _values

    path = big_checkpoint(tmp, size)
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    checkpointer = ocp.StandardCheckpointer()
    ours_dst, ref_dst = tmp / "convert_ours", tmp / "convert_ref.safetensors"

    def ours():
        nw.convert(path, ours_dst, to="safetensors", progress=False)

    def ours_small():  # the budget of case 19
        nw.convert(path, ours_dst, to="safetensors", progress=False, max_memory=CONVERT_BUDGET)

    def reference():
        state = checkpointer.restore(path, abstract)
        save_file({n: np.asarray(state[n][...]) for n in names}, ref_dst)

    slate = _clean_slate(ours_dst, ref_dst)
    ours_t, ref_t = alternate(ours, reference, size.repeats, setup=slate)
    small_t, ref_small_t = alternate(ours_small, reference, size.repeats, setup=slate)
    info = nw.inspect(path)
    reads = {
        budget: _values.plan_reads(
            list(info.leaves.values()), budget, what="convert", where="", location=info.location
        ).reads_in_flight
        for budget in (None, CONVERT_BUDGET)
    }
    expected = np.asarray(model_cls(names[:1], 0).w00[...])
    check = nw.load(ours_dst, lambda: model_cls(names, 1))
    np.testing.assert_array_equal(np.asarray(check.w00[...]), expected)
    del check

    model = model_cls(names, 0)
    live_dst, flat_dst = tmp / "export_ours", tmp / "export_ref.safetensors"

    def export():
        nw.convert(model, live_dst, to="safetensors", progress=False)

    def flat_save():
        save_file({n: np.asarray(getattr(model, n)[...]) for n in names}, flat_dst)

    export_t, flat_t = alternate(
        export, flat_save, size.repeats, setup=_clean_slate(live_dst, flat_dst)
    )
    for dst in (ours_dst, ref_dst, live_dst, flat_dst):
        _fresh(dst)
    gib = size.arrays * size.side**2 * 4 / 2**30
    return [
        Result(
            18,
            f"convert {gib:.3g} GiB Orbax -> safetensors vs bare restore + save_file, default "
            f"max_memory ({reads[None]} reads in flight)",
            ours_t,
            ref_t,
            target=1.2,
        ),
        Result(
            18,
            f"the same convert with max_memory={CONVERT_BUDGET} ({reads[CONVERT_BUDGET]} reads "
            "in flight; its peak RSS is case 19)",
            small_t,
            ref_small_t,
            target=1.2,
        ),
        Result(
            18, "export a live model vs save_file of its flat state", export_t, flat_t, target=1.2
        ),
    ]


_CONVERT_RSS_CODE = """
import json, sys
sys.path.insert(0, {repo!r})
import numpy as np
from benchmarks.cases import Size, _abstract_state, _big_model
size = Size(**json.loads({size!r}))
if {ours!r}:
    import nnx_ckpt_widgets as nw
    nw.convert({path!r}, {dst!r}, to="safetensors", progress=False, max_memory={budget!r})
else:
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file
    model_cls, names = _big_model(size)
    _, abstract = _abstract_state(model_cls, names)
    state = ocp.StandardCheckpointer().restore({path!r}, abstract)
    save_file({{n: np.asarray(state[n][...]) for n in names}}, {dst!r})
{peak}
"""


# The budget that keeps the whole process within the largest array x 2 + 300 MiB (428 MiB) on
# top of its baseline of about 190 MiB: two streamed reads of 64 MiB in flight (each counted
# at 1.1x), one array being written, and the reserve (``_values.ReadPlan.needs(2)``: 237 MiB).
CONVERT_BUDGET = "240MiB"


def case_convert_rss(tmp: Path, size: Size) -> list[Result]:
    """Peak RSS of convert to safetensors vs bare restore + save_file, fresh process each:
    convert at ``max_memory=CONVERT_BUDGET``, and at the default budget."""
    path = big_checkpoint(tmp, size)
    size_json = json.dumps(dataclasses.asdict(size))
    # Each side: (ours, max_memory); the reference ignores the budget.
    sides = [(True, CONVERT_BUDGET), (True, None), (False, None)]
    peaks: dict[tuple[bool, str | None], list[int]] = {side: [] for side in sides}
    for i in range(3 if size.repeats > 1 else 1):
        for ours, budget in sides if i % 2 == 0 else sides[::-1]:
            dst = _fresh(tmp / ("rss_ours" if ours else "rss_ref.safetensors"))
            code = _CONVERT_RSS_CODE.format(
                repo=str(REPO),
                size=size_json,
                ours=ours,
                budget=budget,
                path=str(path),
                dst=str(dst),
                peak=PEAK_KIB,
            )
            peaks[ours, budget].append(int(run_python(code).split()[-1]))
            _fresh(dst)
    small, default, ref = (sorted(p)[len(p) // 2] / 1024 for p in peaks.values())
    largest = size.side**2 * 4 / 2**20
    limit = 2 * largest + 300
    return [
        Result(
            19,
            f"peak RSS of convert to safetensors, max_memory={CONVERT_BUDGET} (VmHWM, fresh "
            "process each)",
            small,
            ref,
            "MiB",
            target=1.0,
            absolute_limit=limit,
            note=f"limit: largest array x 2 + 300 MiB = {limit:.0f} MiB",
        ),
        Result(19, "the same at the default max_memory", default, ref, "MiB"),
    ]


# In number order with the cases above (defined after the list, so added here).
ALL = sorted([*ALL, (18, case_convert), (19, case_convert_rss)], key=lambda case: case[0])
