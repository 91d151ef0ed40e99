"""Keep the Chinese edition of the notebooks (``notebooks/zh/``) in step with the English ones.

The English notebooks are the one source of code and outputs. Their markdown cells are
translated in gettext files, one per notebook: ``notebooks/zh/po/<stem>.po``, whose entries
hold an English markdown cell as ``msgid`` and its Chinese as ``msgstr``. Three subcommands:

``update``
    Sync every ``.po`` file with its English notebook. A new markdown cell becomes an empty
    entry; an entry whose English cell changed becomes ``fuzzy``, keeping its Chinese and the
    English it was translated from (``#| msgid``, polib's ``previous_msgid``); an entry whose
    cell is gone becomes obsolete (``#~``). A new notebook gets a new ``.po`` file.
``build``
    Write ``notebooks/zh/<name>.ipynb``: the English notebook with each markdown cell replaced
    by its translation; code cells, outputs and metadata are unchanged. A notebook whose
    translation is incomplete (missing, empty or fuzzy entries) is not written; the problems
    are listed and the exit status is 1.
``check``
    Change nothing; list every missing, empty, fuzzy or stale translation, every translation
    that lost a code span or link of its English, and every zh notebook that differs from
    what ``build`` would write; exit 1 if there is any.

``make zh`` runs ``update`` then ``build``. Usage::

    python tools/zh_notebooks.py {update,build,check} [NOTEBOOK ...] [--root REPO]

where NOTEBOOK is a stem or file name (``01_save`` or ``01_save.ipynb``); default: all.
Needs only the standard library, nbformat and polib.
"""

from __future__ import annotations

import argparse
import difflib
import io
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
import polib

REPO = Path(__file__).resolve().parents[1]

HEADER = (
    "Chinese (zh_CN) translation of the markdown cells of notebooks/{name}.\n"
    "Regenerate notebooks/zh/ with `make zh`; see notebooks/zh/README.md."
)
METADATA = {
    "Project-Id-Version": "nnx-ckpt-widgets",
    "Language": "zh_CN",
    "MIME-Version": "1.0",
    "Content-Type": "text/plain; charset=UTF-8",
    "Content-Transfer-Encoding": "8bit",
}

# An edited cell keeps its old translation (as fuzzy) when the texts are this similar
# (difflib ratio), or a lower bar when it is still the cell at the same index.
SIMILAR = 0.6
SIMILAR_SAME_CELL = 0.4


@dataclass(frozen=True)
class Problem:
    """One thing that keeps a zh notebook from being complete and current.

    ``kind`` is one of: ``missing`` (no entry, or no file), ``untranslated`` (empty msgstr),
    ``fuzzy``, ``stale`` (an entry that matches no English cell), ``out-of-date`` (a ``.po``
    file that ``update`` would change), ``dropped`` (a translation that lost a code span or
    link of its English), ``differs`` (a zh notebook that ``build`` would change),
    ``unbuilt`` (a zh notebook that cannot be built yet) and ``stray`` (no English notebook).
    """

    path: str  # relative to the repository root
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}: {self.message}"


class IncompleteTranslationError(Exception):
    """Raised by :func:`build_text` when a markdown cell has no usable translation."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class Edition:
    """Where the English notebooks, the translations and the zh notebooks live."""

    root: Path

    @property
    def english_dir(self) -> Path:
        return self.root / "notebooks"

    @property
    def zh_dir(self) -> Path:
        return self.english_dir / "zh"

    @property
    def po_dir(self) -> Path:
        return self.zh_dir / "po"

    def notebooks(self, names: Iterable[str] = ()) -> list[Path]:
        """The English notebooks, all of them or those named (stem or file name)."""
        every = sorted(self.english_dir.glob("*.ipynb"))
        wanted = [n.removesuffix(".ipynb") for n in names]
        if not wanted:
            return every
        by_stem = {p.stem: p for p in every}
        unknown = [n for n in wanted if n not in by_stem]
        if unknown:
            raise SystemExit(
                f"No English notebook named {', '.join(unknown)} in {self.rel(self.english_dir)}/;"
                f" choose from: {', '.join(by_stem)}."
            )
        return [by_stem[n] for n in wanted]

    def po_path(self, notebook: Path) -> Path:
        return self.po_dir / f"{notebook.stem}.po"

    def zh_path(self, notebook: Path) -> Path:
        return self.zh_dir / notebook.name

    def rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)


# --- reading ----------------------------------------------------------------------------------


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def markdown_cells(notebook: nbformat.NotebookNode) -> list[tuple[int, str]]:
    """(cell index, source) of every markdown cell, in notebook order."""
    return [(i, c.source) for i, c in enumerate(notebook.cells) if c.cell_type == "markdown"]


def read_po(path: Path) -> polib.POFile | None:
    return polib.pofile(str(path), wrapwidth=78) if path.exists() else None


def po_text(po: polib.POFile) -> str:
    """Exactly what ``po.save(path)`` writes (polib appends no newline of its own)."""
    return po.__unicode__()


def is_complete(entry: polib.POEntry) -> bool:
    return bool(entry.msgstr) and "fuzzy" not in entry.flags


# --- update -----------------------------------------------------------------------------------


def _similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _cell_indices(entry: polib.POEntry) -> set[int]:
    return {int(line) for _, line in entry.occurrences if str(line).isdigit()}


def synced_po(
    notebook_name: str, cells: Sequence[tuple[int, str]], old: polib.POFile | None
) -> polib.POFile:
    """The ``.po`` file for a notebook whose markdown cells are ``cells``, given the old one.

    Args:
        notebook_name: the notebook's file name, e.g. ``01_save.ipynb`` (for occurrences).
        cells: (cell index, source) of every markdown cell, in notebook order.
        old: the current ``.po`` file, or None when there is none yet.

    Returns:
        A new ``polib.POFile``: one entry per distinct cell source, in notebook order, then
        the obsolete entries. Deterministic: the same inputs give the same text.
    """
    po = polib.POFile(wrapwidth=78, encoding="utf-8", check_for_duplicates=False)
    po.header = old.header if old is not None and old.header else HEADER.format(name=notebook_name)
    po.metadata = {**(old.metadata if old is not None else {}), **METADATA}

    sources: dict[str, list[int]] = {}
    for index, source in cells:
        sources.setdefault(source, []).append(index)

    old_entries = list(old) if old is not None else []
    active = [e for e in old_entries if not e.obsolete]
    by_msgid: dict[str, polib.POEntry] = {}
    for entry in [*active, *(e for e in old_entries if e.obsolete)]:
        by_msgid.setdefault(entry.msgid, entry)

    # 1. The same English text: the entry carries over as it is (fuzzy stays fuzzy).
    chosen: dict[str, tuple[polib.POEntry, bool]] = {}  # msgid -> (old entry, changed)
    used: set[int] = set()
    for source in sources:
        if source in by_msgid:
            chosen[source] = (by_msgid[source], False)
            used.add(id(by_msgid[source]))

    # 2. Edited English text: the most similar unused translated entry, preferring the one
    #    that belonged to the same cell; best pairs first, so the result is order-independent.
    pairs = []
    for source, indices in sources.items():
        if source in chosen:
            continue
        for k, entry in enumerate(active):
            if id(entry) in used or not entry.msgstr:
                continue
            ratio = _similarity(source, entry.msgid)
            same_cell = bool(_cell_indices(entry) & set(indices))
            if ratio >= SIMILAR or (same_cell and ratio >= SIMILAR_SAME_CELL):
                pairs.append((-(ratio + (0.1 if same_cell else 0.0)), indices[0], k, source))
    for _, _, k, source in sorted(pairs):
        entry = active[k]
        if source in chosen or id(entry) in used:
            continue
        chosen[source] = (entry, True)
        used.add(id(entry))

    for source, indices in sources.items():
        occurrences = [(notebook_name, str(i)) for i in indices]
        if source not in chosen:
            po.append(polib.POEntry(msgid=source, msgstr="", occurrences=occurrences))
            continue
        entry, changed = chosen[source]
        was_fuzzy = "fuzzy" in entry.flags
        new = polib.POEntry(
            msgid=source,
            msgstr=entry.msgstr,
            occurrences=occurrences,
            tcomment=entry.tcomment,
            flags=list(entry.flags),
        )
        if changed:
            if not was_fuzzy:
                new.flags.append("fuzzy")
            # The English the Chinese was written for: kept across several edits.
            new.previous_msgid = entry.previous_msgid if was_fuzzy else entry.msgid
            if not new.previous_msgid:
                new.previous_msgid = entry.msgid
        elif was_fuzzy and entry.previous_msgid:
            new.previous_msgid = entry.previous_msgid
        po.append(new)

    # 3. Translations whose English cell is gone: obsolete, kept for reuse (as msgmerge does).
    for entry in old_entries:
        if id(entry) in used or not entry.msgstr:
            continue
        if entry.msgid in chosen:  # an obsolete twin of a live entry
            continue
        po.append(
            polib.POEntry(
                msgid=entry.msgid,
                msgstr=entry.msgstr,
                tcomment=entry.tcomment,
                flags=list(entry.flags),
                obsolete=True,
            )
        )
    return po


def update(edition: Edition, notebooks: Sequence[Path]) -> list[str]:
    """Rewrite each ``.po`` file that is out of step; returns one line per change."""
    changes = []
    for notebook in notebooks:
        path = edition.po_path(notebook)
        old = read_po(path)
        new = synced_po(notebook.name, markdown_cells(read_notebook(notebook)), old)
        if old is not None and po_text(old) == po_text(new):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        new.save(str(path))
        counts = _counts(new)
        changes.append(
            f"{'created' if old is None else 'updated'} {edition.rel(path)}: "
            f"{counts['complete']} translated, {counts['fuzzy']} fuzzy, "
            f"{counts['untranslated']} untranslated, {counts['obsolete']} obsolete"
        )
    return changes


def _counts(po: polib.POFile) -> dict[str, int]:
    live = [e for e in po if not e.obsolete]
    return {
        "complete": sum(is_complete(e) for e in live),
        "fuzzy": sum("fuzzy" in e.flags for e in live),
        "untranslated": sum(not e.msgstr for e in live),
        "obsolete": sum(e.obsolete for e in po),
    }


# --- build ------------------------------------------------------------------------------------


def _first_line(source: str) -> str:
    lines = source.strip().splitlines()
    return repr(lines[0][:60]) if lines else "''"


def translation_problems(
    edition: Edition, notebook: Path, po: polib.POFile | None
) -> list[Problem]:
    """Every markdown cell of ``notebook`` without a complete translation, and stale entries."""
    where = edition.rel(edition.po_path(notebook))
    cells = markdown_cells(read_notebook(notebook))
    if po is None:
        return [
            Problem(
                where,
                "missing",
                f"no translation file for {notebook.name} (its markdown cells "
                f"{', '.join(str(i) for i, _ in cells)} need translating); run `make zh` to "
                "create it, then fill in each msgstr",
            )
        ]
    entries = {e.msgid: e for e in po if not e.obsolete}
    problems, untranslated = [], []
    for index, source in cells:
        entry = entries.get(source)
        if entry is None:
            problems.append(
                Problem(
                    where,
                    "missing",
                    f"cell {index} ({_first_line(source)}) has no entry; run `make zh`, "
                    "then translate it",
                )
            )
        elif not entry.msgstr:
            untranslated.append(index)
        elif "fuzzy" in entry.flags:
            problems.append(
                Problem(
                    where,
                    "fuzzy",
                    f"cell {index} ({_first_line(source)}) changed in English since it was "
                    "translated; compare its msgid with the previous one (#| msgid), fix the "
                    "msgstr, then delete the fuzzy flag",
                )
            )
    if untranslated:
        problems.append(
            Problem(
                where,
                "untranslated",
                f"{len(untranslated)} of {len(cells)} markdown cells have an empty msgstr: "
                f"cells {', '.join(map(str, untranslated))}",
            )
        )
    current = {source for _, source in cells}
    for entry in entries.values():
        if entry.msgid not in current:
            problems.append(
                Problem(
                    where,
                    "stale",
                    f"the entry {_first_line(entry.msgid)} matches no markdown cell of "
                    f"{notebook.name} (the English changed or was removed); run `make zh`",
                )
            )
    return problems


# Fenced blocks, then inline spans (of any number of backticks). A span may wrap across lines
# (CommonMark reads the line break as a space), so code is compared with whitespace collapsed.
_FENCE = re.compile(r"^(`{3,})[^\n]*\n.*?^\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)
_SPACES = re.compile(r"\s+")


def code_of(markdown: str) -> list[str]:
    """The fenced blocks and inline code spans of a markdown text, in order."""
    fences = [m.group(0) for m in _FENCE.finditer(markdown)]
    return fences + [m.group(0) for m in _CODE_SPAN.finditer(_FENCE.sub(" ", markdown))]


_URL = re.compile(r"https?://[^\s)\]>]+")
# Colab and Binder links of an English notebook point at its zh twin in the translation.
_TO_ZH = [
    (re.compile(r"(/blob/[^/\s]+/notebooks/)([\w.-]+\.ipynb)"), r"\1zh/\2"),
    (re.compile(r"(labpath=notebooks%2F)([\w.-]+\.ipynb)"), r"\1zh%2F\2"),
]


def zh_url(url: str) -> str:
    """The URL a translation carries for ``url``: the same, or the zh twin's Colab/Binder link."""
    for pattern, replacement in _TO_ZH:
        url = pattern.sub(replacement, url)
    return url


def dropped_problems(edition: Edition, notebook: Path, po: polib.POFile | None) -> list[Problem]:
    """Translations that lost a code span or URL of their English cell.

    Code, API names, file names, error messages and URLs stay in English; Colab and Binder
    links of ``notebooks/<name>.ipynb`` become those of ``notebooks/zh/<name>.ipynb``.
    """
    if po is None:
        return []
    where = edition.rel(edition.po_path(notebook))
    indices = {source: i for i, source in reversed(markdown_cells(read_notebook(notebook)))}
    problems = []
    for entry in po:
        if entry.obsolete or not entry.msgstr or entry.msgid not in indices:
            continue
        flat = _SPACES.sub(" ", entry.msgstr)
        lost = [s for s in dict.fromkeys(code_of(entry.msgid)) if _SPACES.sub(" ", s) not in flat]
        lost += [
            zh_url(u)
            for u in dict.fromkeys(_URL.findall(entry.msgid))
            if zh_url(u) not in entry.msgstr
        ]
        if lost:
            problems.append(
                Problem(
                    where,
                    "dropped",
                    f"the translation of cell {indices[entry.msgid]} lacks "
                    + ", ".join(lost[:5])
                    + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
                    + " (keep code and links exactly; Colab/Binder links point to notebooks/zh/)",
                )
            )
    return problems


def build_text(edition: Edition, notebook: Path, po: polib.POFile | None) -> str:
    """The zh notebook's file text: ``notebook`` with each markdown cell translated.

    Stale entries do not stop a build (they translate nothing); ``check`` reports them.

    Raises:
        IncompleteTranslationError: when a markdown cell has no complete translation.
    """
    problems = [p for p in translation_problems(edition, notebook, po) if p.kind != "stale"]
    if problems or po is None:
        raise IncompleteTranslationError(problems)
    entries = {e.msgid: e for e in po if not e.obsolete}
    nb = read_notebook(notebook)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = entries[cell.source].msgstr
    out = io.StringIO()
    nbformat.write(nb, out)  # the formatting nbformat (and so Jupyter) gives the English one
    return out.getvalue()


def build(edition: Edition, notebooks: Sequence[Path]) -> tuple[list[str], list[Problem]]:
    """Write each zh notebook whose translation is complete; returns (written, problems)."""
    written, problems = [], []
    for notebook in notebooks:
        try:
            text = build_text(edition, notebook, read_po(edition.po_path(notebook)))
        except IncompleteTranslationError as err:
            problems.extend(err.problems)
            continue
        target = edition.zh_path(notebook)
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            written.append(edition.rel(target))
    return written, problems


# --- check ------------------------------------------------------------------------------------


def check(edition: Edition, notebooks: Sequence[Path], *, strays: bool = True) -> list[Problem]:
    """Everything missing, fuzzy, stale or out of date for ``notebooks``; changes nothing.

    Args:
        edition: where the notebooks live.
        notebooks: the English notebooks to check.
        strays: also report zh notebooks and ``.po`` files that have no English notebook.

    Returns:
        The problems, in notebook order; an empty list when the edition is complete and current.
    """
    problems: list[Problem] = []
    for notebook in notebooks:
        po_path, zh = edition.po_path(notebook), edition.zh_path(notebook)
        po = read_po(po_path)
        found = translation_problems(edition, notebook, po)
        if po is not None and not any(p.kind in ("missing", "stale") for p in found):
            synced = synced_po(notebook.name, markdown_cells(read_notebook(notebook)), po)
            if po_text(synced) != po_text(po):
                found.append(
                    Problem(
                        edition.rel(po_path),
                        "out-of-date",
                        f"not in step with {notebook.name} (cell numbers or header); run `make zh`",
                    )
                )
        problems += found + dropped_problems(edition, notebook, po)
        try:
            expected: str | None = build_text(edition, notebook, po)
        except IncompleteTranslationError:
            expected = None
        if expected is None:
            problems.append(
                Problem(
                    edition.rel(zh),
                    "unbuilt",
                    ("exists but " if zh.exists() else "")
                    + "cannot be built until the translation above is complete",
                )
            )
        elif not zh.exists():
            problems.append(Problem(edition.rel(zh), "missing", "not built yet; run `make zh`"))
        elif zh.read_text(encoding="utf-8") != expected:
            problems.append(
                Problem(
                    edition.rel(zh),
                    "differs",
                    f"not what `make zh` builds from {edition.rel(notebook)} and "
                    f"{edition.rel(po_path)} (never edit a zh notebook by hand); run `make zh`",
                )
            )
    if strays:
        english = {p.name for p in edition.notebooks()}
        for zh in sorted(edition.zh_dir.glob("*.ipynb")):
            if zh.name not in english:
                problems.append(Problem(edition.rel(zh), "stray", "no English notebook; delete it"))
        for po_path in sorted(edition.po_dir.glob("*.po")):
            if f"{po_path.stem}.ipynb" not in english:
                problems.append(
                    Problem(edition.rel(po_path), "stray", "no English notebook; delete it")
                )
    return problems


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zh_notebooks.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("command", choices=["update", "build", "check"])
    parser.add_argument("notebooks", nargs="*", help="stems or file names; default: all")
    parser.add_argument("--root", type=Path, default=REPO, help="the repository (default: ours)")
    args = parser.parse_args(argv)
    edition = Edition(args.root.resolve())
    notebooks = edition.notebooks(args.notebooks)

    if args.command == "update":
        for line in update(edition, notebooks):
            print(line)
        return 0
    if args.command == "build":
        written, problems = build(edition, notebooks)
        for path in written:
            print(f"wrote {path}")
        if problems:
            print(
                f"Not built: {len({p.path for p in problems})} notebook(s) with incomplete "
                "translations (see notebooks/zh/README.md):",
                file=sys.stderr,
            )
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return 1
        return 0
    problems = check(edition, notebooks, strays=not args.notebooks)
    if problems:
        print(f"The Chinese edition is not complete and current ({len(problems)} problems):")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(f"The Chinese edition is complete and current ({len(notebooks)} notebooks).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
