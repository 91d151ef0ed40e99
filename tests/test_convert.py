"""``convert``: weights out to safetensors (checked against the ``safetensors`` library, bit for
bit) and to Orbax v0/v1; round trips, the plan, and the faults (full disk, a kill, dst exists,
select matching nothing, a raising transform), each with an untouched source."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from conftest import MLP, REPO, assert_same_arrays, make_bnnet, make_mlp, run_cli, save_checkpoint
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file as save_flax

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets.__main__ import main
from nnx_ckpt_widgets.convert import parse_size


class Dtypes(nnx.Module):
    """One Param of every dtype a Hub file holds, plus a 0-d and an empty array."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.f32 = nnx.Param(jnp.asarray(rng.standard_normal((3, 5)), jnp.float32))
        self.bf16 = nnx.Param(jnp.asarray(rng.standard_normal((4, 2)), jnp.bfloat16))
        self.f16 = nnx.Param(jnp.asarray(rng.standard_normal(7), jnp.float16))
        self.fp8 = nnx.Param(jnp.asarray(rng.standard_normal((2, 3)), jnp.float8_e4m3fn))
        self.fp8b = nnx.Param(jnp.asarray(rng.standard_normal(5), jnp.float8_e5m2))
        self.i64 = nnx.Param(np.arange(-3, 3, dtype=np.int64) * 2**40)  # NumPy: no x64 narrowing
        self.i8 = nnx.Param(jnp.arange(-4, 4, dtype=jnp.int8))
        self.u8 = nnx.Param(jnp.arange(6, dtype=jnp.uint8))
        self.flag = nnx.Param(jnp.asarray([True, False, True]))
        self.scalar = nnx.Param(jnp.asarray(2.5, jnp.float32))
        self.empty = nnx.Param(jnp.zeros((0, 4), jnp.float32))
        # NaN payloads and -0.0: equal values are not enough, the bits must match.
        self.odd = nnx.Param(jnp.asarray(np.array([np.nan, -0.0, np.inf], np.float32)))


def tree_hash(path: Path) -> str:
    """One hash of every file under ``path`` (names and bytes): the source must not change."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def library_tensors(file: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes), as the ``safetensors`` library parses the file."""
    with safe_open(str(file), framework="numpy") as opened:  # validates header and offsets
        names = list(opened.keys())
    parsed = dict(safetensors.deserialize(file.read_bytes()))
    assert sorted(parsed) == sorted(names)
    return {
        name: (entry["dtype"], tuple(entry["shape"]), bytes(entry["data"]))
        for name, entry in parsed.items()
    }


def host(value) -> np.ndarray:
    return np.asarray(value.get_value() if isinstance(value, nnx.Variable) else value)


def no_leftovers(folder: Path) -> list[str]:
    """Temporary folders of convert left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".converting")]


# --- the safetensors writer against the library ----------------------------------------------


def test_every_dtype_reads_back_bit_for_bit_with_the_library(tmp_path):
    model = Dtypes()
    plan = ncw.convert(model, tmp_path / "out", to="safetensors", progress=False)
    file = tmp_path / "out" / "model.safetensors"
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    got = library_tensors(file)
    codes = {
        "float32": "F32",
        "bfloat16": "BF16",
        "float16": "F16",
        "float8_e4m3fn": "F8_E4M3",
        "float8_e5m2": "F8_E5M2",
        "int64": "I64",
        "int8": "I8",
        "uint8": "U8",
        "bool": "BOOL",
    }
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        array = np.array(host(variable), order="C")
        expected[".".join(map(str, path))] = (
            codes[array.dtype.name],
            array.shape,
            array.tobytes(),
        )
    assert got == expected
    assert [k.key for k in plan.keys] == list(expected)  # written in the plan's order
    with safe_open(str(file), framework="numpy") as opened:
        assert opened.metadata() == {"format": "pt"}
    # The library's flax reader gives the same arrays (its fp8 reader is broken in 0.8).
    with safe_open(str(file), framework="flax") as opened:
        for name in ("f32", "bf16", "f16", "i8", "u8", "flag", "scalar", "empty", "odd"):
            tensor = np.asarray(opened.get_tensor(name))
            assert tensor.dtype == np.asarray(host(getattr(model, name))).dtype, name
            assert tensor.tobytes() == expected[name][2], name


def test_file_matches_what_the_library_writes(tmp_path):
    """Same tensors as ``safetensors.flax.save_file`` writes: names, dtypes, shapes, bytes."""
    model = Dtypes()
    flat = {
        ".".join(map(str, p)): jnp.asarray(host(v))
        for p, v in nnx.to_flat_state(nnx.state(model))
        if host(v).dtype != np.int64  # the library's flax writer narrows without x64
    }
    save_flax(flat, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    ncw.convert(model, tmp_path / "ours.safetensors", select=r"^(?!i64)", progress=False)
    ours = library_tensors(tmp_path / "ours.safetensors")
    theirs = library_tensors(tmp_path / "lib.safetensors")
    assert ours == theirs
    # The header is padded with spaces to 8 bytes, as the library pads it.
    raw = (tmp_path / "ours.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0 and raw[8 : 8 + length].decode().endswith(("}", " "))
    assert json.loads(raw[8 : 8 + length])["__metadata__"] == {"format": "pt"}


def test_shards_index_and_names_as_the_hub_expects(tmp_path, mlp_state_ckpt):
    before = tree_hash(mlp_state_ckpt)
    plan = ncw.convert(
        mlp_state_ckpt,
        tmp_path / "hub",
        to="safetensors",
        max_shard_size=40,
        metadata={"format": "pt", "note": "<b>x</b>"},
        progress=False,
    )
    folder = tmp_path / "hub"
    names = sorted(os.listdir(folder))
    assert names == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
        "model.safetensors.index.json",
    ]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 104} == {"total_size": plan.total_size}
    assert index["weight_map"] == {
        "linear1.bias": "model-00001-of-00003.safetensors",
        "linear1.kernel": "model-00002-of-00003.safetensors",  # 48 B > 40: a file of its own
        "linear2.bias": "model-00003-of-00003.safetensors",
        "linear2.kernel": "model-00003-of-00003.safetensors",
    }
    reference = ncw.inspect(mlp_state_ckpt)
    for file in names[:-1]:
        with safe_open(str(folder / file), framework="numpy") as opened:
            assert opened.metadata() == {"format": "pt", "note": "<b>x</b>"}
            for name in opened.keys():  # noqa: SIM118 (safe_open is no dict)
                leaf = reference.leaves[tuple(name.split("."))]
                assert opened.get_slice(name).get_shape() == list(leaf.shape)
    # The package reads the shards back as one checkpoint, and the source never changed.
    assert ncw.inspect(folder).layout == "safetensors (3 shards)"
    assert tree_hash(mlp_state_ckpt) == before
    assert "<b>" not in plan._repr_html_()


def test_one_file_when_it_fits_and_size_strings(tmp_path, mlp_state_ckpt):
    ncw.convert(mlp_state_ckpt, tmp_path / "one", to="safetensors", progress=False)
    assert os.listdir(tmp_path / "one") == ["model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    for bad in ("5 parsecs", "-1", 0, True):
        with pytest.raises(ncw.InvalidArgumentError, match="max_shard_size"):
            parse_size(bad)


# --- the plan -----------------------------------------------------------------------------


def test_dry_run_is_the_plan_and_writes_nothing(tmp_path, mlp_state_ckpt):
    plan = ncw.convert(
        mlp_state_ckpt,
        tmp_path / "out",
        to="safetensors",
        max_shard_size=40,
        cast="bfloat16",
        dry_run=True,
    )
    assert not plan.written
    assert list(tmp_path.iterdir()) == []
    assert plan.files == {
        "model-00001-of-00002.safetensors": ("linear1.bias", "linear1.kernel", "linear2.bias"),
        "model-00002-of-00002.safetensors": ("linear2.kernel",),  # 36 + 16 B > 40
    }
    assert [(k.key, k.dtype, k.nbytes, k.cast) for k in plan.keys] == [
        ("linear1.bias", "bfloat16", 8, True),
        ("linear1.kernel", "bfloat16", 24, True),
        ("linear2.bias", "bfloat16", 4, True),
        ("linear2.kernel", "bfloat16", 16, True),
    ]
    assert plan.other_files == ("model.safetensors.index.json",)
    assert plan.summary() == (
        f"Will write 4 arrays (52 B) in 2 safetensors files to {tmp_path / 'out'} (4 cast)."
    )
    # The real run writes exactly what the plan said.
    done = ncw.convert(
        mlp_state_ckpt,
        tmp_path / "out",
        to="safetensors",
        max_shard_size=40,
        cast="bfloat16",
        progress=False,
    )
    assert done.written and done.as_dict()["keys"] == plan.as_dict()["keys"]
    for file, names in plan.files.items():
        tensors = library_tensors(tmp_path / "out" / file)
        assert list(tensors) == list(names) or sorted(tensors) == sorted(names)
        assert {t[0] for t in tensors.values()} == {"BF16"}


def test_cast_touches_floats_only(tmp_path):
    model = Dtypes()
    ncw.convert(model, tmp_path / "c.safetensors", cast="bfloat16", progress=False)
    got = library_tensors(tmp_path / "c.safetensors")
    assert got["i64"][0] == "I64" and got["flag"][0] == "BOOL" and got["u8"][0] == "U8"
    assert got["f32"][0] == got["fp8"][0] == got["f16"][0] == "BF16"
    f32 = np.asarray(model.f32.get_value()).astype(ml_dtypes.bfloat16)
    assert got["f32"][2] == f32.tobytes()
    with pytest.raises(ncw.InvalidArgumentError, match="float dtype"):
        ncw.convert(model, tmp_path / "x.safetensors", cast="int8", dry_run=True)


def test_hf_names_and_pytorch_layout_with_rename_and_transform(tmp_path):
    model = make_mlp(3)
    ncw.convert(
        model,
        tmp_path / "hf",
        to="safetensors",
        rename={
            r"^linear(\d)/kernel$": r"model/fc\1/weight",
            r"^linear(\d)/bias$": r"model/fc\1/bias",
        },
        transform={r"weight$": lambda w: w.T},
        progress=False,
    )
    got = library_tensors(tmp_path / "hf" / "model.safetensors")
    assert sorted(got) == [
        "model.fc1.bias",
        "model.fc1.weight",
        "model.fc2.bias",
        "model.fc2.weight",
    ]
    kernel = np.asarray(model.linear1.kernel.get_value())
    assert got["model.fc1.weight"][1] == kernel.T.shape
    assert got["model.fc1.weight"][2] == np.ascontiguousarray(kernel.T).tobytes()
    # ...and back with the inverse tables: bit for bit.
    back = ncw.load(
        tmp_path / "hf",
        lambda: make_mlp(9),
        rename={
            r"^model/fc(\d)/weight$": r"linear\1/kernel",
            r"^model/fc(\d)/bias$": r"linear\1/bias",
        },
        transform={r"kernel$": lambda w: w.T},
    )
    assert_same_arrays(model, back)


# --- refusals -----------------------------------------------------------------------------


def test_prng_keys_refused_by_name_unless_select_leaves_them_out(tmp_path):
    model = make_bnnet(0)
    with pytest.raises(ncw.InvalidArgumentError, match=r"PRNG key.*rngs.*select="):
        ncw.convert(model, tmp_path / "k", to="safetensors")
    assert not (tmp_path / "k").exists()
    plan = ncw.convert(
        model, tmp_path / "k", to="safetensors", select=r"^(?!.*rngs)", progress=False
    )
    assert plan.skipped > 0
    assert sorted(library_tensors(tmp_path / "k" / "model.safetensors")) == sorted(
        k.key for k in plan.keys
    )


@pytest.mark.parametrize("fmt", ["orbax", "orbax-v1"])
def test_prng_keys_go_to_orbax_as_keys(tmp_path, fmt):
    """Orbax saves typed keys: a model with nnx.Rngs and a Dropout's keys converts whole, from a
    live model and from a checkpoint, and restores bit for bit, key implementations included."""
    model = make_bnnet(3)
    ncw.convert(model, tmp_path / "live", to=fmt, progress=False)
    save_checkpoint(tmp_path / "v0", nnx.state(model))
    ncw.convert(tmp_path / "v0", tmp_path / "from_ckpt", to=fmt, progress=False)
    for out in ("live", "from_ckpt"):
        info = ncw.inspect(tmp_path / out)
        assert info.leaves[("rngs", "default", "key")].key_impl == "threefry2x32"
        target = make_bnnet(0)
        ncw.restore(tmp_path / out, target)
        assert_same_arrays(model, target)
        assert jax.random.key_impl(target.rngs.default.key.get_value()) == jax.random.key_impl(
            model.rngs.default.key.get_value()
        )


def test_non_array_leaves_refused_by_name(tmp_path):
    model = make_mlp(0)
    model.note = nnx.Variable("trained on <data>")
    with pytest.raises(ncw.InvalidArgumentError, match=r"non-array leaf \(note\)"):
        ncw.convert(model, tmp_path / "n", to="orbax")
    ncw.convert(model, tmp_path / "n", to="orbax", select="linear", progress=False)
    assert len(ncw.inspect(tmp_path / "n").leaves) == 4


def test_dst_exists_refused_unless_overwrite(tmp_path, mlp_state_ckpt):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(ncw.InvalidArgumentError, match="exists; pass overwrite=True"):
        ncw.convert(mlp_state_ckpt, dst, to="safetensors")
    assert os.listdir(dst) == ["keep.txt"]
    ncw.convert(mlp_state_ckpt, dst, to="safetensors", overwrite=True, progress=False)
    assert os.listdir(dst) == ["model.safetensors"]
    assert no_leftovers(tmp_path) == []


def test_dst_overlapping_src_refused_even_with_overwrite(tmp_path, mlp_state_ckpt):
    src = tmp_path / "src"
    save_checkpoint(src, nnx.state(make_mlp(0)))
    before = tree_hash(src)
    for dst in (src, src / "inside", tmp_path):
        with pytest.raises(ncw.InvalidArgumentError, match="overlaps the source"):
            ncw.convert(src, dst, to="orbax", overwrite=True)
    assert tree_hash(src) == before


def test_select_matching_nothing(tmp_path, mlp_state_ckpt):
    with pytest.raises(ncw.InvalidArgumentError, match="matches none of the 4 arrays"):
        ncw.convert(mlp_state_ckpt, tmp_path / "o", to="safetensors", select="nothing$")
    assert list(tmp_path.iterdir()) == []


def test_transform_raising_leaves_nothing(tmp_path, mlp_state_ckpt):
    before = tree_hash(mlp_state_ckpt)

    def breaks_on_values(w):
        if isinstance(w, np.ndarray):  # fine on shapes, raises on the real array
            raise RuntimeError("bad weights")
        return w

    with pytest.raises(ncw.TransformError, match=r"linear2/kernel.*bad weights"):
        ncw.convert(
            mlp_state_ckpt,
            tmp_path / "o",
            to="safetensors",
            transform={"linear2/kernel": breaks_on_values},
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []  # no dst, no temporary folder
    assert tree_hash(mlp_state_ckpt) == before
    with pytest.raises(ncw.TransformError, match="failed"):
        ncw.convert(
            mlp_state_ckpt, tmp_path / "o", to="orbax", transform={"kernel": lambda w: w.reshape(7)}
        )


def test_format_and_destination_arguments(tmp_path, mlp_state_ckpt):
    with pytest.raises(ncw.InvalidArgumentError, match="pass to= one of"):
        ncw.convert(mlp_state_ckpt, tmp_path / "o", dry_run=True)
    with pytest.raises(ncw.InvalidArgumentError, match="to must be one of"):
        ncw.convert(mlp_state_ckpt, tmp_path / "o", to="pickle", dry_run=True)
    with pytest.raises(ncw.InvalidArgumentError, match="local folders and gs:// buckets only"):
        ncw.convert(mlp_state_ckpt, "s3://bucket/o", to="orbax", dry_run=True)
    with pytest.raises(ncw.InvalidArgumentError, match="strings only"):
        ncw.convert(mlp_state_ckpt, tmp_path / "o", to="safetensors", metadata={"n": 1})


def test_extra_files_copied_beside(tmp_path, mlp_state_ckpt):
    config = tmp_path / "config.json"
    config.write_text('{"model_type": "mlp"}')
    plan = ncw.convert(
        mlp_state_ckpt, tmp_path / "o", to="safetensors", extra_files=[config], progress=False
    )
    assert plan.other_files == ("config.json",)
    assert (tmp_path / "o" / "config.json").read_text() == '{"model_type": "mlp"}'
    assert ncw.inspect(tmp_path / "o").config == {"model_type": "mlp"}


# --- round trips, bit for bit ---------------------------------------------------------------


def test_orbax_v0_to_safetensors_to_nnx(tmp_path):
    model = MLP(rngs=nnx.Rngs(5), dtype=jnp.bfloat16)
    src = save_checkpoint(tmp_path / "v0", nnx.state(model))
    ncw.convert(src, tmp_path / "st", to="safetensors", progress=False)
    target = MLP(rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    ncw.restore(tmp_path / "st", target)
    assert_same_arrays(model, target)


def test_orbax_v1_to_v0_and_v0_to_v1(tmp_path):
    model = make_mlp(7)
    ocp.v1.save(tmp_path / "v1", nnx.state(model))
    before = tree_hash(tmp_path / "v1")
    ncw.convert(tmp_path / "v1", tmp_path / "v0", to="orbax", progress=False)
    info = ncw.inspect(tmp_path / "v0")
    assert info.layout.startswith("Orbax v0") and info.format == "nnx.State"
    # Orbax itself restores it, as a saved nnx.State.
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(tmp_path / "v0")
    np.testing.assert_array_equal(
        raw["linear1"]["kernel"]["value"], model.linear1.kernel.get_value()
    )
    target = make_mlp(0)
    ncw.restore(tmp_path / "v0", target)
    assert_same_arrays(model, target)
    ncw.convert(tmp_path / "v0", tmp_path / "v1b", to="orbax-v1", progress=False)
    assert ncw.inspect(tmp_path / "v1b").layout.startswith("Orbax v1")
    again = make_mlp(1)
    ncw.restore(tmp_path / "v1b", again)
    assert_same_arrays(model, again)
    assert tree_hash(tmp_path / "v1") == before


@pytest.mark.parametrize("fmt", ["orbax", "orbax-v1"])
def test_every_dtype_through_orbax_and_out_again(tmp_path, fmt):
    """Live -> Orbax -> safetensors gives the bytes of live -> safetensors: bf16, fp8, int64
    (kept as NumPy where JAX would narrow it), bool and 0-d arrays included."""
    model = Dtypes()
    with pytest.raises(ncw.InvalidArgumentError, match=r"'empty' of <Dtypes> has no elements"):
        ncw.convert(model, tmp_path / "orbax", to=fmt, dry_run=True)
    keep = r"^(?!empty)"  # Orbax cannot save an empty array
    ncw.convert(model, tmp_path / "direct.safetensors", select=keep, progress=False)
    ncw.convert(model, tmp_path / "orbax", to=fmt, select=keep, progress=False)
    info = ncw.inspect(tmp_path / "orbax")
    assert info.format == "nnx.State" and info.leaves[("i64",)].dtype == "int64"
    ncw.convert(tmp_path / "orbax", tmp_path / "again.safetensors", progress=False)
    assert library_tensors(tmp_path / "again.safetensors") == library_tensors(
        tmp_path / "direct.safetensors"
    )


def test_legacy_flax_msgpack_run_to_orbax_and_safetensors(tmp_path):
    """A run written by flax.training.checkpoints without Orbax (msgpack files), step 20 of it,
    to Orbax and to safetensors: the same arrays, bit for bit (bf16 included)."""
    import warnings

    import flax
    from flax.training import checkpoints

    rng = np.random.default_rng(0)
    trees = {
        step: {
            "linear1": {"kernel": rng.standard_normal((3, 4)).astype(np.float32)},
            "linear2": {"kernel": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16)},
        }
        for step in (10, 20)
    }
    root = tmp_path / "run"
    with flax.config.temp_flip_flag("use_orbax_checkpointing", False), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # flax's notice about this writer
        for step, tree in trees.items():
            checkpoints.save_checkpoint(root, tree, step, keep=5)
    before = tree_hash(root)
    ncw.convert(root, tmp_path / "orbax", to="orbax", step=20, progress=False)
    ncw.convert(root, tmp_path / "st", to="safetensors", step=20, progress=False)
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "orbax")
    got = library_tensors(tmp_path / "st" / "model.safetensors")
    for layer in ("linear1", "linear2"):
        want = trees[20][layer]["kernel"]
        array = np.asarray(restored[layer]["kernel"])
        assert array.dtype == want.dtype and array.tobytes() == want.tobytes()
        assert got[f"{layer}.kernel"][2] == want.tobytes()
    assert tree_hash(root) == before


def test_live_model_to_safetensors_to_load(tmp_path):
    model = make_mlp(11)
    ncw.convert(model, tmp_path / "m.safetensors", progress=False)
    loaded = ncw.load(tmp_path / "m.safetensors", lambda: make_mlp(0))
    assert_same_arrays(model, loaded)
    state = nnx.state(make_mlp(12))
    ncw.convert(state, tmp_path / "s", to="orbax", progress=False)
    target = make_mlp(0)
    ncw.restore(tmp_path / "s", target)
    assert_same_arrays(state, nnx.state(target))


def test_progress_reports_every_byte(tmp_path, mlp_state_ckpt):
    calls: list[tuple[int, int]] = []
    ncw.convert(
        mlp_state_ckpt, tmp_path / "o", to="safetensors", progress=lambda d, t: calls.append((d, t))
    )
    assert calls[0] == (0, 104) and calls[-1] == (104, 104)


# --- faults: full disk, a kill ---------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import numpy as np
    from flax import nnx
    import nnx_ckpt_widgets as ncw

    src, dst, fmt, mode = sys.argv[1:5]
    if mode == "full":
        # A disk that fills up: writes past 64 KiB fail with EFBIG instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        progress = False
    else:
        import nnx_ckpt_widgets._values
        nnx_ckpt_widgets._values.BATCH_BYTES = 1 << 16  # one array per batch

        def progress(done, total):
            if 0 < done < total:  # part of the output is written: killed like a preemption
                os.kill(os.getpid(), signal.SIGKILL)
    try:
        ncw.convert(src, dst, to=fmt, progress=progress)
    except ncw.CheckpointError as err:
        print(type(err).__name__, err)
        sys.exit(1)
    """
)


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory) -> Path:
    """Four 64 KiB arrays of noise (Orbax compresses), bigger than the child's file limit."""
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((128, 128), np.float32) for i in range(4)}
    return save_checkpoint(tmp_path_factory.mktemp("wide") / "ckpt", state)


def run_child(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("fmt", ["safetensors", "orbax"])
def test_full_disk_is_a_storage_error_and_leaves_nothing(tmp_path, wide_ckpt, fmt):
    before = tree_hash(wide_ckpt)
    out = tmp_path / "out"
    done = run_child(str(wide_ckpt), str(out), fmt, "full")
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("StorageError") and "free some space" in last, last
    assert str(out) in last
    assert not out.exists() and no_leftovers(tmp_path) == []
    assert tree_hash(wide_ckpt) == before


def test_killed_convert_leaves_nothing_a_reader_accepts(tmp_path, wide_ckpt):
    before = tree_hash(wide_ckpt)
    out = tmp_path / "out"
    done = run_child(str(wide_ckpt), str(out), "safetensors", "kill")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not out.exists()
    with pytest.raises(ncw.CheckpointNotFoundError):
        ncw.inspect(out)
    assert tree_hash(wide_ckpt) == before
    # What the killed process left is a hidden temporary folder; any file in it is refused.
    partial = [f for d in no_leftovers(tmp_path) for f in (tmp_path / d).rglob("*.safetensors")]
    for file in partial:
        with pytest.raises(SafetensorError, match=r"(?i)incomplete|too small"):
            safe_open(str(file), framework="numpy")
    # A new convert to the same destination is not blocked by it.
    ncw.convert(wide_ckpt, out, to="safetensors", progress=False)
    assert sorted(library_tensors(out / "model.safetensors")) == ["w0", "w1", "w2", "w3"]


# --- command line ---------------------------------------------------------------------------


def test_cli_convert_dry_run_and_write(tmp_path, mlp_state_ckpt, capsys):
    out = tmp_path / "out"
    assert (
        main(
            ["convert", str(mlp_state_ckpt), str(out), "--to", "safetensors", "--dry-run", "--json"]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["written"] is False and plan["total_size"] == 104 and not out.exists()
    # A budget too small to read the largest array: refused by name, nothing written.
    too_small = ["convert", str(mlp_state_ckpt), str(out), "--to", "safetensors"]
    assert main([*too_small, "--max-memory", "1MiB"]) == 1
    assert "max_memory=1.0 MiB is too small for convert" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(
            [
                "convert",
                str(mlp_state_ckpt),
                str(out),
                "--to",
                "safetensors",
                "--cast",
                "bfloat16",
                "--select",
                "linear1",
                "--max-shard-size",
                "10B",
                "--no-progress",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith(
        f"Wrote 2 arrays (32 B) in 2 safetensors files to {out} (2 cast, 2 not selected)."
    )
    assert sorted(os.listdir(out))[-1] == "model.safetensors.index.json"
    done = run_cli("convert", str(mlp_state_ckpt), str(out), "--to", "orbax")
    assert (
        done.returncode == 1
        and done.stderr.startswith("error: dst")
        and "Traceback" not in done.stderr
    )
