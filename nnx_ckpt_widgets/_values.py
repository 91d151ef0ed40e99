"""Per-array value statistics and differences, computed in bounded memory.

Both work on host NumPy arrays (which keep ``int64`` and ``bfloat16`` as stored, whatever
``jax_enable_x64`` says) a chunk of :data:`CHUNK` elements at a time, so the temporary float64
copies stay in the CPU's cache whatever the array's size. Means and variances are merged chunk by
chunk with Chan's formula, as exact as a two-pass computation. A float chunk pays for NaN and
Inf masks only when its min or max is not finite, which one pass over it tells. Sums of squares
use ``np.einsum``, not ``np.dot``: BLAS wakes its thread pool for every chunk, which costs 6x
more on a busy machine.

Statistics of a float array (min, max, mean, std, L2 norm) are over its finite values; NaN,
+Inf and -Inf are counted apart, so a weight matrix with one NaN still shows its scale.

Reading is :func:`iter_arrays`: the layout's own ``read`` in bounded batches
(:func:`nnx_ckpt_widgets.layouts.read_batches`), with the next batches read in worker threads
while this one is summed up (TensorStore and NumPy release the GIL). How many are read at once
follows from a memory budget (:func:`plan_reads`): as many as fit, two per core at most, at
least one; a budget too small for one read of the largest array is refused before any read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from nnx_ckpt_widgets._failures import read_error
from nnx_ckpt_widgets.errors import CheckpointError, CorruptCheckpointError
from nnx_ckpt_widgets.layouts import Location, ReadRequest, read_batches
from nnx_ckpt_widgets.metadata import LeafInfo

if TYPE_CHECKING:
    import numpy as np

Kind = Literal["float", "int", "bool", "key", "other"]
Progress = Callable[[int, int], None]
# Elements per chunk: 512 KiB of float64 temporaries, which stay in the CPU's cache between the
# passes over one chunk (measured 4x faster per GiB than chunks of 2**20).
CHUNK = 1 << 16
# Bytes read per batch: small, so that two batches (one summed up, one being read) stay small.
BATCH_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class ArrayStats:
    """What the values of one array look like.

    Attributes:
      key: the key path, spelled ``layers/0/kernel``.
      shape, dtype: as stored; for PRNG keys, the shape of the key array and ``key<impl>``.
      kind: ``float``, ``int``, ``bool``, ``key`` (a PRNG key array, not summed up as
        numbers) or ``other`` (complex, ...: shape and dtype only).
      size: number of elements (of keys: number of keys).
      min, max: over finite values (None for an empty array or one with no finite value).
      mean, std, norm: over finite values (population std; none for bools and keys).
      nan, posinf, neginf: counts of NaN, +Inf and -Inf (floats only).
      zeros: number of elements equal to zero (``False`` for bools).
      trues: number of ``True`` elements of a bool array.
      key_impl: the PRNG implementation of a key array, e.g. ``threefry2x32``.
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    kind: Kind
    size: int
    min: float | int | bool | None = None
    max: float | int | bool | None = None
    mean: float | None = None
    std: float | None = None
    norm: float | None = None
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    zeros: int = 0
    trues: int | None = None
    key_impl: str | None = None

    @property
    def zero_fraction(self) -> float | None:
        """Fraction of elements equal to zero; None for keys and empty arrays."""
        if self.kind in ("key", "other") or self.size == 0:
            return None
        return self.zeros / self.size

    @property
    def nonfinite(self) -> int:
        """NaN and Inf values together."""
        return self.nan + self.posinf + self.neginf

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["zero_fraction"] = self.zero_fraction
        return out


@dataclasses.dataclass(frozen=True)
class ArrayDiff:
    """How one array changed from checkpoint ``a`` to checkpoint ``b``.

    Attributes:
      key, shape, dtype: the array's, the same on both sides.
      identical: the two are bit for bit the same.
      rel_change: ``||a - b|| / ||a||`` (L2, in float64); ``inf`` when ``a`` is all zeros
        and ``b`` is not; NaN when either holds NaN or Inf; None for keys.
      max_abs: the largest ``|a - b|``; None for keys.
      nan_a, nan_b: NaN counts on each side; inf_a, inf_b: ±Inf counts.
      norm_a, norm_diff: ``||a||`` and ``||a - b||`` (None when identical, or for keys).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    identical: bool
    rel_change: float | None = None
    max_abs: float | None = None
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    norm_a: float | None = None
    norm_diff: float | None = None

    @property
    def nan_appeared(self) -> bool:
        return self.nan_a == 0 and self.nan_b > 0

    @property
    def inf_appeared(self) -> bool:
        return self.inf_a == 0 and self.inf_b > 0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        out["nan_appeared"], out["inf_appeared"] = self.nan_appeared, self.inf_appeared
        return out


def kind_of(dtype: np.dtype) -> Kind:
    import numpy as np

    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "int"
    if np.issubdtype(dtype, np.floating) or _is_ml_float(dtype):
        return "float"
    return "other"


def _is_ml_float(dtype: np.dtype) -> bool:
    """bfloat16, float8_* and friends (ml_dtypes), which NumPy does not call floating."""
    try:
        import ml_dtypes

        ml_dtypes.finfo(dtype)
    except (ImportError, ValueError, TypeError):
        return False
    return True


class _Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        """Add a float64 chunk (overwritten: it becomes the deviations)."""
        import numpy as np

        n = x.size
        if n == 0:
            return
        mean = float(x.sum()) / n
        np.subtract(x, mean, out=x)
        m2 = float(np.einsum("i,i->", x, x))
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0

    @property
    def norm(self) -> float:
        return math.sqrt(max(self.m2 + self.n * self.mean * self.mean, 0.0))


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:

    flat = array.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        yield flat[start : start + CHUNK]


def _finite_chunk(chunk: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """The chunk's finite values and its NaN, +Inf and -Inf counts."""
    import numpy as np

    lo, hi = chunk.min(), chunk.max()
    if np.isfinite(lo) and np.isfinite(hi):
        return chunk, 0, 0, 0
    nan = int(np.count_nonzero(np.isnan(chunk)))
    posinf = int(np.count_nonzero(chunk == np.inf))
    neginf = int(np.count_nonzero(chunk == -np.inf))
    return chunk[np.isfinite(chunk)], nan, posinf, neginf


def array_stats(
    key: str, array: Any, *, key_impl: str | None = None, dtype: str | None = None
) -> ArrayStats:
    """The statistics of one array (a NumPy array, or anything ``np.asarray`` takes).

    Args:
      key: the name to report it under.
      array: the values; a typed JAX PRNG key array is reported as keys.
      key_impl: set when ``array`` holds the data of PRNG keys (Orbax stores keys as their
        ``uint32`` data, the key being its last axis or axes).
      dtype: the dtype name to report (the stored one), when not ``array``'s own.
    """
    import numpy as np

    impl = key_impl or _typed_key_impl(array)
    if impl is not None:
        shape = tuple(np.shape(array))
        data_dims = 0 if key_impl is None else _key_data_dims(impl)
        keys_shape = shape[: len(shape) - data_dims] if data_dims else shape
        return ArrayStats(
            key, keys_shape, f"key<{impl}>", "key", math.prod(keys_shape), key_impl=impl
        )
    array = np.asarray(array)
    shape, name = tuple(array.shape), dtype or array.dtype.name
    kind = kind_of(array.dtype)
    if kind == "other" or array.size == 0:
        return ArrayStats(key, shape, name, kind, int(array.size))
    if kind == "bool":
        trues = int(np.count_nonzero(array))
        return ArrayStats(
            key,
            shape,
            name,
            kind,
            array.size,
            min=bool(trues == array.size),
            max=bool(trues > 0),
            zeros=array.size - trues,
            trues=trues,
        )
    moments = _Moments()
    lo: Any = None
    hi: Any = None
    nan = posinf = neginf = zeros = 0
    for chunk in _chunks(array):
        zeros += int(np.count_nonzero(chunk == 0))  # SIMD; count_nonzero of floats is not
        if kind == "float":
            chunk, n_nan, n_pos, n_neg = _finite_chunk(chunk)
            nan, posinf, neginf = nan + n_nan, posinf + n_pos, neginf + n_neg
            if chunk.size == 0:
                continue
        c_lo, c_hi = chunk.min(), chunk.max()
        lo = c_lo if lo is None else min(lo, c_lo)
        hi = c_hi if hi is None else max(hi, c_hi)
        moments.add(chunk.astype(np.float64))
    if lo is None:  # no finite value at all
        return ArrayStats(
            key, shape, name, kind, array.size, nan=nan, posinf=posinf, neginf=neginf, zeros=zeros
        )
    py = int if kind == "int" else float
    return ArrayStats(
        key,
        shape,
        name,
        kind,
        array.size,
        min=py(lo),
        max=py(hi),
        mean=moments.mean,
        std=moments.std,
        norm=moments.norm,
        nan=nan,
        posinf=posinf,
        neginf=neginf,
        zeros=zeros,
    )


def array_diff(key: str, a: Any, b: Any, *, keys: bool = False) -> ArrayDiff:
    """How ``b`` differs from ``a`` (same shape and dtype).

    Args:
      key: the name to report it under.
      a, b: the two arrays; typed PRNG keys are compared through their data.
      keys: the arrays hold PRNG key data: only bit identity is reported.
    """
    import numpy as np

    a, b = _key_data(a), _key_data(b)
    is_key = keys or _typed_key_impl(a) is not None
    a, b = np.asarray(a), np.asarray(b)
    shape, dtype = tuple(a.shape), a.dtype.name
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{key}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
    identical = _bit_identical(a, b)
    kind = kind_of(a.dtype)
    if is_key or kind == "other":
        return ArrayDiff(key, shape, dtype, identical)
    if identical:
        nan = inf = 0
        if kind == "float":
            for chunk in _chunks(a):
                _, n_nan, n_pos, n_neg = _finite_chunk(chunk)
                nan, inf = nan + n_nan, inf + n_pos + n_neg
        nonfinite = nan + inf > 0
        return ArrayDiff(
            key,
            shape,
            dtype,
            True,
            rel_change=math.nan if nonfinite else 0.0,
            max_abs=math.nan if nonfinite else 0.0,
            nan_a=nan,
            nan_b=nan,
            inf_a=inf,
            inf_b=inf,
        )
    dd = aa = 0.0
    max_abs = 0.0
    counts = [0, 0, 0, 0]  # nan_a, nan_b, inf_a, inf_b
    for ca, cb in zip(_chunks(a), _chunks(b), strict=True):
        if kind == "float":
            for side, chunk in enumerate((ca, cb)):
                _, n_nan, n_pos, n_neg = _finite_chunk(chunk)
                counts[side] += n_nan
                counts[2 + side] += n_pos + n_neg
        xa = ca.astype(np.float64)
        xb = cb.astype(np.float64)
        aa += float(np.einsum("i,i->", xa, xa))
        np.subtract(xb, xa, out=xb)
        dd += float(np.einsum("i,i->", xb, xb))
        np.abs(xb, out=xb)
        max_abs = max(max_abs, float(xb.max()))
    if any(counts):
        rel = math.nan
        max_abs = math.nan
    elif aa == 0.0:
        rel = math.inf if dd > 0 else 0.0
    else:
        rel = math.sqrt(dd) / math.sqrt(aa)
    nan_a, nan_b, inf_a, inf_b = counts
    return ArrayDiff(
        key,
        shape,
        dtype,
        identical=False,
        rel_change=rel,
        max_abs=max_abs,
        nan_a=nan_a,
        nan_b=nan_b,
        inf_a=inf_a,
        inf_b=inf_b,
        norm_a=math.sqrt(aa),
        norm_diff=math.sqrt(dd),
    )


def _bit_identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit equal (NaN payloads included), chunk by chunk, stopping at a difference."""
    import numpy as np

    if a.size == 0:
        return True
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    va = np.ascontiguousarray(a).reshape(-1)
    vb = np.ascontiguousarray(b).reshape(-1)
    va, vb = (
        (va.view(unsigned), vb.view(unsigned))
        if unsigned
        else (va.view(np.uint8), vb.view(np.uint8))
    )
    return all(np.array_equal(x, y) for x, y in zip(_chunks(va), _chunks(vb), strict=True))


def _typed_key_impl(array: Any) -> str | None:
    """The implementation name of a typed JAX key array, else None (without importing JAX)."""
    dtype = getattr(array, "dtype", None)
    name = str(dtype) if dtype is not None else ""
    if not name.startswith("key<"):
        return None
    import jax

    return str(jax.random.key_impl(array))


def _key_data(array: Any) -> Any:
    if _typed_key_impl(array) is None:
        return array
    import jax

    return jax.random.key_data(array)


def _key_data_dims(impl: str) -> int:
    """Trailing axes of a key's data: one for every built-in implementation (``(2,)``,
    ``(4,)``)."""
    return 1


# --- reading ------------------------------------------------------------------------------

MemoryArg = int | str | None
# A read holds about 2.1x its array while it runs (the compressed bytes and the array they
# decode into; measured on Orbax's zstd chunks), so each read in flight is counted at 2.2x;
# an array the layout streams (see ``Layout.streams``) at its own factor.
READ_FACTOR = 2.2
# Room for what is not an array: float64 chunk temporaries, TensorStore's and Orbax's
# per-call state, the report being built.
RESERVE = 32 * 2**20
READS_PER_CORE = 2
# The default budget: this share of the memory available at the call, at most DEFAULT_CAP.
DEFAULT_SHARE = 0.25
DEFAULT_CAP = 4 * 2**30
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(value: int | str, name: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"512MiB"``, ``"1.5 GiB"`` or ``"800MB"``.

    Raises:
      InvalidArgumentError: anything else, or a budget that is not positive.
    """
    import re

    from nnx_ckpt_widgets.errors import InvalidArgumentError

    example = f"{name}=2**30 or {name}='512MiB'"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgumentError(
            f"{name} must be a number of bytes or a string such as '512MiB', got "
            f"{type(value).__name__}; pass e.g. {example}."
        )
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise InvalidArgumentError(
                f"{name}={value!r} is not a size; write bytes with a unit of B, KB, MB, GB, "
                f"KiB, MiB or GiB, e.g. {example}."
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgumentError(f"{name} must be positive, got {value}; pass e.g. {example}.")
    return value


def available_memory() -> int:
    """Bytes of memory the kernel says are available now (``MemAvailable``)."""
    import os

    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_CAP


def default_budget() -> int:
    """A quarter of the memory available at the call, at most 4 GiB.

    A quarter, because the caller's process (a notebook's kernel, its JAX buffers) and its
    neighbours keep using memory while the reads run; the cap, because with 4-16 reads in
    flight (two per core) more memory buys no speed.
    """
    return max(1, min(int(available_memory() * DEFAULT_SHARE), DEFAULT_CAP))


def cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """How many reads run at once within a memory budget.

    Attributes:
      budget: bytes the reads may hold on top of what the process held at the call.
      batch_bytes: bytes per read batch (an array larger than this is a batch of its own).
      reads_in_flight: reads that run at once (at least one).
      largest: the largest array's bytes.
      hold: the most bytes one read holds while it runs.
    """

    budget: int
    batch_bytes: int
    reads_in_flight: int
    largest: int
    hold: int

    def needs(self, reads: int) -> int:
        """Bytes held with ``reads`` in flight: what each read holds, one batch being used,
        and the reserve."""
        return RESERVE + max(self.largest, self.batch_bytes) + self.hold * reads


def plan_reads(
    leaves: Sequence[LeafInfo],
    max_memory: MemoryArg,
    *,
    what: str,
    where: str,
    sides: int = 1,
    location: Location | None = None,
) -> ReadPlan:
    """The reads in flight for ``leaves`` within ``max_memory``, split evenly over ``sides``
    read at once (``diff`` reads two checkpoints): per side as many as fit, with at most two
    reads per core in all, and at least one. ``location``'s layout says which arrays it
    streams (they hold less while read); without it every read counts at ``READ_FACTOR``.

    Raises:
      InvalidArgumentError: ``max_memory`` is not a size, or is too small for one read of the
        largest array; the message names the array and the budget it needs.
    """
    from nnx_ckpt_widgets._text import human_bytes
    from nnx_ckpt_widgets.errors import InvalidArgumentError

    budget = default_budget() if max_memory is None else parse_memory(max_memory)
    share = budget // sides
    largest_leaf = max(leaves, key=lambda leaf: leaf.nbytes, default=None)
    largest = largest_leaf.nbytes if largest_leaf is not None else 0
    # Smaller batches when the budget is small: a batch must fit one read and its use.
    room = (share - RESERVE) / (1 + READ_FACTOR)
    batch = int(max(1, min(BATCH_BYTES, room))) if room > 0 else 1
    # A batch is never larger than all the bytes there are to read.
    batch = max(1, min(batch, sum(leaf.nbytes for leaf in leaves)))
    holds = _read_holds(leaves, location)  # the layout is asked once
    # The least that reads everything: one read at a time, each array a read of its own.
    alone = _hold(holds, 0)
    one = RESERVE + largest + alone
    if share < one:
        name = largest_leaf.name if largest_leaf is not None else "(none)"
        need = human_bytes(one * sides)
        raise InvalidArgumentError(
            f"max_memory={human_bytes(budget)} is too small for {what} of {where}: its largest "
            f"array, {name} ({human_bytes(largest)}), needs a budget of at least {need} "
            f"({one * sides} bytes) to be read; raise max_memory, or leave that array out "
            "with select=."
        )
    plan = ReadPlan(budget, batch, 1, largest, _hold(holds, batch))
    if plan.needs(1) > share:
        # Batches held at READ_FACTOR outgrow the streamed arrays: make them no larger than
        # what one streamed array holds, which fits (``one`` above).
        batch = max(1, min(batch, int(alone / READ_FACTOR)))
        plan = ReadPlan(budget, batch, 1, largest, _hold(holds, batch))
    reads = 1
    # Two per core: a read spends part of its time in Python (Orbax's per-call work), when
    # another read keeps the core decoding.
    while reads < READS_PER_CORE * cores() // sides and plan.needs(reads + 1) <= share:
        reads += 1
    return dataclasses.replace(plan, reads_in_flight=reads)


def _read_holds(leaves: Sequence[LeafInfo], location: Location | None) -> list[tuple[int, int]]:
    """``(bytes, held)`` of a read of each array alone: ``READ_FACTOR`` times its bytes,
    or the layout's ``stream_factor`` for an array it streams. The layout is asked once, and
    only about the arrays that can set the largest: the largest array holds at least its
    streamed share, so an array holding less at ``READ_FACTOR`` cannot."""
    layout = location.layout if location is not None else None
    streams = getattr(layout, "streams", None)
    stream_factor = getattr(layout, "stream_factor", READ_FACTOR)
    least = stream_factor * max((leaf.nbytes for leaf in leaves), default=0)
    candidates = [leaf for leaf in leaves if READ_FACTOR * leaf.nbytes > least]
    streamed = streams(location, read_requests(candidates)) if candidates and streams else set()
    return [
        (leaf.nbytes, math.ceil((stream_factor if i in streamed else READ_FACTOR) * leaf.nbytes))
        for i, leaf in enumerate(candidates)
    ]


def _hold(holds: Sequence[tuple[int, int]], batch: int) -> int:
    """The most bytes one read holds: a batch at ``READ_FACTOR``, or an array larger than a
    batch (a read of its own) at what it holds (``holds`` from :func:`_read_holds`)."""
    own = (held for size, held in holds if size > batch)
    return max(math.ceil(READ_FACTOR * batch), max(own, default=0))


def read_requests(leaves: Sequence[LeafInfo]) -> list[ReadRequest]:
    """Requests for the arrays of ``leaves`` as stored, onto host memory."""
    return [
        ReadRequest(stored_path=leaf.stored_path, shape=leaf.shape, dtype=leaf.dtype, host=True)
        for leaf in leaves
    ]


def call_progress(progress: Callable[..., None] | None, done: int, total: int, reads: int) -> None:
    """Call ``progress(done, total)``, with ``reads_in_flight=reads`` when it takes that
    keyword."""
    if progress is None:
        return
    if _takes_reads_in_flight(progress):
        progress(done, total, reads_in_flight=reads)
    else:
        progress(done, total)


def _takes_reads_in_flight(fn: Callable[..., None]) -> bool:
    import inspect

    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.name == "reads_in_flight" or p.kind is p.VAR_KEYWORD
        for p in parameters
        if p.kind is not p.POSITIONAL_ONLY
    )


def iter_arrays(
    location: Location,
    leaves: Sequence[LeafInfo],
    *,
    progress: Callable[..., None] | None = None,
    batch_bytes: int | None = None,
    where: str = "",
    plan: ReadPlan | None = None,
) -> Iterator[tuple[LeafInfo, np.ndarray]]:
    """Yield ``(leaf, array)`` for each leaf, in order, reading in bounded batches.

    ``plan.reads_in_flight`` batches are read at once in worker threads (TensorStore and
    NumPy release the GIL) while the caller works on the one before them, in order; without a
    plan, one. ``progress(done_bytes, total_bytes)`` is called before the first read and after
    each batch, with ``reads_in_flight=`` when it takes that keyword.

    Raises:
      CorruptCheckpointError: the layout could not read a batch, or returned another shape.
      CheckpointError: another subclass saying why a batch could not be read (out of memory,
        storage).
    """
    import collections
    from concurrent.futures import Future, ThreadPoolExecutor

    import numpy as np

    items = list(zip(leaves, read_requests(leaves), strict=True))
    limit = BATCH_BYTES if batch_bytes is None else batch_bytes
    if plan is not None:
        limit = min(limit, plan.batch_bytes)
    batches = read_batches(items, limit, size=lambda item: item[0].nbytes)
    reads = max(1, min(plan.reads_in_flight if plan is not None else 1, len(batches)))
    total = sum(leaf.nbytes for leaf in leaves)
    call_progress(progress, 0, total, reads)
    done = 0

    def read(batch: list) -> Any:
        return location.layout.read(location, [request for _, request in batch])

    pending: collections.deque[tuple[list, Future]] = collections.deque()
    todo = iter(batches)
    pool = ThreadPoolExecutor(max_workers=reads, thread_name_prefix="nnx-ckpt-values-read")
    try:

        def submit() -> None:
            batch = next(todo, None)
            if batch is not None:
                pending.append((batch, pool.submit(read, batch)))

        # ``reads`` batches are read while the caller uses the one before them: the budget
        # counts exactly that.
        for _ in range(reads):
            submit()
        while pending:
            batch, future = pending.popleft()
            try:
                values = future.result()
            except Exception as err:
                if isinstance(err, CheckpointError):
                    raise
                # What the layout let through (NumPy out of memory), in our words.
                path = where or location.data
                raise read_error(path, err, unchanged="nothing was changed") from err
            submit()
            for (leaf, _request), value in zip(batch, values, strict=True):
                array = np.asarray(value)
                if tuple(array.shape) != leaf.shape:
                    raise CorruptCheckpointError(
                        f"Checkpoint at {where or location.data} returned {leaf.name} with shape "
                        f"{tuple(array.shape)} instead of {leaf.shape}; restore the checkpoint "
                        "from a copy or save it again."
                    )
                yield leaf, array
            done += sum(leaf.nbytes for leaf, _ in batch)
            del values, batch, array, future
            call_progress(progress, done, total, reads)
    finally:
        for _, future in pending:
            future.cancel()
        pending.clear()
        pool.shutdown(wait=True)


# --- arguments shared by stats and diff ---------------------------------------------------


ProgressArg = Progress | bool | None


def select_leaves(
    leaves: Sequence[LeafInfo], select: str | None, where: str
) -> tuple[list[LeafInfo], int]:
    """The leaves whose key matches the regex ``select`` (``re.search``), and how many did not.

    Raises:
      InvalidArgumentError: ``select`` is not a valid regex, or matches no key.
    """
    import re

    from nnx_ckpt_widgets import _text
    from nnx_ckpt_widgets.errors import InvalidArgumentError

    if select is None:
        return list(leaves), 0
    if not isinstance(select, str):
        raise InvalidArgumentError(
            f"select must be a regex string such as r'kernel$', got {type(select).__name__}."
        )
    try:
        pattern = re.compile(select)
    except re.error as err:
        raise InvalidArgumentError(
            f"select={select!r} is not a valid regex ({err}); fix the pattern, e.g. "
            r"r'layers/\d+/kernel'."
        ) from err
    chosen = [leaf for leaf in leaves if pattern.search(leaf.name)]
    if leaves and not chosen:
        examples = ", ".join(_text.clip(leaf.name, 40) for leaf in list(leaves)[:3])
        raise InvalidArgumentError(
            f"select={select!r} matches none of the {len(leaves)} arrays of {where} (keys look "
            f"like {examples}); change the pattern."
        )
    return chosen, len(leaves) - len(chosen)


def progress_callback(
    progress: ProgressArg, what: str
) -> tuple[Callable[..., None] | None, Callable[[], None]]:
    """The ``progress`` argument as a callback, and a function to call when done.

    ``None`` shows a tqdm bar when stderr is a terminal, ``True`` always, ``False`` never;
    a callable is called as ``progress(done_bytes, total_bytes)``, with
    ``reads_in_flight=`` too when it takes that keyword (see :func:`call_progress`).
    """
    import sys

    if callable(progress):
        return progress, lambda: None
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        return None, lambda: None
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def update(done: int, total: int, reads_in_flight: int = 1) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=what, unit="B", unit_scale=True, unit_divisor=1024))
            bars[0].set_postfix_str(f"{reads_in_flight} reads in flight", refresh=False)
        bars[0].update(done - bars[0].n)

    def close() -> None:
        if bars:
            bars[0].close()

    return update, close
