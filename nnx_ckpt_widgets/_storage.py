"""Where checkpoint files live: a local folder or a ``gs://`` bucket, through the same calls.

Every layout reads through these functions only: one listing per folder (names of files and of
subfolders together), small files read whole, byte ranges, the TensorStore key-value spec under
which Orbax keeps the arrays, and :func:`guarded` around Orbax's own reads. A layout never
touches ``os`` or ``pathlib`` itself, so each storage backend serves every layout at once.

Local paths are ``pathlib.Path``. A ``gs://`` URL (or an ``etils.epath.Path`` of one) is an
``etils.epath.Path`` handled by :mod:`nnx_ckpt_widgets._bucket`; it keeps its scheme in what is
shown and in every error, and is never turned into a local path.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from nnx_ckpt_widgets import _bucket
from nnx_ckpt_widgets.errors import CheckpointError, CheckpointNotFoundError, InvalidArgumentError

# Any other "scheme://" is one Orbax 0.12.8 cannot read: it sends only gs:// to a cloud driver
# and would normalise s3://b/x into the local path s3:/b/x (S3 is orbax issue 359).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
T = TypeVar("T")
R = TypeVar("R")
# Small files already read during one look at a checkpoint (see one_look): several layouts
# may ask for the same _CHECKPOINT_METADATA, and on a bucket each read is a request.
_SEEN: contextvars.ContextVar[dict[str, bytes] | None] = contextvars.ContextVar(
    "nnx_ckpt_seen", default=None
)


@contextlib.contextmanager
def one_look() -> Iterator[None]:
    """Within the block, each small file is read once (the checkpoint is taken as it was when
    first read); what fails to read is not remembered. Nested blocks share the outer one's
    files."""
    if _SEEN.get() is not None:
        yield
        return
    token = _SEEN.set({})
    try:
        yield
    finally:
        _SEEN.reset(token)


class AnyPath(Protocol):
    """What the layouts use of a path: ``pathlib.Path`` for a local folder, and
    ``etils.epath.Path`` (Orbax's own path type) for a ``gs://`` URL, both satisfy it. Typed
    as a protocol because etils ships no type information: mypy checks every layout against
    exactly these operations."""

    @property
    def name(self) -> str: ...

    @property
    def parent(self) -> AnyPath: ...

    @property
    def suffix(self) -> str: ...

    def __truediv__(self, key: str) -> AnyPath: ...

    def exists(self) -> bool: ...

    def is_dir(self) -> bool: ...

    def is_file(self) -> bool: ...

    def iterdir(self) -> Iterator[AnyPath]: ...

    def read_bytes(self) -> bytes: ...

    def read_text(self, encoding: str | None = ...) -> str: ...

    def __fspath__(self) -> str: ...


@dataclasses.dataclass(frozen=True)
class Listing:
    """One folder, listed once: the names of its files and of its subfolders."""

    path: AnyPath
    files: frozenset[str]
    dirs: frozenset[str]
    is_file: bool = False  # the path is a file (a .safetensors file, say), not a folder

    @property
    def names(self) -> frozenset[str]:
        return self.files | self.dirs

    def __contains__(self, name: object) -> bool:
        return name in self.files or name in self.dirs


def as_path(path: str | os.PathLike[str] | AnyPath) -> AnyPath:
    """The path object every layout works with, from what the user passed.

    Raises:
      InvalidArgumentError: the URL's scheme is one Orbax cannot read.
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    if _bucket.is_bucket(text):
        return _bucket.as_path(text)
    if _URL.match(text):
        raise InvalidArgumentError(
            f"Cannot read {text}: Orbax 0.12.8 reads only local folders and gs:// buckets "
            "(S3 support is the open orbax issue 359); copy the checkpoint to a local folder, "
            "or mount the bucket as one, and pass that path."
        )
    return Path(text).expanduser()


@contextlib.contextmanager
def spelled_as_given(path: object) -> Iterator[None]:
    """Errors raised inside name ``~/runs/ckpt`` as the user wrote it, not as it expands."""
    given = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not isinstance(given, str) or not given.startswith("~"):
        yield
        return
    expanded = str(Path(given).expanduser())
    try:
        yield
    except CheckpointError as err:
        if err.args and isinstance(err.args[0], str) and expanded in err.args[0]:
            err.args = (err.args[0].replace(expanded, given), *err.args[1:])
        raise


def absolute(path: AnyPath) -> AnyPath:
    """``path`` as Orbax and TensorStore need it: absolute, with ``..`` and symlinks resolved
    (TensorStore rejects a file path holding ``..``); a URL is returned as is. Only what is
    handed to them is normalised: every message shows the path as the user gave it."""
    return path.resolve() if isinstance(path, Path) else path


def is_bucket(path: AnyPath) -> bool:
    return _bucket.is_bucket(path)


def not_found(path: AnyPath) -> CheckpointNotFoundError:
    """The error for a path with nothing at it; a bucket's says whether the bucket exists."""
    if is_bucket(path) and not _bucket.bucket_exists(path):
        bucket, _ = _bucket.split(path)
        return CheckpointNotFoundError(
            f"No checkpoint at {path}: the bucket {bucket!r} does not exist, or these "
            "credentials cannot see it; check the bucket name and the project."
        )
    return CheckpointNotFoundError(
        f"No checkpoint at {path}: the path does not exist; check the spelling or the "
        "working directory."
    )


def listdir(path: AnyPath) -> Listing | None:
    """List ``path`` once; None when it is not a folder (missing, or a file).

    Raises:
      CheckpointNotFoundError: the folder exists but cannot be listed.
      StorageError: the bucket cannot be reached.
    """
    if is_bucket(path):
        found = _bucket.listdir(path)
        return None if found is None else Listing(path, *found)
    files: set[str] = set()
    dirs: set[str] = set()
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a symlink loop: no folder; the layout that meets it says so
                    is_dir = False
                (dirs if is_dir else files).add(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise CheckpointNotFoundError(
            f"Cannot list checkpoint folder {path}: {err.strerror}; check its permissions."
        ) from err
    return Listing(path, frozenset(files), frozenset(dirs))


def exists(path: AnyPath) -> bool:
    if is_bucket(path):
        return _bucket.info(path) is not None
    return os.path.exists(path)


def is_file(path: AnyPath) -> bool:
    if is_bucket(path):
        found = _bucket.info(path)
        return found is not None and found.get("type") == "file"
    return os.path.isfile(path)


def read_bytes(path: AnyPath) -> bytes:
    """Read a small file whole (raises ``OSError``; ``StorageError`` for a bucket that does not
    answer)."""
    seen = _SEEN.get()
    key = str(path)
    if seen is not None and key in seen:
        return seen[key]
    data = _bucket.read_bytes(path) if is_bucket(path) else Path(path).read_bytes()
    if seen is not None:
        seen[key] = data
    return data


def kvstore(path: AnyPath) -> dict[str, Any]:
    """The TensorStore key-value store spec of a folder."""
    if is_bucket(path):
        return _bucket.kvstore(path)
    return {"driver": "file", "path": str(absolute(path))}


def ts_context(path: AnyPath) -> Any:
    """The TensorStore context for our own reads of ``path``: bounded retries on a bucket."""
    return _bucket.ts_context() if is_bucket(path) else None


def timeout(path: AnyPath) -> float | None:
    """Seconds one read of ``path`` may wait; None (no bound) for a local file."""
    return _bucket.timeout() if is_bucket(path) else None


def storage_error(path: AnyPath, err: BaseException) -> Exception | None:
    """The :class:`StorageError` for a transport failure on a bucket; None for anything else
    (a damaged file is the caller's to report)."""
    return _bucket.error(path, err) if is_bucket(path) else None


def guarded(path: AnyPath, fn: Callable[[], T]) -> T:
    """``fn()``, a read of ``path`` through Orbax or TensorStore: bounded in time on a bucket
    (see :func:`nnx_ckpt_widgets._bucket.guarded`), called as is for a local path."""
    return _bucket.guarded(path, fn) if is_bucket(path) else fn()


def concurrently(path: AnyPath, fn: Callable[[R], T], items: Iterable[R]) -> list[T]:
    """``[fn(x) for x in items]``; on a bucket, where each call waits on the network, several
    at a time (the first exception is raised, as in the loop)."""
    todo = list(items)
    if not is_bucket(path) or len(todo) < 2:
        return [fn(x) for x in todo]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
        # Each call in a copy of this context, so one_look() holds in the helper threads too.
        futures = [pool.submit(contextvars.copy_context().run, fn, x) for x in todo]
        return [future.result() for future in futures]


def read_json(file: AnyPath, what: str) -> Any:
    """Parse a small JSON file of a checkpoint, as hostile input (see
    :func:`nnx_ckpt_widgets._untrusted.parse_json`: depth bounded, no ``RecursionError``).

    Raises:
      CorruptCheckpointError: it cannot be read, is not JSON, or nests too deep.
    """
    from nnx_ckpt_widgets._untrusted import parse_json
    from nnx_ckpt_widgets.errors import CorruptCheckpointError

    try:
        raw = read_bytes(file)
    except OSError as err:
        raise CorruptCheckpointError(
            f"Checkpoint at {file.parent} is damaged: {file.name} ({what}) cannot be read "
            f"({err.strerror or err}); restore it from a copy or save it again."
        ) from err
    return parse_json(raw, file, what)


def size(path: AnyPath) -> int:
    """A file's size in bytes (raises ``OSError``)."""
    if is_bucket(path):
        found = _bucket.info(path)
        if found is None or found.get("type") != "file":
            raise FileNotFoundError(f"{path} is missing")
        return int(found["size"])
    return os.path.getsize(path)


def is_local(path: AnyPath) -> bool:
    """Whether ``path`` is on this machine's file system (not a URL)."""
    return isinstance(path, Path)


def read_into(path: AnyPath, offset: int, buffer: memoryview) -> int:
    """Fill ``buffer`` with the bytes at ``offset`` of a local file; returns how many it got
    (fewer at the file's end; raises ``OSError``)."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        return fill(handle, buffer)


def fill(reader: Any, buffer: memoryview) -> int:
    """Fill ``buffer`` from ``reader``'s ``readinto``; returns how many bytes it got (fewer
    when the reader ends first)."""
    done = 0
    while done < len(buffer):
        got = reader.readinto(buffer[done:])
        if not got:
            break
        done += got
    return done


def read_range(path: AnyPath, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` of a file, or fewer at its end (raises ``OSError``)."""
    if is_bucket(path):
        return _bucket.read_range(path, offset, length)
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)
