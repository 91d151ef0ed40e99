"""Tests of nnx_ckpt_widgets.launch: real processes, real JAX, real checkpoints on disk."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.launch import TIMEOUT_EXIT_CODE, _child_env, run

SCRIPTS = Path(__file__).resolve().parents[1] / "notebooks" / "scripts"
LAUNCH = [sys.executable, "-m", "nnx_ckpt_widgets.launch"]

# Each test script first records its pid in the folder given as argv[1], so the test can
# check afterwards that no process was left behind.
RECORD_PID = """
import os, sys, time
from pathlib import Path
out = Path(sys.argv[1])
index = int(os.environ["NNX_CKPT_PROCESS_ID"])
(out / f"pid{index}").write_text(str(os.getpid()))
def wait_for(*names):
    while not all((out / name).exists() for name in names):
        time.sleep(0.02)
"""


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "script.py"
    script.write_text(RECORD_PID + textwrap.dedent(body))
    return script


def recorded_pids(folder: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(folder.glob("pid*"))]


def is_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_all_gone(pids: list[int]) -> None:
    # SIGKILL is delivered at once, but the kernel may take a moment to tear a process down.
    deadline = time.monotonic() + 5
    while any(map(is_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [pid for pid in pids if is_alive(pid)] == []


@pytest.mark.multiprocess
def test_raising_process_stops_the_others(tmp_path: Path) -> None:
    # Real JAX processes: the one that raises would hang in the distributed shutdown barrier,
    # and the other one ignores SIGTERM.
    script = write_script(
        tmp_path,
        """
        from nnx_ckpt_widgets.launch import initialize
        initialize()
        if index == 1:
            wait_for("pid0")
            raise RuntimeError("boom in process 1")
        time.sleep(300)
        """,
    )
    result = subprocess.run(
        [*LAUNCH, "--num-processes", "2", "--timeout", "120", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    # Not the timeout's code: the launcher stopped everything on its own, long before.
    assert result.returncode == 1, result.stderr
    assert "[1] RuntimeError: boom in process 1" in result.stderr
    assert "launch: process 1 exited with code 1; stopped process(es) 0." in result.stderr
    pids = recorded_pids(tmp_path)
    assert len(pids) == 2
    assert_all_gone(pids)


@pytest.mark.multiprocess
def test_timeout_kills_every_process_and_what_they_started(tmp_path: Path) -> None:
    script = write_script(
        tmp_path,
        """
        import signal, subprocess
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as JAX processes do
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        (out / f"pid{index}-child").write_text(str(child.pid))
        time.sleep(300)
        """,
    )
    result = subprocess.run(
        [*LAUNCH, "--num-processes", "2", "--timeout", "3", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == TIMEOUT_EXIT_CODE
    assert "launch: timed out after 3 s with process(es) 0, 1 still running, and killed" in (
        result.stderr
    )
    pids = recorded_pids(tmp_path)
    assert len(pids) == 4
    assert_all_gone(pids)


@pytest.mark.multiprocess
def test_exit_code_is_the_worst_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(
        tmp_path,
        """
        wait_for("pid0", "pid1", "pid2")
        sys.exit([0, 3, 5][index])
        """,
    )
    assert run(script, [str(tmp_path)], num_processes=3, timeout=60) == 5
    err = capsys.readouterr().err
    assert "launch: process 1 exited with code 3; process 2 exited with code 5." in err
    assert_all_gone(recorded_pids(tmp_path))


@pytest.mark.multiprocess
@pytest.mark.parametrize("inherited_ignore", [False, True], ids=["terminal", "background-job"])
def test_interrupt_kills_every_process(tmp_path: Path, inherited_ignore: bool) -> None:
    # A job started with & in a non-interactive shell inherits an ignored SIGINT: the shell's
    # `trap '' INT` then `exec` gives the launcher exactly that, under the same pid.
    script = write_script(tmp_path, "time.sleep(300)\n")
    command = [*LAUNCH, "--num-processes", "2", str(script), str(tmp_path)]
    if inherited_ignore:
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(recorded_pids(tmp_path)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 130
    assert "launch: interrupted; killed all processes." in err
    pids = recorded_pids(tmp_path)
    assert len(pids) == 2
    assert_all_gone(pids)


@pytest.mark.multiprocess
def test_output_is_prefixed_and_grouped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = write_script(
        tmp_path,
        """
        wait_for("pid0", "pid1")
        print(f"out {index}")
        print(f"err {index}", file=sys.stderr)
        # gloo's C++ chatter, two messages interleaved by two threads: dropped.
        chatter = "is connected to 1 peer ranks. Expected number of connected peer ranks is : "
        print(f"[Gloo] Rank [Gloo] Rank 0 {chatter}")
        print(1)
        print(42)
        """,
    )
    assert run(script, [str(tmp_path)], num_processes=2, grouped=True) == 0
    captured = capsys.readouterr()
    assert captured.out == "[0] out 0\n[0] 42\n[1] out 1\n[1] 42\n"
    assert captured.err == "[0] err 0\n[1] err 1\n"


def test_child_env_sets_devices_and_keeps_other_xla_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=x")
    env = _child_env(1, 4, 2, "127.0.0.1:1234")
    assert env["XLA_FLAGS"] == "--xla_dump_to=x --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert (env["NNX_CKPT_COORDINATOR"], env["NNX_CKPT_NUM_PROCESSES"]) == ("127.0.0.1:1234", "4")
    assert env["NNX_CKPT_PROCESS_ID"] == "1"


def test_run_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="must be at least 1, got 0 and 1"):
        run(SCRIPTS / "save_sharded.py", num_processes=0)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        run(tmp_path / "missing.py")


def checksums_printed(text: str, verb: str) -> dict[str, str]:
    return dict(re.findall(rf"^\[0\] {verb} (\S+) sha256 (\w+)$", text, flags=re.MULTILINE))


@pytest.mark.multiprocess
def test_round_trip_2x2_save_4x1_restore_single_process_restore(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    save = run(SCRIPTS / "save_sharded.py", [str(tmp_path)], 2, 2, timeout=120, grouped=True)
    saved_output = capsys.readouterr()
    assert save == 0, saved_output.err
    assert saved_output.err == ""
    assert "[1] linear1.kernel (8, 8): this process holds [4:8, 0:4] [4:8, 4:8]" in (
        saved_output.out
    )
    # One OCDBT folder per writing process; the metadata is written once, by process 0.
    assert sorted(p.name for p in (tmp_path / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]

    restore = run(SCRIPTS / "restore_sharded.py", [str(tmp_path)], 4, 1, timeout=120, grouped=True)
    restored_output = capsys.readouterr()
    assert restore == 0, restored_output.err
    assert restored_output.err == ""  # no "Sharding info not provided" or other warning
    assert "[3] linear1.kernel (8, 8): this process holds [0:8, 6:8]" in restored_output.out

    saved = checksums_printed(saved_output.out, "saved")
    assert sorted(saved) == ["linear1.kernel", "linear2.kernel"]
    assert checksums_printed(restored_output.out, "restored") == saved

    # Back to one process and one device, in this test's own process.
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    monkeypatch.syspath_prepend(str(SCRIPTS))
    from sharded_mlp import DIM, SAVE_AXES, TwoLayerMLP, checksums

    mesh = jax.make_mesh((1, 1), ("data", "model"), devices=jax.devices()[:1])
    _, abstract_state = nnx.get_abstract_model(
        lambda: TwoLayerMLP(DIM, SAVE_AXES, rngs=nnx.Rngs(0)), mesh
    )
    state = ocp.StandardCheckpointer().restore(tmp_path / "state", abstract_state)
    assert checksums(state) == saved
    with jax.set_mesh(mesh):
        expected = nnx.state(TwoLayerMLP(DIM, SAVE_AXES, rngs=nnx.Rngs(0)))
    jax.tree.map(np.testing.assert_array_equal, expected, state)

    # What the package reads from the multi-process checkpoint: metadata only, with the saving
    # job's mesh and PartitionSpecs; and a restore through it onto the single-device mesh.
    import nnx_ckpt_widgets as ncw

    info = ncw.inspect(tmp_path / "state")
    assert info.format == "nnx.State" and sorted(map("/".join, info.leaves)) == [
        "linear1/kernel",
        "linear2/kernel",
    ]
    assert {leaf.name: leaf.sharding for leaf in info} == {
        "linear1/kernel": "mesh(data=2,model=2) P(data, model)",
        "linear2/kernel": "mesh(data=2,model=2) P(model, data)",
    }
    assert info.nbytes == 2 * DIM * DIM * 4
    with jax.set_mesh(mesh):
        target = TwoLayerMLP(DIM, SAVE_AXES, rngs=nnx.Rngs(1))
    report = ncw.restore(tmp_path / "state", target)
    assert report.ok and report.restored_arrays == 2
    jax.tree.map(np.testing.assert_array_equal, expected, nnx.state(target))


def test_gloo_chatter_is_dropped_even_when_interleaved() -> None:
    from nnx_ckpt_widgets.launch import _GlooFilter

    message = (
        "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"
    )
    tangled = "[Gloo] Rank " + message + message.removeprefix("[Gloo] Rank 0")
    chatter = _GlooFilter()
    assert not chatter.is_chatter("")  # a script's own blank line, before gloo spoke
    assert not chatter.is_chatter("2")  # a script's own number
    assert chatter.is_chatter(message)
    assert chatter.is_chatter(tangled)
    assert chatter.is_chatter("")  # the second message's stray newline
    assert not chatter.is_chatter("linear1.kernel (8, 8): this process holds [0:4, 0:4]")
