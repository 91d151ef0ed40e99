"""The GCS emulator's own life cycle: a notebook that starts, closes and starts it again in one
kernel (Run All twice) must work, and a closed emulator must leave nothing behind."""

from __future__ import annotations

import socket

from etils import epath

from nnx_ckpt_widgets.emulator import GCSEmulator


def _port_is_free(port: int) -> bool:
    # SO_REUSEADDR: the relay's closed connections may sit in TIME_WAIT, which is fine; a socket
    # still listening on the port is not.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_close_frees_the_port_and_a_second_emulator_starts_clean():
    with GCSEmulator(buckets=["twice"]) as first:
        port = first.port
        (epath.Path("gs://twice") / "run.txt").write_text("first")
        assert [p.name for p in epath.Path("gs://twice").iterdir()] == ["run.txt"]
        assert not _port_is_free(port)
    # The relay's accept thread was blocked in accept() when close() ran.
    assert _port_is_free(port)
    with GCSEmulator(buckets=["twice"]) as second:
        assert second.port == port  # TensorStore keeps the process's first address
        assert second.running
        # A fresh emulator has fresh storage; gcsfs must not list what the first one held.
        assert list(epath.Path("gs://twice").iterdir()) == []
        (epath.Path("gs://twice") / "run.txt").write_text("second")
        assert (epath.Path("gs://twice") / "run.txt").read_text() == "second"
    assert _port_is_free(port)


def test_stop_then_start_keeps_the_port_and_the_objects():
    with GCSEmulator(buckets=["again"]) as gcs:
        (epath.Path("gs://again") / "kept.txt").write_text("kept")
        gcs.stop()
        assert not gcs.running
        assert _port_is_free(gcs.port)
        gcs.start()
        assert (epath.Path("gs://again") / "kept.txt").read_text() == "kept"


def test_a_refusing_endpoint_is_reported_at_once(monkeypatch):
    """The probe asks the endpoint gcsfs would use; a refused connection is a StorageError
    before any gcsfs retry."""
    import fsspec.config
    import pytest

    from nnx_ckpt_widgets import _bucket
    from nnx_ckpt_widgets.errors import StorageError

    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setitem(fsspec.config.conf, "gs", {"endpoint_url": f"http://127.0.0.1:{port}"})
    assert _bucket._endpoint() == ("127.0.0.1", port)
    with pytest.raises(
        StorageError,
        match=rf"^Cannot read gs://b/x: the storage endpoint 127\.0\.0\.1:{port} cannot be "
        r"reached \(Connection refused\)",
    ):
        _bucket.check_reachable("gs://b/x")
    monkeypatch.setitem(fsspec.config.conf, "gs", {})
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "127.0.0.1:4443")
    assert _bucket._endpoint() == ("127.0.0.1", 4443)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    assert _bucket._endpoint() == ("storage.googleapis.com", 443)
