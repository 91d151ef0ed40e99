"""Checkpoints in a Google Cloud Storage bucket (``gs://``), the storage Orbax writes natively.

Paths are ``etils.epath.Path`` objects, as Orbax uses them; they print as ``gs://bucket/...``
and are never turned into local paths. Listings and small files go through gcsfs, the file
system ``etils.epath`` uses for ``gs://`` (one listing request per folder); byte ranges go
through TensorStore's ``gcs`` key-value store, as Orbax's own array reads do.

Every request is bounded: gcsfs calls get a timeout, TensorStore reads a bounded retry
policy, and the Orbax calls a layout makes run under :func:`guarded`, a watchdog, because
Orbax's own TensorStore context retries a dead endpoint for many minutes. A bucket that does
not answer gives a :class:`~nnx_ckpt_widgets.errors.StorageError` naming the URL, never a
hang. ``NNX_CKPT_GCS_TIMEOUT`` (seconds, default 60) sets the bound.

The writes at the end serve ``convert`` only, into its own staging prefix and its own ``dst``
(see :mod:`nnx_ckpt_widgets._commit`); nothing here writes into a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from nnx_ckpt_widgets.errors import CheckpointError, InvalidArgumentError, StorageError, first_line

SCHEME = "gs://"
TIMEOUT_ENV = "NNX_CKPT_GCS_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
EXTRA = 'pip install "nnx-ckpt-widgets[gcs]"'
# TensorStore's words for a request that never got an answer (not for a damaged file).
_TRANSPORT_MARKERS = (
    "CURL error",
    "retry attempts failed",
    "UNAVAILABLE",
    "DEADLINE_EXCEEDED",
    "Connection refused",
    "Could not connect",
    "Failed to connect",
)
_DENIED_MARKERS = ("PERMISSION_DENIED", "UNAUTHENTICATED")
T = TypeVar("T")


def timeout() -> float:
    """Seconds any one bucket request (or one guarded Orbax call) may take."""
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        return DEFAULT_TIMEOUT


def is_bucket(path: Any) -> bool:
    return str(path).startswith(SCHEME)


def as_path(text: str, verb: str = "read") -> Any:
    """The ``etils.epath.Path`` of a ``gs://`` URL (``verb``: what the caller will do, for the
    errors).

    Raises:
      StorageError: gcsfs, which etils.epath needs for ``gs://``, is not installed.
    """
    try:
        import gcsfs  # noqa: F401
    except ImportError as err:
        raise StorageError(
            f"Cannot {verb} {text}: gs:// buckets need gcsfs, which is not installed; "
            f"install it with {EXTRA}."
        ) from err
    from etils import epath

    if not text[len(SCHEME) :].strip("/"):
        raise InvalidArgumentError(
            f"Cannot {verb} {text}: the URL names no bucket; pass gs://BUCKET/PATH."
        )
    return epath.Path(text.rstrip("/"))


def split(path: Any) -> tuple[str, str]:
    """``("bucket", "a/b")`` of ``gs://bucket/a/b``."""
    bucket, _, key = str(path)[len(SCHEME) :].partition("/")
    return bucket, key.strip("/")


def _fs() -> Any:
    import fsspec

    return fsspec.filesystem("gs")


def _key(path: Any) -> str:
    return str(path)[len(SCHEME) :].rstrip("/")


def error(path: Any, err: BaseException, verb: str = "read") -> StorageError | None:
    """A :class:`StorageError` naming ``path`` when ``err`` (or what it chains) is a transport
    failure rather than a damaged or missing file; None otherwise. ``verb`` says what failed
    (``read``, or ``write`` for convert's output)."""
    import asyncio

    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    seconds = f"{timeout():g}"
    for inner in chain:
        if isinstance(inner, StorageError):
            return inner
        if isinstance(inner, (TimeoutError, asyncio.TimeoutError)) or type(inner).__name__ in (
            "FSTimeoutError",
        ):
            return StorageError(
                f"Cannot {verb} {path}: the bucket did not answer within {seconds} s; check the "
                f"network and the bucket (set {TIMEOUT_ENV} to wait longer)."
            )
        text = str(inner)
        if getattr(inner, "code", None) in (401, 403) or any(m in text for m in _DENIED_MARKERS):
            return StorageError(
                f"Cannot {verb} {path}: access denied ({first_line(inner, 120)}); sign in with "
                "`gcloud auth application-default login` or check the bucket's permissions."
            )
        if any(marker in text for marker in _TRANSPORT_MARKERS) or _is_connection_error(inner):
            return StorageError(
                f"Cannot {verb} {path}: the bucket cannot be reached ({first_line(inner, 160)}); "
                "check the network, or that the storage emulator is running."
            )
    return None


def _is_connection_error(err: BaseException) -> bool:
    if isinstance(err, ConnectionError):
        return True
    module = type(err).__module__ or ""
    return module.startswith("aiohttp") and "Connect" in type(err).__name__


# Endpoints that accepted a connection lately (monotonic time): probed again after this long.
_REACHED: dict[tuple[str, int], float] = {}
_PROBE_EVERY = 10.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _endpoint() -> tuple[str, int]:
    """Host and port gcsfs sends its requests to: the one configured for fsspec's ``gs``, the
    emulator's, or Google's."""
    import fsspec.config

    url = str(fsspec.config.conf.get("gs", {}).get("endpoint_url") or "")
    url = url or os.environ.get("STORAGE_EMULATOR_HOST", "")
    if url in ("", "default"):
        url = "https://storage.googleapis.com"
    elif "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def forget_endpoints() -> None:
    """Probe every endpoint again on the next call (the emulator calls it when it stops)."""
    _REACHED.clear()


def check_reachable(path: Any, verb: str = "read") -> None:
    """Fail at once when the storage endpoint refuses connections or its name does not resolve.

    gcsfs retries such a request six times with backoff, about 33 s, before it gives up (a
    browser whose emulator was stopped would spin that long on a click). A refused connection
    or an unknown host is a definite answer, so one TCP connect settles it. Anything slower or
    less definite (a timeout, a proxy in the way) is left to gcsfs and :func:`timeout`.
    """
    if any(os.environ.get(name) for name in _PROXY_VARS):
        return  # the proxy, not this machine, reaches the endpoint
    host, port = _endpoint()
    last = _REACHED.get((host, port))
    if last is not None and time.monotonic() - last < _PROBE_EVERY:
        return
    try:
        socket.create_connection((host, port), timeout=min(timeout(), 5.0)).close()
    except (ConnectionRefusedError, socket.gaierror) as err:
        raise StorageError(
            f"Cannot {verb} {path}: the storage endpoint {host}:{port} cannot be reached "
            f"({err.strerror or err}); check the network, or that the storage emulator is running."
        ) from err
    except OSError:
        return  # not definite: gcsfs tries, within the timeout
    _REACHED[(host, port)] = time.monotonic()


def _call(path: Any, fn: Callable[..., T], *args: Any, verb: str = "read", **kwargs: Any) -> T:
    """A gcsfs call with the timeout; transport failures become :class:`StorageError`."""
    check_reachable(path, verb)
    try:
        return fn(*args, timeout=timeout(), **kwargs)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise (error(path, err, verb) or err) from err


def listdir(path: Any) -> tuple[frozenset[str], frozenset[str]] | None:
    """``(files, dirs)`` of a folder in one listing request; None when nothing is there or it is
    one object (a file)."""
    fs = _fs()
    key = _key(path)
    try:
        entries = _call(path, fs.ls, key, detail=True, refresh=True)
    except FileNotFoundError:
        return None
    files: set[str] = set()
    dirs: set[str] = set()
    for entry in entries:
        name = str(entry.get("name", "")).rstrip("/")
        if name == key and entry.get("type") != "directory":
            return None  # the listing of an object is the object itself
        (dirs if entry.get("type") == "directory" else files).add(name.rsplit("/", 1)[-1])
    return frozenset(files), frozenset(dirs)


def info(path: Any) -> dict[str, Any] | None:
    """The object's (or folder's) description; None when it is not there."""
    try:
        return _call(path, _fs().info, _key(path))
    except FileNotFoundError:
        return None


def bucket_exists(path: Any) -> bool:
    bucket, _ = split(path)
    try:
        _call(path, _fs().info, bucket)
    except FileNotFoundError:
        return False
    return True


def read_bytes(path: Any) -> bytes:
    """One small object, whole (``FileNotFoundError`` when it is missing)."""
    return _call(path, _fs().cat_file, _key(path))


_STORES: dict[str, Any] = {}
_STORES_LOCK = threading.Lock()


def ts_context() -> Any:
    """A TensorStore context whose gcs requests give up in seconds, not minutes."""
    import tensorstore as ts

    return ts.Context(
        {"gcs_request_retries": {"max_retries": 4, "initial_delay": "0.1s", "max_delay": "1s"}}
    )


def kvstore(path: Any) -> dict[str, Any]:
    """The TensorStore spec of a folder in a bucket."""
    bucket, key = split(path)
    return {"driver": "gcs", "bucket": bucket, "path": f"{key}/" if key else ""}


def read_range(path: Any, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of an object, through TensorStore's gcs driver."""
    import tensorstore as ts

    bucket, key = split(path)
    try:
        with _STORES_LOCK:
            if bucket not in _STORES:
                spec = {"driver": "gcs", "bucket": bucket}
                _STORES[bucket] = ts.KvStore.open(spec, context=ts_context()).result(
                    timeout=timeout()
                )
            store = _STORES[bucket]
        result = store.read(key, byte_range=slice(offset, offset + length)).result(
            timeout=timeout()
        )
    except Exception as err:
        raise (error(path, err) or OSError(f"cannot read {path}: {first_line(err)}")) from err
    if result.state != "value":
        raise FileNotFoundError(f"{path} is missing")
    return bytes(result.value)


_ABANDONED: list[threading.Thread] = []


def abandoned() -> list[threading.Thread]:
    """The guarded reads given up on that are still running (Orbax retrying on its own)."""
    _ABANDONED[:] = [t for t in _ABANDONED if t.is_alive()]
    return list(_ABANDONED)


def guarded(path: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` (an Orbax or TensorStore read of ``path``) under the watchdog.

    Orbax's TensorStore context retries an endpoint that refuses connections for many
    minutes; the call runs in a helper thread, and when it has not returned within
    :func:`timeout` seconds the caller gets a :class:`StorageError` at once. The abandoned
    read only ever fills buffers of its own, never the caller's target.

    Raises:
      StorageError: no answer in time, or a transport failure.
    """
    check_reachable(path)  # Orbax's own listings go through gcsfs and its 33 s of retries
    worker, outcome = _in_thread(f"nnx-ckpt read {path}", fn)
    worker.join(timeout())
    if not outcome:
        _ABANDONED.append(worker)
        raise StorageError(
            f"Cannot read {path}: the bucket did not answer within {timeout():g} s; check the "
            f"network and the bucket (set {TIMEOUT_ENV} to wait longer)."
        )
    return _outcome(path, outcome[0], "read")


def _in_thread(name: str, fn: Callable[[], T]) -> tuple[threading.Thread, list[Any]]:
    """``fn`` started in a daemon thread, in a copy of the caller's context (Orbax v1's
    Context, the layout to read, is one); the list gets ``(ok, value or error)`` when it
    ends."""
    import contextvars

    outcome: list[Any] = []
    context = contextvars.copy_context()

    def work() -> None:
        try:
            outcome.append((True, context.run(fn)))
        except BaseException as err:  # handed to the caller's thread
            outcome.append((False, err))

    worker = threading.Thread(target=work, name=name, daemon=True)
    worker.start()
    return worker, outcome


def _outcome(path: Any, outcome: tuple[bool, Any], verb: str) -> Any:
    """The value of a call run by :func:`_in_thread`, or its error (a transport failure as a
    :class:`StorageError`)."""
    ok, value = outcome
    if ok:
        return value
    if not isinstance(value, CheckpointError):
        transport = error(path, value, verb)
        if transport is not None:
            raise transport from value
    raise value


# --- writes (convert's output only: its own staging prefix, then its own dst) --------------


def watched(path: Any, fn: Callable[[], T]) -> T:
    """Run ``fn`` (an Orbax save into ``path``) in a helper thread, and give up on it with a
    :class:`StorageError` as soon as the endpoint refuses connections.

    A save may rightly take long, so unlike :func:`guarded` there is no bound on the whole
    call; but Orbax's TensorStore context retries an endpoint that is gone for many minutes
    (more than six, measured on the emulator). The endpoint is probed once a second while the
    save runs. A save given up on can only ever write into its own staging prefix, which is
    never committed.

    Raises:
      StorageError: the endpoint refuses connections, or the save failed in transport.
    """
    worker, outcome = _in_thread(f"nnx-ckpt write {path}", fn)
    while True:
        worker.join(1.0)
        if outcome:
            return _outcome(path, outcome[0], "write")
        _REACHED.clear()  # a fresh probe each time: one TCP connect a second
        try:
            check_reachable(path, "write")
        except StorageError:
            _ABANDONED.append(worker)
            raise


def objects(path: Any) -> list[str]:
    """Every object at ``path``: ``""`` for an object of that very name, and the names under
    ``path/`` relative to it (``a/b``), sorted; one listing without delimiter. An empty list
    when nothing is there."""
    fs = _fs()
    key = _key(path)
    found = _call(path, fs.find, key, verb="write")
    names = []
    for name in found:
        name = str(name)
        if name == key:
            names.append("")
        elif name.startswith(key + "/"):
            names.append(name[len(key) + 1 :])
    return sorted(names)


def copy(src: Any, dst: Any) -> None:
    """Copy one object inside the bucket service (a rewrite: the bytes never come here)."""
    _call(dst, _fs().cp_file, _key(src), _key(dst), verb="write")


def remove(paths: list[Any]) -> None:
    """Delete objects, in the order given (what makes a checkpoint readable goes first)."""
    fs = _fs()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # already gone: what was asked
            _call(path, fs.rm_file, _key(path), verb="write")


class Upload:
    """A new object, streamed in parts: gcsfs's ``open(..., "wb")`` sends each 5 MiB block as
    it fills (a resumable upload), and the object appears only when :meth:`close` finishes it.
    :meth:`discard` ends the upload without an object, where a plain ``with fs.open(...)``
    would finish it truncated (gcsfs closes, and so commits, a file left open, also when it is
    garbage collected)."""

    def __init__(self, path: Any):
        self.path = path
        self._file = _call(path, _fs().open, _key(path), "wb", verb="write")

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        step = int(self._file.blocksize)
        # A block at a time: gcsfs copies what it is given into its buffer before sending it,
        # so a whole array would be held twice.
        for start in range(0, len(view), step):
            # A dead endpoint fails here at once rather than after gcsfs's retries of a block.
            check_reachable(self.path, "write")
            try:
                self._file.write(view[start : start + step])
            except Exception as err:
                raise (error(self.path, err, "write") or err) from err
        return len(view)

    def close(self) -> None:
        check_reachable(self.path, "write")
        try:
            self._file.close()
        except Exception as err:
            raise (error(self.path, err, "write") or err) from err

    def discard(self) -> None:
        # Cancels an upload in parts (nothing was sent otherwise); an endpoint that is gone
        # keeps nothing of an unfinished upload either.
        with contextlib.suppress(Exception):
            self._file.discard()
        self._file.closed = True  # never finished later, on close or at garbage collection

    def __enter__(self) -> Upload:
        return self

    def __exit__(self, kind: Any, *rest: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
