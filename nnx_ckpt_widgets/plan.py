"""``plan``: what a restore will do, decided in one place.

A :class:`RestorePlan` turns a :class:`~nnx_ckpt_widgets.compare.LoadReport` (one status per
key) and the restore options into one action per key, the arrays and bytes to read, or the
refusal with its reason and its fix. ``compare`` and the browser show it; ``restore``, ``load``,
``apply_report`` and the CLI carry it out. Nothing else decides whether a restore may run.

A refusal carries its fix twice: in the Python API's words (``strict=False``, ``cast=True``) and
in the browser's (the lenient mode, the "cast dtypes" box), so each place names its own controls
and only the ones that apply.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets._text import human_bytes, plural
from nnx_ckpt_widgets.compare import READ_STATUSES, Action, KeyStatus, LoadReport
from nnx_ckpt_widgets.errors import CheckpointMismatchError, InvalidArgumentError

__all__ = ["PlannedKey", "Refusal", "RestoreOptions", "RestorePlan", "make_plan"]

MissingPolicy = Literal["keep", "zeros"]
UnexpectedPolicy = Literal["ignore", "error"]
MISSING_POLICIES: tuple[MissingPolicy, ...] = ("keep", "zeros")
UNEXPECTED_POLICIES: tuple[UnexpectedPolicy, ...] = ("ignore", "error")


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """The options of :func:`~nnx_ckpt_widgets.restore`, validated.

    Attributes:
      strict: any difference between checkpoint and target refuses the restore.
      missing: with ``strict=False``, ``"keep"`` or ``"zeros"`` for target keys the checkpoint
        lacks.
      unexpected: with ``strict=False``, ``"ignore"`` checkpoint keys the target lacks, or
        refuse (``"error"``).
      cast: casting dtypes is allowed (and each cast is reported).
      initialise: missing keys can be initialised by a factory (``load``), so an abstract
        target may keep them.
    """

    strict: bool = True
    missing: MissingPolicy = "keep"
    unexpected: UnexpectedPolicy = "ignore"
    cast: bool = False
    initialise: bool = False

    def __post_init__(self) -> None:
        if self.missing not in MISSING_POLICIES:
            raise InvalidArgumentError(
                f"missing must be one of {MISSING_POLICIES}, got {self.missing!r}."
            )
        if self.unexpected not in UNEXPECTED_POLICIES:
            raise InvalidArgumentError(
                f"unexpected must be one of {UNEXPECTED_POLICIES}, got {self.unexpected!r}."
            )


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a restore will not run, and how to make it run.

    Attributes:
      reason: what does not fit, e.g. ``"2 missing (linear2/bias, linear2/kernel)"``.
      fix: the way out in the Python API's words (parameters).
      controls: the way out in the browser's words (its mode, dropdowns and boxes).
    """

    reason: str
    fix: str
    controls: str


@dataclasses.dataclass(frozen=True)
class PlannedKey:
    """What a restore does with one key.

    Attributes:
      key: the target's key (or, for ``ignored``, the checkpoint's key after ``rename``).
      action: ``restored``, ``cast``, ``zeros``, ``kept`` (the target's value, or the
        factory's for ``load``) or ``ignored``.
      sources: the checkpoint keys (as stored) its value comes from; empty unless read.
      transformed: a ``transform`` function runs on the value read.
      nbytes: bytes read from the checkpoint for this key.
    """

    key: str
    action: Action
    sources: tuple[str, ...] = ()
    transformed: bool = False
    nbytes: int = 0


@dataclasses.dataclass(frozen=True)
class RestorePlan:
    """A restore decided before anything is read: one :class:`PlannedKey` per key, or a
    :class:`Refusal`.

    ``str()`` is one line (``Ready to restore 4 arrays (104 B) and zero-fill 2.``, or
    ``Refused: ...``); ``keys`` and :meth:`as_dict` say it key by key.
    """

    report: LoadReport
    options: RestoreOptions
    keys: tuple[PlannedKey, ...]
    refusal: Refusal | None = None

    @property
    def ok(self) -> bool:
        """True when the restore will run."""
        return self.refusal is None

    @property
    def to_read(self) -> tuple[KeyStatus, ...]:
        """The report's entries whose arrays are read, in the order they are read."""
        return self.report.to_read if self.ok else ()

    @property
    def read_arrays(self) -> int:
        return len(self.to_read)

    @property
    def read_bytes(self) -> int:
        return sum(e.nbytes for e in self.to_read)

    @property
    def action_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key in self.keys:
            counts[key.action] = counts.get(key.action, 0) + 1
        return counts

    def summary(self) -> str:
        """One line: what the restore will do, or why it will not run (with the Python fix)."""
        if self.refusal is not None:
            return f"Refused: {self.refusal.reason}; {self.refusal.fix}"
        counts = self.action_counts
        read = counts.get("restored", 0) + counts.get("cast", 0)
        parts = [f"Ready to restore {plural(read, 'array')} ({human_bytes(self.read_bytes)})"]
        if counts.get("cast"):
            parts.append(f"cast {counts['cast']}")
        if counts.get("zeros"):
            parts.append(f"zero-fill {counts['zeros']}")
        if counts.get("kept"):
            verb = "initialise" if self.options.initialise else "keep"
            parts.append(f"{verb} {counts['kept']}")
        if counts.get("ignored"):
            parts.append(f"ignore {counts['ignored']}")
        return _join(parts) + "."

    def error(self) -> CheckpointMismatchError:
        """The error a restore of this plan raises; only for a refused plan."""
        assert self.refusal is not None, "only a refused plan has an error"
        return CheckpointMismatchError(
            f"Checkpoint at {self.report.path} does not fit the target: "
            f"{self.refusal.reason}; {self.refusal.fix}",
            self.report,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        refusal = dataclasses.asdict(self.refusal) if self.refusal is not None else None
        return {
            "ok": self.ok,
            "options": dataclasses.asdict(self.options),
            "refusal": refusal,
            "read_arrays": self.read_arrays,
            "read_bytes": self.read_bytes,
            "keys": [
                {
                    "key": k.key,
                    "action": k.action,
                    "sources": list(k.sources),
                    "transformed": k.transformed,
                    "nbytes": k.nbytes,
                }
                for k in self.keys
            ],
        }

    def __str__(self) -> str:
        return self.summary()


def make_plan(report: LoadReport, options: RestoreOptions | None = None) -> RestorePlan:
    """Decide what a restore of ``report``'s checkpoint into its target does with ``options``.

    Args:
      report: the comparison of a checkpoint with a target (:func:`compare`).
      options: the restore options; strict by default.

    Returns:
      The plan: one action per key, or a refusal naming the reason and the fix.
    """
    opts = options if options is not None else RestoreOptions()
    refusal = _refusal(report, opts)
    keys: list[PlannedKey] = []
    if refusal is None:
        for entry in report.entries:
            keys.append(_planned(entry, opts))
    return RestorePlan(report=report, options=opts, keys=tuple(keys), refusal=refusal)


def _planned(entry: KeyStatus, opts: RestoreOptions) -> PlannedKey:
    if entry.status in READ_STATUSES:
        action: Action = "cast" if entry.status == "dtype mismatch" else "restored"
        if entry.layers is not None:
            sources = tuple(part.name for part in entry.layers.parts)
            if entry.layers.kind == "unstack":
                sources = (entry.layers.spelled(str(entry.layers.index)),)
        else:
            leaf = entry.read_leaf
            sources = (entry.source or (leaf.name if leaf is not None else entry.path),)
        return PlannedKey(entry.path, action, sources, entry.transformed, entry.nbytes)
    if entry.status == "missing":
        return PlannedKey(entry.path, "zeros" if opts.missing == "zeros" else "kept")
    return PlannedKey(entry.path, "ignored")


def _refusal(report: LoadReport, opts: RestoreOptions) -> Refusal | None:
    """The one copy of the rules: why these options cannot restore this report, or None."""
    if report.layer_problems:
        first = report.layer_problems[0]
        more = len(report.layer_problems) - 1
        return Refusal(
            first + (f" (and {more} more)" if more else ""),
            "fix the stack= or unstack= patterns so each stacked array gets every layer once.",
            "Its layers cannot be stacked or unstacked as asked: fix stack= or unstack= in the "
            "call that opened this browser.",
        )
    summary = report.summary()
    renamed_hint = bool(report.missing and report.unexpected)
    nothing = _nothing_matches(report)
    if nothing is not None:
        return nothing
    if opts.strict:
        allowed = READ_STATUSES if opts.cast else ("matched",)
        if all(e.status in allowed for e in report.entries):
            return None
        if report.shape_mismatched:
            return _shape_refusal(report)
        fixes, controls = [], ""
        if report.missing or report.unexpected:
            todo = _join(
                (["keep or zero the missing keys"] if report.missing else [])
                + (["skip the unexpected ones"] if report.unexpected else [])
            )
            fixes.append(f"pass strict=False to {todo}")
            controls = f"Choose lenient to {todo}"
        if renamed_hint:
            fixes.append("or rename={...} if layers were renamed")
        if report.dtype_mismatched:
            fixes.append("pass cast=True to cast dtypes" if not fixes else "cast=True for dtypes")
            # The box is a lenient option: strict mode keeps it unticked.
            controls += (
                ", and tick 'cast dtypes'" if controls else "Choose lenient and tick 'cast dtypes'"
            )
        return Refusal(summary, ", ".join(fixes) + ".", controls + ".")
    if report.shape_mismatched:
        return _shape_refusal(report)
    if report.dtype_mismatched and not opts.cast:
        return Refusal(
            f"{len(report.dtype_mismatched)} dtype mismatched "
            f"({_keypaths.preview(report.dtype_mismatched)})",
            "pass cast=True to cast them; every cast is reported.",
            "Tick 'cast dtypes' to cast them; every cast is reported.",
        )
    if report.unexpected and opts.unexpected == "error":
        return Refusal(
            f"{plural(len(report.unexpected), 'unexpected key')} "
            f"({_keypaths.preview(report.unexpected)})",
            "pass unexpected='ignore' to skip them.",
            "Choose 'unexpected: ignore' to skip them.",
        )
    if opts.missing == "keep" and not opts.initialise:
        abstract = [p for p in report.missing if p in report.abstract_keys]
        if abstract:
            return Refusal(
                f"{plural(len(abstract), 'missing key')} ({_keypaths.preview(abstract)}) and the "
                "target is abstract, so it has no values to keep for them",
                "pass missing='zeros', or use load(path, factory) to initialise them.",
                "Choose 'missing: zeros', or build the model with real values first.",
            )
    return None


def _nothing_matches(report: LoadReport) -> Refusal | None:
    """A restore that would read nothing changes nothing worth having: refuse it."""
    if report.to_read or report.shape_mismatched or not report.entries:
        return None
    item = " pick another item (the step holds several)," if report.item is not None else ""
    return Refusal(
        "nothing in this checkpoint matches the model",
        f"check that it is the right checkpoint;{item} or map its keys with rename={{...}}.",
        f"Nothing in this checkpoint matches the model:{item.replace('(', '').replace(')', '')}"
        " check that it is the right checkpoint.",
    )


def _shape_refusal(report: LoadReport) -> Refusal:
    transformed = any(e.transformed for e in report.entries if e.status == "shape mismatch")
    fix = (
        "the transform= function gives the wrong shape: fix it, or the model"
        if transformed
        else "change the model, or reshape the arrays on load with transform={pattern: function}"
    )
    return Refusal(
        f"{len(report.shape_mismatched)} shape mismatched "
        f"({_keypaths.preview(report.shape_mismatched)})",
        f"an array cannot be restored into another shape; {fix}.",
        "An array cannot be restored into another shape: change the model, or restore from "
        "Python with transform=.",
    )


def _join(parts: list[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    if not parts:
        return ""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
