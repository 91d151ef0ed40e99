"""The CheckpointBrowser in a real JupyterLab 4 and Notebook 7, driven through headless Chromium.

The ``server`` fixture is parametrized by app (``"lab"`` or ``"notebook"``); tests ask for one
with ``@pytest.mark.parametrize("server", [...], indirect=True)`` and tests on the same app share
one server. Each server runs on a free loopback port with a token, a temporary root and temporary
settings (windowing off, so every cell is in the DOM), and is stopped, with its kernels, by
killing its process group, whatever the tests did. Both apps expose ``window.jupyterapp``.

``NNX_CKPT_CHROMIUM`` names another Chromium binary. Set ``NNX_CKPT_SCREENSHOT=1`` to also
write ``docs/browser.png`` for the README (from JupyterLab); the screenshots always go to
``tests/artifacts/browser.png`` (Lab) and ``tests/artifacts/browser-notebook.png`` (Notebook 7).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("NNX_CKPT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
XSS_KEY = '<img src=x onerror="window.__pwned=1">'
SERVER_START_TIMEOUT = 240  # the first start of a fresh environment builds caches
CELLS_TIMEOUT_MS = 180_000

MODEL_CODE = """
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import nnx_ckpt_widgets as ncw


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Linear(8, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(4)])
        self.head = nnx.Linear(16, 2, rngs=rngs)


def checksum(model):
    flat = nnx.to_flat_state(nnx.state(model))
    return round(sum(float(np.abs(v.get_value()).sum()) for _, v in flat), 4)
"""

RESTORE_CELLS = [
    MODEL_CODE
    + """
root = Path("ckpt").resolve()
options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
with ocp.CheckpointManager(root, options=options) as manager:
    for step in (100, 200, 300):
        manager.save(step, args=ocp.args.StandardSave(nnx.state(Net(nnx.Rngs(step)))),
                     metrics={"loss": 1.0 / step, "accuracy": step / 400})
saved = Net(nnx.Rngs(300))
model = Net(nnx.Rngs(0))
print("target", checksum(saved), "before", checksum(model))
""",
    """
browser = ncw.CheckpointBrowser("ckpt", model)
browser.tree.row("layers", "{0..3}").set_expanded(True)
browser.tree.select("layers")
browser
""",
]

XSS_CELLS = [
    MODEL_CODE
    + f"""
KEY = {XSS_KEY!r}
root = Path("hostile").resolve()
options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
with ocp.CheckpointManager(root, options=options) as manager:
    tree = {{KEY: np.ones(2, np.float32), "ok": np.zeros(3, np.float32)}}
    manager.save(1, args=ocp.args.StandardSave(tree), metrics={{"loss": 1.0, KEY: 2.0}})
browser = ncw.CheckpointBrowser(root, Net(nnx.Rngs(0)))
browser
""",
]


def _notebook(cells: list[str]) -> str:
    return json.dumps(
        {
            "cells": [
                {
                    "cell_type": "code",
                    "execution_count": None,
                    "id": f"cell-{i}",
                    "metadata": {},
                    "outputs": [],
                    "source": source.strip("\n"),
                }
                for i, source in enumerate(cells)
            ],
            "metadata": {
                "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        },
        indent=1,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = (
        f"BROWSER TESTS NOT RUN: {CHROMIUM} is missing; install Debian's chromium "
        "(`make chromium` as root, or apt-get install chromium)."
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " CI=true, so this is a failure, not a skip.")
    pytest.skip(reason)


# Per app: the module to run, its config class, and the URL path that opens a notebook.
APPS = {
    "lab": ("jupyterlab", "LabApp", "lab/tree"),
    "notebook": ("notebook", "JupyterNotebookApp", "notebooks"),
}


@dataclass(frozen=True)
class Server:
    app: str
    url: str
    token: str
    root: Path

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/{APPS[self.app][2]}/{name}?token={self.token}"


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Iterator[Server]:
    """A running JupyterLab or Notebook 7 (``request.param``); always stopped afterwards."""
    app = request.param
    module, config, _ = APPS[app]
    _require_chromium()
    base = tmp_path_factory.mktemp(app)
    root, settings, home = base / "root", base / "app-settings", base / "home"
    for folder in (root, settings, home):
        folder.mkdir()
    # Windowing off: every cell stays in the DOM, so outputs can be found and screenshot.
    overrides = {
        "@jupyterlab/notebook-extension:tracker": {
            "windowingMode": "none",
            "autoStartDefaultKernel": True,
        },
        "@jupyterlab/apputils-extension:notification": {
            "checkForUpdates": False,
            "fetchNews": "false",
        },
    }
    (settings / "overrides.json").write_text(json.dumps(overrides))
    token, port = secrets.token_hex(16), _free_port()
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "IPYTHONDIR": str(home / "ipython"),
        "JAX_PLATFORMS": "cpu",
    }
    command = [
        sys.executable,
        "-m",
        module,
        "--no-browser",
        "--allow-root",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        f"--{config}.expose_app_in_browser=True",
        f"--{config}.app_settings_dir={settings}",
        f"--{config}.user_settings_dir={home / 'user-settings'}",
        f"--{config}.workspaces_dir={home / 'workspaces'}",
    ]
    log_path = base / f"{app}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    # A SIGTERM to pytest (a CI timeout) must still run the finally below.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        _wait_for_server(process, f"{url}/api/status?token={token}", log_path)
        yield Server(app, url, token, root)
    finally:
        _stop(process)
        log.close()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def _wait_for_server(process: subprocess.Popen, status_url: str, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(status_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the server did not answer in {SERVER_START_TIMEOUT} s:\n{log.read_text()}")


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (kernels run in sessions of their own), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


def _stop(process: subprocess.Popen) -> None:
    """Stop the server and its kernels: its process group, politely then by force.

    Kernels get sessions of their own, so they are found by parentage first and killed last
    in case the server could not shut them down.
    """
    kernels = _descendants(process.pid)
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in kernels:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def browser_page(server):
    # Depends on the server so that its pages close before that server stops.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            context = chromium.new_context(viewport={"width": 1280, "height": 1000})
            yield context
        finally:
            chromium.close()


def _open_and_run(context, server: Server, name: str, cells: list[str]):
    (server.root / name).write_text(_notebook(cells))
    page = context.new_page()
    page.goto(server.notebook_url(name))
    # Lab and Notebook 7 both expose the app; wait for the notebook's kernel to be idle.
    page.wait_for_function(
        """() => {
            const app = window.jupyterapp;
            const widget = app && app.shell.currentWidget;
            const kernel = widget && widget.sessionContext && widget.sessionContext.session
                && widget.sessionContext.session.kernel;
            return kernel && kernel.connectionStatus === "connected" && kernel.status === "idle";
        }""",
        timeout=CELLS_TIMEOUT_MS,
    )
    # Not awaited: the command's promise settles only when every cell has run.
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    try:
        page.wait_for_selector(".nnx-ckpt-browser .nnx-ckpt-status", timeout=CELLS_TIMEOUT_MS)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        stem = f"failed-{server.app}-{Path(name).stem}"
        page.screenshot(path=str(ARTIFACTS / f"{stem}.png"), full_page=True)
        (ARTIFACTS / f"{stem}.txt").write_text(page.inner_text("body"))
        raise
    return page


def _kernel_print(page, code: str) -> str:
    """Run ``code`` in the notebook's kernel and return what it printed."""
    return page.evaluate(
        """async (code) => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const future = kernel.requestExecute({code});
            let out = "";
            future.onIOPub = (msg) => {
                if (msg.header.msg_type === "stream") out += msg.content.text;
                if (msg.header.msg_type === "error") out += "ERROR " + msg.content.evalue;
            };
            await future.done;
            return out;
        }""",
        code,
    )


@pytest.mark.parametrize("server", ["lab", "notebook"], indirect=True)
def test_restore_button(server, browser_page):
    page = _open_and_run(browser_page, server, "restore.ipynb", RESTORE_CELLS)
    widget = page.locator(".nnx-ckpt-browser")
    status = widget.locator(".nnx-ckpt-status")
    assert status.get_attribute("data-state") == "ready"
    assert status.inner_text() == "Ready to restore 12 arrays (4.9 KiB)."
    assert "ckpt, step 300 (3 steps, latest 300)" in widget.inner_text()
    target, before = _kernel_print(page, "print(checksum(saved), checksum(model))").split()
    assert target != before

    widget.locator("button.nnx-ckpt-restore").click()
    page.wait_for_selector('.nnx-ckpt-status[data-state="done"]', timeout=60_000)
    assert status.inner_text().startswith("Restored 12 arrays (4.9 KiB).")
    assert not widget.locator("button.nnx-ckpt-restore").is_disabled()
    assert _kernel_print(page, "print(checksum(model))").split() == [target]
    assert _kernel_print(page, "print(browser.status)").strip() == "Restored 12 arrays (4.9 KiB)."

    ARTIFACTS.mkdir(exist_ok=True)
    widget.scroll_into_view_if_needed()
    page.wait_for_timeout(500)  # let treescope finish its first layout
    name = "browser.png" if server.app == "lab" else f"browser-{server.app}.png"
    shot = widget.screenshot(path=str(ARTIFACTS / name))
    if server.app == "lab" and os.environ.get("NNX_CKPT_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        (REPO / "docs" / "browser.png").write_bytes(shot)


@pytest.mark.parametrize("server", ["lab"], indirect=True)
def test_hostile_key_shows_as_text_and_runs_nothing(server, browser_page):
    page = _open_and_run(browser_page, server, "hostile.ipynb", XSS_CELLS)
    widget = page.locator(".nnx-ckpt-browser")
    # Click the hostile name in the tree: the kernel renders the caption and treescope view.
    widget.locator("button", has_text=XSS_KEY).first.click()
    page.wait_for_selector(".nnx-ckpt-caption", timeout=60_000)
    page.wait_for_timeout(1000)  # an injected <img src=x> would have fired onerror by now
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    text = widget.inner_text()
    assert XSS_KEY in page.locator(".nnx-ckpt-caption").inner_text()
    assert text.count(XSS_KEY) >= 3  # the tree, the caption and the load report
    # The step dropdown lists the metric named like the payload, as text (spaces become NBSP).
    options = [o.replace("\xa0", " ") for o in widget.locator("select option").all_inner_texts()]
    assert any("<img src=x" in option for option in options)
