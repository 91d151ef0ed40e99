"""The browser's Values panel at the Python level: widget state and outputs, escaping included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FAILING_READ, copy_checkpoint, corrupt_chunks, save_checkpoint, save_manager

import nnx_ckpt_widgets as nw
from nnx_ckpt_widgets import CheckpointBrowser

HOSTILE = "<img src=x onerror=alert(1)>"


def step_tree(step: int) -> dict:
    layers = {str(i): {"kernel": np.full((2, 3), float(i), np.float32)} for i in range(4)}
    head = np.arange(6, dtype=np.float32).reshape(3, 2) * step
    if step == 3:
        head[0, 0] = np.nan
    return {"layers": layers, "head": {"kernel": head}, HOSTILE: np.ones(2, np.float32) * step}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    steps = {s: {"state": step_tree(s)} for s in (1, 2, 3)}
    return save_manager(tmp_path_factory.mktemp("values") / "root", steps)


def count_reads(monkeypatch, path) -> list[int]:
    layout = type(nw.inspect(path).location.layout)
    real = layout.read
    calls: list[int] = []

    def read(self, location, requests):
        calls.append(len(requests))
        return real(self, location, requests)

    monkeypatch.setattr(layout, "read", read)
    return calls


def test_nothing_is_read_until_asked(root, monkeypatch):
    calls = count_reads(monkeypatch, root)
    browser = CheckpointBrowser(root)
    browser.tree.select("head", "kernel")
    browser.step_selector.value = 1
    assert calls == [] and browser.values.stats_report is None
    assert browser.values.status.startswith("Nothing read yet")
    assert "values:" not in repr(browser)  # the browser's text is as before until asked


def test_values_of_a_subtree_escaped(root):
    browser = CheckpointBrowser(root)
    browser.values_button.click()
    browser.wait(30)
    report = browser.values.stats_report
    assert report is not None and len(report) == 6 and report.step == 3
    assert report.with_nan == ["head/kernel"]
    assert browser.values.status == f"Values of the checkpoint: {report.summary()}"
    assert browser.values.status.startswith("Values of the checkpoint: 6 arrays (")
    html = browser.values.result_html.value
    assert HOSTILE not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "values: Values of the checkpoint: 6 arrays" in repr(browser)
    assert not browser.values_button.disabled and not browser.values.running
    browser.tree.select("layers", "{0..3}")
    browser.values_button.click()
    browser.wait(30)
    report = browser.values.stats_report
    assert [e.key for e in report] == [f"layers/{i}/kernel" for i in range(4)]
    assert report.groups()[0][0] == "layers/{0..3}/kernel"
    assert browser.values.array is None and browser.values.array_output.outputs == ()


def test_one_array_is_drawn_by_treescope(root):
    browser = CheckpointBrowser(root, step=2)
    browser.tree.select("head", "kernel")
    browser.values_button.click()
    browser.wait(30)
    np.testing.assert_array_equal(browser.values.array, step_tree(2)["head"]["kernel"])
    (output,) = browser.values.array_output.outputs
    assert output["data"]["text/plain"] == "head/kernel: (3, 2) float32"
    assert "treescope" in output["data"]["text/html"]
    assert browser.values.stats_report["head/kernel"].max == 10.0
    # One array: named once, counted once ("Values of 1 array of head/kernel: 1 array" before).
    assert browser.values.status == "Values of head/kernel: 1 array (24 B): no NaN or Inf."


def test_hostile_array_drawn_with_escaped_name(root):
    browser = CheckpointBrowser(root)
    browser.tree.select(HOSTILE)
    browser.values_button.click()
    browser.wait(30)
    assert browser.values.stats_report.entries[0].key == HOSTILE
    assert HOSTILE not in browser.values.status_html.value
    assert HOSTILE not in browser.values.result_html.value


def test_compare_with_another_step(root):
    browser = CheckpointBrowser(root)  # the latest step, 3
    panel = browser.values
    assert [value for _, value in panel.other_step.options] == [1, 2]
    assert panel.other_step.value == 2  # the step before by default
    assert panel.diff_button in panel.actions.children
    panel.diff_button.click()
    browser.wait(30)
    report = panel.diff_report
    assert report is not None and report.nan_appeared == ["head/kernel"]
    assert report.unchanged == [f"layers/{i}/kernel" for i in range(4)]
    assert panel.status == f"Step 2 → step 3: {report.summary()}"
    assert report.summary().startswith("NaN appeared in head/kernel; 4 of 6 arrays unchanged")
    assert HOSTILE not in panel.result_html.value and "&lt;img" in panel.result_html.value
    # The selected subtree limits the diff.
    browser.tree.select("layers")
    panel.other_step.value = 1
    panel.diff_button.click()
    browser.wait(30)
    assert [e.key for e in panel.diff_report.entries] == [f"layers/{i}/kernel" for i in range(4)]
    assert panel.diff_report.identical
    # Another step in the browser drops what was shown.
    browser.step_selector.value = 1
    assert panel.diff_report is None and panel.result_html.value == ""
    assert [value for _, value in panel.other_step.options] == [2, 3]


def test_no_step_dropdown_without_steps(tmp_path):
    path = save_checkpoint(tmp_path / "c", {"w": np.zeros(3, np.float32)})
    panel = CheckpointBrowser(path).values
    assert panel.actions.children[0] is panel.values_button
    assert panel.diff_button not in panel.actions.children


@FAILING_READ
def test_a_damaged_array_becomes_the_status(tmp_path, failing_orbax_read):
    wide = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    path = copy_checkpoint(save_checkpoint(tmp_path / "good", wide), tmp_path / "bad")
    corrupt_chunks(path, "w")
    browser = CheckpointBrowser(path)
    browser.values_button.click()
    browser.wait(30)
    panel = browser.values
    assert isinstance(panel.error, nw.CorruptCheckpointError)
    assert panel.status.startswith("Could not read the values: ") and str(path) in panel.status
    assert not panel.values_button.disabled
