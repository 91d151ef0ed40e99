"""Hugging Face safetensors through every entry point, on files the ``safetensors`` library
writes: one file, shards with their index, every dtype JAX has, hostile headers, and
``transform=`` for PyTorch layouts."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import assert_refused_cheaply, assert_same_arrays, run_cli, snapshot
from flax import nnx
from safetensors.flax import save_file as save_flax
from safetensors.numpy import save_file

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets.__main__ import main

HIDDEN, VOCAB, LAYERS = 8, 16, 3


class TinyLM(nnx.Module):
    """NNX names for a Llama-like stack: embedding, per-layer projections, a head."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, HIDDEN, rngs=rngs)
        self.layers = nnx.List(
            [nnx.Linear(HIDDEN, 2 * HIDDEN, use_bias=False, rngs=rngs) for _ in range(LAYERS)]
        )
        self.head = nnx.Linear(HIDDEN, VOCAB, use_bias=False, rngs=rngs)


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights in Hugging Face names and PyTorch layouts ([out, in])."""
    rng = np.random.default_rng(seed)
    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), np.float32)}
    for i in range(LAYERS):
        weights[f"model.layers.{i}.mlp.up_proj.weight"] = rng.standard_normal(
            (2 * HIDDEN, HIDDEN), np.float32
        )
    weights["lm_head.weight"] = rng.standard_normal((VOCAB, HIDDEN), np.float32)
    return weights


RENAME = {
    r"^model/embed_tokens/weight$": "embed/embedding",
    r"^model/layers/(\d+)/mlp/up_proj/weight$": r"layers/\1/kernel",
    r"^lm_head/weight$": "head/kernel",
}
TRANSPOSE = {r"(layers/\d+|head)/kernel$": lambda w: w.T}


def save_sharded(folder: Path, weights: dict[str, np.ndarray], shards: int = 2) -> Path:
    """Shards plus ``model.safetensors.index.json``, as ``save_pretrained`` writes them."""
    folder.mkdir()
    names = list(weights)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[k::shards]}
        save_file(part, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(w.nbytes for w in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    return folder


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(hf_weights(), path, metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    return save_sharded(tmp_path_factory.mktemp("st") / "llama", hf_weights())


def _expected(weights: dict[str, np.ndarray]) -> dict[tuple, tuple[np.ndarray, str]]:
    out = {("embed", "embedding"): weights["model.embed_tokens.weight"]}
    for i in range(LAYERS):
        out[("layers", i, "kernel")] = weights[f"model.layers.{i}.mlp.up_proj.weight"].T
    out[("head", "kernel")] = weights["lm_head.weight"].T
    return {path: (array, "float32") for path, array in out.items()}


def test_inspect_reads_names_as_key_paths_and_shows_metadata(single, sharded):
    for path, layout in ((single, "safetensors"), (sharded, "safetensors (2 shards)")):
        info = ncw.inspect(path)
        assert info.layout == layout and info.format == "pure dict"
        assert ("model", "layers", "0", "mlp", "up_proj", "weight") in info.leaves
        assert info.leaves[("lm_head", "weight")].shape == (VOCAB, HIDDEN)
        assert info.custom_metadata == {"format": "pt"}
        text = str(info)
        assert "model/layers/{0..2}/mlp/up_proj/weight" in text and "3 × (16, 8)" in text
        assert 'custom metadata: format="pt"' in text
    assert ncw.inspect(sharded).config == {"model_type": "llama", "hidden_size": 8}
    assert 'config.json: hidden_size=8, model_type="llama"' in str(ncw.inspect(sharded))
    assert ncw.inspect(single.parent).leaves == ncw.inspect(single).leaves  # folder of one


def test_inspect_reads_headers_only(tmp_path, single):
    """Data bytes replaced by garbage: inspect and compare still answer, restore refuses."""
    path = tmp_path / "model.safetensors"
    raw = bytearray(single.read_bytes())
    length = struct.unpack("<Q", raw[:8])[0]
    raw[8 + length :] = np.random.default_rng(0).bytes(len(raw) - 8 - length)
    path.write_bytes(bytes(raw))
    assert ncw.inspect(path).leaves == ncw.inspect(single).leaves
    assert ncw.compare(path, TinyLM(nnx.Rngs(0)), rename=RENAME, transform=TRANSPOSE).ok


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_transform_report_then_exact_restore_and_load(which, request):
    path = request.getfixturevalue(which)
    model = TinyLM(nnx.Rngs(0))
    plain = ncw.compare(path, model, rename=RENAME)
    assert set(plain.shape_mismatched) == {
        "layers/0/kernel",
        "layers/1/kernel",
        "layers/2/kernel",
        "head/kernel",
    }
    report = ncw.compare(path, model, rename=RENAME, transform=TRANSPOSE)
    assert report.ok, str(report)
    marked = {e.path for e in report.entries if e.transformed}
    assert marked == {"layers/0/kernel", "layers/1/kernel", "layers/2/kernel", "head/kernel"}
    assert "transformed from (16, 8) float32" in str(report) and "4 transformed" in str(report)
    result = ncw.restore(path, model, rename=RENAME, transform=TRANSPOSE)
    assert result.action_counts["restored"] == 5
    assert_same_arrays(_expected(hf_weights()), model)
    loaded = ncw.load(path, lambda: TinyLM(nnx.Rngs(1)), rename=RENAME, transform=TRANSPOSE)
    assert_same_arrays(_expected(hf_weights()), loaded)


def test_transform_errors_leave_the_model_alone(single):
    model = TinyLM(nnx.Rngs(0))
    before = snapshot(model)
    with pytest.raises(ncw.InvalidArgumentError, match=r"transform pattern '\(' is not"):
        ncw.compare(single, model, rename=RENAME, transform={"(": lambda w: w})
    with pytest.raises(
        ncw.InvalidArgumentError,
        match=r"transform of 'head/kernel' on a float32\(16, 8\) array failed",
    ):
        ncw.compare(single, model, rename=RENAME, transform={"head": lambda w: w.reshape(7)})

    def only_abstract(w):  # fine under jax.eval_shape, fails on real data
        if not isinstance(w, jax.core.Tracer):
            raise RuntimeError("boom")
        return w.T

    transform = {r"layers/\d+/kernel$": lambda w: w.T, r"^head/kernel$": only_abstract}
    assert ncw.compare(single, model, rename=RENAME, transform=transform).ok
    with pytest.raises(
        ncw.InvalidArgumentError,
        match=r"transform of 'head/kernel' from .* failed \(RuntimeError boom\)",
    ) as raised:
        ncw.restore(single, model, rename=RENAME, transform=transform)
    assert str(single) in str(raised.value) and "head/kernel" in str(raised.value)
    assert_same_arrays(before, model)
    # A dtype change by transform is a cast: reported, and allowed only with cast=True.
    halve = {**TRANSPOSE, r"^embed/": lambda w: w.astype(jnp.bfloat16)}
    report = ncw.compare(single, model, rename=RENAME, transform=halve)
    assert report.dtype_mismatched == ["embed/embedding"]
    with pytest.raises(ncw.CheckpointMismatchError):
        ncw.restore(single, model, rename=RENAME, transform=halve)
    assert_same_arrays(before, model)
    ncw.restore(single, model, rename=RENAME, transform=halve, cast=True)
    embed = hf_weights()["model.embed_tokens.weight"]
    expected = embed.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), expected)


class Holder(nnx.Module):
    def __init__(self, arrays: dict[str, np.ndarray]):
        for name, array in arrays.items():
            setattr(self, name, nnx.Param(jnp.zeros(array.shape, array.dtype)))


DTYPE_VALUES = {
    "BOOL": np.array([True, False, True]),
    "U8": np.arange(4, dtype=np.uint8),
    "I8": np.arange(-2, 2, dtype=np.int8),
    "U16": np.arange(4, dtype=np.uint16),
    "I16": np.arange(-2, 2, dtype=np.int16),
    "F16": np.linspace(-1, 1, 4).astype(np.float16),
    "BF16": np.linspace(-1, 1, 4).astype(ml_dtypes.bfloat16),
    "U32": np.arange(4, dtype=np.uint32),
    "I32": np.arange(-2, 2, dtype=np.int32),
    "F32": np.linspace(-1, 1, 4).astype(np.float32),
    "U64": np.arange(4, dtype=np.uint64),
    "I64": np.arange(-2, 2, dtype=np.int64),
    "F64": np.linspace(-1, 1, 4),
    "F8_E4M3": np.linspace(-1, 1, 4).astype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.linspace(-1, 1, 4).astype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.array([0.25, 1, 2, 8]).astype(ml_dtypes.float8_e8m0fnu),
}


WIDE = ("U64", "I64", "F64")  # JAX holds these only with jax_enable_x64


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])


def test_every_dtype_round_trips_bit_for_bit(tmp_path):
    arrays = {f"t_{code.lower()}": v for code, v in DTYPE_VALUES.items() if code not in WIDE}
    path = tmp_path / "dtypes.safetensors"
    save_flax({name: jnp.asarray(value) for name, value in arrays.items()}, path)
    assert {v["dtype"] for v in _header(path).values()} == set(DTYPE_VALUES) - set(WIDE)
    info = ncw.inspect(path)
    assert {leaf.name: leaf.dtype for leaf in info} == {
        name: np.dtype(value.dtype).name for name, value in arrays.items()
    }
    model = Holder(arrays)
    ncw.restore(path, model)
    for name, value in arrays.items():
        got = np.asarray(getattr(model, name)[...])
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8), err_msg=name)


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype:UserWarning")  # our Holder's zeros
def test_64_bit_dtypes_are_read_and_cast_when_jax_is_32_bit(tmp_path):
    wide = {f"t_{code.lower()}": DTYPE_VALUES[code] for code in WIDE}
    path = tmp_path / "wide.safetensors"
    save_file(wide, path)  # the NumPy writer keeps 64 bits
    assert {v["dtype"] for v in _header(path).values()} == set(WIDE)
    info = ncw.inspect(path)
    assert {leaf.name: leaf.dtype for leaf in info} == {
        "t_u64": "uint64",
        "t_i64": "int64",
        "t_f64": "float64",
    }
    model = Holder(wide)  # JAX makes these 32-bit: a cast, which is reported
    assert ncw.compare(path, model).dtype_mismatched == sorted(wide)
    result = ncw.restore(path, model, cast=True)
    assert {e.path for e in result.casts} == set(wide)
    for name, value in wide.items():
        got = np.asarray(getattr(model, name)[...])
        np.testing.assert_array_equal(got, value.astype(got.dtype), err_msg=name)


def test_direct_and_orbax_readers_give_the_same_bits(tmp_path):
    # Local files are read directly; buckets and multi-process shardings go through Orbax v1's
    # SafetensorsLayout. Both must give the same arrays, for every dtype Orbax reads.
    from nnx_ckpt_widgets.layouts import locate
    from nnx_ckpt_widgets.layouts.base import ReadRequest
    from nnx_ckpt_widgets.layouts.safetensors import ORBAX_READABLE

    arrays = {
        f"t_{code.lower()}": v
        for code, v in DTYPE_VALUES.items()
        if code not in WIDE and code in ORBAX_READABLE
    }
    path = tmp_path / "both.safetensors"
    save_flax({name: jnp.asarray(value) for name, value in arrays.items()}, path)
    location = locate(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    requests = [
        ReadRequest((name,), value.shape, np.dtype(value.dtype).name, device)
        for name, value in arrays.items()
    ]
    direct = location.layout.read(location, requests)
    via_orbax = location.layout._read_orbax(
        location,
        list(
            zip(
                [t for h in location.layout.headers(location) for t in h.tensors],
                requests,
                strict=True,
            )
        ),
    )
    for request, got in zip(requests, direct, strict=True):
        name = request.stored_path[0]
        want = np.asarray(via_orbax[name])
        assert np.asarray(got).dtype == want.dtype == arrays[name].dtype, name
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))


def test_file_truncated_after_inspect_is_refused_and_the_model_kept(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": np.arange(1024, dtype=np.float32)}, path)
    model = Holder({"w": np.zeros(1024, np.float32)})
    before = snapshot(model)
    report = ncw.compare(path, model)
    with open(path, "r+b") as handle:  # a download overwritten while the report was open
        handle.truncate(path.stat().st_size - 100)
    with pytest.raises(ncw.CorruptCheckpointError, match=r"ended 100 bytes into tensor 'w'"):
        ncw.apply_report(report, model)
    assert_same_arrays(before, model)


def _file(tmp_path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "evil.safetensors"
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = {
    "length-2-62": (lambda t: _file(t, b"{}", length=2**62), "header claims"),
    "not-json": (lambda t: _file(t, b"\xff{not json"), "not valid JSON"),
    "past-the-end": (lambda t: _file(t, {"w": F32_2}, b"\0" * 4), "truncated download"),
    "offsets-vs-shape": (
        lambda t: _file(t, {"w": {**F32_2, "data_offsets": [0, 4]}}, b"\0" * 8),
        "needs 8",
    ),
    "overlap": (
        lambda t: _file(t, {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlap",
    ),
    "unknown-dtype": (lambda t: _file(t, {"w": {**F32_2, "dtype": "Q7"}}, b"\0" * 8), "Q7"),
    "empty": (lambda t: _empty(t), "too short"),
}


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "evil.safetensors"
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_is_refused_with_the_file_named(tmp_path, case):
    make, words = HOSTILE[case]
    path = make(tmp_path)
    assert_refused_cheaply(path, Holder({"w": np.zeros(2, np.float32)}), words)


def test_index_naming_a_missing_shard(tmp_path, sharded):
    folder = tmp_path / "llama"
    folder.mkdir()
    for file in sharded.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "model-00002-of-00002.safetensors").unlink()
    model = TinyLM(nnx.Rngs(0))
    before = snapshot(model)
    for call in (lambda: ncw.inspect(folder), lambda: ncw.restore(folder, model)):
        with pytest.raises(ncw.CorruptCheckpointError) as raised:
            call()
        assert "model-00002-of-00002.safetensors" in str(raised.value)
        assert "missing" in str(raised.value) and str(folder) in str(raised.value)
    assert_same_arrays(before, model)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ncw.CorruptCheckpointError, match="not a file beside it"):
        ncw.inspect(folder)


def test_hostile_tensor_names_are_escaped(tmp_path):
    evil = '<img src=x onerror="alert(1)">'
    path = tmp_path / "names.safetensors"
    save_file({f"{evil}.weight": np.ones(2, np.float32)}, path)
    info = ncw.inspect(path)
    html = info._repr_html_()
    assert "<img" not in html and "&lt;img" in html
    report = ncw.compare(path, Holder({"w": np.zeros(2, np.float32)}))
    assert "<img" not in report._repr_html_()
    browser = ncw.CheckpointBrowser(path)
    assert "<img" not in browser.header.value


def test_cli_inspect_and_compare_json(tmp_path, single):
    done = run_cli("inspect", str(single))
    assert done.returncode == 0, done.stderr
    assert "safetensors, pure dict: 5 arrays" in done.stdout
    done = run_cli("inspect", str(single), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["layout"] == "safetensors" and data["custom_metadata"] == {"format": "pt"}
    leaves = {leaf["key"]: leaf for leaf in data["leaves"]}
    assert leaves["lm_head/weight"]["shape"] == [VOCAB, HIDDEN]
    assert leaves["lm_head/weight"]["dtype"] == "float32"


def tiny_lm() -> TinyLM:
    return TinyLM(nnx.Rngs(0))


def test_cli_compare_json(single, capsys):
    assert main(["compare", str(single), "--model", f"{__name__}:tiny_lm", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    statuses = {e["key"]: e["status"] for e in data["entries"]}
    assert statuses["lm_head/weight"] == "unexpected" and statuses["head/kernel"] == "missing"


def test_browser_with_rename_and_transform(sharded):
    model = TinyLM(nnx.Rngs(0))
    browser = ncw.CheckpointBrowser(sharded, model, rename=RENAME, transform=TRANSPOSE)
    assert browser.report is not None and browser.report.ok
    assert "transformed from (16, 8) float32" in browser.panel.report_html.value
    assert "safetensors (2 shards)" in repr(browser)
    browser.restore_button.click()
    browser.wait(60)
    assert browser.panel.error is None, browser.panel.error
    assert browser.status.startswith("Restored 5 arrays")
    assert_same_arrays(_expected(hf_weights()), model)
