"""Checkpoints from strangers: nothing is overwritten, nothing from them runs or renders as HTML.

The rest of the fault suite of ``test_faults.py``. Overwrite safety: the package writes no files,
the example script refuses an existing target without ``--force``, and notebooks and benchmarks
save only into fresh temporary folders. Hostile names (HTML, JS, quotes, newlines, 10,000
characters, non-ASCII) in keys, metric names, item and folder names reach every HTML the
package makes as text, and a long one wraps or is clipped. Trust: no pickle, eval or exec in the
package, and the README's security section says what is read and what to do.
"""

from __future__ import annotations

import ast
import html
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import ipywidgets
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import copy_checkpoint, save_checkpoint
from flax import nnx

import nnx_ckpt_widgets as ncw
from nnx_ckpt_widgets import CheckpointBrowser, compare_states

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nnx_ckpt_widgets"
SCRIPTS = REPO / "notebooks" / "scripts"

# --- overwrite safety -----------------------------------------------------------------------

_WRITES = re.compile(
    r"\.save\(|rmtree|unlink\(|os\.remove|\.write_(text|bytes)\(|erase_and_create_empty|"
    r"force=True|shutil\.(move|copy)|os\.(rename|replace)|\bopen\([^)]*[\"'][wax]"
)


# The GCS emulator (tests and notebooks) keeps its objects and log in a temporary folder of its
# own, which it creates and removes; it never writes into a checkpoint the user gave.
_OWN_STORAGE = {"emulator.py"}
# convert writes the destination the user names, through a new temporary folder beside it, and
# refuses a destination that exists or overlaps its source; tests/test_convert.py hashes every
# source before and after, faults included.
_OWN_STORAGE |= {"convert.py"}


def test_the_package_writes_no_files():
    for file in sorted(PACKAGE.glob("*.py")):
        if file.name in _OWN_STORAGE:
            continue
        found = _WRITES.search(file.read_text())
        assert found is None, f"{file.name} writes: {found.group(0)!r}"


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


def test_the_package_never_unpickles_or_executes():
    forbidden = re.compile(r"pickle|\beval\(|\bexec\(|allow_pickle=True|marshal")
    for file in sorted(PACKAGE.glob("*.py")):
        found = forbidden.search(file.read_text())
        assert found is None, f"{file.name}: {found.group(0)!r}"


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
