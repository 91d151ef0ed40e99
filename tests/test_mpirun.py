"""The multi-process scripts under a real cluster launcher: Open MPI's ``mpirun``.

``jax.distributed.initialize()`` detects Open MPI by itself, so ``notebooks/scripts`` run
unchanged: saved by 2 processes x 2 CPU devices, restored by 4 processes x 1 device.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "notebooks" / "scripts"
REPO = SCRIPTS.parents[1]


def mpirun(num_processes: int, devices: int, script: str, outdir: Path) -> str:
    """Run ``script OUTDIR`` as ``num_processes`` Open MPI ranks; returns their output."""
    command = ["mpirun", "-np", str(num_processes), "--oversubscribe"]  # 2 cores may run 4
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")  # containers and CI run as root
    for name, value in {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PATH": os.environ["PATH"],
    }.items():
        command += ["-x", f"{name}={value}"]
    command += [sys.executable, str(SCRIPTS / script), str(outdir)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, to stop everything on a timeout
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mpirun {script} timed out:\n{output}")
    assert process.returncode == 0, output
    return output


def processes_using(marker: str) -> list[int]:
    """Live processes whose command line holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def sums(output: str, verb: str) -> dict[str, str]:
    return dict(re.findall(rf"{verb} (\S+) sha256 ([0-9a-f]+)", output))


@pytest.mark.multiprocess
def test_scripts_run_unchanged_under_mpirun(tmp_path):
    if shutil.which("mpirun") is None:
        reason = "mpirun is missing: `make test` installs Debian's openmpi-bin when it can."
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " CI=true, so this is a failure, not a skip.")
        pytest.skip(reason)
    outdir = tmp_path / "mpi-run"
    saved = mpirun(2, 2, "save_sharded.py", outdir)
    assert "process 0 of 2, 2 devices" in saved and "process 1 of 2, 2 devices" in saved
    assert sorted(p.name for p in (outdir / "state").glob("ocdbt.process_*")) == [
        "ocdbt.process_0",
        "ocdbt.process_1",
    ]
    restored = mpirun(4, 1, "restore_sharded.py", outdir)
    for rank in range(4):
        assert f"process {rank} of 4, 1 device" in restored
    assert len(sums(saved, "saved")) == 2
    assert sums(restored, "restored") == sums(saved, "saved")
    deadline = time.monotonic() + 10  # mpirun has returned; its ranks must be gone too
    while processes_using(str(outdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_using(str(outdir)) == []
