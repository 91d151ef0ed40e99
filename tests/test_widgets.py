"""Python-level tests of the widgets on real Orbax checkpoints: no kernel, no browser, no mocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import ipywidgets
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import traitlets
from flax import nnx

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import CheckpointBrowser, compare_states
from nnx_ckpt_widgets._tree_view import TreeView
from nnx_ckpt_widgets.errors import CheckpointMismatchError, CorruptCheckpointError

XSS = "<img src=x onerror=alert(1)>"
HOSTILE = {
    XSS: np.ones(2, np.float32),
    "<script>alert(2)</script>": np.ones(3, np.float32),
    "quote\"s 'and' & <b>bold</b>": np.ones(1, np.float32),
    "line1\nline2": np.ones(1, np.float32),
    "k" * 10_000: np.ones(1, np.float32),
    "ключ-中文-🙂": np.ones(1, np.float32),
}


class MLP(nnx.Module):
    def __init__(self, din: int = 3, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(din, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)


class Wider(nnx.Module):
    """MLP plus one more layer: restoring an MLP checkpoint leaves ``extra`` missing."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.linear1 = nnx.Linear(3, 4, rngs=rngs)
        self.linear2 = nnx.Linear(4, 2, rngs=rngs)
        self.extra = nnx.Linear(2, 2, rngs=rngs)


class Big(nnx.Module):
    """32 MiB of float32, so that a restore takes long enough to click twice during it."""

    def __init__(self, fill: float = 0.0):
        self.a = nnx.Param(jnp.full((2048, 2048), fill, jnp.float32))
        self.b = nnx.Param(jnp.full((2048, 2048), fill, jnp.float32))


def save(path: Path, tree: Any) -> Path:
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    return path


def save_manager(root: Path, states: dict[int, Any], metrics: dict[int, dict]) -> Path:
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(root, options=options) as manager:
        for step, state in states.items():
            manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics[step])
        manager.wait_until_finished()
    return root


def arrays(model: Any) -> dict[tuple, np.ndarray]:
    return {
        tuple(p): np.array(v.get_value(), copy=True) for p, v in nnx.to_flat_state(nnx.state(model))
    }


def assert_arrays_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    jax.tree.map(np.testing.assert_array_equal, a, b)


def walk(widget: ipywidgets.Widget) -> list[ipywidgets.Widget]:
    """The widget and every widget shown inside it (box children, recursively)."""
    found = [widget]
    for child in getattr(widget, "children", ()):
        found.extend(walk(child))
    return found


def html_values(widget: ipywidgets.Widget) -> list[str]:
    """Everything the front-end will parse as HTML: HTML widgets and Output html outputs."""
    values = []
    for w in walk(widget):
        if isinstance(w, ipywidgets.HTML):
            values.append(w.value)
        if isinstance(w, ipywidgets.Output):
            values.extend(o["data"].get("text/html", "") for o in w.outputs)
    return values


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory) -> Path:
    """``nnx.state(MLP(rngs=nnx.Rngs(1)))`` saved as an nnx.State."""
    return save(tmp_path_factory.mktemp("w") / "mlp", nnx.state(MLP(rngs=nnx.Rngs(1))))


@pytest.fixture(scope="module")
def manager_root(tmp_path_factory) -> Path:
    """Steps 1, 2, 3 of MLP(rngs=Rngs(step)) with metrics, one named like an XSS payload."""
    states = {s: nnx.state(MLP(rngs=nnx.Rngs(s))) for s in (1, 2, 3)}
    metrics = {s: {"loss": 1.0 / s, XSS: float(s)} for s in (1, 2, 3)}
    return save_manager(tmp_path_factory.mktemp("w") / "manager", states, metrics)


def test_import_does_not_load_widgets_treescope_or_jax():
    code = textwrap.dedent(
        """
        import sys
        import nnx_ckpt_widgets
        heavy = ("ipywidgets", "treescope", "jax", "IPython", "flax", "orbax")
        print(sorted(m for m in heavy if m in sys.modules))
        assert "CheckpointBrowser" in nnx_ckpt_widgets.__all__
        nnx_ckpt_widgets.CheckpointBrowser
        print("ipywidgets" in sys.modules)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # the lazy export does load the widgets when asked for


def test_header_tree_and_repr(mlp_ckpt):
    browser = CheckpointBrowser(mlp_ckpt)
    header = browser.header.value
    assert str(mlp_ckpt) in header and "nnx.State" in header
    assert "4 arrays" in header and "26 params" in header and "104 B" in header
    assert browser.tree.text().splitlines() == [
        "▾ linear1  16 params, 64 B",
        "    bias  (4,) float32  4 params, 16 B",
        "    kernel  (3, 4) float32  12 params, 48 B",
        "▾ linear2  10 params, 40 B",
        "    bias  (2,) float32  2 params, 8 B",
        "    kernel  (4, 2) float32  8 params, 32 B",
    ]
    text = repr(browser)
    assert text == repr(CheckpointBrowser(mlp_ckpt))  # deterministic
    assert text.startswith(f"CheckpointBrowser: {mlp_ckpt}\nformat nnx.State: 4 arrays")
    assert "model_id" not in text and "IPY_MODEL" not in text
    bundle = browser._repr_mimebundle_()
    assert bundle["text/plain"] == text and len(text) > 110  # not cut at 110 characters
    assert "application/vnd.jupyter.widget-view+json" in bundle
    with pytest.raises(AttributeError, match="pass one"):
        browser.restore_button  # noqa: B018
    assert browser.wait() is None and browser.status == ""


def test_restore_click_restores_the_model(mlp_ckpt):
    model = MLP(rngs=nnx.Rngs(0))
    saved = arrays(MLP(rngs=nnx.Rngs(1)))
    with pytest.raises(AssertionError):
        assert_arrays_equal(arrays(model), saved)
    browser = CheckpointBrowser(mlp_ckpt, model)
    assert browser.status == "Ready to restore 4 arrays (104 B)."
    assert "matched" in browser.panel.report_html.value
    browser.restore_button.click()
    report = browser.wait(timeout=60)
    assert browser.status == "Restored 4 arrays (104 B)."
    assert 'data-state="done"' in browser.panel.status_html.value
    assert report is not None and report.restored_arrays == 4
    assert {e.action for e in report.entries} == {"restored"}
    assert_arrays_equal(arrays(model), saved)
    assert not browser.restore_button.disabled
    assert "status: Restored 4 arrays (104 B)." in repr(browser)


def test_button_disabled_while_running_and_second_click_ignored(tmp_path):
    path = save(tmp_path / "big", nnx.state(Big(1.0)))
    model = Big(0.0)
    browser = CheckpointBrowser(path, model)
    statuses: list[str] = []
    disabled: list[bool] = []
    browser.observe(lambda c: statuses.append(c["new"]), "status")
    browser.restore_button.observe(lambda c: disabled.append(c["new"]), "disabled")
    browser.restore_button.click()
    assert browser.restore_button.disabled and browser.panel.running
    assert browser.step_selector.disabled
    assert browser.panel.mode.disabled and browser.panel.missing.disabled
    browser.restore_button.click()  # ignored: a restore is running
    browser.wait(timeout=120)
    assert disabled == [True, False]
    assert [s for s in statuses if s.startswith("Restoring")] == ["Restoring 2 arrays (32.0 MiB)…"]
    assert [s for s in statuses if s.startswith("Restored")] == ["Restored 2 arrays (32.0 MiB)."]
    np.testing.assert_array_equal(model.a.get_value(), np.ones((2048, 2048), np.float32))


def test_strict_failure_leaves_model_untouched(mlp_ckpt):
    model = MLP(din=5, rngs=nnx.Rngs(0))  # linear1/kernel is (5, 4), the checkpoint's (3, 4)
    before = arrays(model)
    browser = CheckpointBrowser(mlp_ckpt, model)
    assert browser.status.startswith("A strict restore will fail: 1 shape mismatched")
    assert "shape mismatch" in browser.panel.report_html.value
    browser.restore_button.click()
    assert browser.wait(timeout=60) is None
    assert browser.status.startswith("Restore failed: Checkpoint at ")
    assert "does not fit the target" in browser.status and "\n" not in browser.status
    assert isinstance(browser.panel.error, CheckpointMismatchError)
    assert 'data-state="failed"' in browser.panel.status_html.value
    assert_arrays_equal(arrays(model), before)
    assert not browser.restore_button.disabled  # the user may change options and retry


def test_corrupt_data_fails_and_leaves_model_untouched(tmp_path):
    path = save(tmp_path / "mlp", nnx.state(MLP(rngs=nnx.Rngs(1))))
    model = MLP(rngs=nnx.Rngs(0))
    before = arrays(model)
    browser = CheckpointBrowser(path, model)
    # The metadata was read when the browser was built; now the array data goes missing.
    for file in (path / "d").iterdir():
        file.write_bytes(b"\0" * 16)
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status.startswith("Restore failed: ")
    assert isinstance(browser.panel.error, CorruptCheckpointError)
    assert_arrays_equal(arrays(model), before)


def test_lenient_options(mlp_ckpt):
    model = Wider(rngs=nnx.Rngs(0))
    extra_before = np.array(model.extra.kernel.get_value())
    browser = CheckpointBrowser(mlp_ckpt, model)
    panel = browser.panel
    assert panel.missing.disabled and panel.unexpected.disabled and panel.cast.disabled
    assert browser.status.startswith("A strict restore will fail: 2 missing (extra/")
    panel.mode.value = False
    assert not panel.missing.disabled
    assert browser.status == "Ready to restore 4 arrays (104 B)."
    assert panel.options() == {
        "step": None,
        "item": None,
        "strict": False,
        "missing": "keep",
        "unexpected": "ignore",
        "cast": False,
    }
    panel.missing.value = "zeros"
    browser.restore_button.click()
    report = browser.wait(timeout=60)
    assert browser.status == "Restored 4 arrays (104 B)."
    assert {e.path: e.action for e in report.entries}["extra/kernel"] == "zeros"
    assert not np.array_equal(extra_before, 0)
    np.testing.assert_array_equal(model.extra.kernel.get_value(), np.zeros((2, 2)))
    assert "zeros" in panel.report_html.value  # the report now shows what was done


def test_step_selector_lists_steps_metrics_and_latest(manager_root):
    model = MLP(rngs=nnx.Rngs(0))
    browser = CheckpointBrowser(manager_root, model)
    selector = browser.step_selector
    assert selector in walk(browser)
    labels = [label for label, _ in selector.options]
    assert [value for _, value in selector.options] == [1, 2, 3]
    assert labels[2].startswith("3 (") and labels[2].endswith("(latest)")
    # Dropdown labels are set as text by the front-end; long metric names are shortened.
    assert "loss=0.3333" in labels[2] and "<img src=x …or=alert(1)>=3" in labels[2]
    assert not any("latest" in label for label in labels[:2])
    assert selector.value == 3 and browser.info.step == 3
    assert "step 3 (3 steps, latest 3)" in browser.header.value
    assert "steps: 1 (" in repr(browser) and "latest" in repr(browser)

    old_tree = browser.tree
    assert old_tree.comm is not None
    selector.value = 1
    assert browser.info.step == 1 and "step 1 (3 steps, latest 3)" in browser.header.value
    assert browser.tree is not old_tree and old_tree.comm is None  # closed, not leaked
    assert browser.panel.options()["step"] == 1
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status == "Restored 4 arrays (104 B)."
    assert_arrays_equal(arrays(model), arrays(MLP(rngs=nnx.Rngs(1))))
    # Escaped wherever it reaches HTML: the header and report carry no metric names at all,
    # and nothing else either.
    assert not any(XSS in value for value in html_values(browser))


def test_step_selector_marks_the_best_step(manager_root):
    # loss is 1/step: lowest at step 3 (also the latest), highest at step 1.
    browser = CheckpointBrowser(manager_root, best_metric="loss", best_mode="max")
    labels = {value: label for label, value in browser.step_selector.options}
    assert labels[1].endswith("(best)") and labels[3].endswith("(latest)")
    assert "best" not in labels[2] and "latest" not in labels[2]
    assert browser.info.best_step("loss", "min") == 3
    assert browser.info.best_step("no such metric") is None
    minimal = CheckpointBrowser(manager_root, best_metric="loss")
    assert {v: lab for lab, v in minimal.step_selector.options}[3].endswith("(latest, best)")
    assert "3 (" in repr(minimal) and "latest best" in repr(minimal)
    with pytest.raises(ncw.InvalidArgumentError, match="mode must be 'min' or 'max'"):
        CheckpointBrowser(manager_root, best_metric="loss", best_mode="lowest")


def test_hostile_names_are_escaped(tmp_path):
    path = save(tmp_path / "hostile", {"ok": np.zeros(2, np.float32), **HOSTILE})
    browser = CheckpointBrowser(path)
    descriptions = [w.description for w in walk(browser) if isinstance(w, ipywidgets.Button)]
    # Button descriptions are set as text by the front-end; the tree shows names there.
    assert XSS in descriptions and "<script>alert(2)</script>" in descriptions
    assert "line1\\nline2" in descriptions  # a newline shows as \n, on one line
    assert "ключ-中文-🙂" in descriptions
    long = [d for d in descriptions if d.startswith("kkk")]
    assert len(long) == 1 and len(long[0]) <= 80 and "…" in long[0]
    for name in HOSTILE:
        browser.tree.select(name)
        caption = browser.tree.caption.value
        assert "<img" not in caption and "<script" not in caption and "<b>bold" not in caption
    browser.tree.select(XSS)
    assert "&lt;img src=x onerror=alert(1)&gt;" in browser.tree.caption.value
    for value in html_values(browser):
        assert XSS not in value and "<script>alert" not in value and "<b>bold" not in value
    text = repr(browser)
    assert XSS in text and "line1\\nline2" in text and "k" * 100 not in text


def test_hostile_names_in_load_report_are_escaped(tmp_path):
    path = save(tmp_path / "hostile", dict(HOSTILE))
    browser = CheckpointBrowser(path, MLP(rngs=nnx.Rngs(0)))
    report = browser.panel.report_html.value
    assert "unexpected" in report and "&lt;img src=x onerror=alert(1)&gt;" in report
    for value in html_values(browser):
        assert XSS not in value and "<script>alert" not in value


def test_folding_paging_and_lazy_rows(tmp_path):
    tree = {
        "layers": {str(i): {"w": np.zeros(2, np.float32)} for i in range(30)},
        "wide": {f"p{i}": np.zeros(1, np.float32) for i in range(100)},
    }
    tree["layers"]["30"] = {"w": np.zeros(3, np.float32)}  # another shape: not folded in
    browser = CheckpointBrowser(save(tmp_path / "fold", tree), page_size=40)
    tree_view = browser.tree
    lines = tree_view.text().splitlines()
    assert lines[:3] == [
        "▾ layers  63 params, 252 B",
        "  ▸ {0..29}  30 folded  60 params, 240 B",
        "  ▸ 30  3 params, 12 B",
    ]
    assert lines[3] == "▾ wide  100 params, 400 B"
    assert lines[-1] == "  … 60 more" and len(lines) == 4 + 40 + 1
    rows = [w for w in walk(browser) if isinstance(w, ipywidgets.HBox)]
    assert len(rows) < 60  # 100 names under "wide", 30 folded layers: only a page is built
    more = [
        w for w in walk(browser) if isinstance(w, ipywidgets.Button) and "more" in w.description
    ]
    assert [m.description for m in more] == ["show 40 more (60 not shown)"]
    more[0].click()
    assert tree_view.text().splitlines()[-1] == "  … 20 more"
    group = tree_view.row("layers", "{0..29}")
    assert not group.expanded
    group.toggle.click()
    assert group.expanded and "      w  30 × (2,) float32  60 params, 240 B" in tree_view.text()
    group.toggle.click()
    assert not group.expanded and "30 × (2,)" not in tree_view.text()


def test_selection_shows_subtree_through_treescope(tmp_path):
    tree = {"layers": {str(i): {"w": np.zeros(2, np.float32)} for i in range(150)}}
    browser = CheckpointBrowser(save(tmp_path / "sel", tree))
    tree_view = browser.tree
    tree_view.select("layers", "{0..149}")
    assert tree_view.selected == "layers/{0..149}"
    assert "150 folded subtrees of one structure; showing layers/0" in tree_view.caption.value
    (output,) = tree_view.output.outputs
    assert "treescope" in output["data"]["text/html"]
    tree_view.row("layers").name.click()
    assert tree_view.selected == "layers"
    assert "showing the first 100 of 150 arrays" in tree_view.caption.value


def test_tree_view_validates_traits(mlp_ckpt):
    info = ncw.inspect(mlp_ckpt)
    with pytest.raises(traitlets.TraitError, match="page_size must be at least 1, got 0"):
        TreeView(info, page_size=0)
    with pytest.raises(ncw.InvalidArgumentError, match="no node 'nope'"):
        TreeView(info).row("nope")


def test_compare_states_side_by_side(mlp_ckpt):
    model = MLP(rngs=nnx.Rngs(0))
    saved = nnx.state(MLP(rngs=nnx.Rngs(1)))
    before = compare_states(saved, model)
    assert not before.equal
    assert repr(before) == (
        "SideBySide(saved | restored): 4 arrays compared; "
        "2 different: linear1/kernel, linear2/kernel"
    )
    assert before._repr_mimebundle_()["text/plain"] == repr(before)
    outputs = [w for w in walk(before) if isinstance(w, ipywidgets.Output)]
    assert len(outputs) == 2 and all(
        "treescope" in o.outputs[0]["data"]["text/html"] for o in outputs
    )
    ncw.restore(mlp_ckpt, model)
    after = compare_states(saved, model, labels=(XSS, "model"))
    assert after.equal and repr(after).endswith("4 arrays compared; all equal")
    assert not any(XSS in value for value in html_values(after))
    pure = compare_states({"linear1": {"bias": np.zeros(4)}}, model)
    assert pure.differences["only_right"] == [
        ("linear1", "kernel"),
        ("linear2", "bias"),
        ("linear2", "kernel"),
    ]


def test_relative_path_restores(tmp_path, monkeypatch):
    save(tmp_path / "mlp", nnx.state(MLP(rngs=nnx.Rngs(1))))
    monkeypatch.chdir(tmp_path)
    model = MLP(rngs=nnx.Rngs(0))
    browser = CheckpointBrowser("mlp", model)
    assert "<b>mlp</b>" in browser.header.value
    browser.restore_button.click()
    browser.wait(timeout=60)
    assert browser.status == "Restored 4 arrays (104 B).", browser.status
    assert_arrays_equal(arrays(model), arrays(MLP(rngs=nnx.Rngs(1))))
