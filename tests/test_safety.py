"""Checkpoints from strangers: nothing is overwritten, nothing from them runs or renders as HTML.

The rest of the fault suite of ``test_faults.py``. Overwrite safety: no entry point changes any
file of a checkpoint of any layout (hashed before and after each), the example script refuses
an existing target without ``--force``, and notebooks and benchmarks save only into fresh
temporary folders. Hostile names (HTML, JS, quotes, newlines, 10,000
characters, non-ASCII) in keys, metric names, item and folder names reach every HTML the
package makes as text, and a long one wraps or is clipped. Trust: a live pickle payload placed
wherever a reader might look is never run, and the README's security section says what is read
and what to do.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import ipywidgets
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import FAILING_READ, copy_checkpoint, make_mlp, save_checkpoint, save_manager
from flax import nnx
from safetensors.numpy import save_file

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import CheckpointBrowser, compare_states
from nnx_ckpt_widgets.__main__ import main as cli

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nnx_ckpt_widgets"
SCRIPTS = REPO / "notebooks" / "scripts"

# --- overwrite safety -----------------------------------------------------------------------

# Every layout, as its real writer leaves it, read through every entry point: nothing in the
# checkpoint changes (content, names, folders, modification times). Behavioural, so it covers
# layouts/, where untrusted files are parsed, and whatever a dependency does on our behalf.


def _fingerprint(path: Path) -> dict[str, tuple]:
    """Every file and folder under ``path`` (a file: its folder): mode, size, mtime and, for
    files, a SHA-256 of the bytes. Access times are left out: reading changes them."""
    root = path if path.is_dir() else path.parent
    found: dict[str, tuple] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = Path(folder) / name
            stat = full.lstat()
            digest = hashlib.sha256(full.read_bytes()).hexdigest() if name in files else None
            found[str(full.relative_to(root))] = (
                stat.st_mode,
                stat.st_size,
                stat.st_mtime_ns,
                digest,
            )
    return found


def _mlp_arrays() -> dict[str, np.ndarray]:
    """The MLP's arrays under dotted names, as a PyTorch-style safetensors file holds them."""
    flat = nnx.to_flat_state(nnx.state(make_mlp(0)))
    return {".".join(map(str, path)): np.asarray(leaf.get_value()) for path, leaf in flat}


def _save_shards(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Two shards, their index and a config.json, as ``save_pretrained`` lays them out."""
    folder.mkdir(parents=True)
    weight_map = {}
    for k, names in enumerate((sorted(arrays)[::2], sorted(arrays)[1::2])):
        file = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file({n: arrays[n] for n in names}, folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp"}))
    return folder


@pytest.fixture(scope="module")
def every_layout(tmp_path_factory) -> dict[str, tuple[Path, tuple[int, int] | None]]:
    """``{layout: (path, two steps to diff or None)}``: the MLP in every layout, each written
    by the library users write it with, in a folder of its own."""
    from orbax.checkpoint import v1

    base = tmp_path_factory.mktemp("layouts")
    state = nnx.state(make_mlp(0))
    made: dict[str, tuple[Path, tuple[int, int] | None]] = {}
    made["orbax v0"] = (save_checkpoint(base / "v0" / "ckpt", state), None)
    steps = {1: {"model": state}, 2: {"model": nnx.state(make_mlp(2))}}
    made["orbax v0 manager"] = (save_manager(base / "manager" / "run", steps), (1, 2))
    v1.save(base / "v1" / "ckpt", state)
    made["orbax v1"] = (base / "v1" / "ckpt", None)
    with v1.training.Checkpointer(base / "training" / "run") as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, nnx.state(make_mlp(2)))
    made["orbax v1 training"] = (base / "training" / "run", (1, 2))
    (base / "st").mkdir()
    save_file(_mlp_arrays(), base / "st" / "model.safetensors", metadata={"format": "pt"})
    made["safetensors file"] = (base / "st" / "model.safetensors", None)
    made["safetensors shards"] = (_save_shards(base / "shards" / "model", _mlp_arrays()), None)
    return made


def _every_entry_point(path: Path, steps: tuple[int, int] | None) -> Iterator[tuple[str, Any]]:
    """``(name, call)`` for every way the package reads a checkpoint, the CLI included."""
    model = make_mlp(1)
    diff_steps = {"steps": steps} if steps else {}
    yield "inspect", lambda: ncw.inspect(path)
    yield "compare", lambda: ncw.compare(path, model)
    yield "restore", lambda: ncw.restore(path, model)
    yield "stats", lambda: ncw.stats(path, progress=False)
    yield "diff", lambda: ncw.diff(path, None if steps else path, progress=False, **diff_steps)
    yield "browser", lambda: expand_and_select_all(CheckpointBrowser(path, model))
    second = ["--steps", *map(str, steps)] if steps else [str(path)]
    for args in (["inspect"], ["stats", "--no-progress"], ["diff", *second, "--no-progress"]):
        yield "cli " + args[0], lambda args=args: cli([args[0], str(path), *args[1:]])
    # convert writes only its own new destination, outside the checkpoint.
    out = Path(tempfile.mkdtemp(prefix="nnx-ckpt-convert-"))
    yield "convert", lambda: ncw.convert(path, out / "st", to="safetensors", progress=False)
    yield "convert orbax", lambda: ncw.convert(path, out / "v1", to="orbax-v1", progress=False)
    yield "cli convert", lambda: cli(["convert", str(path), str(out / "v0"), "--to", "orbax"])


LAYOUTS = (
    "orbax v0",
    "orbax v0 manager",
    "orbax v1",
    "orbax v1 training",
    "safetensors file",
    "safetensors shards",
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_no_entry_point_changes_a_checkpoint(every_layout, layout, capsys):
    path, steps = every_layout[layout]
    before = _fingerprint(path)
    assert before, path
    for name, call in _every_entry_point(path, steps):
        result = call()
        if name.startswith("cli"):
            assert result == 0, capsys.readouterr().err
        assert _fingerprint(path) == before, f"{name} changed the {layout} checkpoint"
    capsys.readouterr()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in folder.rglob("*") if f.is_file()}


def test_save_sharded_refuses_an_existing_checkpoint(tmp_path, mlp_state_ckpt):
    existing = copy_checkpoint(mlp_state_ckpt, tmp_path / "state")
    before = _files(existing)
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "save_sharded.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {existing} already exists; pass --force to replace it."
    ]
    assert _files(existing) == before


@pytest.mark.multiprocess
def test_save_sharded_force_replaces_it(tmp_path, mlp_state_ckpt, capsys):
    from nnx_ckpt_widgets.launch import run

    copy_checkpoint(mlp_state_ckpt, tmp_path / "state")
    args = [str(tmp_path), "--force"]
    assert run(SCRIPTS / "save_sharded.py", args, 2, 2, timeout=120, grouped=True) == 0
    assert capsys.readouterr().err == ""
    info = ncw.inspect(tmp_path / "state")  # the sharded MLP now, not the old checkpoint
    assert info.leaves[("linear1", "kernel")].shape == (8, 8)
    assert "mesh(data=2,model=2)" in info.leaves[("linear1", "kernel")].sharding


def _code(source: str) -> ast.Module:
    """A notebook cell or a module as an AST; IPython magics and shell lines become ``pass``."""
    lines = [re.sub(r"^(\s*)[%!].*", r"\1pass", line) for line in source.splitlines()]
    return ast.parse("\n".join(lines))


def _unsafe_writes(tree: ast.Module, roots: set[str]) -> list[str]:
    """Calls that save or delete somewhere not derived from the ``roots`` names."""
    derived = set(roots)
    assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.withitem))]
    for _ in range(5):  # a few rounds reach every name built from another
        for node in assigns:
            value = node.value if isinstance(node, ast.Assign) else node.context_expr
            targets = node.targets if isinstance(node, ast.Assign) else [node.optional_vars]
            if {n.id for n in ast.walk(value) if isinstance(n, ast.Name)} & derived:
                derived |= {
                    n.id for t in targets if t for n in ast.walk(t) if isinstance(n, ast.Name)
                }
    bad = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        func = call.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
        if name not in ("save", "rmtree", "CheckpointManager", "erase_and_create_empty"):
            continue
        if name == "save" and "manager" in receiver:
            continue  # a manager's save(step, ...) writes under its root, checked at creation
        where = call.args[0] if call.args else None
        if (
            where is None
            or not {n.id for n in ast.walk(where) if isinstance(n, ast.Name)} & derived
        ):
            bad.append(ast.unparse(call)[:120])
    return bad


def test_notebooks_save_only_into_fresh_temporary_folders():
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        for word in ("erase_and_create_empty", "rmtree", "force=True"):
            assert word not in code, f"{notebook.name} uses {word}"
        tree = _code(code)
        assert _unsafe_writes(tree, {"ckpt_dir"}) == [], notebook.name
        if "save(" in code:
            fresh = [
                'ckpt_dir = Path(tempfile.mkdtemp(prefix="nnx-ckpt-"))',
                # a new bucket of an emulator the notebook starts, on its own temporary storage
                "gcs = GCSEmulator().start()\nckpt_dir = gcs.create_bucket(",
            ]
            assert any(line in code for line in fresh), notebook.name


def test_benchmarks_save_only_into_their_temporary_folder():
    main = (REPO / "benchmarks" / "__main__.py").read_text()
    assert "tempfile.TemporaryDirectory(" in main
    assert _unsafe_writes(_code((REPO / "benchmarks" / "cases.py").read_text()), {"tmp"}) == []


# --- hostile names ----------------------------------------------------------------------------

XSS = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(2)</script>"
QUOTES = "quote\"s 'and' & <b>bold</b>"
LONG = "k" * 10_000
NAMES = (XSS, SCRIPT, QUOTES, "line1\nline2", LONG, "ключ-中文-🙂")
OURS = {"div", "span", "b", "br", "table", "tr", "th", "td", "ul", "li", "details", "summary"}


class _Elements(HTMLParser):
    """Every element, and the styles around each run of the long name."""

    def __init__(self):
        super().__init__()
        self.elements: list[tuple[str, list]] = []
        self.styles: list[str] = []
        self.around_long: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, attrs))
        if tag != "br":
            given = dict(attrs)
            # Our widgets style by class, from one stylesheet (nnx_ckpt_widgets._display.STYLE).
            classes = " ".join(f".{c}" for c in (given.get("class") or "").split())
            self.styles.append(f"{given.get('style') or ''} {classes}".strip())

    def handle_endtag(self, tag):
        if self.styles:
            self.styles.pop()

    def handle_data(self, data):
        if "k" * 200 in data:
            self.around_long.append(";".join(self.styles))


def assert_inert(markup: str) -> None:
    """No element or event handler from a payload; a long name wraps anywhere."""
    assert "<img" not in markup and "<script" not in markup and "<b>bold" not in markup
    parser = _Elements()
    parser.feed(markup.replace("<style>", "").replace("</style>", ""))  # our one style sheet
    for tag, attrs in parser.elements:
        assert tag in OURS, tag
        assert not [name for name, _ in attrs if name.startswith("on")], (tag, attrs)
    for styles in parser.around_long:
        assert "overflow-wrap:anywhere" in styles or ".nnx-ckpt-text" in styles, styles


def walk(widget: ipywidgets.Widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from walk(child)


def html_values(widget: ipywidgets.Widget) -> list[str]:
    """Every HTML widget value inside ``widget``; no widget may describe itself in HTML."""
    values = []
    for each in walk(widget):
        assert not getattr(each, "description_allow_html", False), each
        if isinstance(each, ipywidgets.HTML):
            values.append(each.value)
    return values


def expand_and_select_all(browser: CheckpointBrowser) -> list[str]:
    """Open every node (all pages), select each, and collect the HTML shown after each."""
    seen = []

    def visit(rows) -> None:  # a _ChildList: the rows under one node
        while len(rows.rows) < len(rows.nodes):
            rows.show_more()
        for row in rows.rows:
            browser.tree.select_node(row.node)
            seen.extend(html_values(browser))
            row.set_expanded(True)
            if row.children is not None:
                visit(row.children)

    visit(browser.tree._top)
    return seen


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint in a folder named like the payload, and a manager root with hostile items,
    metric names and values; step 1's model item is damaged, so choosing it shows an error."""
    base = tmp_path_factory.mktemp("hostile") / XSS
    tree = {XSS: {SCRIPT: np.ones(2, np.float32), QUOTES: np.ones(1, np.float32)}}
    tree |= {name: np.ones(1, np.float32) for name in NAMES[3:]}
    ckpt = save_checkpoint(base / XSS, tree)
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m["loss"], best_mode="min")
    with ocp.CheckpointManager(base / "run", options=options, item_names=(XSS, "m")) as manager:
        for step in (0, 1):
            items = {XSS: ocp.args.StandardSave(tree), "m": ocp.args.StandardSave({"a": 1.0})}
            metrics = {"loss": 1.0 - step, XSS: 1.0, SCRIPT: QUOTES, LONG: 2.0}
            manager.save(step, args=ocp.args.Composite(**items), metrics=metrics)
        manager.wait_until_finished()
    (base / "run" / "0" / XSS / "_METADATA").write_text("garbage")
    return ckpt, base / "run"


def target() -> nnx.State:
    """Some hostile keys match, some are missing from the checkpoint, one differs in shape."""
    return nnx.State(
        {
            XSS: {SCRIPT: nnx.Param(jnp.zeros(2)), QUOTES: nnx.Param(jnp.zeros(3))},
            LONG: nnx.Param(jnp.zeros(1)),
            SCRIPT + LONG: nnx.Param(jnp.zeros(1)),
        }
    )


def test_checkpoint_info_and_load_reports(hostile):
    ckpt, root = hostile
    escaped = html.escape(XSS)
    for info in (ncw.inspect(ckpt), ncw.inspect(root, item=XSS)):
        assert_inert(info._repr_html_())
        assert escaped in info._repr_html_()
    report = ncw.compare(ckpt, target())
    assert {"matched", "missing", "unexpected", "shape mismatch"} <= {
        e.status for e in report.entries
    }
    with pytest.raises(ncw.CheckpointMismatchError) as raised:
        ncw.restore(ckpt, target(), strict=False)  # a shape differs: even lenient refuses
    assert "\n" not in str(raised.value)
    fits = nnx.State({XSS: {SCRIPT: nnx.Param(jnp.zeros(2))}, LONG: nnx.Param(jnp.zeros(1))})
    restored = ncw.restore(ckpt, fits, strict=False)
    for each in (report, restored):
        assert_inert(each._repr_html_())
        assert escaped in each._repr_html_()


def test_browser_html_after_expanding_selecting_and_failing(hostile):
    ckpt, _ = hostile
    browser = CheckpointBrowser(ckpt, target(), expand_depth=0, page_size=2)
    shown = expand_and_select_all(browser)
    browser.restore_button.click()  # strict: fails, and the reason names hostile keys
    browser.wait(timeout=60)
    assert browser.status.startswith("Restore failed: ")
    shown += html_values(browser)
    for markup in shown:
        assert_inert(markup)
    assert any(html.escape(XSS) in m for m in shown)
    assert any("&lt;script&gt;" in m for m in shown)
    long = next(r for r in browser.tree._top.rows if r.node.label.startswith("kkk"))
    assert len(long.name.description) <= 80 and "…" in long.name.description  # clipped
    # Clipped to the pane (the button ellipsizes), the whole name in its tooltip.
    assert long.name.layout.max_width == "100%" and "nnx-ckpt-name" in long.name._dom_classes
    assert long.name.tooltip.startswith("kkk") and len(long.name.tooltip) > 80


def test_browser_of_a_manager_with_hostile_items_and_metrics(hostile):
    _, root = hostile
    browser = CheckpointBrowser(root, item=XSS)
    labels = [label for label, _ in browser.step_selector.options]
    assert all(len(label) < 200 for label in labels)  # long metric names are clipped
    assert any("<img src=x" in label for label in labels)  # a label is text, never HTML
    assert XSS in browser.item_selector.options
    browser.step_selector.value = 0  # damaged: the browser shows why, escaped
    assert browser.error is not None
    shown = expand_and_select_all(browser) + html_values(browser)
    for markup in shown:
        assert_inert(markup)
    assert html.escape(XSS) in browser.error_html.value


def test_side_by_side():
    left = {name: np.ones(1, np.float32) for name in NAMES}
    right = {XSS: np.zeros(1, np.float32), LONG: np.ones(1, np.float32)}
    view = compare_states(left, right, labels=(XSS, SCRIPT))
    style, *values = html_values(view)  # first our stylesheet, which holds no names
    assert style.startswith("<style>") and "<img" not in style and XSS not in style
    assert len(values) == 3
    for markup in values:
        assert_inert(markup)
    assert html.escape(XSS) in values[0] and html.escape(SCRIPT) in values[2]


# --- trust ------------------------------------------------------------------------------------


class _Payload:
    """Unpickled, it creates ``marker`` (``open(marker, "w")``): proof that something ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickle_at(folder: Path, relative: str, marker: Path) -> None:
    """Put a live pickle payload at ``folder/relative`` (replacing what was there)."""
    import pickle

    target = folder / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if relative.endswith(".npz"):
        payload = np.empty(1, object)
        payload[0] = _Payload(marker)
        np.savez(target, w=payload)  # an object array is stored as a pickle
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))


# (layout, file replaced or added): everywhere a reader might look for something to unpickle.
PICKLE_PLACES = [
    ("orbax v0", "_METADATA"),
    ("orbax v0", "_sharding"),
    ("orbax v0", "_CHECKPOINT_METADATA"),
    ("orbax v0", "array_metadatas/process_0"),
    ("orbax v0", "checkpoint"),  # where Flax's msgpack (or old Orbax) keeps a whole tree
    ("orbax v0", "pytorch_model.bin"),
    ("orbax v0 manager", "2/metrics/metrics"),
    ("orbax v0 manager", "2/model/_METADATA"),
    ("safetensors shards", "config.json"),
    ("safetensors shards", "model.safetensors.index.json"),
    ("safetensors shards", "pytorch_model.bin"),
    ("safetensors shards", "training_args.bin"),
    ("safetensors shards", "model-00001-of-00002.safetensors"),
    ("safetensors shards", "flax_model.msgpack"),
    ("safetensors shards", "weights.npz"),
    ("empty", "pytorch_model.bin"),
    ("empty", "model.pt"),
    ("empty", "optimizer.pth"),
    ("empty", "last.ckpt"),
    ("empty", "weights.npz"),
    ("empty", "flax_model.msgpack"),
    ("empty", "checkpoint"),
]


def test_the_pickle_payload_is_live(tmp_path):
    import pickle

    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()  # so its absence below means nothing unpickled it


@FAILING_READ  # a damaged array makes Orbax leave coroutines un-awaited (see conftest)
@pytest.mark.parametrize(
    ("layout", "place"), PICKLE_PLACES, ids=[f"{layout}:{place}" for layout, place in PICKLE_PLACES]
)
def test_nothing_in_a_checkpoint_is_ever_unpickled(
    every_layout, tmp_path, layout, place, capsys, failing_orbax_read
):
    import shutil

    if layout == "empty":
        folder = tmp_path / "ckpt"
        folder.mkdir()
        path, steps = folder, None
    else:
        source, steps = every_layout[layout]
        folder = shutil.copytree(source if source.is_dir() else source.parent, tmp_path / "ckpt")
        path = folder if source.is_dir() else folder / source.name
    marker = tmp_path / "unpickled"
    _pickle_at(folder, place, marker)
    for _, call in _every_entry_point(path, steps):
        with contextlib.suppress(ncw.CheckpointError):  # refusing it is right; running it is not
            call()
        assert not marker.exists(), f"{place} in a {layout} checkpoint was unpickled"
    capsys.readouterr()


def test_readme_security_section():
    readme = (REPO / "README.md").read_text()
    section = " ".join(readme.split("## Security", 1)[1].split("\n## ", 1)[0].split())
    for words in (
        "_METADATA",
        "_CHECKPOINT_METADATA",
        "array bytes",
        "never unpickles",
        "executes",
        "never writes",
        "strangers",
        "fresh model",
    ):
        assert words in section, words


def test_the_text_class_wraps_anywhere():
    """A long name wraps wherever the widgets mark it ``nnx-ckpt-text`` (see assert_inert)."""
    from nnx_ckpt_widgets._display import STYLE

    rule = STYLE.split(".nnx-ckpt .nnx-ckpt-text {", 1)[1].split("}", 1)[0]
    assert "overflow-wrap: anywhere" in rule


def test_values_and_diff_html_are_inert(hostile):
    """Stats, diffs and the browser's Values panel, on hostile names, folder names included."""
    ckpt, root = hostile
    escaped = html.escape(XSS)
    report = ncw.stats(ckpt, progress=False)
    from nnx_ckpt_widgets.diff import diff_infos

    changes = diff_infos(ncw.inspect(ckpt), ncw.inspect(root, step=1, item=XSS), progress=False)
    for markup in (report._repr_html_(), changes._repr_html_()):
        assert_inert(markup)
        assert escaped in markup
    browser = CheckpointBrowser(root, step=1, item=XSS)
    browser.values_button.click()
    browser.wait(30)
    assert browser.values.stats_report is not None
    browser.tree.select(XSS, SCRIPT)
    browser.values_button.click()
    browser.wait(30)
    assert browser.values.array is not None
    for markup in html_values(browser):
        assert_inert(markup)


def test_convert_plan_html_and_export_panel_are_inert(hostile, tmp_path):
    """A convert plan's table and the browser's Export panel, on hostile key names: to
    safetensors and to Orbax, planned from Python and from the panel, and after an export."""
    ckpt, root = hostile
    escaped = html.escape(XSS)
    for fmt in ("safetensors", "orbax"):
        plan = ncw.convert(ckpt, tmp_path / fmt, to=fmt, dry_run=True, progress=False)
        markup = plan._repr_html_()
        assert_inert(markup)
        assert escaped in markup and "&lt;script&gt;" in markup
        assert "<table" in markup and len(plan.keys) == len(ncw.inspect(ckpt).leaves)
    browser = CheckpointBrowser(root, step=1, item=XSS)
    panel = browser.export_panel
    panel.destination.value = str(tmp_path / XSS)
    browser.plan_button.click()
    browser.wait(60)
    assert panel.plan is not None and not (tmp_path / XSS).exists()
    shown = html_values(browser)
    panel.format.value = "orbax"
    browser.export_button.click()
    browser.wait(60)
    assert panel.result is not None and panel.result.written, panel.status
    shown += html_values(browser)
    for markup in shown:
        assert_inert(markup)
    assert any(escaped in m and "<table" in m for m in shown)
    assert any(html.escape(str(tmp_path / XSS)) in m for m in shown)  # the status line
