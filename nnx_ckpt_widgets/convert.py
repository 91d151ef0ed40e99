"""``convert``: weights out, to Hugging Face safetensors or Orbax, streamed and atomic.

The plan is made first, from metadata only, with the functions ``compare`` uses
(``build_report``: ``rename``, then ``transform`` shapes through ``jax.eval_shape``), so what
``dry_run=True`` shows is what is written. Safetensors files are written by a small streaming
writer: each shard's header comes from the plan, then the tensors' bytes in order, as arrays
arrive from bounded batch reads (the layout's partial restore), as many at once as
``max_memory`` allows (``_values.plan_reads``, as ``stats`` reads), so memory stays near the
largest array plus the reads in flight. Everything goes to a temporary folder beside ``dst``,
which is renamed into place only when complete; a failure removes it. In a bucket, which
cannot rename, it goes to a hidden staging prefix that :mod:`nnx_ckpt_widgets._commit` copies
into ``dst`` when complete. The source is only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Literal

from nnx_ckpt_widgets import _bucket, _commit, _keypaths
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._layers import LayerSource
from nnx_ckpt_widgets._storage import AnyPath
from nnx_ckpt_widgets._text import clip, human_bytes, plural
from nnx_ckpt_widgets._values import (
    MemoryArg,
    ProgressArg,
    ReadPlan,
    iter_arrays,
    plan_reads,
    progress_callback,
    select_leaves,
)
from nnx_ckpt_widgets.compare import (
    LoadReport,
    Transform,
    build_report,
    run_transforms,
    state_of,
)
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    InvalidArgumentError,
    StorageError,
    TransformError,
    first_line,
)
from nnx_ckpt_widgets.layouts import Location
from nnx_ckpt_widgets.layouts.safetensors import DTYPES
from nnx_ckpt_widgets.metadata import STATE_FORMAT, CheckpointInfo, LeafInfo
from nnx_ckpt_widgets.metadata import inspect as inspect_checkpoint

__all__ = ["ConvertPlan", "ConvertedKey", "convert"]

Format = Literal["safetensors", "orbax", "orbax-v1"]
FORMATS: tuple[Format, ...] = ("safetensors", "orbax", "orbax-v1")
DEFAULT_METADATA = {"format": "pt"}  # what transformers' save_pretrained writes for PyTorch
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# numpy / ml_dtypes name -> safetensors spelling.
SAFETENSORS_DTYPES = {name: code for code, (name, _) in DTYPES.items()}
# How TensorStore words an operating-system error (a full disk: errno 28, or 27 past a file
# size limit) when it raises it as a ValueError.
_OS_ERROR = re.compile(r"os_error_code|No space left|File too large|Disk quota")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclasses.dataclass(frozen=True)
class ConvertedKey:
    """One array as it will be written.

    Attributes:
      key: the name written: ``a.b.c`` in safetensors, ``a/b/c`` in Orbax.
      source: the source's key (``a/b/c``), before ``rename``.
      shape: the shape written (after ``transform``).
      dtype: the dtype written (after ``transform`` and ``cast``).
      nbytes: bytes written for it.
      file: the safetensors file it goes to; None for Orbax.
      cast: ``cast`` changes its dtype.
      transformed: a ``transform`` function runs on it.
      renamed: ``rename`` changed its key.
    """

    key: str
    source: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: str | None = None
    cast: bool = False
    transformed: bool = False
    renamed: bool = False
    # What is read (the array as stored) and the functions it goes through.
    read_leaf: LeafInfo | None = dataclasses.field(default=None, repr=False, compare=False)
    transforms: tuple[Transform, ...] = dataclasses.field(default=(), repr=False, compare=False)
    out_path: KeyPath = dataclasses.field(default=(), repr=False, compare=False)
    value_dtype: str = dataclasses.field(default="", repr=False, compare=False)  # before cast
    # Stacked or sliced from other stored arrays (stack=/unstack=), instead of read_leaf.
    layers: LayerSource | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class ConvertPlan:
    """What :func:`convert` writes, decided before anything is read.

    ``str()`` is a summary and the files with their keys; :meth:`as_dict` is plain data.

    Attributes:
      src: the source, as given (a path, or ``<MLP>`` for a live model).
      dst: the destination.
      format: ``safetensors``, ``orbax`` or ``orbax-v1``.
      keys: one :class:`ConvertedKey` per array, in the order written.
      files: for safetensors, each file and the keys it holds, in order (an index file and
        the extra files are listed in ``other_files``).
      other_files: the index and the user's files copied beside the weights.
      metadata: the safetensors ``__metadata__`` (or Orbax ``custom_metadata``).
      max_shard_size: the shard size limit in bytes.
      skipped: source arrays left out by ``select``.
      written: True once :func:`convert` has written it; False for a dry run.
      report: the comparison the plan was built from (every key ``unexpected``: there is no
        target), as ``compare`` builds it.
    """

    src: str
    dst: str
    format: Format
    keys: tuple[ConvertedKey, ...]
    files: Mapping[str, tuple[str, ...]]
    other_files: tuple[str, ...] = ()
    metadata: Mapping[str, Any] | None = None
    max_shard_size: int = 0
    skipped: int = 0
    written: bool = False
    report: LoadReport | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def total_size(self) -> int:
        """Bytes of array data written."""
        return sum(k.nbytes for k in self.keys)

    def summary(self) -> str:
        """One line: what is (or would be) written where."""
        verb = "Wrote" if self.written else "Will write"
        casts = sum(k.cast for k in self.keys)
        moved = sum(k.transformed for k in self.keys)
        parts = [f"{plural(len(self.keys), 'array')} ({human_bytes(self.total_size)})"]
        if self.format == "safetensors":
            parts.append(f"in {plural(len(self.files), 'safetensors file')}")
        else:
            parts.append(f"as an {'Orbax v1' if self.format == 'orbax-v1' else 'Orbax'} checkpoint")
        text = f"{verb} {' '.join(parts)} to {self.dst}"
        extra = []
        if casts:
            extra.append(f"{casts} cast")
        if moved:
            extra.append(f"{moved} transformed")
        if self.skipped:
            extra.append(f"{self.skipped} not selected")
        return text + (f" ({', '.join(extra)})" if extra else "") + "."

    def __str__(self) -> str:
        lines = [self.summary()]
        for file, names in self.files.items():
            size = sum(k.nbytes for k in self.keys if k.file == file)
            lines.append(f"{file}  {plural(len(names), 'tensor')}, {human_bytes(size)}")
        for file in self.other_files:
            lines.append(file)
        width = max((len(clip(k.key, 60)) for k in self.keys), default=0)
        for k in self.keys:
            note = []
            if k.renamed:
                note.append(f"from {clip(k.source, 60)}")
            if k.transformed:
                note.append("transformed")
            if k.cast:
                note.append("cast")
            shape = "(" + ", ".join(str(d) for d in k.shape) + ")"
            tail = f"  [{', '.join(note)}]" if note else ""
            lines.append(f"  {clip(k.key, 60):<{width}}  {k.dtype}{shape}{tail}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from nnx_ckpt_widgets import render

        return render.plan_html(self)  # keys come from checkpoints: escaped there

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the CLI's ``--json``)."""
        return {
            "src": self.src,
            "dst": self.dst,
            "format": self.format,
            "written": self.written,
            "total_size": self.total_size,
            "max_shard_size": self.max_shard_size,
            "metadata": dict(self.metadata) if self.metadata is not None else None,
            "skipped": self.skipped,
            "files": {file: list(names) for file, names in self.files.items()},
            "other_files": list(self.other_files),
            "keys": [
                {
                    "key": k.key,
                    "source": k.source,
                    "shape": list(k.shape),
                    "dtype": k.dtype,
                    "nbytes": k.nbytes,
                    "file": k.file,
                    "cast": k.cast,
                    "transformed": k.transformed,
                    "renamed": k.renamed,
                }
                for k in self.keys
            ],
        }


def convert(
    src: Any,
    dst: str | os.PathLike,
    *,
    to: Format | None = None,
    step: int | None = None,
    item: str | None = None,
    select: str | None = None,
    rename: Mapping[str, str] | None = None,
    transform: Mapping[str, Transform] | None = None,
    cast: str | None = None,
    stack: Mapping[str, int] | None = None,
    unstack: Mapping[str, int] | None = None,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, Any] | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    dry_run: bool = False,
    progress: ProgressArg = None,
    max_memory: MemoryArg = None,
) -> ConvertPlan:
    """Write a checkpoint or a live model as Hugging Face safetensors or as an Orbax checkpoint.

    Safetensors are written the way the Hub expects: one ``model.safetensors`` when the
    arrays fit in ``max_shard_size``, else ``model-0000k-of-0000n.safetensors`` shards and
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``); key paths
    ``a/b/c`` become ``a.b.c``. They are streamed: arrays are read in bounded batches, as
    many at once as ``max_memory`` allows, and written as they come, so memory stays near the
    largest array plus the reads in flight, never a whole shard or model. Orbax output is
    saved by one Orbax call (``StandardCheckpointer`` for ``"orbax"``, ``ocp.v1.save`` for
    ``"orbax-v1"``), which takes the whole tree: peak memory is then the size of the arrays
    converted. Typed
    PRNG keys go to Orbax as keys.

    The output is written to a temporary folder beside ``dst`` and renamed into place when
    complete; on any failure it is removed, so ``dst`` is either complete or absent. ``src``
    is only read.

    A ``gs://`` bucket cannot rename: the output is written under a hidden staging prefix
    beside ``dst`` (``.NAME.<random>.converting/``; safetensors streamed up in 5 MiB parts,
    each object appearing only when finished), then committed: copied into ``dst`` inside the
    bucket service, data first and the objects readers start from last (the index after the
    shards; Orbax's ``_METADATA``, ``_CHECKPOINT_METADATA`` and ``commit_success.txt`` after its
    data). With ``overwrite``, the old output stays until the new one is complete; the commit
    moves its entry files aside first and deletes its other objects last. A failure, a bucket
    that stops answering included, removes the staging prefix and anything committed (a
    bucket that stops answering during the commit itself may keep some of the copied objects,
    never a set a reader takes for complete; the error says so). A
    process killed during the copy (seconds: no bytes are sent again) can leave at ``dst``
    some safetensors shards without their index, which :func:`inspect` and transformers'
    ``from_pretrained`` refuse, though each shard is a complete file that ``safe_open`` opens
    and a loader that globs ``*.safetensors`` when there is no index sees part of the model;
    or part of an Orbax checkpoint, which Orbax refuses on a bucket until
    ``commit_success.txt`` is there and :func:`inspect` reads only once all its data is there.
    A process killed while writing leaves only its hidden staging prefix.

    Args:
      src: a checkpoint path on any layout ``inspect`` reads (local or ``gs://``), a live NNX
        model (or another graph node), or an ``nnx.State``.
      dst: a local folder or a ``gs://`` URL of one; or a file ending in ``.safetensors`` for
        one file whatever its size.
      to: ``"safetensors"``, ``"orbax"`` (v0 ``StandardCheckpointer`` layout) or
        ``"orbax-v1"``; by default from ``dst``'s suffix (``.safetensors``), else refused.
      step, item: which step and item of ``src`` to read, as for :func:`inspect`.
      select: a regex searched in each source key (``layers/0/kernel``): only matching
        arrays are converted.
      rename: regex -> replacement, applied in order to source keys spelled ``a/b/c``, as
        for :func:`restore`; e.g. ``{r"/kernel$": "/weight"}``.
      transform: regex -> function of one array, for keys after ``rename``, as for
        :func:`restore`; e.g. ``{r"/weight$": lambda w: w.T}`` for PyTorch's ``[out, in]``.
      cast: a float dtype such as ``"bfloat16"``: every floating-point array is cast to it.
      stack: regex -> axis, as for :func:`restore`: per-layer keys (``layers/0/w``) are
        written as one stacked array (``layers/w``), the layer at ``axis``.
      unstack: regex -> axis, the reverse: each stacked array its pattern fits is written as
        one array per layer, e.g. ``{r"^decoder/layers/(\\d+/)": 1}`` for MaxText's axis 1.
        Each stacked array is read once.
      max_shard_size: bytes per safetensors file, or a string such as ``"5GB"`` or
        ``"500MiB"`` (default 5 GB, as Hugging Face uses). One array larger than this gets a
        file of its own.
      metadata: the safetensors ``__metadata__`` (strings only; default ``{"format": "pt"}``),
        or the Orbax ``custom_metadata``.
      extra_files: files copied beside the weights, e.g. a ``config.json``.
      overwrite: replace an existing ``dst``.
      dry_run: return the plan and write nothing.
      progress: a callable ``progress(done_bytes, total_bytes)`` (also given
        ``reads_in_flight=`` when it takes that keyword); ``True`` for a tqdm bar, ``False``
        for none; by default a bar when stderr is a terminal.
      max_memory: for a checkpoint ``src``, the memory its reads may use on top of what the
        process holds at the call, as for :func:`nnx_ckpt_widgets.stats`: bytes or a string
        such as ``"512MiB"``; by default a quarter of the memory available, at most 4 GiB.
        It sets how many reads run at once (two per core at most). A live model's arrays are
        already in memory: each is copied to the host and written in turn.

    Returns:
      The :class:`ConvertPlan`: files, keys and bytes; ``written`` is False for a dry run.

    Raises:
      InvalidArgumentError: an option is not valid, ``select`` matches nothing, ``dst``
        exists (without ``overwrite``) or overlaps ``src``, ``max_memory`` is too small for
        the largest array to read (named, with the budget it needs), or an array cannot be written
        (a non-array leaf; for safetensors a PRNG key or a dtype it lacks; for Orbax an
        empty array).
      TransformError: a ``transform`` function raised, or returned another shape or dtype
        than it gave on the array's shape.
      StorageError: writing failed (a full disk, a bucket that stops answering); nothing was
        left at ``dst``.
      CheckpointError: another subclass when ``src`` cannot be found or read.
    """
    fmt = _format(to, dst)
    limit = parse_size(max_shard_size)
    out_dtype = _cast_dtype(cast)
    meta = _metadata(metadata, fmt)
    extras = _extra_files(extra_files)
    dst_text = os.fspath(dst)
    dst_path = _destination(dst_text)
    single = fmt == "safetensors" and dst_path.suffix == ".safetensors"
    if single and extras:
        raise InvalidArgumentError(
            f"extra_files need a folder to go in, but dst {dst_text!r} is one .safetensors file; "
            "pass a folder as dst."
        )

    source = _source(src, step, item)
    keys = {"rename": rename, "transform": transform, "stack": stack, "unstack": unstack}
    plan = _plan(source, dst_text, fmt, select, keys, out_dtype, limit, meta, extras)
    _check_destination(source, dst_path, overwrite)
    # Refused before anything is written, dry run or not: the budget is part of the plan.
    reads = plan_reads(
        _stored(plan), max_memory, what="convert", where=source.where, location=source.location
    )
    if dry_run:
        return plan

    callback, close = progress_callback(progress, "convert")
    try:
        with _atomic(dst_path, overwrite) as out:
            arrays = _arrays(plan, source, callback, reads)
            with contextlib.closing(arrays):
                if fmt == "safetensors":
                    _write_safetensors(plan, arrays, out, single)
                else:
                    _write_orbax(plan, arrays, out)
            for extra in extras:
                with extra.open("rb") as stream, _create(out / extra.name) as copy:
                    shutil.copyfileobj(stream, copy)
    finally:
        close()
    return dataclasses.replace(plan, written=True)


# --- options ------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes from ``5000000``, ``"5GB"`` (10**9, as Hugging Face counts) or ``"500MiB"``.

    Raises:
      InvalidArgumentError: not a positive size.
    """
    if isinstance(size, bool):
        raise InvalidArgumentError(f"max_shard_size must be bytes or e.g. '5GB', got {size!r}.")
    if isinstance(size, int):
        value = size
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if found is None:
            raise InvalidArgumentError(
                f"max_shard_size must be bytes or a size such as '5GB' or '500MiB', got {size!r}."
            )
        value = int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])
    if value <= 0:
        raise InvalidArgumentError(f"max_shard_size must be positive, got {size!r}.")
    return value


def _format(to: str | None, dst: str | os.PathLike) -> Format:
    if to is None:
        if os.fspath(dst).endswith(".safetensors"):
            return "safetensors"
        raise InvalidArgumentError(
            f"Cannot tell the format to write from {os.fspath(dst)!r}; pass to= one of "
            f"{', '.join(FORMATS)} (or a dst ending in .safetensors)."
        )
    for fmt in FORMATS:
        if to == fmt:
            return fmt
    raise InvalidArgumentError(f"to must be one of {', '.join(FORMATS)}, got {to!r}.")


def _cast_dtype(cast: str | None) -> str | None:
    if cast is None:
        return None
    import jax.numpy as jnp

    try:
        dtype = jnp.dtype(cast)
    except TypeError as err:
        raise InvalidArgumentError(
            f"cast must be a float dtype such as 'bfloat16', got {cast!r}."
        ) from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InvalidArgumentError(
            f"cast must be a float dtype such as 'bfloat16', got {cast!r}: only floating-point "
            "arrays are cast."
        )
    return dtype.name


def _metadata(metadata: Mapping[str, Any] | None, fmt: Format) -> Mapping[str, Any] | None:
    if fmt != "safetensors":
        return dict(metadata) if metadata is not None else None
    meta = dict(DEFAULT_METADATA if metadata is None else metadata)
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise InvalidArgumentError(
            f"safetensors metadata holds strings only, but {clip(repr(bad[0]), 60)} is not a "
            "string or has a value that is not; convert it with str() or json.dumps."
        )
    return meta


def _extra_files(files: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    for path in paths:
        if not path.is_file():
            raise InvalidArgumentError(
                f"extra file {str(path)!r} is not a file; pass paths of files to copy beside the "
                "weights, e.g. extra_files=['config.json']."
            )
    names = [p.name for p in paths]
    clash = sorted(
        {n for n in names if names.count(n) > 1 or n.endswith(".safetensors")} & set(names)
    )
    if clash or INDEX_FILE in names:
        raise InvalidArgumentError(
            f"extra_files would overwrite {clash[0] if clash else INDEX_FILE!r} (two files of "
            "one name, or a name the weights use); rename it."
        )
    return paths


# --- sources ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """What to convert: the leaves (as ``inspect`` spells them) and how to read them."""

    info: CheckpointInfo
    where: str
    # leaves, progress, read plan -> (leaf, host array) in order, in bounded memory
    read: Callable[[Sequence[LeafInfo], Any, ReadPlan], Generator[tuple[LeafInfo, Any], None, None]]
    path: Path | None = None  # a local source folder or file, never to be written
    not_arrays: tuple[str, ...] = ()  # live leaves that hold no array (strings, None...)
    location: Location | None = None  # where a checkpoint's arrays are read from


def _source(src: Any, step: int | None, item: str | None) -> _Source:
    if isinstance(src, (str, os.PathLike)):
        info = inspect_checkpoint(src, step=step, item=item)
        location = info.location
        assert location is not None
        where = str(info.item_dir)

        def read(
            leaves: Sequence[LeafInfo], progress: Any, plan: ReadPlan
        ) -> Generator[tuple[LeafInfo, Any], None, None]:
            yield from iter_arrays(location, leaves, progress=progress, where=where, plan=plan)

        text = os.fspath(src)
        local = None if "://" in text else Path(text).absolute()
        return _Source(info, str(info.path), read, local, location=location)
    if step is not None or item is not None:
        raise InvalidArgumentError(
            "step= and item= choose what to read from a checkpoint path; a live model or "
            "nnx.State has neither, so leave them out."
        )
    return _live_source(src)


def _live_source(src: Any) -> _Source:
    import jax
    import numpy as np
    from flax import nnx

    state = state_of(
        src,
        "Cannot convert a {}: pass a checkpoint path, an NNX model (or another graph node) or "
        "an nnx.State.",
    )
    leaves: dict[KeyPath, LeafInfo] = {}
    values: dict[KeyPath, Any] = {}
    not_arrays = []
    for raw_path, variable in nnx.to_flat_state(state):
        path = _keypaths.to_keypath(raw_path)
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        if isinstance(value, (bool, int, float)):
            value = np.asarray(value)  # Orbax stores a Python scalar as a 0-d array too
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            not_arrays.append(_keypaths.join(path))
            continue
        if isinstance(value, jax.ShapeDtypeStruct):
            raise InvalidArgumentError(
                f"{_keypaths.join(path)!r} is abstract (nnx.eval_shape): there are no values "
                "to write; convert a model with real arrays, or a checkpoint path."
            )
        shape, dtype, impl = tuple(value.shape), value.dtype, None
        if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            impl = str(jax.random.key_impl(value))
            data = jax.eval_shape(jax.random.key_data, value)
            shape, dtype = tuple(data.shape), data.dtype
        leaves[path] = LeafInfo(path, path, shape, np.dtype(dtype).name, None, impl)
        values[path] = value
    name = f"<{type(src).__name__}>"
    # A live model has no path: its name stands in, shown as "<MLP>" wherever a path is.
    info = CheckpointInfo(path=Path(name), item_dir=Path(name), format=STATE_FORMAT, leaves=leaves)

    def read(
        leaves: Sequence[LeafInfo], progress: Any, plan: ReadPlan
    ) -> Generator[tuple[LeafInfo, Any], None, None]:
        del plan  # nothing to read: the arrays are in memory already
        total = sum(leaf.nbytes for leaf in leaves)
        done = 0
        if progress is not None:
            progress(0, total)
        for leaf in leaves:
            # One array at a time from device to host: memory stays near the largest array.
            value = values[leaf.path]
            if leaf.key_impl is not None:
                value = jax.random.key_data(value)  # as Orbax stores it (and reads it back)
            yield leaf, np.asarray(value)  # zero-copy for an array on the CPU
            done += leaf.nbytes
            if progress is not None:
                progress(done, total)

    return _Source(info, name, read, None, tuple(not_arrays))


# --- the plan -----------------------------------------------------------------------------


def _plan(
    source: _Source,
    dst: str,
    fmt: Format,
    select: str | None,
    key_options: Mapping[str, Any],
    cast: str | None,
    limit: int,
    metadata: Mapping[str, Any] | None,
    extras: list[Path],
) -> ConvertPlan:
    import jax.numpy as jnp
    import numpy as np

    info = source.info
    chosen, skipped = select_leaves(list(info.leaves.values()), select, source.where)
    pattern = re.compile(select) if select is not None else None
    not_arrays = [n for n in source.not_arrays if pattern is None or pattern.search(n)]
    # Orbax saves typed PRNG keys (as their data plus the implementation's name); safetensors
    # has no such type, and a key is no weight a Hub model could use.
    keys = [leaf.name for leaf in chosen if leaf.key_impl is not None and fmt == "safetensors"]
    if not_arrays or keys:
        what = (
            f"{plural(len(keys), 'PRNG key array')} ({_keypaths.preview(keys)})"
            if keys
            else f"{len(not_arrays)} non-array {'leaf' if len(not_arrays) == 1 else 'leaves'} "
            f"({_keypaths.preview(not_arrays)})"
        )
        raise InvalidArgumentError(
            f"{source.where} holds {what}, which convert does not write; leave them out with "
            r"select=, e.g. select=r'^(?!.*rngs)'."
        )
    # The same functions as compare: rename, then transform shapes through jax.eval_shape
    # (restore's other key options, when they come, pass through here the same way).
    selected = dataclasses.replace(info, leaves={leaf.path: leaf for leaf in chosen})
    report = build_report(selected, [], **key_options)
    if report.layer_problems:
        raise InvalidArgumentError(
            f"{source.where} cannot be converted with these stack=/unstack= patterns: "
            f"{report.layer_problems[0]}; fix the patterns."
        )
    value_level = info.format == STATE_FORMAT
    planned: list[ConvertedKey] = []
    names: dict[str, str] = {}
    for entry in report.entries:
        leaf = entry.checkpoint
        assert leaf is not None, "every entry of a report without target has an array"
        path = _keypaths.split(entry.path)
        dtype = leaf.dtype
        is_cast = cast is not None and jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
        is_cast = is_cast and dtype != cast
        if is_cast:
            assert cast is not None
            dtype = cast
        source_key = entry.source or entry.path
        if fmt == "safetensors":
            name = _hf_name(path, source_key, source.where)
            if dtype not in SAFETENSORS_DTYPES:
                raise InvalidArgumentError(
                    f"{source_key!r} of {source.where} is {dtype}, which safetensors cannot "
                    f"hold; cast it (cast='bfloat16' for floats) or leave it out with select=."
                )
            out_path = path
        else:
            if 0 in leaf.shape:
                raise InvalidArgumentError(
                    f"{source_key!r} of {source.where} has no elements {leaf.shape}, and Orbax "
                    "cannot save an empty array; leave it out with select=, or write "
                    "safetensors."
                )
            name = entry.path
            out_path = path + ((_keypaths.VARIABLE_LEVEL,) if value_level else ())
        if name in names:
            raise InvalidArgumentError(
                f"{names[name]!r} and {source_key!r} would both be written as {name!r}; make "
                "rename= tell them apart."
            )
        names[name] = source_key
        nbytes = int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize
        planned.append(
            ConvertedKey(
                key=name,
                source=source_key,
                shape=leaf.shape,
                dtype=dtype,
                nbytes=nbytes,
                cast=is_cast,
                transformed=entry.transformed,
                renamed=entry.source is not None,
                read_leaf=entry.read_leaf,
                layers=entry.layers,
                transforms=entry.transforms,
                out_path=out_path,
                value_dtype=leaf.dtype,
            )
        )
    files: dict[str, tuple[str, ...]] = {}
    other: list[str] = []
    if fmt == "safetensors":
        single = dst.endswith(".safetensors")
        groups = [planned] if single else _shards(planned, limit)
        file_of: dict[str, str] = {}
        for n, group in enumerate(groups):
            if single:
                file = os.path.basename(dst)
            elif len(groups) == 1:
                file = SINGLE_FILE
            else:
                file = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
            files[file] = tuple(k.key for k in group)
            file_of.update(dict.fromkeys(files[file], file))
        planned = [dataclasses.replace(k, file=file_of[k.key]) for k in planned]
        if len(groups) > 1:
            other.append(INDEX_FILE)
    other.extend(p.name for p in extras)
    return ConvertPlan(
        src=source.where,
        dst=dst,
        format=fmt,
        keys=tuple(planned),
        files=files,
        other_files=tuple(other),
        metadata=metadata,
        max_shard_size=limit,
        skipped=skipped,
        report=report,
    )


def _hf_name(path: KeyPath, source_key: str, where: str) -> str:
    """``('a', 'b', 'c')`` -> ``a.b.c``; a part holding a dot would not come back as it went."""
    if any("." in part or part == "" for part in path):
        raise InvalidArgumentError(
            f"{source_key!r} of {where} has a key part with a '.' (or an empty one), so its "
            "safetensors name would not split back into the same path; map it with rename=."
        )
    return ".".join(path)


def _shards(keys: list[ConvertedKey], limit: int) -> list[list[ConvertedKey]]:
    """Consecutive groups of at most ``limit`` bytes, as ``save_pretrained`` shards (one array
    larger than the limit gets a shard of its own)."""
    shards: list[list[ConvertedKey]] = []
    size = 0
    for key in keys:
        if not shards or (size + key.nbytes > limit and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += key.nbytes
    return shards or [[]]


def _destination(text: str) -> AnyPath:
    """``dst`` as a path: a ``pathlib.Path``, or an ``etils.epath.Path`` for ``gs://``."""
    if _bucket.is_bucket(text):
        path = _bucket.as_path(text, "write")
        if not _bucket.split(path)[1]:
            raise InvalidArgumentError(
                f"dst {text!r} is a whole bucket; convert writes into a folder of it: pass "
                "gs://BUCKET/FOLDER."
            )
        return path
    if "://" in text:
        raise InvalidArgumentError(
            f"convert writes to local folders and gs:// buckets only, got {text!r}; convert to "
            "a local folder and upload it (e.g. huggingface_hub.upload_folder)."
        )
    return Path(text)


def _check_destination(source: _Source, dst: AnyPath, overwrite: bool) -> None:
    if not isinstance(dst, Path):
        _check_bucket_destination(source, dst, overwrite)
        return
    target = dst.absolute()
    if source.path is not None:
        src = source.path
        src_real, dst_real = Path(os.path.realpath(src)), Path(os.path.realpath(target))
        if src_real == dst_real or src_real in dst_real.parents or dst_real in src_real.parents:
            raise InvalidArgumentError(
                f"dst {str(dst)!r} overlaps the source {str(src)!r}; convert never writes into "
                "or over its source: choose another destination."
            )
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise InvalidArgumentError(
            f"dst {str(dst)!r} exists; pass overwrite=True (--overwrite) to replace it, or choose "
            "another destination."
        )


def _check_bucket_destination(source: _Source, dst: AnyPath, overwrite: bool) -> None:
    """As for a local ``dst``: no overlap with a source in a bucket, and ``dst`` (an object of
    that name, or any object under ``dst/``) absent unless ``overwrite``."""
    src = source.info.path if source.path is None else None
    if src is not None and _bucket.is_bucket(src):
        a, b = str(src).rstrip("/"), str(dst).rstrip("/")
        if a == b or a.startswith(b + "/") or b.startswith(a + "/"):
            raise InvalidArgumentError(
                f"dst {b!r} overlaps the source {a!r}; convert never writes into or over its "
                "source: choose another destination."
            )
    if not overwrite and _commit.exists(dst):
        raise InvalidArgumentError(
            f"dst {str(dst)!r} exists; pass overwrite=True (--overwrite) to replace it, or choose "
            "another destination."
        )


# --- writing ------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic(dst: AnyPath, overwrite: bool) -> Iterator[AnyPath]:
    """A temporary folder beside ``dst`` to write into; renamed to ``dst`` when the block
    completes, removed when it fails (an interrupted process leaves only a hidden
    ``.NAME.*.converting`` folder, never ``dst``). In a bucket, a hidden staging prefix
    beside ``dst``, committed object by object (see :mod:`nnx_ckpt_widgets._commit`)."""
    if not isinstance(dst, Path):
        with _commit.staged(dst, overwrite) as staging:
            yield staging
        return
    target = dst.absolute()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".converting", dir=target.parent)
        )
    except OSError as err:
        raise StorageError(
            f"Cannot write beside {dst} ({first_line(err)}); check the folder's permissions, "
            "or choose another destination."
        ) from err
    out = tmp / "out"
    try:
        yield out
        if target.exists() or target.is_symlink():
            if not overwrite:  # it appeared while we wrote
                raise InvalidArgumentError(
                    f"dst {str(dst)!r} appeared while converting; pass overwrite=True to replace "
                    "it, or choose another destination."
                )
            os.replace(target, tmp / "old")  # out of the way, then the new one in its place
            try:
                os.replace(out, target)
            except BaseException:
                os.replace(tmp / "old", target)  # the old one back: it is not ours to lose
                raise
        else:
            os.replace(out, target)
    except CheckpointError:
        raise  # the source's own errors (CheckpointNotFoundError is an OSError too)
    except OSError as err:
        raise StorageError(
            f"Writing {dst} failed ({first_line(err)}); nothing was left there (the temporary "
            "folder was removed): free some space or choose another destination."
        ) from err
    finally:
        _remove(tmp)


def _remove(folder: Path) -> None:
    """Remove ``folder``, again while it reappears: after a failed save, Orbax's own threads
    can still be finishing writes into it (seen once under load, with a full disk)."""
    for wait in (0.0, 0.05, 0.2, 0.5, 1.0):
        time.sleep(wait)
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            return


def _parts(key: ConvertedKey) -> tuple[LeafInfo, ...]:
    """The stored leaves ``key`` is made of: one, or a stacked key's layers."""
    parts = key.layers.parts if key.layers is not None else (key.read_leaf,)
    assert all(p is not None for p in parts)
    return parts  # type: ignore[return-value]


def _stored(plan: ConvertPlan) -> list[LeafInfo]:
    """The stored leaves to read, each once, in the order the keys need them."""
    order: dict[tuple, LeafInfo] = {}
    for key in plan.keys:
        for p in _parts(key):
            order.setdefault((p.stored_path, p.path), p)
    return list(order.values())


def _arrays(
    plan: ConvertPlan, source: _Source, progress: Any, reads: ReadPlan
) -> Generator[tuple[ConvertedKey, Any], None, None]:
    """Each planned key with its array as written: read in bounded batches (``reads`` of
    them at once), transformed, cast and checked against the plan."""
    import numpy as np

    # Each stored array is read once; a stacked array that several layers are sliced from
    # (unstack) stays in memory only until its last layer.
    needs = [_parts(k) for k in plan.keys]
    left: dict[tuple, int] = {}
    for parts in needs:
        for p in parts:
            left[(p.stored_path, p.path)] = left.get((p.stored_path, p.path), 0) + 1
    reader = source.read(_stored(plan), progress, reads)
    # Closing the reader ends its prefetch thread when writing stops early.
    with contextlib.closing(reader):
        held: dict[tuple, Any] = {}
        for key, parts in zip(plan.keys, needs, strict=True):
            for p in parts:
                while (p.stored_path, p.path) not in held:
                    leaf, value = next(reader)
                    held[(leaf.stored_path, leaf.path)] = value
            got = [held[(p.stored_path, p.path)] for p in parts]
            for p in parts:
                left[(p.stored_path, p.path)] -= 1
                if not left[(p.stored_path, p.path)]:
                    del held[(p.stored_path, p.path)]
            layers = key.layers
            array = got[0] if layers is None else layers.combine(got)
            if key.transforms:
                name = _keypaths.join(key.out_path)
                value = run_transforms(
                    name, key.transforms, array, abstract=False, where=f" from {source.where}"
                )
                array = np.asarray(value)
                if (tuple(array.shape), str(array.dtype)) != (key.shape, key.value_dtype):
                    raise TransformError(
                        f"transform of {key.source!r} from {source.where} returned "
                        f"{array.dtype}{tuple(array.shape)} on the real array, not what it gave "
                        "on its shape; make the function depend only on the array's shape and "
                        "dtype."
                    )
            if key.cast:
                array = array.astype(key.dtype)
            if (tuple(array.shape), str(array.dtype)) != (key.shape, key.dtype):
                raise CheckpointError(
                    f"{source.where} gave {key.source!r} as {array.dtype}{tuple(array.shape)}, "
                    f"not the {key.dtype}{key.shape} its metadata says; nothing was written to "
                    f"{plan.dst}: check the source with nw.inspect."
                )
            yield key, array
        # Run the reader to its end: its last progress call, and the check that it is done.
        assert next(reader, None) is None, "every array read was used"


def _create(path: AnyPath) -> BinaryIO | _bucket.Upload:
    """A new file to write, as a context manager: a local file, or a bucket object streamed up
    in parts that appears only when complete (and never, when the block fails)."""
    if isinstance(path, Path):
        return open(path, "wb")
    return _bucket.Upload(path)


def _write_safetensors(
    plan: ConvertPlan,
    arrays: Iterator[tuple[ConvertedKey, Any]],
    out: AnyPath,
    single: bool,
) -> None:
    if isinstance(out, Path):  # a bucket has no folders to make
        folder = out.parent if single else out
        folder.mkdir(exist_ok=True)
    by_key = {k.key: k for k in plan.keys}
    for file, names in plan.files.items():
        keys = [by_key[n] for n in names]
        path = out if single else out / file
        with _create(path) as stream:
            stream.write(safetensors_header(keys, plan.metadata))
            for key in keys:
                got, array = next(arrays)
                assert got is key
                write_array(stream, array)
    # Run the reader to its end: its last progress call, and the check that it is done.
    leftover = next(arrays, None)
    assert leftover is None, "the plan and the reader agree on the arrays"
    if len(plan.files) > 1:
        index = {
            "metadata": {"total_size": plan.total_size},
            "weight_map": {k.key: k.file for k in plan.keys},
        }
        with _create(out / INDEX_FILE) as stream:
            stream.write((json.dumps(index, indent=2) + "\n").encode())


def safetensors_header(keys: Sequence[ConvertedKey], metadata: Mapping[str, Any] | None) -> bytes:
    """The header of a safetensors file holding ``keys`` in order: its 8-byte little-endian
    length, then the JSON, padded with spaces to a multiple of 8 bytes as the library pads it
    (so the data that follows is aligned)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key in keys:
        header[key.key] = {
            "dtype": SAFETENSORS_DTYPES[key.dtype],
            "shape": list(key.shape),
            "data_offsets": [offset, offset + key.nbytes],
        }
        offset += key.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def write_array(stream: Any, array: Any) -> None:
    """Write an array's bytes, little-endian and C-ordered, without another whole copy."""
    import numpy as np

    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    stream.write(flat.data)


def _write_orbax(
    plan: ConvertPlan, arrays: Iterator[tuple[ConvertedKey, Any]], out: AnyPath
) -> None:
    import jax
    import orbax.checkpoint as ocp

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    tree: dict[str, Any] = {}
    for key, array in arrays:
        node = tree
        for part in key.out_path[:-1]:
            node = node.setdefault(part, {})
        # As jax.Arrays, as a training run saves them, so Orbax records their sharding and
        # restores them as it restores any checkpoint; a dtype JAX would narrow (int64
        # without jax_enable_x64) stays a NumPy array, which Orbax saves as it is.
        kept = jax.dtypes.canonicalize_dtype(array.dtype) != array.dtype
        value = array if kept else jax.device_put(array, device)
        impl = key.read_leaf.key_impl if key.read_leaf is not None else None
        if impl is not None:  # a typed PRNG key again, so Orbax records its implementation
            value = jax.random.wrap_key_data(value, impl=impl)
        node[key.out_path[-1]] = value
    meta = dict(plan.metadata) if plan.metadata is not None else None

    def save() -> None:
        if plan.format == "orbax":
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(out, tree, custom_metadata=meta)
        else:
            ocp.v1.save(out, tree, custom_metadata=meta)

    # Orbax takes the whole tree in one call: no streaming here (see the docstring).
    try:
        if isinstance(out, Path):
            save()
        else:
            # Orbax's first request goes through gcsfs, which retries a dead endpoint for 33 s.
            _bucket.check_reachable(out, "write")
            _bucket.watched(out, save)  # and its TensorStore writes for many minutes
    except (OSError, CheckpointError):
        raise  # _atomic names the destination; ours name it already
    except Exception as err:  # Orbax's own errors, e.g. a value it cannot save
        transport = None if isinstance(out, Path) else _bucket.error(plan.dst, err, "write")
        if transport is not None:
            raise transport from err
        if _OS_ERROR.search(str(err)):  # TensorStore reports a full disk as a ValueError
            raise StorageError(
                f"Writing {plan.dst} failed ({type(err).__name__}: {first_line(err, 160)}); "
                "nothing was left there (the temporary folder was removed): free some space or "
                "choose another destination."
            ) from err
        raise CheckpointError(
            f"Orbax could not save the converted arrays to {plan.dst} ({type(err).__name__}: "
            f"{first_line(err, 160)}); nothing was left there."
        ) from err
