"""Metadata from a checkpoint, read as hostile input: the one way in for every layout.

Whoever wrote a checkpoint controls every byte of its JSON files and headers
(``_METADATA``, ``_sharding``, zarr's ``.zarray``, ``_CHECKPOINT_METADATA``, safetensors
headers and indexes, ``config.json``). Everything a layout takes from them goes through here:

- :func:`parse_json` bounds the nesting depth before ``json.loads`` sees the bytes (CPython's
  decoder recurses, and what it returns is walked again by ``repr``, ``json.dumps`` and the
  renderers), so no ``RecursionError`` can come out of a checkpoint;
- :func:`shape` and :func:`dtype_name` check what an array claims to be: non-negative integer
  dimensions, at most :data:`MAX_DIMS` of them, element counts and byte sizes that fit in
  int64, and only the dtypes JAX can hold;
- :func:`span` checks a ``[begin, end)`` pair of byte offsets.

The checks raise :class:`Invalid` with the reason; each layout turns it into its own
``CorruptCheckpointError`` sentence naming the file (the metadata is inconsistent, so the
checkpoint is damaged).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

from nnx_ckpt_widgets.errors import CheckpointError, CorruptCheckpointError

# No checkpoint format nests deeper than a handful of levels (HF configs about 4, Orbax's
# metadata about 6); user custom_metadata rarely more. 64 leaves room for both while keeping
# every later walk (repr, json.dumps, treescope) far from Python's recursion limit of 1000.
MAX_DEPTH = 64
# XLA's own limit on an array's rank.
MAX_DIMS = 64
INT64_MAX = 2**63 - 1
# What JSON nesting opens and closes, and what may hide them inside a string.
_OPEN, _CLOSE = b"[{", b"]}"
_KEEP = b'"[]{}'
_DROP = bytes(b for b in range(256) if b not in _KEEP)


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the block.

    Parsing and checking a header of 10^6 tensors allocates tens of millions of objects, none
    in a cycle; each allocation burst sets off a collection that walks everything allocated so
    far, which more than doubles the time (measured: ``json.loads`` of a 77 MB header 5.2 s with
    the collector, 2.1 s without). Reference counting still frees everything as usual.
    The same holds wherever a call builds 10^5 long-lived objects (inspect, compare, restore,
    the browser's first view): cycles made meanwhile are collected once it resumes, when the
    block that paused it ends. The pause is process-wide: cells that run during a restore in
    the browser's worker thread run without it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Invalid(ValueError):
    """A value from a checkpoint's metadata that does not hold up; the message says why."""


def depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in the JSON text ``raw`` (brackets inside
    strings do not count). Linear time, without parsing: about 5% of ``json.loads``."""
    opened = raw.count(b"[") + raw.count(b"{")
    if opened <= MAX_DEPTH:
        return opened  # an upper bound, and within the limit: nothing more to learn
    import numpy as np

    if b"\\" in raw:
        # Escaped backslashes first, then escaped quotes: what stays is a quote that opens or
        # closes a string (left-to-right pairing is how JSON reads a run of backslashes).
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = np.frombuffer(raw.translate(None, _DROP), np.uint8)
    # A bracket is inside a string when an odd number of quotes precede it; uint8 sums wrap
    # but keep their parity, at a quarter of the memory of int32.
    outside = (np.cumsum(marks == ord('"'), dtype=np.uint8) & 1) == 0
    opens = (marks == _OPEN[0]) | (marks == _OPEN[1])
    brackets = marks[(opens | (marks == _CLOSE[0]) | (marks == _CLOSE[1])) & outside]
    step = np.where((brackets == _OPEN[0]) | (brackets == _OPEN[1]), 1, -1).astype(np.int8)
    return int(np.cumsum(step, dtype=np.int32).max(initial=0))


def parse_json(
    raw: bytes,
    file: Any,
    what: str,
    damaged: Callable[[str], CheckpointError] | None = None,
) -> Any:
    """``json.loads(raw)`` for the bytes of ``file`` (``what`` it is, for the message).

    ``damaged(why)`` makes the error of a layout that words its own (a safetensors header);
    by default it names ``file`` and what it holds.

    Raises:
      CorruptCheckpointError: not UTF-8 JSON, or nested deeper than :data:`MAX_DEPTH`.
    """
    if damaged is None:

        def damaged(why: str) -> CheckpointError:
            return CorruptCheckpointError(
                f"Checkpoint at {file.parent} is damaged: {file.name} ({what}) {why}; restore "
                "it from a copy or save it again."
            )

    too_deep = f"nests deeper than {MAX_DEPTH} levels"
    try:
        if depth(raw) > MAX_DEPTH:
            raise damaged(too_deep)
        return json.loads(raw)
    except RecursionError as err:  # depth() bounds valid JSON; this guards the rest
        raise damaged(too_deep) from err
    except (UnicodeDecodeError, ValueError) as err:
        raise damaged("is not valid JSON") from err


def shape(value: Any) -> tuple[int, ...]:
    """An array's shape from metadata: a list of at most :data:`MAX_DIMS` non-negative ints
    whose product fits in int64.

    Raises:
      Invalid: anything else (floats, ``Infinity``, booleans, negatives, too many dims).
    """
    if type(value) is list and len(value) <= MAX_DIMS:
        for n in value:
            if type(n) is not int or not 0 <= n <= INT64_MAX:
                break
        else:
            dims = tuple(value)
            if math.prod(dims) <= INT64_MAX:
                return dims
    raise Invalid(_why_shape(value))


def _why_shape(value: Any) -> str:
    if type(value) is not list:
        return f"its shape is a {type(value).__name__}, not a list"
    if len(value) > MAX_DIMS:
        return f"its shape has {len(value):,} dimensions (at most {MAX_DIMS})"
    for n in value:
        if type(n) is not int:
            return f"its shape holds {_short(n)}, not a whole number"
        if n < 0:
            return f"its shape holds the negative size {n}"
        if n > INT64_MAX:
            return f"its shape holds the size {n}, larger than int64"
    return "its shape has more elements than fit in int64"


def nbytes(dims: tuple[int, ...], itemsize: int) -> int:
    """Bytes of an array of a checked shape.

    Raises:
      Invalid: more bytes than fit in int64.
    """
    total = math.prod(dims) * itemsize
    if total > INT64_MAX:
        raise Invalid(f"its shape {dims} needs {total:,} bytes, more than fit in int64")
    return total


def span(value: Any, limit: int) -> tuple[int, int]:
    """A ``[begin, end)`` pair of byte offsets with ``0 <= begin <= end``; ``end`` beyond
    ``limit`` (the bytes there are) is for the caller to word.

    Raises:
      Invalid: not two whole numbers in order.
    """
    if type(value) is list and len(value) == 2:
        begin, end = value
        if type(begin) is int and type(end) is int and 0 <= begin <= end:
            return begin, end
    raise Invalid("its data_offsets are not two whole numbers in order")


@functools.cache
def known_dtypes() -> frozenset[str]:
    """Names of the dtypes an array in a checkpoint may have: NumPy's numeric ones and
    ml_dtypes' (``bfloat16``, the float8 family, ``int4``...), which JAX reads."""
    import ml_dtypes
    import numpy as np

    names = {"bool", "complex64", "complex128"}
    names.update(f"{kind}{bits}" for kind in ("int", "uint") for bits in (8, 16, 32, 64))
    names.update(f"float{bits}" for bits in (16, 32, 64))
    for name in dir(ml_dtypes):
        found = getattr(ml_dtypes, name)
        if isinstance(found, type) and issubclass(found, np.generic):
            names.add(np.dtype(found).name)
    return frozenset(names)


@functools.lru_cache(maxsize=256)  # a checkpoint has a few dtypes and up to 10^5 arrays
def itemsize(dtype: str) -> int:
    """Bytes one element of ``dtype`` takes, spelled as NumPy (with ml_dtypes) or zarr does.

    Raises:
      TypeError, Invalid: ``dtype`` is not a dtype JAX can hold.
    """
    import ml_dtypes  # noqa: F401  (NumPy knows bfloat16 and fp8 by name once it is imported)
    import numpy as np

    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return np.dtype(dtype_name(dtype)).itemsize


def dtype_name(spec: Any) -> str:
    """The canonical name (``float32``, ``bfloat16``) of a dtype as zarr or NumPy spell it
    (``<f4``, ``bfloat16``, ``|b1``).

    Raises:
      Invalid: not a string, or not a dtype in :func:`known_dtypes` (``"<U4"``, ``"|V9"``).
    """
    if type(spec) is not str:
        import numpy as np

        # A dtype object, as Orbax's own metadata reader returns it.
        if not isinstance(spec, np.dtype | type) or not np.issubdtype(spec, np.generic):
            raise Invalid(f"its dtype {_short(spec)} is not a dtype name")
        spec = np.dtype(spec).name
    if len(spec) > 40:
        raise Invalid(f"its dtype {_short(spec)} is not one JAX can hold")
    name = _dtype_name(spec)
    if name is None:
        raise Invalid(f"its dtype {_short(spec)} is not one JAX can hold")
    return name


@functools.lru_cache(maxsize=256)
def _dtype_name(spec: str) -> str | None:
    import numpy as np

    try:
        name = np.dtype(spec).name
    except Exception:  # NumPy raises TypeError, ValueError, SyntaxError... for odd strings
        import ml_dtypes

        found = getattr(ml_dtypes, spec.lstrip("<>|="), None)
        name = np.dtype(found).name if isinstance(found, type) else ""
    return name if name in known_dtypes() else None


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= 40 else text[:39] + "…"
