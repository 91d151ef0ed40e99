"""Run a JAX script as several processes on one machine, as a cluster would.

The launcher starts ``num_processes`` Python processes of one script, each with
``devices_per_process`` CPU devices, and tells them where the coordinator is through
environment variables. Inside the script, :func:`initialize` reads those variables and calls
``jax.distributed.initialize``; started by SLURM, Open MPI or Kubernetes instead, the same
script falls back to JAX's own cluster detection, so it runs unchanged on a real cluster.

Command line::

    python -m nnx_ckpt_widgets.launch --num-processes 2 --devices-per-process 2 \\
        [--timeout SECONDS] [--grouped] SCRIPT [ARGS...]

Every line a process writes is prefixed with its process id (``[1] ...``). When one process
fails, the others are stopped within a second and the launcher exits with the worst exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from typing import TextIO

from nnx_ckpt_widgets.errors import InvalidArgumentError

ENV_COORDINATOR = "NNX_CKPT_COORDINATOR"
ENV_NUM_PROCESSES = "NNX_CKPT_NUM_PROCESSES"
ENV_PROCESS_ID = "NNX_CKPT_PROCESS_ID"
ENV_LAUNCHER_PID = "NNX_CKPT_LAUNCHER_PID"

#: Exit code when ``timeout`` expires (the code coreutils' ``timeout`` uses).
TIMEOUT_EXIT_CODE = 124
# After the first failure, the others get this long to exit on their own (and report their
# own error) before they are killed: enough to catch simultaneous failures, short next to 30 s.
_GRACE_SECONDS = 1.0
_POLL_SECONDS = 0.05
# Gloo's C++ code prints "[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of
# connected peer ranks is : 1" to stdout for every new CPU collective context, with no switch to
# turn it off; its count and order vary from run to run. It writes the message in pieces, and
# two threads (one per local device) may interleave them: see _GlooFilter.
_GLOO_START = "[Gloo] Rank "
# TensorStore's C++ notice, on a process's first request to a GCS emulator, that it uses the
# emulator's test token (nnx_ckpt_widgets.emulator): dropped like gloo's chatter.
_TEST_TOKEN_NOTICE = re.compile(
    r"google_auth_provider\.cc:\d+\] Using GOOGLE_AUTH_TOKEN_FOR_TESTING$"
)
_GLOO_PIECE = re.compile(
    r"\[Gloo\] Rank |\d+| is connected to | peer ranks\. "
    r"|Expected number of connected peer ranks is : "
)


def initialize() -> None:
    """Connects this process to the others through ``jax.distributed.initialize``.

    Call it at the top of the script, before any JAX computation (creating an array, a
    model or a mesh): JAX fixes the set of devices at the first computation.

    Started by :func:`run` (or ``python -m nnx_ckpt_widgets.launch``), it uses the CPU
    collectives of gloo and the coordinator, process count and process id the launcher put in
    the environment. It also makes an uncaught exception print its traceback and exit at once
    (``os._exit(1)``): otherwise the process would wait minutes in JAX's distributed shutdown
    barrier. Started any other way, it calls plain ``jax.distributed.initialize()``, which
    detects SLURM, Open MPI, mpi4py and Kubernetes by itself.

    Raises:
        InvalidArgumentError: When the launcher's environment variables are malformed.
    """
    import jax

    coordinator = os.environ.get(ENV_COORDINATOR)
    if coordinator is None:
        jax.distributed.initialize()
        return
    try:
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
        process_id = int(os.environ[ENV_PROCESS_ID])
    except (KeyError, ValueError) as err:
        raise InvalidArgumentError(
            f"{ENV_COORDINATOR} is set but {ENV_NUM_PROCESSES} or {ENV_PROCESS_ID} is missing "
            "or not an integer; start the script with `python -m nnx_ckpt_widgets.launch`."
        ) from err
    sys.excepthook = _print_and_exit
    # One write per line: gloo's C++ code writes to the same pipe, and a line written in two
    # pieces (the unbuffered default) could get one of its messages in the middle.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(line_buffering=True, write_through=False)
    _watch_launcher()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


def _print_and_exit(
    exc_type: type[BaseException], exc: BaseException, tb: types.TracebackType | None
) -> None:
    traceback.print_exception(exc_type, exc, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _watch_launcher() -> None:
    """Exits this process when the launcher is gone (killed with SIGKILL, say)."""
    launcher_pid = int(os.environ.get(ENV_LAUNCHER_PID, "0"))

    def watch() -> None:
        while os.getppid() == launcher_pid:
            time.sleep(1.0)
        os._exit(1)

    if launcher_pid:
        threading.Thread(target=watch, name="nnx-ckpt-launcher-watch", daemon=True).start()


def _free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that is free at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child_env(
    process_id: int, num_processes: int, devices_per_process: int, coordinator: str
) -> dict[str, str]:
    """Returns ``os.environ`` plus what process ``process_id`` of :func:`run` needs."""
    env = dict(os.environ)
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        **{
            ENV_COORDINATOR: coordinator,
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(process_id),
            ENV_LAUNCHER_PID: str(os.getpid()),
        },
    )
    return env


def run(
    script: str | os.PathLike[str],
    args: Sequence[str] = (),
    num_processes: int = 2,
    devices_per_process: int = 1,
    timeout: float | None = None,
    *,
    grouped: bool = False,
    show_gloo: bool = False,
) -> int:
    """Runs ``script`` as ``num_processes`` processes and waits for all of them.

    Each line a process writes to stdout or stderr is written to the same stream of this
    process, prefixed with the process id (``[1] ...``). When a process fails, the others get
    one second to finish, then are killed with SIGKILL (JAX processes ignore SIGTERM). No
    process outlives the call, also when it is interrupted.

    Args:
        script: Path of the Python script; it must call :func:`initialize` first.
        args: Command-line arguments passed to every process.
        num_processes: Number of processes (at least 1).
        devices_per_process: Number of CPU devices of each process (at least 1).
        timeout: Seconds after which all processes are killed; ``None`` waits forever.
        grouped: Print each process's lines together, ordered by process id, once all
            processes have ended, instead of as they come: the output is then the same from
            run to run (what a stored notebook output needs).
        show_gloo: Keep the "[Gloo] Rank 0 is connected to 1 peer ranks" lines that the
            gloo library prints whenever JAX sets up CPU collectives; dropped by default.

    Returns:
        0 when every process succeeded; otherwise the worst exit code of the processes that
        ended by themselves (128 + N for signal N), or :data:`TIMEOUT_EXIT_CODE`.

    Raises:
        InvalidArgumentError: When ``script`` is not a file, or ``num_processes``,
            ``devices_per_process`` or ``timeout`` is not positive.
    """
    if min(num_processes, devices_per_process) < 1:
        raise InvalidArgumentError(
            "num_processes and devices_per_process must be at least 1, "
            f"got {num_processes} and {devices_per_process}."
        )
    if timeout is not None and timeout <= 0:
        raise InvalidArgumentError(f"timeout must be positive seconds or None, got {timeout}.")
    if not os.path.isfile(script):
        raise InvalidArgumentError(
            f"Script {os.fspath(script)!r} does not exist; pass the path of a Python file."
        )

    coordinator = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen[str]] = []
    readers: list[threading.Thread] = []
    held: dict[int, list[tuple[bool, str]]] = {i: [] for i in range(num_processes)}
    gloo = [_GlooFilter() for _ in range(num_processes)]
    killed: set[int] = set()
    lock = threading.Lock()

    def emit(index: int, is_err: bool, line: str) -> None:  # called by the reader threads
        with lock:
            if not (show_gloo or is_err) and gloo[index].is_chatter(line):
                return
            if is_err and not show_gloo and _TEST_TOKEN_NOTICE.search(line):
                return
            if grouped:
                held[index].append((is_err, line))
            else:
                _write(sys.stderr if is_err else sys.stdout, index, line)

    def kill_running() -> list[int]:
        running = [i for i, proc in enumerate(procs) if proc.poll() is None]
        for i in running:
            _kill_group(procs[i])
        killed.update(running)
        return running

    start = time.monotonic()
    timed_out = False
    running: list[int] = []
    first_failed_process = 0
    try:
        for i in range(num_processes):
            proc = subprocess.Popen(
                [sys.executable, os.fspath(script), *args],
                env=_child_env(i, num_processes, devices_per_process, coordinator),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                # Own session: a Ctrl-C meant for the launcher does not reach the children,
                # and killing the group also kills whatever they started.
                start_new_session=True,
            )
            procs.append(proc)
            for stream, is_err in ((proc.stdout, False), (proc.stderr, True)):
                reader = threading.Thread(target=_pump, args=(stream, i, is_err, emit), daemon=True)
                reader.start()
                readers.append(reader)

        first_failure_time: float | None = None
        while any(proc.poll() is None for proc in procs):
            time.sleep(_POLL_SECONDS)
            now = time.monotonic()
            if first_failure_time is None:
                failing = [i for i, proc in enumerate(procs) if proc.poll()]
                if failing:
                    first_failure_time, first_failed_process = now, failing[0]
            if first_failure_time is not None and now - first_failure_time > _GRACE_SECONDS:
                kill_running()
            elif timeout is not None and now - start > timeout and not timed_out:
                timed_out = True
                running = kill_running()
    finally:
        # Also on KeyboardInterrupt or any error in the loop: leave no process behind.
        kill_running()
        for proc in procs:
            proc.wait()
            _kill_group(proc)  # whatever the script started and left running
        for reader in readers:
            reader.join(timeout=2.0)
        with lock:
            for index in sorted(held):
                for is_err, line in held[index]:
                    _write(sys.stderr if is_err else sys.stdout, index, line)

    codes = {
        i: _exit_code(proc.returncode)
        for i, proc in enumerate(procs)
        if not (i in killed and proc.returncode == -signal.SIGKILL)
    }
    if timed_out:
        print(
            f"launch: timed out after {timeout:g} s with process(es) "
            f"{', '.join(map(str, running))} still running, and killed them; "
            "look for a hang in their output above, or raise --timeout.",
            file=sys.stderr,
            flush=True,
        )
        return TIMEOUT_EXIT_CODE
    failed = {i: code for i, code in codes.items() if code}
    if not failed:
        return 0
    worst = max(failed.values())
    stopped = sorted(set(range(num_processes)) - set(codes))
    print(
        "launch: "
        + "; ".join(f"process {i} exited with code {code}" for i, code in sorted(failed.items()))
        + (f"; stopped process(es) {', '.join(map(str, stopped))}" if stopped else "")
        + f". Process {first_failed_process} failed first: its lines above, prefixed "
        f"[{first_failed_process}], say why.",
        file=sys.stderr,
        flush=True,
    )
    return worst


def _pump(stream: TextIO, index: int, is_err: bool, emit: Callable[[int, bool, str], None]) -> None:
    for line in stream:
        emit(index, is_err, line.rstrip("\n"))
    stream.close()


class _GlooFilter:
    """Recognizes gloo's chatter in the stdout of one process.

    A chatter line is made of message pieces only, such as ``[Gloo] Rank [Gloo] Rank 0 is
    connected to 1 peer ranks. Expected number of connected peer ranks is : 1`` followed by
    ``1 is connected ...``, or even a lone ``1``. Each message has one start and one newline,
    so counting starts against lines tells when such a lone number still belongs to a message.
    (Python's own lines come whole: :func:`initialize` writes each with a single call.)
    """

    def __init__(self) -> None:
        self.unfinished = 0
        self.seen = False

    def is_chatter(self, line: str) -> bool:
        if not line:
            # Two interleaved messages can leave one newline on a line of its own: a blank line
            # once gloo has spoken is taken as such a stray newline.
            self.unfinished = max(0, self.unfinished - 1)
            return self.seen
        pieces = _GLOO_PIECE.findall(line)
        if not pieces or "".join(pieces) != line:
            return False
        starts = pieces.count(_GLOO_START)
        if not (starts or self.unfinished or "connected" in line):
            return False  # a number that the script printed
        self.unfinished = max(0, self.unfinished + starts - 1)
        self.seen = True
        return True


def _write(stream: TextIO, index: int, line: str) -> None:
    stream.write(f"[{index}] {line}\n")
    stream.flush()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone
        os.killpg(proc.pid, signal.SIGKILL)


def _exit_code(returncode: int) -> int:
    """Maps a Popen return code to a shell-style exit code (128 + N for signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``python -m nnx_ckpt_widgets.launch``.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Returns:
        The exit code of :func:`run`, or 130 when interrupted.
    """
    parser = argparse.ArgumentParser(
        prog="python -m nnx_ckpt_widgets.launch",
        description="Run SCRIPT as several JAX processes on this machine (CPU devices).",
    )
    parser.add_argument("--num-processes", type=int, default=2, metavar="N", help="default 2")
    parser.add_argument("--devices-per-process", type=int, default=1, metavar="D", help="default 1")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="kill all after this")
    parser.add_argument(
        "--grouped", action="store_true", help="print the output per process, at the end"
    )
    parser.add_argument(
        "--show-gloo", action="store_true", help="keep gloo's '[Gloo] Rank ...connected' lines"
    )
    parser.add_argument("script", metavar="SCRIPT", help="Python file that calls initialize()")
    parser.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="given to SCRIPT")
    ns = parser.parse_args(argv)
    # SIGTERM to the launcher unwinds like Ctrl-C, so run() kills the processes it started.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # A launcher started in the background of a script inherits an ignored SIGINT; Ctrl-C (or
    # kill -INT) must still stop it and every process it started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(
            ns.script,
            ns.args,
            num_processes=ns.num_processes,
            devices_per_process=ns.devices_per_process,
            timeout=ns.timeout,
            grouped=ns.grouped,
            show_gloo=ns.show_gloo,
        )
    except InvalidArgumentError as err:
        parser.error(str(err))
    except KeyboardInterrupt:
        print("launch: interrupted; killed all processes.", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
