"""The Chinese edition (notebooks/zh/): complete, current, and generated, never hand-edited.

The first tests check the committed files: every English markdown cell has a complete
translation, every zh notebook is exactly what ``make zh`` builds, and code cells, outputs and
metadata are the English ones. The rest run ``tools/zh_notebooks.py`` on a copy of a notebook
and its translation in ``tmp_path`` and show that the checks fail when they should: an edited
English cell becomes fuzzy, a new cell is missing, a removed one becomes obsolete.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import nbformat
import polib
import pytest

REPO = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("zh_notebooks", REPO / "tools" / "zh_notebooks.py")
assert _spec is not None and _spec.loader is not None
zh = importlib.util.module_from_spec(_spec)
sys.modules["zh_notebooks"] = zh  # dataclasses look their module up here
_spec.loader.exec_module(zh)

EDITION = zh.Edition(REPO)
ENGLISH = EDITION.notebooks()
ZH = sorted(EDITION.zh_dir.glob("*.ipynb"))


def _report(problems) -> str:
    return "\n".join(f"  {p}" for p in problems)


# --- the committed edition ------------------------------------------------------------------


@pytest.mark.parametrize("notebook", ENGLISH, ids=lambda p: p.stem)
def test_translation_is_complete(notebook: Path):
    """Completeness: each English markdown cell has a non-empty, non-fuzzy translation."""
    po = zh.read_po(EDITION.po_path(notebook))
    problems = zh.translation_problems(EDITION, notebook, po)
    problems += zh.dropped_problems(EDITION, notebook, po)
    assert not problems, f"{notebook.name} is not fully translated:\n{_report(problems)}"


@pytest.mark.parametrize("notebook", ENGLISH, ids=lambda p: p.stem)
def test_zh_notebook_is_fresh(notebook: Path):
    """Freshness: the committed zh notebook and .po file are exactly what `make zh` writes."""
    problems = [p for p in zh.check(EDITION, [notebook], strays=False)]
    assert not problems, f"run `make zh` ({notebook.name}):\n{_report(problems)}"


@pytest.mark.parametrize("notebook", ENGLISH, ids=lambda p: p.stem)
def test_notes_on_the_guide_use_the_prescribed_label(notebook: Path):
    """notebooks/zh/README.md: a departure from the guide is a "> **与原指南的不同：**"
    paragraph; no other kind of translator's note ("> 注：") that the English lacks."""
    po = zh.read_po(EDITION.po_path(notebook))
    for entry in po:
        for line in entry.msgstr.splitlines():
            assert not line.startswith(("> 注", "> **注")), (notebook.name, line[:60])


def test_no_stray_translations():
    problems = [p for p in zh.check(EDITION, [], strays=True)]
    assert not problems, _report(problems)


@pytest.mark.parametrize("zh_notebook", ZH, ids=lambda p: p.stem)
def test_code_cells_outputs_and_metadata_are_the_english_ones(zh_notebook: Path):
    """Byte for byte, as stored: the zh edition shares code and outputs, it never copies them."""
    english_path = EDITION.english_dir / zh_notebook.name
    assert english_path.exists(), f"{zh_notebook} has no English notebook"
    english = json.loads(english_path.read_text(encoding="utf-8"))
    chinese = json.loads(zh_notebook.read_text(encoding="utf-8"))
    assert chinese["metadata"] == english["metadata"]
    assert (chinese["nbformat"], chinese["nbformat_minor"]) == (
        english["nbformat"],
        english["nbformat_minor"],
    )
    assert [c["cell_type"] for c in chinese["cells"]] == [c["cell_type"] for c in english["cells"]]
    translated = 0
    for en, cn in zip(english["cells"], chinese["cells"], strict=True):
        if en["cell_type"] == "markdown":
            assert cn["id"] == en["id"] and cn["metadata"] == en["metadata"]
            translated += cn["source"] != en["source"]
        else:
            dump = dict(ensure_ascii=False, sort_keys=True, indent=1)
            assert json.dumps(cn, **dump) == json.dumps(en, **dump)
    assert translated > 0, f"{zh_notebook.name}: no markdown cell is translated"
    # Both files are formatted as nbformat.write formats them, so only translated lines differ.
    for path in (english_path, zh_notebook):
        text = path.read_text(encoding="utf-8")
        assert nbformat.writes(nbformat.read(path, as_version=4)) + "\n" == text, path


@pytest.mark.parametrize("zh_notebook", ZH, ids=lambda p: p.stem)
def test_zh_notebook_links_to_itself(zh_notebook: Path):
    """The Colab and Binder badges of a zh notebook open the zh notebook."""
    text = "".join(c.source for c in nbformat.read(zh_notebook, as_version=4).cells)
    assert f"blob/main/notebooks/zh/{zh_notebook.name}" in text
    assert f"labpath=notebooks%2Fzh%2F{zh_notebook.name}" in text
    assert f"blob/main/notebooks/{zh_notebook.name}" not in text


def test_zh_folder_finds_the_english_notebooks_resources():
    """Notebook 05 runs `scripts/*.py` relative to its folder: notebooks/zh/scripts is a link."""
    link = EDITION.zh_dir / "scripts"
    assert link.is_symlink() and link.readlink() == Path("..") / "scripts"
    assert (link / "save_sharded.py").read_bytes() == (
        EDITION.english_dir / "scripts" / "save_sharded.py"
    ).read_bytes()


# --- the checks fail when they should (on a copy in tmp_path) --------------------------------

NAME = "01_save.ipynb"


@pytest.fixture
def copy(tmp_path: Path):
    """A repository holding notebook 01, its translation and its zh notebook."""
    edition = zh.Edition(tmp_path)
    edition.po_dir.mkdir(parents=True)
    shutil.copy(EDITION.english_dir / NAME, edition.english_dir / NAME)
    shutil.copy(EDITION.po_path(EDITION.english_dir / NAME), edition.po_dir)
    shutil.copy(EDITION.zh_dir / NAME, edition.zh_dir / NAME)
    assert zh.check(edition, edition.notebooks()) == []
    return edition


def _edit(path: Path, change) -> None:
    nb = nbformat.read(path, as_version=4)
    change(nb)
    nbformat.write(nb, path)


def _kinds(edition) -> set[tuple[str, str]]:
    return {(p.path.split("/")[-1], p.kind) for p in zh.check(edition, edition.notebooks())}


def _run(edition, *args: str) -> int:
    return zh.main([*args, "--root", str(edition.root)])


def test_edited_english_cell_becomes_fuzzy_and_blocks_check_and_build(copy, capsys):
    english = copy.english_dir / NAME
    before = nbformat.read(english, as_version=4).cells[3].source
    zh_before = (copy.zh_dir / NAME).read_bytes()
    _edit(english, lambda nb: setattr(nb.cells[3], "source", before + " It runs on a CPU."))

    # Before `update`: the new text has no entry and the old entry is stale.
    assert {("01_save.po", "missing"), ("01_save.po", "stale")} <= _kinds(copy)
    assert _run(copy, "check") == 1

    # `update`: the old translation is kept, marked fuzzy, with the English it was made for.
    assert _run(copy, "update") == 0
    entry = zh.read_po(copy.po_path(english)).find(before + " It runs on a CPU.")
    assert entry is not None and "fuzzy" in entry.flags
    assert entry.previous_msgid == before
    assert entry.msgstr.startswith("## 设置")
    assert ("01_save.po", "fuzzy") in _kinds(copy)
    capsys.readouterr()

    # `build` refuses, names the cell, and leaves the zh notebook alone.
    assert _run(copy, "build") == 1
    err = capsys.readouterr().err
    assert "notebooks/zh/po/01_save.po: fuzzy: cell 3 ('## Setup')" in err
    assert (copy.zh_dir / NAME).read_bytes() == zh_before
    assert _run(copy, "check") == 1

    # A translator reviews it: the flag goes, and the edition is current again.
    po = zh.read_po(copy.po_path(english))
    entry = po.find(before + " It runs on a CPU.")
    entry.flags.remove("fuzzy")
    entry.previous_msgid = None
    entry.msgstr += "它在 CPU 上运行。"
    po.save()
    assert _run(copy, "build") == 0
    assert "它在 CPU 上运行。" in nbformat.read(copy.zh_dir / NAME, as_version=4).cells[3].source
    assert _run(copy, "check") == 0


def test_new_markdown_cell_is_missing(copy, capsys):
    english = copy.english_dir / NAME
    text = "## A new section\n\nThis cell has no translation yet."
    _edit(english, lambda nb: nb.cells.insert(5, nbformat.v4.new_markdown_cell(text)))
    assert ("01_save.po", "missing") in _kinds(copy)

    assert _run(copy, "update") == 0
    entry = zh.read_po(copy.po_path(english)).find(text)
    assert entry is not None and entry.msgstr == "" and entry.occurrences == [(NAME, "5")]
    # Every other entry moved one cell down and kept its translation.
    assert all(zh.is_complete(e) for e in zh.read_po(copy.po_path(english)) if e.msgid != text)
    assert ("01_save.po", "untranslated") in _kinds(copy)
    capsys.readouterr()
    assert _run(copy, "build") == 1
    assert "untranslated: 1 of 14 markdown cells have an empty msgstr: cells 5" in (
        capsys.readouterr().err
    )


def test_removed_cell_becomes_obsolete(copy):
    english = copy.english_dir / NAME
    removed = nbformat.read(english, as_version=4).cells[17].source  # "A checkpoint is a folder:"
    _edit(english, lambda nb: nb.cells.pop(17))
    assert ("01_save.po", "stale") in _kinds(copy)
    assert ("01_save.ipynb", "differs") in _kinds(copy)

    assert _run(copy, "update") == 0
    po = zh.read_po(copy.po_path(english))
    (gone,) = po.obsolete_entries()
    assert gone.msgid == removed and gone.msgstr == "检查点是一个文件夹："
    assert "#~ msgid" in copy.po_path(english).read_text(encoding="utf-8")
    # The remaining cells are all translated, so the zh notebook builds without the cell.
    assert _run(copy, "build") == 0
    cells = nbformat.read(copy.zh_dir / NAME, as_version=4).cells
    assert len(cells) == len(nbformat.read(english, as_version=4).cells)
    assert _run(copy, "check") == 0


def test_hand_edited_zh_notebook_and_changed_outputs_differ(copy):
    zh_path = copy.zh_dir / NAME
    _edit(zh_path, lambda nb: setattr(nb.cells[3], "source", "## 手工修改"))
    assert ("01_save.ipynb", "differs") in _kinds(copy)
    assert _run(copy, "build") == 0
    assert _run(copy, "check") == 0

    # A re-executed English notebook (new outputs) is carried over by the next build.
    def new_output(nb):
        nb.cells[8].outputs = [nbformat.v4.new_output("stream", name="stdout", text="(3, 4)\n")]

    _edit(copy.english_dir / NAME, new_output)
    assert ("01_save.ipynb", "differs") in _kinds(copy)
    assert _run(copy, "build") == 0
    assert nbformat.read(zh_path, as_version=4).cells[8].outputs[0].text == "(3, 4)\n"


def test_new_notebook_without_translation(copy):
    shutil.copy(EDITION.english_dir / "03_pure_dict.ipynb", copy.english_dir)
    assert {("03_pure_dict.po", "missing"), ("03_pure_dict.ipynb", "unbuilt")} <= _kinds(copy)
    assert _run(copy, "update") == 0
    po = zh.read_po(copy.po_dir / "03_pure_dict.po")
    assert po.metadata["Language"] == "zh_CN" and po.percent_translated() == 0
    assert len(po) == len(
        zh.markdown_cells(nbformat.read(copy.english_dir / "03_pure_dict.ipynb", 4))
    )
    assert _run(copy, "build", "01_save") == 0  # the complete one still builds alone
    assert _run(copy, "build") == 1


def test_dropped_code_span_or_english_badge_is_reported(copy):
    po_path = copy.po_path(copy.english_dir / NAME)
    po = polib.pofile(str(po_path), wrapwidth=78)
    first = next(e for e in po if e.occurrences == [(NAME, "0")])
    first.msgstr = first.msgstr.replace("notebooks/zh/", "notebooks/").replace(
        "`nnx.split`", "nnx.split"
    )
    po.save()
    (problem,) = [p for p in zh.check(copy, copy.notebooks()) if p.kind == "dropped"]
    assert "`nnx.split`" in problem.message and "notebooks/zh/01_save.ipynb" in problem.message


def test_update_is_deterministic_and_idempotent(copy):
    po_path = copy.po_path(copy.english_dir / NAME)
    before = po_path.read_bytes()
    assert zh.update(copy, copy.notebooks()) == []
    assert po_path.read_bytes() == before
    # Two edited cells swap places: each keeps its own translation (fuzzy), not the other's.
    english = copy.english_dir / NAME

    def swap(nb):
        nb.cells[9].source += " Extra."
        nb.cells[21].source += " Extra."
        nb.cells[9], nb.cells[21] = nb.cells[21], nb.cells[9]

    _edit(english, swap)
    zh.update(copy, copy.notebooks())
    po = zh.read_po(po_path)
    cells = nbformat.read(english, as_version=4).cells
    assert po.find(cells[9].source).msgstr.startswith("### 把 checkpointer")
    assert po.find(cells[21].source).msgstr.startswith("再写一个小工具函数")
    text = po_path.read_bytes()
    zh.update(copy, copy.notebooks())
    assert po_path.read_bytes() == text


def test_readme_zh_lists_every_notebook_with_zh_links():
    readme = (REPO / "README.zh.md").read_text(encoding="utf-8")
    colab = "https://colab.research.google.com/github/nnx-ckpt-widgets/nnx-ckpt-widgets/blob/main"
    binder = "https://mybinder.org/v2/gh/nnx-ckpt-widgets/nnx-ckpt-widgets/main"
    missing = [
        nb.name
        for nb in ENGLISH
        if f"(notebooks/zh/{nb.name})" not in readme
        or f"{colab}/notebooks/zh/{nb.name})" not in readme
        or f"{binder}?labpath=notebooks%2Fzh%2F{nb.name})" not in readme
    ]
    assert not missing, f"README.zh.md has no row with zh links for {missing}"
    assert "(README.zh.md)" in (REPO / "README.md").read_text(encoding="utf-8")
    assert "(README.md)" in readme


def test_code_of_reads_fences_wrapped_spans_and_double_backticks():
    text = "Run `a\nb` and ``x `y` z``:\n\n```\npython -m `tool`\n```\n\nthen `c`; a lone ` stays."
    assert zh.code_of(text) == ["```\npython -m `tool`\n```", "`a\nb`", "``x `y` z``", "`c`"]
