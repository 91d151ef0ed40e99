"""The browser's Export panel at the Python level: Plan (a dry run that writes nothing), Export
to safetensors and Orbax read back bit for bit, the selected subtree only, a refused existing
destination, progress, and a step change. Real checkpoints, real files, no mocks."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import MLP, assert_same_arrays, save_checkpoint, save_manager
from flax import nnx
from safetensors import safe_open

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import CheckpointBrowser, render
from nnx_ckpt_widgets._display import PROGRESS_AFTER
from nnx_ckpt_widgets._export_panel import select_pattern
from nnx_ckpt_widgets.errors import InvalidArgumentError


def tree(fill: float = 0.0) -> dict[str, object]:
    """Four folded layers, a head, a sibling whose name starts like ``layers``, several dtypes."""
    rng = np.random.default_rng(int(fill))
    layers = {
        str(i): {"kernel": rng.standard_normal((3, 4)).astype(np.float32) + fill} for i in range(4)
    }
    return {
        "layers": layers,
        "layers_norm": {"scale": np.arange(4, dtype=np.float16)},
        "head": {
            "w": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
            "b": np.array([np.nan, -0.0], np.float32),  # NaN and -0.0: the bits must match
            "n": np.arange(6, dtype=np.int32).reshape(2, 3),
        },
    }


def flat(nested: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
    out: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out |= flat(value, (*prefix, key))
        else:
            out[(*prefix, key)] = np.asarray(value)
    return out


def folder_hash(path: Path) -> str:
    """Names and bytes of every file under ``path``: what a dry run must leave as it was."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*")):
        digest.update(str(file.relative_to(path)).encode())
        if file.is_file():
            digest.update(file.read_bytes())
    return digest.hexdigest()


def read_safetensors(folder: Path) -> dict[tuple[str, ...], np.ndarray]:
    """Every tensor of every ``.safetensors`` file under ``folder``, read by the library."""
    arrays = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as opened:
            for name in opened.keys():  # noqa: SIM118 (safe_open is no dict)
                arrays[tuple(name.split("."))] = opened.get_tensor(name)
    return arrays


def assert_bits_equal(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    for key, array in expected.items():
        got = actual[key]
        assert got.dtype == array.dtype and got.shape == array.shape, key
        np.testing.assert_array_equal(got.view(np.uint8), array.view(np.uint8), err_msg=str(key))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("export") / "ckpt", tree())


def test_plan_shows_the_keys_and_writes_nothing(ckpt, tmp_path):
    source, before = folder_hash(ckpt.parent), sorted(os.listdir(tmp_path))
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    # Empty by default: Export cannot run, and a click from Python does nothing.
    assert panel.destination.value == "" and browser.export_button.disabled
    assert not panel.overwrite.value
    browser.export_button.click()
    browser.wait(60)
    assert panel.plan is None and panel.status.startswith("Nothing written")
    # Plan works before a destination is typed: the keys, going nowhere yet.
    browser.plan_button.click()
    browser.wait(60)
    assert panel.plan is not None
    assert panel.phase == "planned" and "(no destination yet)" in panel.status
    dst = tmp_path / "out"
    panel.destination.value = str(dst)
    assert not browser.export_button.disabled and panel.plan is None  # a new option, no plan
    browser.plan_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and not plan.written and plan.dst == str(dst)
    expected = {".".join(path) for path in flat(tree())}
    assert {k.key for k in plan.keys} == expected
    assert (
        panel.status == f"Will write 8 arrays ({plan.total_size} B) in 1 safetensors file to {dst}."
    )
    shown = panel.plan_html.value
    # The plan's own table, its summary said once, in the status line.
    assert shown == render.plan_html(plan, title=False) and plan.summary() not in shown
    assert plan.summary() in plan._repr_html_() and "<table" in shown
    for key in ("layers.{0..3}.kernel", "layers_norm.scale", "head.w", "head.b", "head.n"):
        assert f">{key}<" in shown, key
    assert ">4 × (3, 4)<" in shown and ">bfloat16<" in shown
    assert "export: Will write 8 arrays" in repr(browser)
    # Nothing written anywhere: not dst, not beside it, not in the source.
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == before
    assert folder_hash(ckpt.parent) == source


def test_export_writes_safetensors_read_back_bit_for_bit(ckpt, tmp_path):
    source = folder_hash(ckpt.parent)
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    panel.destination.value = str(tmp_path / "hub")
    panel.shard_size.value = "60B"  # several shards and an index, as the Hub names them
    browser.export_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and plan.written and panel.phase == "done", panel.status
    assert re.fullmatch(
        rf"Wrote 8 arrays \(\d+ B\) in {len(plan.files)} safetensors files to "
        + re.escape(str(tmp_path / "hub")),
        panel.status,
    )
    assert len(plan.files) > 1 and (tmp_path / "hub" / "model.safetensors.index.json").exists()
    # The table names each file in a row of its own, above its keys.
    shown = panel.plan_html.value
    assert shown.count("nnx-ckpt-plan-file") == len(plan.files)
    assert all(f">{file}: " in shown for file in plan.files)
    assert "also: model.safetensors.index.json" in shown
    assert "in " in panel.status_html.value and panel.result is plan
    arrays = read_safetensors(tmp_path / "hub")
    assert_bits_equal(flat(tree()), arrays)
    # The checkpoint's own arrays, as Orbax restores them, are what was written.
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(ckpt)
    assert_bits_equal(flat(restored), arrays)
    assert folder_hash(ckpt.parent) == source


@pytest.mark.parametrize("fmt", ["orbax", "orbax-v1"])
def test_export_to_orbax_restores_bit_for_bit(tmp_path, fmt):
    model = MLP(rngs=nnx.Rngs(1))
    ckpt = save_checkpoint(tmp_path / "mlp", nnx.state(model))
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    panel.format.value = fmt
    assert panel.shard_size.disabled  # a safetensors option only
    panel.destination.value = str(tmp_path / "out")
    browser.export_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and plan.written, panel.status
    assert "nnx-ckpt-plan-file" not in panel.plan_html.value  # Orbax has no files to name
    other = MLP(rngs=nnx.Rngs(0))
    ncw.restore(tmp_path / "out", other)
    assert_same_arrays(model, other)


def test_selected_subtree_only_exports_exactly_that_subtree(ckpt, tmp_path):
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    panel.destination.value = str(tmp_path / "layers")
    panel.subtree.value = True
    browser.tree.select("layers")
    browser.export_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and plan.written and plan.skipped == 4, panel.status
    assert "(4 not selected)" in panel.status
    want = {k: v for k, v in flat(tree()).items() if k[0] == "layers"}  # not layers_norm
    assert_bits_equal(want, read_safetensors(tmp_path / "layers"))
    # A folded node stands for all its copies: the four layers again, nothing else.
    panel.destination.value = str(tmp_path / "folded")
    browser.tree.select("layers", "{0..3}")
    browser.plan_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and {k.key for k in plan.keys} == {
        f"layers.{i}.kernel" for i in range(4)
    }
    # Another selection drops a plan of the selected subtree.
    browser.tree.select("head")
    assert panel.plan is None and panel.plan_html.value == ""


def test_plan_table_marks_renames_casts_transforms_and_clips(ckpt):
    plan = ncw.convert(
        ckpt,
        "unused",
        to="safetensors",
        rename={r"^head/": "out/"},
        transform={r"^out/n$": lambda a: a.T},
        cast="bfloat16",
        dry_run=True,
    )
    table = render.plan_html(plan)
    assert "<th style='white-space:nowrap'>notes</th>" in table
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    by_key = {re.sub(r"<.*", "", re.sub(r"^<td[^>]*>", "", row)): row for row in rows[1:]}
    assert "'>from head/w<" in by_key["out.w"] and ">bfloat16<" in by_key["out.w"]
    assert "cast from float32" in by_key["out.b"]
    assert ">transformed<" in by_key["out.n"] and ">(3, 2)<" in by_key["out.n"]  # transposed
    assert ">int32<" in by_key["out.n"]  # integers are not cast
    assert ">cast from float32<" in by_key["layers.{0..3}.kernel"]
    assert ">cast from float16<" in by_key["layers_norm.scale"]
    assert "'>from " not in by_key["layers.{0..3}.kernel"]  # not renamed: no source shown
    # Past max_rows, one line says how many more rows and arrays; str(plan) lists them all.
    clipped = render.plan_html(plan, max_rows=2)
    assert len(re.findall(r"<tr>", clipped)) == 3  # the header and two rows
    assert re.search(r"… and \d+ more rows \(\d+ arrays\): str\(plan\) lists every key", clipped)
    assert all(k.key in str(plan) for k in plan.keys)


def test_select_pattern_is_anchored_and_escaped():
    pattern = re.compile(select_pattern([("layers", "1"), ("a.b(c)",)]))
    assert pattern.search("layers/1/kernel") and pattern.search("layers/1")
    assert pattern.search("a.b(c)/w")
    for other in ("layers/10/kernel", "x/layers/1/kernel", "aXb(c)/w", "layers/1x"):
        assert not pattern.search(other), other


def test_an_existing_destination_is_refused_and_left_alone(ckpt, tmp_path):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    before = folder_hash(tmp_path)
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    panel.destination.value = str(dst)
    for button in (browser.plan_button, browser.export_button):
        button.click()
        browser.wait(60)
        assert panel.plan is None
        assert panel.phase == "failed" and isinstance(panel.error, InvalidArgumentError)
        lead = "Cannot plan: " if button is browser.plan_button else "Export failed: "
        assert panel.status == lead + str(panel.error), panel.status
        assert "\n" not in panel.status and "exists" in panel.status
        assert panel.plan_html.value == ""
        assert folder_hash(tmp_path) == before  # nothing changed, nothing beside it
    assert "export: Export failed: " in repr(browser)


def test_progress_reaches_the_whole_size(ckpt, tmp_path, monkeypatch):
    """The bar, past PROGRESS_AFTER on the panel's clock, shows all bytes written; while the
    export runs, the buttons, the options and the step selector are disabled."""
    import nnx_ckpt_widgets._display as display_module
    import nnx_ckpt_widgets._export_panel as panel_module

    class Clock:
        now = 100.0

        def perf_counter(self) -> float:
            return self.now

    clock = Clock()
    monkeypatch.setattr(display_module, "time", clock)
    browser = CheckpointBrowser(ckpt)
    panel = browser.export_panel
    real = panel_module.convert
    calls: list[tuple[int, int]] = []
    during: list[tuple[float, str, bool, bool, bool, bool]] = []

    def watched(*args, progress, **kwargs):
        def seen(done: int, total: int) -> None:
            calls.append((done, total))
            progress(done, total)

        plan = real(*args, progress=seen, **kwargs)
        clock.now += PROGRESS_AFTER + 0.5  # the next tick shows the bar, the export still on
        deadline = time.monotonic() + 30  # a guard against a hang, not a timing bound
        while panel.progress.layout.display != "flex":
            assert time.monotonic() < deadline, "the progress bar never showed"
            time.sleep(0.02)
        during.append(
            (
                panel.bar.value,
                panel.bar_text.value,
                browser.export_button.disabled,
                browser.plan_button.disabled,
                panel.destination.disabled,
                browser.step_selector.disabled,
            )
        )
        return plan

    monkeypatch.setattr(panel_module, "convert", watched)
    running: list[bool] = []
    panel.observe(lambda change: running.append(change["new"]), "running")
    panel.destination.value = str(tmp_path / "out")
    browser.export_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and plan.written
    assert calls and calls[-1] == (plan.total_size, plan.total_size)
    ((value, text, *disabled),) = during
    size = f"{plan.total_size} B"
    assert value == 1.0 and f"{size} of {size} · 1.5 s" in text, text
    assert all(disabled), disabled
    assert running == [True, False] and panel.progress.layout.display == "none"
    assert not browser.export_button.disabled and not browser.step_selector.disabled


def test_switching_step_updates_the_panel(tmp_path):
    steps = {s: {"state": tree(float(s))} for s in (1, 2)}
    root = save_manager(tmp_path / "root", steps)
    browser = CheckpointBrowser(root)
    panel = browser.export_panel
    assert browser.info.step == 2
    panel.destination.value = str(tmp_path / "out")
    browser.plan_button.click()
    browser.wait(60)
    assert panel.plan is not None
    browser.step_selector.value = 1
    assert panel.plan is None and panel.phase == "ready" and panel.info.step == 1
    browser.export_button.click()
    browser.wait(60)
    plan = panel.plan
    assert plan is not None and plan.written, panel.status
    assert_bits_equal(flat(tree(1.0)), read_safetensors(tmp_path / "out"))
