"""Fault suite: damaged checkpoints and a save killed half-way, through every entry point.

Each damaged case is a fixture made from a real checkpoint (a 64-wide MLP, so one array is
stored as a chunk outside OCDBT's B-tree). The entry points are ``inspect``, ``compare``,
``restore`` (the target must stay bit-for-bit unchanged), the CLI (``inspect`` as a real
process; ``compare`` in-process), and ``CheckpointBrowser(path, model)``. Every error is a
``CheckpointError`` subclass whose message is one line naming the path and the damage; the CLI
exits 1 with one ``error: ...`` line on stderr. Outcomes (N not found, C corrupt, I incomplete,
M mismatch, ok; "failed" = the browser builds and its restore reads ``Restore failed: ...``):

====  ==========================================  =======  =======  =======  ===  =======
case  damage                                      inspect  compare  restore  CLI  browser
====  ==========================================  =======  =======  =======  ===  =======
1     the path is missing                         N        N        N        1    N
2     an empty directory                          N        N        N        1    N
3     a file where the directory should be        N        N        N        1    N
4     ``_METADATA`` is missing                    C        C        C        1    C
5     ``_METADATA`` holds garbage                 C        C        C        1    C
6a    ``_METADATA`` valid JSON, not an object     C        C        C        1    C
6b    ``_METADATA`` entries of the wrong schema   C        C        C        1    C
6c    ``_sharding`` valid JSON, not an object     C        C        C        1    C
7     ``_CHECKPOINT_METADATA`` holds garbage      C        C        C        1    C
8     root ``manifest.ocdbt`` truncated           C        C        C        1    C
9a    every file under ``d/`` deleted             C        C        C        1    C
9b    only the files holding array chunks gone    ok       ok       C        0    failed
10a   every file under ``d/`` random bytes        C        C        C        1    C
10b   only an array's chunk bytes random          ok       ok       C        0    failed
11a   an Orbax tmp folder (interrupted save)      I        I        I        1    I
11b   a manager root whose only save is a tmp     I        I        I        1    I
12    a checkpoint of another model               ok       ok (*)   M        0    failed
13    manager root, one broken step (see below)   per step
14a   v1: the ``state/`` checkpointable is gone    C        C        C        1    C
14b   v1: ``state/_METADATA`` truncated            C        C        C        1    C
14c   v1: no commit marker, no commit time         I        I        I        1    I
14d   v1: an interrupted ``ocp.v1.save`` (tmp)     I        I        I        1    I
15    a folder in no known layout                 U        U        U        1    U
====  ==========================================  =======  =======  =======  ===  =======

(*) the report lists the mismatches; the browser shows it. Case 8 truncates the root manifest:
the per-process ``ocdbt.process_0/manifest.ocdbt`` is not read after a save, and a restore from
a checkpoint with only that one truncated is exact. Case 13 breaks step 1 of steps 0, 1, 2:
a garbage ``_CHECKPOINT_METADATA`` makes step 1 not offered (C when asked for, as interrupted
steps give I); a garbage item ``_METADATA`` gives C for that step only, and the browser stays on
its step and says why; random array bytes give C at restore (``Restore failed: ...``); garbage
metrics leave the step offered, without metrics. The good steps restore exactly throughout.
Cases 14 are made from an ``ocp.v1.save`` checkpoint of the same model; a v1 checkpoint that
lost only ``commit_success.txt`` but keeps its commit time is finished, as Orbax's own loader
says, and reads as such. U is ``UnknownLayoutError``: never "damaged" for files we do not know.
``stats`` and ``diff`` (library and CLI) raise what ``restore`` raises in every case but 12, where
they read the other model's checkpoint as any other.
A save killed mid-write, by v0's ``CheckpointManager`` and by v1's ``training.Checkpointer``,
is never offered as a step.

Overwrite safety, hostile names and trust, the rest of this suite, are in ``test_safety.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import (
    FAILING_READ,
    MLP,
    Stack,
    assert_same_arrays,
    chunk_locations,
    copy_checkpoint,
    corrupt_chunks,
    kill_mid_save,
    run_cli,
    save_checkpoint,
    snapshot,
)
from flax import nnx
from orbax.checkpoint import v1

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import CheckpointBrowser
from nnx_ckpt_widgets.__main__ import main

REPO = Path(__file__).resolve().parents[1]
NOT_FOUND, CORRUPT = ncw.CheckpointNotFoundError, ncw.CorruptCheckpointError
INCOMPLETE, MISMATCH = ncw.IncompleteCheckpointError, ncw.CheckpointMismatchError
UNKNOWN = ncw.UnknownLayoutError


def wide_mlp(seed: int = 1) -> MLP:
    """The model the damaged checkpoints were saved from (with seed 0); the CLI's factory."""
    return MLP(64, 64, 2, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("faults") / "wide", nnx.state(wide_mlp(0)))


@pytest.fixture(scope="module")
def wide_v1_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "wide_v1"
    v1.save(path, nnx.state(wide_mlp(0)))
    return path


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    state = nnx.state(Stack(3, rngs=nnx.Rngs(0)))
    return save_checkpoint(tmp_path_factory.mktemp("faults") / "stack", state)


def _data_files(path: Path) -> list[Path]:
    return [f for f in path.rglob("*") if f.is_file() and f.parent.name == "d"]


def damage(case: str, path: Path) -> Path:
    """Damage ``path``, a copy of a real checkpoint, as ``case`` says; returns what to open."""
    rng = np.random.default_rng(7)
    if case in ("01-missing", "02-empty", "03-file"):
        shutil.rmtree(path)
        if case == "02-empty":
            path.mkdir()
        elif case == "03-file":
            path.write_text("x")
    elif case == "04-metadata-missing":
        (path / "_METADATA").unlink()
    elif case == "05-metadata-garbage":
        (path / "_METADATA").write_bytes(b"\x00\xff{garbage")
    elif case == "06a-metadata-not-object":
        (path / "_METADATA").write_text("[1, 2]")
    elif case == "06b-metadata-wrong-schema":
        entry = {"key_metadata": "w", "value_metadata": 3}
        (path / "_METADATA").write_text(json.dumps({"tree_metadata": {"w": entry}}))
    elif case == "06c-sharding-not-object":
        (path / "_sharding").write_text("[1, 2]")
    elif case == "07-step-metadata-garbage":
        (path / "_CHECKPOINT_METADATA").write_text("garbage")
    elif case == "08-manifest-truncated":
        manifest = path / "manifest.ocdbt"
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    elif case in ("09a-data-files-deleted", "10a-data-files-random"):
        files = _data_files(path)
        assert files
        for file in files:
            if case.startswith("09"):
                file.unlink()
            else:
                file.write_bytes(rng.bytes(file.stat().st_size))
    elif case == "09b-chunk-files-deleted":
        files = {file for file, _, _ in chunk_locations(path).values()}
        assert files and len(files) < len(_data_files(path))  # the B-tree nodes stay
        for file in files:
            file.unlink()
    elif case == "10b-chunk-bytes-random":
        corrupt_chunks(path, "linear1.kernel.value")
    elif case == "11a-tmp-folder":
        tmp = path.rename(path.parent / "c.orbax-checkpoint-tmp-1")
        (tmp / "commit_success.txt").unlink(missing_ok=True)  # none from Orbax 0.12.0
        return tmp
    elif case == "14a-v1-checkpointable-gone":
        shutil.rmtree(path / "state")
    elif case == "14b-v1-metadata-truncated":
        metadata = path / "state" / "_METADATA"
        metadata.write_bytes(metadata.read_bytes()[: metadata.stat().st_size // 2])
    elif case == "14c-v1-no-commit":
        _strip_commit(path)
    elif case == "14d-v1-interrupted":
        _strip_commit(path)
        return path.rename(path.parent / "c.orbax-checkpoint-tmp-1796195476")
    elif case == "15-unknown-layout":
        shutil.rmtree(path)
        path.mkdir()
        (path / "weights.bin").write_bytes(b"\0" * 16)
        (path / "notes").mkdir()
    elif case == "11b-root-with-only-a-tmp-step":
        (path.parent / "run" / "0.orbax-checkpoint-tmp-1").mkdir(parents=True)
        path.rename(path.parent / "run" / "0.orbax-checkpoint-tmp-1" / "default")
        return path.parent / "run"
    return path


# case -> (error at metadata time, error at restore time, words every message must contain)
CASES = {
    "01-missing": (NOT_FOUND, NOT_FOUND, "does not exist"),
    "02-empty": (NOT_FOUND, NOT_FOUND, "the folder is empty"),
    "03-file": (NOT_FOUND, NOT_FOUND, "it is a file"),
    "04-metadata-missing": (CORRUPT, CORRUPT, "_METADATA file is missing"),
    "05-metadata-garbage": (CORRUPT, CORRUPT, "_METADATA (tree metadata) is not valid JSON"),
    "06a-metadata-not-object": (CORRUPT, CORRUPT, "_METADATA has no tree_metadata mapping"),
    "06b-metadata-wrong-schema": (CORRUPT, CORRUPT, "_METADATA has an entry of an unknown schema"),
    "06c-sharding-not-object": (CORRUPT, CORRUPT, "_sharding is not a JSON object"),
    "07-step-metadata-garbage": (CORRUPT, CORRUPT, "_CHECKPOINT_METADATA (step metadata)"),
    "08-manifest-truncated": (CORRUPT, CORRUPT, "manifest.ocdbt"),
    "09a-data-files-deleted": (CORRUPT, CORRUPT, "NOT_FOUND"),
    "09b-chunk-files-deleted": (None, CORRUPT, "linear1.kernel.value"),
    "10a-data-files-random": (CORRUPT, CORRUPT, "cannot be read"),
    "10b-chunk-bytes-random": (None, CORRUPT, "linear1.kernel.value"),
    "11a-tmp-folder": (INCOMPLETE, INCOMPLETE, "interrupted"),
    "11b-root-with-only-a-tmp-step": (INCOMPLETE, INCOMPLETE, "interrupted"),
    "12-another-model": (None, MISMATCH, "does not fit"),
    "14a-v1-checkpointable-gone": (CORRUPT, CORRUPT, "item 'state', named in _CHECKPOINT_"),
    "14b-v1-metadata-truncated": (CORRUPT, CORRUPT, "_METADATA (tree metadata) is not valid"),
    "14c-v1-no-commit": (INCOMPLETE, INCOMPLETE, "no commit marker"),
    "14d-v1-interrupted": (INCOMPLETE, INCOMPLETE, "interrupted"),
    "15-unknown-layout": (UNKNOWN, UNKNOWN, "weights.bin, notes/; the supported layouts are"),
}


def _strip_commit(path: Path) -> None:
    """Remove both signs of a finished save: the commit marker and the commit time."""
    (path / "commit_success.txt").unlink(missing_ok=True)  # none from Orbax 0.12.0
    metadata = json.loads((path / "_CHECKPOINT_METADATA").read_text())
    del metadata["commit_timestamp_nsecs"]
    (path / "_CHECKPOINT_METADATA").write_text(json.dumps(metadata))


@pytest.fixture(params=sorted(CASES))
def case(request, tmp_path, wide_ckpt, wide_v1_ckpt, other_ckpt):
    at_metadata, at_restore, words = CASES[request.param]
    if request.param == "12-another-model":
        return copy_checkpoint(other_ckpt, tmp_path / "c"), at_metadata, at_restore, words
    source = wide_v1_ckpt if "-v1-" in request.param else wide_ckpt
    path = damage(request.param, copy_checkpoint(source, tmp_path / "c"))
    return path, at_metadata, at_restore, words


def assert_good_error(err: BaseException, cls: type, path: Path, words: str) -> None:
    message = str(err)
    assert isinstance(err, cls), repr(err)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert words in message, message


def assert_restore_fails(path: Path, cls: type, named: Path, words: str, **kwargs) -> None:
    """``restore`` raises ``cls`` naming ``named``, and leaves its target bit-for-bit alone."""
    target = wide_mlp()
    before = snapshot(target)
    with pytest.raises(ncw.CheckpointError) as raised:
        ncw.restore(path, target, **kwargs)
    assert_good_error(raised.value, cls, named, words)
    assert_same_arrays(before, target)


def assert_restores_exactly(root: Path, step: int) -> None:
    target = wide_mlp(99)
    ncw.restore(root, target, step=step)
    assert_same_arrays(wide_mlp(step), target)


@FAILING_READ
def test_library(case, request):
    path, at_metadata, at_restore, words = case
    if at_metadata is None and at_restore is CORRUPT:
        request.getfixturevalue("failing_orbax_read")
    for call in (lambda: ncw.inspect(path), lambda: ncw.compare(path, wide_mlp())):
        if at_metadata is None:
            call()
        else:
            with pytest.raises(ncw.CheckpointError) as raised:
                call()
            assert_good_error(raised.value, at_metadata, path, words)
    if at_restore is MISMATCH:
        report = ncw.compare(path, wide_mlp())
        assert not report.ok and report.missing and report.unexpected
    assert_restore_fails(path, at_restore, path, words)


def test_cli(case, capfd):
    path, at_metadata, _, words = case
    process = run_cli("inspect", str(path))
    # compare needs a model factory: this module's, so it runs in-process.
    code = main(["compare", str(path), "--model", f"{__name__}:wide_mlp"])
    compared = capfd.readouterr()
    if at_metadata is None:
        assert (process.returncode, code) == (0, 0), process.stderr + compared.err
        assert process.stdout == str(ncw.inspect(path)) + "\n"
        report = ncw.compare(path, wide_mlp())
        assert compared.out == f"{report}\nPlan (strict): {report.plan()}\n"
        return
    for returncode, out, err in (
        (process.returncode, process.stdout, process.stderr),
        (code, compared.out, compared.err),
    ):
        assert returncode == 1 and out == "" and "Traceback" not in err
        (line,) = err.splitlines()
        assert line.startswith("error: ") and str(path) in line and words in line


@FAILING_READ
def test_browser(case, request):
    path, at_metadata, at_restore, words = case
    if at_metadata is None and at_restore is CORRUPT:
        request.getfixturevalue("failing_orbax_read")
    target = wide_mlp()
    before = snapshot(target)
    if at_metadata is not None:  # nothing readable to show: building raises, as inspect does
        with pytest.raises(ncw.CheckpointError) as raised:
            CheckpointBrowser(path, target)
        assert_good_error(raised.value, at_metadata, path, words)
        return
    browser = CheckpointBrowser(path, target)
    if at_restore is MISMATCH:
        assert browser.status.startswith("A strict restore will fail")
        assert "missing" in browser.panel.report_html.value
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status.startswith("Restore failed: "), browser.status
    assert str(path) in browser.status and "\n" not in browser.status
    assert isinstance(browser.panel.error, at_restore)
    assert not browser.restore_button.disabled  # still usable: it can be clicked again
    assert_same_arrays(before, target)


@FAILING_READ
def test_stats_and_diff(case, request, wide_ckpt):
    """``stats`` and ``diff`` (and their CLI) give the errors ``restore`` gives: a damaged
    array raises when read, the others when the checkpoint is looked up."""
    path, at_metadata, at_restore, words = case
    if at_metadata is None and at_restore is CORRUPT:
        request.getfixturevalue("failing_orbax_read")
    expected = at_metadata or (None if at_restore is MISMATCH else at_restore)
    calls = (
        lambda: ncw.stats(path, progress=False),
        lambda: ncw.diff(wide_ckpt, path, progress=False),
    )
    for call in calls:
        if expected is None:
            assert call().entries
            continue
        with pytest.raises(ncw.CheckpointError) as raised:
            call()
        assert_good_error(raised.value, expected, path, words)
    code = main(["stats", str(path), "--no-progress"])
    assert code == (0 if expected is None else 1)


# --- 13: a manager root with one broken step among good ones ----------------------------------


@pytest.fixture(scope="module")
def good_root(tmp_path_factory) -> Path:
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    root = tmp_path_factory.mktemp("faults") / "run"
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in range(3):
            state = nnx.state(wide_mlp(step))
            manager.save(step, args=ocp.args.StandardSave(state), metrics={"loss": 1 / (step + 1)})
        manager.wait_until_finished()
    return root


BREAK_STEP = {
    "step-metadata": lambda s: (s / "_CHECKPOINT_METADATA").write_text("garbage"),
    "item-metadata": lambda s: (s / "default" / "_METADATA").write_text("garbage"),
    "array-bytes": lambda s: corrupt_chunks(s / "default", "linear1.kernel.value"),
    "metrics": lambda s: (s / "metrics" / "metrics").write_text("garbage"),
}


@FAILING_READ
@pytest.mark.usefixtures("failing_orbax_read")
@pytest.mark.parametrize("damage", sorted(BREAK_STEP))
def test_one_broken_step_among_good_ones(tmp_path, good_root, damage, capfd):
    root = copy_checkpoint(good_root, tmp_path / "run")
    BREAK_STEP[damage](root / "1")
    info = ncw.inspect(root)
    offered = [s.step for s in info.steps]
    assert offered == ([0, 2] if damage == "step-metadata" else [0, 1, 2])
    assert info.step == 2
    for step in (0, 2):
        assert_restores_exactly(root, step)
    if damage == "metrics":  # metrics only label a step: it is offered without them
        assert info.steps[1].metrics == {} and info.steps[0].metrics == {"loss": 1.0}
        assert_restores_exactly(root, 1)
        return
    broken = root / "1" if damage == "step-metadata" else root / "1" / "default"
    words = {"step-metadata": "_CHECKPOINT_METADATA", "item-metadata": "_METADATA"}
    words = words.get(damage, "linear1.kernel.value")
    if damage != "array-bytes":
        with pytest.raises(CORRUPT) as raised:
            ncw.inspect(root, step=1)
        assert_good_error(raised.value, CORRUPT, broken, words)
        assert main(["inspect", str(root), "--step", "1"]) == 1
        (line,) = capfd.readouterr().err.splitlines()
        assert line.startswith("error: ") and str(broken) in line
    assert_restore_fails(root, CORRUPT, broken, words, step=1)

    target = wide_mlp(99)
    browser = CheckpointBrowser(root, target)
    assert [value for _, value in browser.step_selector.options] == offered
    if damage == "item-metadata":
        browser.step_selector.value = 1  # as choosing it in the dropdown does
        assert browser.step_selector.value == 2 and browser.info.step == 2
        assert isinstance(browser.error, CORRUPT) and browser.error_html in browser.children
        assert "Cannot open step 1" in browser.error_html.value
        assert str(broken) in browser.error_html.value
    if damage == "array-bytes":
        browser.step_selector.value = 1
        browser.restore_button.click()
        browser.wait(timeout=60)
        assert browser.status.startswith("Restore failed: ") and str(broken) in browser.status
    browser.step_selector.value = 0  # a good step still opens, and restores exactly
    assert browser.info.step == 0 and browser.error is None
    assert browser.error_html not in browser.children
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status.startswith("Restored "), browser.status
    assert_same_arrays(wide_mlp(0), target)


def test_broken_latest_step_names_it_and_other_steps_open(tmp_path, good_root):
    root = copy_checkpoint(good_root, tmp_path / "run")
    BREAK_STEP["item-metadata"](root / "2")
    # By default the latest intact step opens, and the broken one is listed with its reason
    # (issue 23, point 6).
    info = ncw.inspect(root)
    assert info.step == 1 and [s.step for s in info.steps] == [0, 1]
    ((broken,),) = [[s for s in info.unrestorable if s.step == 2]]
    assert str(root / "2" / "default") in broken.reason and "_METADATA" in broken.reason
    assert "not restorable: step 2" in str(info)
    with pytest.raises(CORRUPT) as raised:
        ncw.inspect(root, step=2)
    assert_good_error(raised.value, CORRUPT, root / "2" / "default", "_METADATA")
    browser = CheckpointBrowser(root, wide_mlp(99), step=1)
    browser.step_selector.value = 2
    assert browser.info.step == 1 and "Cannot open step 2" in browser.error_html.value
    assert "error: Cannot open step 2" in repr(browser)


# --- a save killed half-way -------------------------------------------------------------------

SAVER_HEAD = """
import sys
sys.path.insert(0, {tests!r})
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import v1
from test_faults import wide_mlp

root, last = sys.argv[1], int(sys.argv[2])
# 256 MiB of random bits (zstd cannot shrink them), written in a background thread.
bits = np.random.default_rng(0).integers(0, 2**32, (64, 1024, 1024), dtype=np.uint32)
big = {{"w": jnp.asarray(bits)}}
"""
SAVERS = {
    "v0": """
with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=None)) as m:
    for step in range(last + 1):
        m.save(step, args=ocp.args.StandardSave(nnx.state(wide_mlp(step))))
    m.wait_until_finished()
    m.save(last + 1, args=ocp.args.StandardSave(big))
    print("saving", flush=True)  # save() returned: the tmp folder exists, the write runs
    m.wait_until_finished()
    print("finished", flush=True)
""",
    "v1": """
with v1.training.Checkpointer(root) as checkpointer:
    for step in range(last + 1):
        checkpointer.save(step, nnx.state(wide_mlp(step)), metrics={{"loss": 1.0}})
    response = checkpointer.save_async(last + 1, big)
    print("saving", flush=True)  # save_async() returned: the write runs in the background
    response.result()
    print("finished", flush=True)
""",
}


def _tmp_bytes(root: Path, step: int) -> int:
    """Bytes in the tmp folder of ``step``'s save; -1 when there is none (any more)."""
    try:
        (tmp,) = root.glob(f"{step}.orbax-checkpoint-tmp*")
        return sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
    except (ValueError, FileNotFoundError):
        return -1


@pytest.mark.parametrize("api", sorted(SAVERS))
def test_save_killed_mid_write_is_never_offered(tmp_path, capfd, api):
    root, last = tmp_path / "run", 2
    script = tmp_path / "saver.py"
    script.write_text((SAVER_HEAD + SAVERS[api]).format(tests=str(Path(__file__).parent)))
    # Killed once array bytes are reaching the disk: 8 MiB of the 256 MiB.
    written = kill_mid_save(
        script, str(root), str(last), written=lambda: _tmp_bytes(root, last + 1)
    )
    # The kill landed mid-write: the tmp folder holds part of the array, and no step folder.
    assert 8 << 20 <= written <= _tmp_bytes(root, last + 1) < 256 << 20
    assert not (root / str(last + 1)).exists()

    info = ncw.inspect(root)
    assert [s.step for s in info.steps] == list(range(last + 1)) and info.step == last
    layout = "training.Checkpointer root" if api == "v1" else "CheckpointManager root"
    assert info.layout == layout
    for step in range(last + 1):
        assert_restores_exactly(root, step)
    assert main(["inspect", str(root)]) == 0
    kept = " (loss=1)" if api == "v1" else ""  # the v1 saver keeps a metric per step
    steps_line = ", ".join(f"{step}{kept}" for step in range(last + 1))
    assert f"steps: {steps_line}\n" in capfd.readouterr().out
    assert main(["inspect", str(root), "--step", str(last + 1)]) == 1
    assert "interrupted" in capfd.readouterr().err
    browser = CheckpointBrowser(root, wide_mlp(99))
    assert [value for _, value in browser.step_selector.options] == list(range(last + 1))

    # A new manager on the same root saves that step again; then it is offered, and exact.
    with ocp.CheckpointManager(root) as manager:
        manager.save(last + 1, args=ocp.args.StandardSave(nnx.state(wide_mlp(last + 1))))
        manager.wait_until_finished()
    assert [s.step for s in ncw.inspect(root).steps] == list(range(last + 2))
    assert_restores_exactly(root, last + 1)
    browser = CheckpointBrowser(root, wide_mlp(99))
    assert [value for _, value in browser.step_selector.options] == list(range(last + 2))


@FAILING_READ
def test_garbage_array_metadatas_fail_with_a_named_reason(tmp_path, failing_orbax_read):
    """Outside the matrix: Orbax's per-process array metadata file holds garbage."""
    path = save_checkpoint(tmp_path / "ckpt", nnx.state(MLP(rngs=nnx.Rngs(0))))
    (path / "array_metadatas" / "process_0").write_text("not json {")
    model = MLP(rngs=nnx.Rngs(1))
    before = snapshot(model)
    with pytest.raises(ncw.CheckpointError) as caught:
        ncw.restore(path, model)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    # The reason is never a bare token such as "0": it names at least the error's type.
    reason = message.split("could not be read: ", 1)[-1].split(";")[0]
    assert reason and " " in reason, message
    assert_same_arrays(before, model)


def test_v1_without_commit_marker_but_with_commit_time_is_finished(tmp_path, wide_v1_ckpt):
    """Orbax's own v1 loader reads such a checkpoint: it is not damaged, and not unfinished."""
    path = copy_checkpoint(wide_v1_ckpt, tmp_path / "c")
    (path / "commit_success.txt").unlink(missing_ok=True)  # none from Orbax 0.12.0
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.state(nnx.eval_shape(wide_mlp)),
    )
    reference = v1.load(path, abstract)
    assert ncw.inspect(path).layout == "Orbax v1 checkpoint"
    target = wide_mlp()
    ncw.restore(path, target)
    assert_same_arrays(wide_mlp(0), target)
    assert_same_arrays(snapshot(reference), target)
