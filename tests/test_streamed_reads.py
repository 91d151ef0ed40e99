"""Host reads of large arrays streamed from their OCDBT data files (stats, diff, convert).

Each array is compared bit for bit with what Orbax's own restore returns for the same
checkpoint; damage found by the stream is left for Orbax to name.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import zstandard

import nnx_ckpt_widgets as nw
from nnx_ckpt_widgets import _values
from nnx_ckpt_widgets.layouts import _pytree
from tests.conftest import save_checkpoint
from tests.test_convert import library_tensors

SIDE = 512  # 512 x 512 float32 is 1 MiB: at STREAM_MIN


def _tree(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((SIDE, SIDE)).astype(np.float32)
    normal[0, :4] = [np.nan, -0.0, np.inf, -np.inf]
    return {
        "f32": normal,
        "bf16": rng.standard_normal((SIDE, SIDE * 2)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((SIDE * 2, SIDE)).astype(np.float16),
        "i8": rng.integers(-128, 128, (SIDE * 4, SIDE), dtype=np.int8),
        "u8": rng.integers(0, 256, (SIDE * 4, SIDE), dtype=np.uint8),
        "zeros": np.zeros((SIDE * 4, SIDE), np.uint8),  # one tiny frame, inline: not streamed
        "i32": rng.integers(-(2**31), 2**31, (SIDE, SIDE), dtype=np.int32),
        "f8": rng.standard_normal((SIDE * 4, SIDE)).astype(ml_dtypes.float8_e4m3fn),
        "cube": rng.standard_normal((64, 64, 64)).astype(np.float32),
        "small": np.arange(10, dtype=np.float32),
    }


def _requests(info) -> list:
    return _values.read_requests(list(info.leaves.values()))


def _orbax(path: Path) -> dict[str, np.ndarray]:
    return ocp.StandardCheckpointer().restore(path)


def _bytes_equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    tree = _tree()
    return save_checkpoint(tmp_path_factory.mktemp("streamed") / "ckpt", tree), tree


def test_large_arrays_are_streamed_and_match_orbax_bit_for_bit(saved):
    path, tree = saved
    info = nw.inspect(path)
    requests = _requests(info)
    streamed = info.location.layout.streams(info.location, requests)
    names = [requests[i].stored_path[0] for i in sorted(streamed)]
    assert sorted(names) == sorted(n for n in tree if n not in ("small", "zeros"))
    arrays = info.location.layout.read(info.location, requests)
    reference = _orbax(path)
    for request, array in zip(requests, arrays, strict=True):
        name = request.stored_path[0]
        assert _bytes_equal(array, tree[name]), name
        assert _bytes_equal(array, reference[name]), name


def test_stats_diff_and_convert_read_the_same_values_with_and_without_streaming(
    saved, monkeypatch, tmp_path
):
    path, tree = saved
    # One element of one array changed: diff must find exactly it, streamed or not.
    other_tree = {name: value.copy() for name, value in tree.items()}
    other_tree["i32"][7, 9] += 1
    other = save_checkpoint(tmp_path / "other", other_tree)
    streamed = nw.stats(path, progress=False)
    streamed_diff = nw.diff(path, other, progress=False)
    out = tmp_path / "out.safetensors"
    nw.convert(path, out, to="safetensors", progress=False)
    monkeypatch.setattr(_pytree, "STREAM_MIN", 1 << 62)  # every array through Orbax
    info = nw.inspect(path)
    assert not info.location.layout.streams(info.location, _requests(info))
    plain = nw.stats(path, progress=False)
    plain_diff = nw.diff(path, other, progress=False)
    assert streamed_diff.changed == plain_diff.changed == ["i32"]
    assert streamed_diff.entries == plain_diff.entries
    assert streamed_diff.largest_change.max_abs == 1.0
    assert [e.as_dict() for e in streamed] == [e.as_dict() for e in plain]
    assert streamed["f32"].nan == 1 and streamed["f32"].posinf == streamed["f32"].neginf == 1
    written = library_tensors(out)  # as the safetensors library parses the file
    assert sorted(written) == sorted(tree)
    for name, value in tree.items():
        assert written[name][1:] == (value.shape, value.tobytes()), name


def test_a_new_checkpoint_at_the_same_path_is_not_read_from_the_old_ones_index(tmp_path):
    path = tmp_path / "ckpt"
    first, second = (_tree(seed)["f32"] for seed in (1, 2))
    save_checkpoint(path, {"w": first})
    assert nw.stats(path, progress=False)["w"].max == float(np.nanmax(first[1:]))
    shutil.rmtree(path)
    save_checkpoint(path, {"w": second})
    info = nw.inspect(path)
    assert info.location.layout.streams(info.location, _requests(info)) == {0}
    assert nw.stats(path, progress=False)["w"].max == float(np.nanmax(second[1:]))


def _chunk(path: Path, name: str):
    info = nw.inspect(path)
    requests = _requests(info)
    index = next(i for i, r in enumerate(requests) if r.stored_path == (name,))
    return _pytree.streamed_chunks(info.location.data, requests)[index]


# Orbax's restore of a truncated data file leaves an asyncio callback to a closed loop.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. None:pytest.PytestUnraisableExceptionWarning"
)
@pytest.mark.parametrize(
    "damage",
    ["truncate_file", "frame_magic", "last_byte", "zero_length_file"],
)
def test_damage_the_stream_finds_is_left_for_orbax_to_name(saved, tmp_path, damage):
    """The stream never returns bytes a restore would not: it gives damaged chunks back to
    Orbax, whose error (or value) is the one the user gets, as without streaming."""
    source, _ = saved
    path = tmp_path / "ckpt"
    shutil.copytree(source, path)
    chunk = _chunk(path, "f32")
    data = bytearray(chunk.file.read_bytes())
    if damage == "truncate_file":
        data = data[: chunk.offset + chunk.length // 2]
    elif damage == "frame_magic":
        data[chunk.offset] ^= 0xFF
    elif damage == "last_byte":
        data[chunk.offset + chunk.length - 1] ^= 0xFF
    else:
        data = bytearray()
    chunk.file.write_bytes(bytes(data))
    with pytest.raises((ValueError, zstandard.ZstdError)):
        _pytree._read_stream(chunk)  # the stream itself refuses it
    with pytest.raises(nw.CorruptCheckpointError, match=str(path)):
        nw.stats(path, progress=False)


def test_streamed_arrays_count_less_against_the_budget(saved, monkeypatch):
    """From the reported reads in flight: the same budget allows more reads of arrays that
    are streamed (1.1x each) than of arrays Orbax reads (2.2x each)."""
    path, _ = saved
    monkeypatch.setattr(_values, "cores", lambda: 4)
    monkeypatch.setattr(_values, "BATCH_BYTES", 2**19)  # every large array a read of its own

    def reads_in_flight() -> set[int]:
        seen: set[int] = set()

        def progress(done: int, total: int, *, reads_in_flight: int) -> None:
            seen.add(reads_in_flight)

        # Every 1 MiB array but the one of zeros, which is inline and never streamed.
        nw.stats(path, progress=progress, max_memory="36MiB", select="^(?!zeros$)")
        return seen

    # 36 MiB: 32 reserved and 1 MiB in use; 3 MiB for reads of 1.1 MiB, or of 2.2 MiB.
    streamed = reads_in_flight()
    monkeypatch.setattr(_pytree, "STREAM_MIN", 1 << 62)
    plain = reads_in_flight()
    assert streamed == {2} and plain == {1}


def test_arrays_read_onto_a_device_are_not_streamed(saved):
    """Streaming serves host reads only: a restore's device arrays go through Orbax."""
    info = nw.inspect(saved[0])
    requests = [dataclasses.replace(r, host=False) for r in _requests(info)]
    assert info.location.layout.streams(info.location, requests) == set()


def test_a_frame_that_asks_for_a_large_window_is_not_decoded_here(tmp_path):
    """The decoder keeps at most an 8 MiB window: a frame wanting 64 MiB (not one Orbax
    writes, at zstd level 1) is refused, and Orbax gets to read it."""
    array = np.random.default_rng(0).standard_normal((SIDE, SIDE)).astype(np.float32)
    params = zstandard.ZstdCompressionParameters.from_level(1, window_log=26)
    # Without the size up front, the frame keeps its window (with it, zstd would shrink it).
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    frame = writer.compress(array.tobytes()) + writer.flush()
    assert zstandard.get_frame_parameters(frame).window_size > 2**23
    file = tmp_path / "chunk"
    file.write_bytes(b"x" * 7 + frame)
    stream = _pytree._Stream(file, 7, len(frame), array.dtype, array.shape)
    with pytest.raises(zstandard.ZstdError, match="too much memory"):
        _pytree._read_stream(stream)
    level1 = zstandard.ZstdCompressor(level=1).compress(array.tobytes())
    file.write_bytes(b"x" * 7 + level1)
    ok = _pytree._Stream(file, 7, len(level1), array.dtype, array.shape)
    assert _bytes_equal(_pytree._read_stream(ok), array)
