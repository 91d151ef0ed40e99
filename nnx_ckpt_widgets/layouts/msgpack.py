"""Flax msgpack checkpoints: what ``flax.serialization.to_bytes`` writes.

Three writers produce these files, and people still hold all of them:

- ``flax.training.checkpoints.save_checkpoint`` with ``flax_use_orbax_checkpointing=False``
  (or any flax before 2023): one file ``checkpoint_<n>`` per step, several in one root;
- Hugging Face transformers' ``FlaxPreTrainedModel.save_pretrained``: ``flax_model.msgpack``,
  or shards ``flax_model-0000k-of-0000n.msgpack`` with ``flax_model.msgpack.index.json``
  (``{"weight_map": {"a/b/c": shard}}``), each shard ``to_bytes`` of its part of the tree;
- any other ``*.msgpack`` file from ``to_bytes`` or ``msgpack_serialize``.

The stream is a msgpack map of maps; flax stores each array as an ext object of type 1 whose
payload is the msgpack triple ``(shape, dtype name, raw bytes)`` (type 3 is a NumPy scalar,
type 2 a Python complex), and splits arrays above 1 GiB into a ``__msgpack_chunked_array__``
map. Whoever made the file controls every length in it, so ``inspect`` does not hand it to
``msgpack.unpackb``: :func:`read_index` walks the stream itself, reading only container and
ext headers and skipping array bytes, and checks each declared length against the bytes left
in the file, the nesting depth, the ext types, and each array's byte count against its shape
and dtype, before anything is allocated. A restore then reads one array's validated byte
range at a time, one file (shard) after the other, and decodes it with flax's own
``flax.serialization.msgpack_restore``, which never unpickles.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._storage import AnyPath, Listing
from nnx_ckpt_widgets._text import clip
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ItemSelectionError,
    ResourceExhaustedError,
    UnknownLayoutError,
)
from nnx_ckpt_widgets.layouts import _steps
from nnx_ckpt_widgets.layouts.base import Location, ReadRequest, StepInfo, StoredLeaf
from nnx_ckpt_widgets.layouts.safetensors import index_shards

SUFFIX = ".msgpack"
HF_WEIGHTS = "flax_model.msgpack"
HF_INDEX = "flax_model.msgpack.index.json"
CONFIG = "config.json"
# Flax trees are a few levels deep (a TrainState's optimizer state about ten); a stream nested
# deeper than this is not a checkpoint, and the walk recurses once per level.
MAX_DEPTH = 64
# Names (keys, dtypes) and string leaves are read whole; nothing a checkpoint writes is longer.
MAX_NAME = 1 << 16
MAX_DIMS = 32
# The largest trees people save hold some 10^5 leaves (optimizer states included).
MAX_KEYS = 1_000_000
CHUNKED = "__msgpack_chunked_array__"
# Orbax 0.2.x writes this string in its ``checkpoint`` file for an array kept in a zarr folder.
PLACEHOLDER = "PLACEHOLDER://"
# The dtype names NumPy and ml_dtypes give (``arr.dtype.name``, what flax writes).
DTYPES = frozenset(
    (
        *("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
        *("float16", "float32", "float64", "complex64", "complex128", "bfloat16"),
        *("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"),
        *("float8_e4m3b11fnuz", "float8_e8m0fnu", "int4", "uint4"),
    )
)
_WINDOW = 1 << 16
# A step file of a legacy flax root: "<prefix><n>" with no suffix (flax's default prefix is
# "checkpoint_"); its tmp file ("checkpoint_tmp") is not a step.
_STEP_FILE = re.compile(r"^([^.]*?)(\d+)$")
_HF_SHARD = re.compile(r"^flax_model-\d+-of-\d+\.msgpack$")
# First byte of a msgpack map: every flax state dict starts with one.
_MAP_START = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaf of a msgpack stream, validated, with where its bytes are.

    ``kind`` is ``array`` (ext 1), ``scalar`` (ext 3, a NumPy scalar), ``complex`` (ext 2),
    ``chunked`` (a flax chunked array), ``python`` (a msgpack int, float or bool) or
    ``placeholder`` (an Orbax 0.2.x leaf kept elsewhere; ``name`` says where).
    ``[start, end)`` is the whole msgpack object in the file, what flax decodes.
    """

    path: tuple[str, ...]
    kind: str
    shape: tuple[int, ...]
    dtype: str
    file: AnyPath
    start: int
    end: int
    name: str = ""


def _damaged(file: AnyPath, why: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Msgpack checkpoint {file} is damaged: {why}; download or save it again."
    )


class _Stream:
    """Reads a file forward through a small window; every read and skip is checked against
    the file's size first, so a declared length never becomes an allocation."""

    def __init__(self, file: AnyPath, size: int, start: int = 0, end: int | None = None):
        self.file, self.pos, self.end = file, start, size if end is None else end
        self._buf, self._at = b"", 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise _damaged(
                self.file,
                f"{what} at byte {self.pos:,} declares {n:,} bytes but only "
                f"{max(self.end - self.pos, 0):,} are left (a truncated file?)",
            )

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        offset = self.pos - self._at
        if not (offset >= 0 and offset + n <= len(self._buf)):
            try:
                # Never past the end: a bucket refuses a range beyond the object.
                want = min(max(n, _WINDOW), self.end - self.pos)
                self._buf = _storage.read_range(self.file, self.pos, want)
            except OSError as err:
                raise CorruptCheckpointError(
                    f"Cannot read msgpack checkpoint {self.file}: {err.strerror or err}; check "
                    "that it exists and is readable."
                ) from err
            self._at, offset = self.pos, 0
            if len(self._buf) < n:
                raise _damaged(self.file, f"it ended inside {what} (it changed while read?)")
        self.pos += n
        return self._buf[offset : offset + n]

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.read(n, what), "big")


def _head(stream: _Stream, what: str) -> tuple[str, int]:
    """The next object's type and its length, count or value: ``('map', n)``, ``('int', v)``
    (``v`` read), ``('str', n)`` (``n`` bytes follow), ``('ext', n)`` (type byte, then ``n``)."""
    tag = stream.read(1, what)[0]
    if tag <= 0x7F:
        return "int", tag
    if tag >= 0xE0:
        return "int", tag - 0x100
    if 0x80 <= tag <= 0x8F:
        return "map", tag & 0x0F
    if 0x90 <= tag <= 0x9F:
        return "array", tag & 0x0F
    if 0xA0 <= tag <= 0xBF:
        return "str", tag & 0x1F
    simple = {0xC0: ("nil", 0), 0xC2: ("bool", 0), 0xC3: ("bool", 1)}
    if tag in simple:
        return simple[tag]
    sized = {
        0xC4: ("bin", 1), 0xC5: ("bin", 2), 0xC6: ("bin", 4),
        0xC7: ("ext", 1), 0xC8: ("ext", 2), 0xC9: ("ext", 4),
        0xD9: ("str", 1), 0xDA: ("str", 2), 0xDB: ("str", 4),
        0xDC: ("array", 2), 0xDD: ("array", 4), 0xDE: ("map", 2), 0xDF: ("map", 4),
    }  # fmt: skip
    if tag in sized:
        kind, width = sized[tag]
        return kind, stream.uint(width, what)
    if tag in (0xCA, 0xCB):
        stream.skip(4 if tag == 0xCA else 8, what)
        return "float", 0
    if 0xCC <= tag <= 0xCF:
        return "int", stream.uint(1 << (tag - 0xCC), what)
    if 0xD0 <= tag <= 0xD3:
        width = 1 << (tag - 0xD0)
        return "int", int.from_bytes(stream.read(width, what), "big", signed=True)
    if 0xD4 <= tag <= 0xD8:
        return "ext", 1 << (tag - 0xD4)
    raise _damaged(stream.file, f"byte {stream.pos - 1:,} ({tag:#04x}) starts no msgpack value")


def _name(stream: _Stream, what: str) -> str:
    kind, n = _head(stream, what)
    if kind == "int":
        return str(n)  # flax writes str keys; msgpack int keys read as their index
    if kind != "str":
        raise _damaged(stream.file, f"{what} at byte {stream.pos:,} is a {kind}, not a name")
    if n > MAX_NAME:
        raise _damaged(stream.file, f"{what} at byte {stream.pos:,} is {n:,} bytes long")
    try:
        return stream.read(n, what).decode("utf-8")
    except UnicodeDecodeError as err:
        raise _damaged(stream.file, f"{what} at byte {stream.pos:,} is not UTF-8") from err


def _ndarray(stream: _Stream, size: int, scalar: bool) -> tuple[tuple[int, ...], str]:
    """Check the payload of a flax ndarray ext: ``(shape, dtype name, bytes)``, the bytes
    exactly ``prod(shape) * itemsize`` and ending where the ext ends."""
    end = stream.pos + size
    what = "an array header"
    kind, n = _head(stream, what)
    if kind != "array" or n != 3:
        raise _damaged(stream.file, f"the array at byte {stream.pos:,} is not (shape, dtype, data)")
    kind, dims = _head(stream, what)
    if kind != "array" or dims > MAX_DIMS:
        raise _damaged(stream.file, f"the array at byte {stream.pos:,} has an invalid shape")
    shape = []
    for _ in range(dims):
        kind, n = _head(stream, what)
        if kind != "int" or n < 0:
            raise _damaged(stream.file, f"the array at byte {stream.pos:,} has an invalid shape")
        shape.append(n)
    dtype = _name(stream, "a dtype name")
    if dtype not in DTYPES:
        raise _damaged(
            stream.file,
            f"the array at byte {stream.pos:,} has the unknown dtype {clip(dtype, 20)!r}",
        )
    kind, n = _head(stream, what)
    if kind != "bin":
        raise _damaged(stream.file, f"the array at byte {stream.pos:,} holds no bytes")
    expected = math.prod(shape) * _itemsize(dtype)
    if n != expected or stream.pos + n != end:
        raise _damaged(
            stream.file,
            f"the array at byte {stream.pos:,} holds {n:,} bytes but shape {tuple(shape)} of "
            f"{dtype} needs {expected:,}",
        )
    if scalar and shape:
        raise _damaged(stream.file, f"the scalar at byte {stream.pos:,} has shape {tuple(shape)}")
    stream.skip(n, "array data")
    return tuple(shape), dtype


def _itemsize(dtype: str) -> int:
    if dtype in ("int4", "uint4"):
        return 1  # NumPy keeps one 4-bit value per byte
    return _numpy_dtype(dtype).itemsize


def _numpy_dtype(dtype: str) -> Any:
    import ml_dtypes
    import numpy as np

    found = getattr(ml_dtypes, dtype, None)
    return np.dtype(found if found is not None else dtype)


class _Walk:
    """One pass over a stream, collecting its leaves (:class:`Entry`) in stored order."""

    def __init__(self, stream: _Stream):
        self.stream = stream
        self.entries: list[Entry] = []
        self.keys = 0

    def value(self, path: tuple[str, ...], depth: int) -> None:
        stream = self.stream
        if depth > MAX_DEPTH:
            raise _damaged(stream.file, f"it is nested more than {MAX_DEPTH} levels deep")
        start = stream.pos
        kind, n = _head(stream, "a value")
        if kind in ("map", "array"):
            # Each entry takes at least one byte per key and value: a count the file cannot
            # hold is refused before the loop.
            stream.need(n * (2 if kind == "map" else 1), f"a {kind} of {n:,} entries")
            self.keys += n
            if self.keys > MAX_KEYS:
                # Keys are held while walking: a tiny-keyed file of many megabytes would
                # otherwise grow the walk's memory far beyond the file's size.
                raise _damaged(stream.file, f"it holds more than {MAX_KEYS:,} keys")
            first = len(self.entries)
            names: set[str] = set()
            for i in range(n):
                key = _name(stream, "a key") if kind == "map" else str(i)
                if key in names:
                    raise _damaged(stream.file, f"the key {clip(key, 60)!r} appears twice")
                names.add(key)
                self.value((*path, key), depth + 1)
            if kind == "map" and CHUNKED in names:
                self._chunked(path, start, first)
        elif kind == "ext":
            self._ext(path, start, n)
        elif kind in ("int", "float", "bool"):
            dtype = {"int": "int64", "float": "float64", "bool": "bool"}[kind]
            self.entries.append(Entry(path, "python", (), dtype, stream.file, start, stream.pos))
        elif kind == "str":
            if n <= MAX_NAME:
                text = stream.read(n, "a string").decode("utf-8", "replace")
                if text.startswith(PLACEHOLDER):
                    self.entries.append(
                        Entry(path, "placeholder", (), "", stream.file, start, stream.pos, text)
                    )
            else:
                stream.skip(n, "a string")
        elif kind == "bin":
            stream.skip(n, "a byte string")
        # nil: nothing stored (flax writes None for an empty optimizer state)

    def _ext(self, path: tuple[str, ...], start: int, size: int) -> None:
        stream = self.stream
        code = int.from_bytes(stream.read(1, "an ext type"), "big", signed=True)
        stream.need(size, "an ext payload")
        if code in (1, 3):
            shape, dtype = _ndarray(stream, size, scalar=code == 3)
            kind = "array" if code == 1 else "scalar"
            self.entries.append(Entry(path, kind, shape, dtype, stream.file, start, stream.pos))
        elif code == 2:
            stream.skip(size, "a complex number")
            self.entries.append(
                Entry(path, "complex", (), "complex128", stream.file, start, stream.pos)
            )
        else:
            raise _damaged(
                stream.file,
                f"the value at byte {start:,} is an ext of type {code}, which flax never writes",
            )

    def _chunked(self, path: tuple[str, ...], start: int, first: int) -> None:
        """Fold a flax chunked array (``{CHUNKED: True, shape: {...}, chunks: {...}}``)."""
        parts, self.entries[first:] = self.entries[first:], []
        dims: dict[int, int] = {}
        chunks: list[Entry] = []
        for entry in parts:
            rest = entry.path[len(path) :]
            if rest[:1] == ("shape",) and len(rest) == 2 and rest[1].isdigit():
                dims[int(rest[1])] = _python_int(self.stream, entry)
            elif rest[:1] == ("chunks",) and entry.kind == "array":
                chunks.append(entry)
        dtypes = {c.dtype for c in chunks}
        shape = (
            tuple(dims[i] for i in range(len(dims))) if set(dims) == set(range(len(dims))) else None
        )
        if shape is None or len(dtypes) != 1 or any(len(c.shape) != 1 for c in chunks):
            raise _damaged(self.stream.file, f"the chunked array at byte {start:,} is malformed")
        if sum(c.shape[0] for c in chunks) != math.prod(shape):
            raise _damaged(
                self.stream.file,
                f"the chunked array at byte {start:,} holds "
                f"{sum(c.shape[0] for c in chunks):,} values but its shape {shape} needs "
                f"{math.prod(shape):,}",
            )
        self.entries.append(
            Entry(path, "chunked", shape, dtypes.pop(), self.stream.file, start, self.stream.pos)
        )


def _python_int(stream: _Stream, entry: Entry) -> int:
    if entry.kind != "python" or entry.dtype != "int64":
        raise _damaged(stream.file, f"the chunked array at byte {entry.start:,} has a bad shape")
    sub = _Stream(stream.file, entry.end, entry.start)
    kind, value = _head(sub, "a dimension")
    if kind != "int" or value < 0:
        raise _damaged(stream.file, f"the chunked array at byte {entry.start:,} has a bad shape")
    return value


def read_index(file: AnyPath) -> list[Entry]:
    """Walk one msgpack file for its leaves (names, shapes, dtypes, byte ranges), reading no
    array bytes.

    Raises:
      CorruptCheckpointError: the stream is truncated, too deep, holds an ext type or dtype
        flax never writes, an array whose byte count does not fit its shape, or trailing bytes.
    """
    try:
        size = _storage.size(file)
    except OSError as err:
        raise CorruptCheckpointError(
            f"Cannot read msgpack checkpoint {file}: {err.strerror or err}; check that it exists "
            "and is readable."
        ) from err
    stream = _Stream(file, size)
    walk = _Walk(stream)
    if size == 0:
        raise _damaged(file, "it is empty")
    walk.value((), 0)
    if stream.pos != size:
        raise _damaged(file, f"{size - stream.pos:,} bytes follow the end of its tree")
    return walk.entries


def is_msgpack_map(file: AnyPath) -> bool:
    """Whether ``file`` starts like a flax state dict (a msgpack map); reads one byte."""
    try:
        head = _storage.read_range(file, 0, 1)
    except OSError:
        return False
    return bool(head) and head[0] in _MAP_START


@dataclasses.dataclass(frozen=True)
class Index:
    """What a msgpack Location reads: the files in order and the leaves of each."""

    files: tuple[AnyPath, ...]
    entries: tuple[Entry, ...]


def step_files(listing: Listing) -> dict[int, str]:
    """``{step: file name}`` of a legacy flax root (``checkpoint_100``, ``ckpt_5``)."""
    found: dict[int, str] = {}
    for name in listing.files:
        match = _STEP_FILE.match(name)
        if match and not name.endswith(".json"):
            step = int(match.group(2))
            # Two prefixes in one folder: flax keeps the one it was given; so do we, the first.
            found.setdefault(step, name)
    return found


class MsgpackLayout:
    name = "Flax msgpack checkpoint"
    signature = "a .msgpack file or checkpoint_<n> files, as flax.serialization writes"

    def matches(self, listing: Listing) -> bool:
        if listing.is_file:
            name = listing.path.name
            return name.endswith(SUFFIX) or bool(_STEP_FILE.match(name))
        if any(f.endswith((SUFFIX, HF_INDEX)) for f in listing.files):
            return True
        return bool(step_files(listing))

    def locate(self, listing: Listing, step: int | None, item: str | None) -> Location:
        if item is not None:
            raise ItemSelectionError(
                f"Msgpack checkpoint at {listing.path} holds one unnamed tree, not named items; "
                "drop item=."
            )
        if listing.is_file:
            file = listing.path
            if not file.name.endswith(SUFFIX) and not is_msgpack_map(file):
                # Only its name (checkpoint_300) made it a candidate: not a reason to call a
                # file of another kind a damaged checkpoint.
                raise UnknownLayoutError(
                    f"No checkpoint layout recognised at {file}: it is a file, but not a flax "
                    "msgpack checkpoint; pass the folder that Orbax wrote, a .safetensors file "
                    "or a flax .msgpack file."
                )
            _steps.no_step_here(file, step)
            hf = file.name == HF_WEIGHTS or _HF_SHARD.match(file.name)
            kind = "Hugging Face Flax weights" if hf else self.name
            return self._files(file, file.parent, [file], kind)
        folder = listing.path
        if HF_INDEX in listing.files:
            _steps.no_step_here(folder, step)
            shards = index_shards(listing, HF_INDEX, kind="Msgpack")
            kind = f"Hugging Face Flax weights ({len(shards)} shards)"
            return self._files(folder, folder, [folder / s for s in shards], kind)
        if HF_WEIGHTS in listing.files:
            _steps.no_step_here(folder, step)
            return self._files(folder, folder, [folder / HF_WEIGHTS], "Hugging Face Flax weights")
        singles = sorted(f for f in listing.files if f.endswith(SUFFIX))
        if singles:
            _steps.no_step_here(folder, step)
            if len(singles) > 1:
                raise ItemSelectionError(
                    f"Folder {folder} holds several .msgpack files and no index "
                    f"({clip(', '.join(singles), 120)}); pass one file."
                )
            return self._files(folder, folder, [folder / singles[0]], self.name)
        return self._root(listing, step)

    def _root(self, listing: Listing, step: int | None) -> Location:
        root = listing.path
        found = step_files(listing)
        if not any(is_msgpack_map(root / found[n]) for n in sorted(found)[-1:]):
            # Files named like steps, but the newest is not a flax state dict: not ours.
            shown = ", ".join(clip(found[n], 40) for n in sorted(found)[:5])
            raise UnknownLayoutError(
                f"No checkpoint layout recognised at {root}: it holds files named like steps "
                f"({shown}) that are not flax msgpack checkpoints; pass a checkpoint folder or "
                "file."
            )
        steps = tuple(StepInfo(n, root / found[n], (), {}) for n in sorted(found))
        kind = self.name + " root"
        if step is not None:
            match = [s for s in steps if s.step == step]
            if not match:
                available = ", ".join(str(s.step) for s in steps)
                raise CheckpointNotFoundError(
                    f"Checkpoint root {root} has no step {step}; pick one of: {available}."
                )
            location = self._files(root, root, [match[0].path], kind)
            return dataclasses.replace(location, step=step, steps=steps)
        # The latest step that reads: a damaged newest file (a copy cut short) must not hide
        # the steps before it; it is then not offered.
        damaged: CorruptCheckpointError | None = None
        for chosen in reversed(steps):
            try:
                location = self._files(root, root, [chosen.path], kind)
            except CorruptCheckpointError as err:
                damaged = damaged or err
                continue
            offered = tuple(s for s in steps if s.step <= chosen.step)
            return dataclasses.replace(location, step=chosen.step, steps=offered)
        assert damaged is not None, "a root has at least one step file"
        raise damaged

    def _files(self, path: AnyPath, folder: AnyPath, files: list[AnyPath], kind: str) -> Location:
        entries: list[Entry] = []
        seen: dict[tuple[str, ...], AnyPath] = {}
        for file in files:
            for entry in read_index(file):
                if entry.kind == "placeholder":
                    raise _damaged(
                        file,
                        f"its leaf {clip('/'.join(entry.path), 60)!r} points to a zarr folder, "
                        "as Orbax 0.2's checkpoint file does; pass the folder that holds it",
                    )
                if entry.path in seen:
                    raise CorruptCheckpointError(
                        f"Msgpack checkpoint at {path} is damaged: "
                        f"{clip('/'.join(entry.path), 60)!r} is in both {seen[entry.path]} and "
                        f"{file}; download or save it again."
                    )
                seen[entry.path] = file
                entries.append(entry)
        config = None
        sibling = _storage.listdir(folder)
        if sibling is not None and CONFIG in sibling.files and kind.startswith("Hugging Face"):
            raw = _storage.read_json(folder / CONFIG, "model config")
            config = raw if isinstance(raw, dict) else None
        return Location(
            path=path,
            layout=self,
            kind=kind,
            data=files[0] if len(files) == 1 else folder,
            config=config,
            layout_data=Index(tuple(files), tuple(entries)),
        )

    def leaves(self, location: Location) -> list[StoredLeaf]:
        return leaves_of(index_of(location).entries)

    def read(self, location: Location, requests: Sequence[ReadRequest]) -> list[Any]:
        return read_entries(location.path, index_of(location).entries, requests)


def index_of(location: Location) -> Index:
    index = location.layout_data
    assert isinstance(index, Index), "a msgpack Location carries its index"
    return index


def leaves_of(entries: Sequence[Entry]) -> list[StoredLeaf]:
    return [StoredLeaf(e.path, e.shape, e.dtype, None) for e in entries]


def read_entries(
    path: AnyPath, entries: Sequence[Entry], requests: Sequence[ReadRequest]
) -> list[Any]:
    """Read the requested leaves, one file (shard) at a time and in file order, each from its
    validated byte range through ``flax.serialization.msgpack_restore``.

    Raises:
      CorruptCheckpointError: the bytes changed since the index was read, or do not decode.
    """
    if not requests:
        return []
    by_path = {e.path: e for e in entries}
    chosen = [by_path[tuple(r.stored_path)] for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (str(chosen[i].file), chosen[i].start))
    out: list[Any] = [None] * len(requests)
    for i in order:
        out[i] = _place(_decode(path, chosen[i]), requests[i])
    return out


def _decode(path: AnyPath, entry: Entry) -> Any:
    import numpy as np
    from flax import serialization

    try:
        raw = _storage.read_range(entry.file, entry.start, entry.end - entry.start)
    except CheckpointError:
        raise
    except OSError as err:
        raise CorruptCheckpointError(
            f"Msgpack checkpoint at {path} could not be read ({err.strerror or err}); the target "
            f"was left unchanged, check that {entry.file} is readable."
        ) from err
    if len(raw) != entry.end - entry.start:
        raise _changed(path, entry)
    try:
        if entry.kind in ("array", "scalar") and entry.dtype.startswith(
            ("float8", "int4", "uint4")
        ):
            value = _ml_dtypes_array(raw, entry)  # flax's decoder knows only bfloat16 of these
        else:
            value = serialization.msgpack_restore(raw)
    except CheckpointError:
        raise
    except MemoryError as err:  # the machine, not the file: its bytes were validated
        raise ResourceExhaustedError(
            f"Ran out of memory reading {clip('/'.join(entry.path), 60)!r} of {path}; the "
            "target was left unchanged, restore fewer arrays at a time."
        ) from err
    except Exception as err:  # msgpack and NumPy raise several types for bad bytes
        raise _changed(path, entry) from err
    value = np.asarray(value)
    if value.shape != entry.shape or (
        entry.kind != "python" and value.dtype != _numpy_dtype(entry.dtype)
    ):
        raise _changed(path, entry)
    return value


def _ml_dtypes_array(raw: bytes, entry: Entry) -> Any:
    """An array of a dtype flax's decoder does not know: its validated bytes end the ext."""
    import numpy as np

    size = math.prod(entry.shape) * _itemsize(entry.dtype)
    data = raw[len(raw) - size :] if size else b""
    return np.frombuffer(data, _numpy_dtype(entry.dtype)).reshape(entry.shape)


def _changed(path: AnyPath, entry: Entry) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"Msgpack checkpoint at {path} is damaged: {clip('/'.join(entry.path), 60)!r} in "
        f"{entry.file} does not decode to the {entry.dtype} array of shape {entry.shape} it "
        "declared (it changed since it was inspected?); the target was left unchanged, download "
        "or save it again."
    )


def _place(value: Any, request: ReadRequest) -> Any:
    import jax

    if request.scalar_type is not None:
        return request.scalar_type(value.item())
    if str(value.dtype) != request.dtype:
        value = value.astype(_numpy_dtype(request.dtype))
    if request.host:
        return value
    sharding = request.sharding
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.device_put(value, sharding)
