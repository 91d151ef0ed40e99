"""``compare``: does a checkpoint fit a model? One status per key, and what to do about it."""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from nnx_ckpt_widgets import _keypaths, _untrusted
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._layers import LayerSource, apply_layers
from nnx_ckpt_widgets._text import clip, human_bytes, plural, shape_text
from nnx_ckpt_widgets.errors import (
    InvalidArgumentError,
    TransformError,
    first_line,
)
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect

if TYPE_CHECKING:
    from nnx_ckpt_widgets._layers import Suggestion
    from nnx_ckpt_widgets.plan import RestorePlan

__all__ = ["KeyStatus", "LoadReport", "TargetLeaf", "compare", "flatten_target"]

Status = Literal["matched", "missing", "unexpected", "shape mismatch", "dtype mismatch"]
Action = Literal["restored", "cast", "zeros", "kept", "ignored"]
ACTIONS: tuple[Action, ...] = ("restored", "cast", "zeros", "kept", "ignored")
# Top-level collections of a Flax Linen variables dict.
LINEN_COLLECTIONS = ("params", "batch_stats", "cache", "intermediates")
# The statuses whose arrays a restore reads from the checkpoint.
READ_STATUSES: tuple[Status, ...] = ("matched", "dtype mismatch")
STATUSES: tuple[Status, ...] = (
    "matched",
    "missing",
    "unexpected",
    "shape mismatch",
    "dtype mismatch",
)


@dataclasses.dataclass(frozen=True, slots=True)  # 10^5 of them: no __dict__ each
class TargetLeaf:
    """One array of the target, spelled the way the checkpoint stores it.

    A typed PRNG key (``key<fry>``) is stored by Orbax as its ``uint32`` key data, so
    ``shape`` and ``dtype`` here are those of ``jax.random.key_data`` of it. A Python scalar
    (``nnx.Variable(0)``) is stored as a 0-d value of NumPy's dtype for it (``int64``);
    ``scalar_type`` is then its Python type.
    """

    path: KeyPath
    raw_path: tuple[Any, ...]
    variable: Any
    shape: tuple[int, ...]
    dtype: str
    sharding: Any = None
    key_impl: Any = None
    abstract: bool = False
    scalar_type: type | None = None


@dataclasses.dataclass(frozen=True, slots=True)  # 10^5 of them: no __dict__ each
class KeyStatus:
    """The verdict for one key.

    Attributes:
      path: the key, spelled ``linear1/kernel``: the target's path, or the checkpoint's (after
        ``rename``) for an unexpected key.
      status: one of ``matched``, ``missing``, ``unexpected``, ``shape mismatch``,
        ``dtype mismatch``.
      checkpoint: the checkpoint's array, unless missing.
      target_shape: the target's shape, unless unexpected.
      target_dtype: the target's dtype, unless unexpected.
      source: the checkpoint's own key when ``rename`` changed it.
      action: after a restore, what was done: ``restored``, ``cast``, ``kept``, ``zeros`` or
        ``ignored``.
      transformed: a ``transform`` function applies to this key; ``checkpoint`` then holds
        the shape and dtype it gives, and ``stored`` the array as stored.
    """

    path: str
    status: Status
    checkpoint: LeafInfo | None = None
    target_shape: tuple[int, ...] | None = None
    target_dtype: str | None = None
    source: str | None = None
    action: Action | None = None
    transformed: bool = False
    stored: LeafInfo | None = None
    transforms: tuple[Callable[[Any], Any], ...] = dataclasses.field(
        default=(), repr=False, compare=False
    )
    layers: LayerSource | None = None

    @property
    def detail(self) -> str:
        ckpt = self.checkpoint
        if ckpt is None:  # missing: only the model side exists
            return f"model {shape_text(self.target_shape)} {self.target_dtype}"
        if self.status == "shape mismatch":
            model = shape_text(self.target_shape)
            text = f"checkpoint {shape_text(ckpt.shape)} vs model {model}"
        elif self.status == "dtype mismatch":
            text = f"checkpoint {ckpt.dtype} vs model {self.target_dtype}"
        else:
            text = f"{shape_text(ckpt.shape)} {ckpt.dtype}"
        if self.stored is not None:
            text += f", transformed from {shape_text(self.stored.shape)} {self.stored.dtype}"
        if self.layers is not None:
            text += f" ← {self.layers.text}"
        return text

    @property
    def read_leaf(self) -> LeafInfo | None:
        """The checkpoint's array as stored: what a restore reads for this key."""
        return self.stored if self.stored is not None else self.checkpoint

    @property
    def read_leaves(self) -> tuple[LeafInfo, ...]:
        """The stored arrays a restore reads for this key: one, or the layers it stacks (an
        unstacked key shares its stacked array with the other layers)."""
        if self.layers is not None:
            return self.layers.parts
        leaf = self.read_leaf
        return (leaf,) if leaf is not None else ()

    @property
    def nbytes(self) -> int:
        """Bytes a restore reads for this key (0 unless the checkpoint holds it); an
        unstacked key counts its share of the stacked array."""
        layers = self.layers
        if layers is not None and layers.kind == "unstack":
            stacked = layers.parts[0]
            return stacked.nbytes // max(stacked.shape[layers.axis], 1)
        return sum(leaf.nbytes for leaf in self.read_leaves)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """How a checkpoint's keys line up with a target's, one :class:`KeyStatus` per key.

    ``str()`` is a load-report table with repeated layer indices folded and a last line that
    says what to do; ``_repr_html_`` is the same, colour-coded.
    """

    path: str
    format: str
    entries: tuple[KeyStatus, ...]
    step: int | None = None
    item: str | None = None
    restored_arrays: int | None = None
    restored_bytes: int | None = None
    notes: tuple[str, ...] = ()
    info: CheckpointInfo | None = dataclasses.field(default=None, repr=False, compare=False)
    # Why the layers given to stack= or unstack= cannot be combined (gaps, duplicates, counts).
    layer_problems: tuple[str, ...] = ()
    # The key options the report was built with: rename, transform, stack, unstack.
    key_options: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)
    # The target's keys whose values are abstract (nnx.eval_shape): nothing to keep there.
    abstract_keys: frozenset[str] = dataclasses.field(
        default=frozenset(), repr=False, compare=False
    )

    def _paths(self, status: Status) -> list[str]:
        return [e.path for e in self.entries if e.status == status]

    @property
    def matched(self) -> list[str]:
        return self._paths("matched")

    @property
    def missing(self) -> list[str]:
        return self._paths("missing")

    @property
    def unexpected(self) -> list[str]:
        return self._paths("unexpected")

    @property
    def shape_mismatched(self) -> list[str]:
        return self._paths("shape mismatch")

    @property
    def dtype_mismatched(self) -> list[str]:
        return self._paths("dtype mismatch")

    @property
    def casts(self) -> list[KeyStatus]:
        """The keys whose dtype was cast by a restore with ``cast=True``."""
        return [e for e in self.entries if e.action == "cast"]

    @property
    def to_read(self) -> tuple[KeyStatus, ...]:
        """The entries whose arrays a restore reads: matched ones, and the ones to cast."""
        return tuple(e for e in self.entries if e.status in READ_STATUSES)

    @property
    def read_bytes(self) -> int:
        """Bytes a restore reads from the checkpoint, each stored array counted once."""
        stored = {leaf.stored_path: leaf.nbytes for e in self.to_read for leaf in e.read_leaves}
        return sum(stored.values())

    @property
    def action_counts(self) -> dict[Action, int]:
        """After a restore: how many keys got each action, in the order of ``ACTIONS``."""
        counts = dict.fromkeys(ACTIONS, 0)
        for entry in self.entries:
            if entry.action is not None:
                counts[entry.action] += 1
        return counts

    @property
    def outcome(self) -> str | None:
        """After a restore, one line on what changed: ``Restored 2 arrays (128 B), zero-filled
        2.``; None before any restore."""
        if self.restored_arrays is None:
            return None
        counts = self.action_counts
        read = counts["restored"] + counts["cast"]
        size = human_bytes(self.restored_bytes or 0)
        parts = [f"Restored {plural(read, 'array')} ({size})"]
        if counts["cast"]:
            parts.append(f"{counts['cast']} of them cast")
        if counts["zeros"]:
            parts.append(f"zero-filled {counts['zeros']}")
        if counts["kept"]:
            parts.append(f"kept {counts['kept']} as they were")
        if counts["ignored"]:
            parts.append(f"ignored {plural(counts['ignored'], 'checkpoint key')}")
        return ", ".join(parts) + "."

    @property
    def ok(self) -> bool:
        """True when every key matched: a strict restore will succeed."""
        return all(e.status == "matched" for e in self.entries)

    @property
    def counts(self) -> dict[str, int]:
        return {status: len(self._paths(status)) for status in STATUSES}

    @property
    def advice(self) -> str:
        """One line saying what to do next."""
        if self.outcome is not None:
            return self.outcome
        if self.ok:
            return f"All {len(self.entries)} keys match: restore(path, model) will load them."
        todo = []
        shaped = [e for e in self.entries if e.status == "shape mismatch"]
        if any(e.transformed for e in shaped):
            todo.append("shapes still differ after transform=: fix its function or the model")
        elif shaped:
            # The names already match, so rename= cannot help: the arrays need reshaping.
            todo.append(
                "shapes differ under matching names: change the model, or reshape the arrays "
                "on load with transform={pattern: function}"
            )
        if self.missing:
            todo.append("keep the model's values for missing keys with strict=False")
        if self.unexpected:
            todo.append(
                "skip unexpected keys with strict=False, or map renamed layers with rename={...}"
            )
        if self.dtype_mismatched:
            todo.append("allow dtype casts with cast=True")
        found = self.suggestion
        if found is not None and not self.layer_problems:
            return f"It looks like {found.why}: pass {found.code}."
        if self.layer_problems:
            todo.insert(0, f"fix stack=/unstack=: {self.layer_problems[0]}")
        hint = self.linen_hint
        return "To load it: " + "; ".join(todo) + "." + (f" {hint}" if hint else "")

    @functools.cached_property
    def suggestion(self) -> Suggestion | None:
        """Arguments that make more keys match, when the mismatch has a known shape: a scanned
        checkpoint and a per-layer model (``unstack=``) or the reverse (``stack=``), a prefix
        such as MaxText's ``params/params/``, ``layers_0`` against ``layers/0``. Each is tried
        on the metadata before it is offered; ``kwargs`` are the full key options to pass
        (``restore(path, model, **report.suggestion.kwargs)``) and ``code`` is the part to
        add, as Python."""
        info = self.info
        if info is None or not self.missing or not self.unexpected:
            return None
        from nnx_ckpt_widgets._layers import Suggestion, suggest

        missing, unexpected, targets = {}, {}, []
        for e in self.entries:
            if e.status == "unexpected":
                assert e.checkpoint is not None
                unexpected[_keypaths.split(e.path)] = (e.checkpoint.shape, e.checkpoint.dtype)
                continue
            shape, dtype = e.target_shape or (), e.target_dtype or ""
            path = _keypaths.split(e.path)
            targets.append(TargetLeaf(path, (), None, shape, dtype))
            if e.status == "missing":
                missing[path] = (shape, dtype)
        base = self.key_options

        def merged(extra: Mapping[str, Mapping[str, object]]) -> dict[str, Any]:
            out = dict(base)
            for name, mapping in extra.items():
                out[name] = {**(base.get(name) or {}), **mapping}
            return out

        def rebuild(extra: dict[str, dict[str, object]]) -> int:
            report = build_report(info, targets, **merged(extra))
            return 0 if report.layer_problems else len(report.matched)

        found = suggest(missing, unexpected, rebuild)
        if found is None:
            return None
        full = {k: v for k, v in merged(found.kwargs).items() if v}
        return Suggestion(full, found.why, code_of=tuple(found.kwargs))

    @property
    def linen_hint(self) -> str | None:
        """For a Flax Linen checkpoint (collections ``params``, ``batch_stats``; modules
        auto-named ``Dense_0``), how its names map to the model's, from the first unexpected
        module whose arrays match a missing one's in names and shapes; None otherwise."""
        unexpected = [e for e in self.entries if e.status == "unexpected"]
        linen = [e for e in unexpected if e.path.split("/", 1)[0] in LINEN_COLLECTIONS]
        if not linen:
            return None
        collections = sorted({e.path.split("/", 1)[0] for e in linen})
        text = (
            f"This looks like a Flax Linen checkpoint (collections {', '.join(collections)}, "
            "modules named by class and number): map each module to the model's attribute "
            "with rename=, one pattern per module"
        )
        missing = [e for e in self.entries if e.status == "missing"]
        # Parameters first: they are what a reader expects to see mapped.
        for entry in sorted(linen, key=lambda e: not e.path.startswith("params/")):
            parts = entry.path.split("/")
            if len(parts) < 3 or entry.checkpoint is None:
                continue
            prefix, leaf = "/".join(parts[:-1]), parts[-1]
            for target in missing:
                if target.path.endswith("/" + leaf) and target.target_shape == (
                    entry.checkpoint.shape
                ):
                    goal = target.path[: -len(leaf) - 1]
                    return f"{text}, e.g. {{r'^{clip(prefix, 40)}/': '{clip(goal, 40)}/'}}."
        return text + "."

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON (the CLI's ``--json``)."""

        def leaf(entry: KeyStatus) -> dict[str, Any] | None:
            ckpt = entry.checkpoint
            if ckpt is None:
                return None
            return {"key": ckpt.name, "shape": list(ckpt.shape), "dtype": ckpt.dtype}

        return {
            "path": self.path,
            "format": self.format,
            "step": self.step,
            "item": self.item,
            "ok": self.ok,
            "counts": self.counts,
            "advice": self.advice,
            "notes": list(self.notes),
            "entries": [
                {
                    "key": e.path,
                    "status": e.status,
                    "checkpoint": leaf(e),
                    "target_shape": list(e.target_shape) if e.target_shape is not None else None,
                    "target_dtype": e.target_dtype,
                    "source": e.source,
                    "transformed": e.transformed,
                    "action": e.action,
                }
                for e in self.entries
            ],
        }

    def plan(
        self,
        *,
        strict: bool = True,
        missing: str = "keep",
        unexpected: str = "ignore",
        cast: bool = False,
    ) -> RestorePlan:
        """What a restore with these options would do: one action per key, or the refusal.

        Args:
          strict, missing, unexpected, cast: as for :func:`~nnx_ckpt_widgets.restore`.

        Returns:
          The :class:`~nnx_ckpt_widgets.plan.RestorePlan`; ``str()`` of it is one line.

        Raises:
          InvalidArgumentError: ``missing`` or ``unexpected`` is not a known policy.
        """
        from nnx_ckpt_widgets.plan import RestoreOptions, make_plan

        options = RestoreOptions(strict, missing, unexpected, cast)  # type: ignore[arg-type]
        return make_plan(self, options)

    def summary(self) -> str:
        """One sentence listing the differences."""
        parts = [
            f"{len(paths)} {label} ({_keypaths.preview(paths)})"
            for label, paths in (
                ("missing", self.missing),
                ("unexpected", self.unexpected),
                ("shape mismatched", self.shape_mismatched),
                ("dtype mismatched", self.dtype_mismatched),
            )
            if paths
        ]
        return ", ".join(parts) if parts else "no differences"

    def __str__(self) -> str:
        from nnx_ckpt_widgets import render

        return render.report_text(self)

    def _repr_html_(self) -> str:
        from nnx_ckpt_widgets import render

        return render.report_html(self)


def state_of(value: Any, refusal: str) -> Any:
    """The ``nnx.State`` of a model or another NNX graph node, or an ``nnx.State`` itself.

    Raises:
      InvalidArgumentError: ``refusal``, its ``{}`` filled with the type's name, for anything
        else.
    """
    from flax import nnx

    if isinstance(value, nnx.State):
        return value
    if nnx.graph.is_graph_node(value):
        return nnx.state(value)
    raise InvalidArgumentError(refusal.format(type(value).__name__))


# Both build an object or more per leaf and keep them all: at 100,000 leaves the cyclic
# collector's passes over them took a third of compare's time (measured: 6.5 s, 4.1 s paused).
@_untrusted.no_gc()
def flatten_target(target: Any) -> list[TargetLeaf]:
    """The arrays of a model, any NNX graph node or an ``nnx.State``, concrete or abstract.

    Raises:
      InvalidArgumentError: ``target`` is none of these.
    """
    import jax
    import numpy as np
    from flax import nnx

    state = state_of(
        target,
        "Cannot compare a checkpoint with a {}: pass an NNX model, another NNX graph node "
        "such as nnx.Optimizer, or an nnx.State.",
    )
    leaves = []
    # Per dtype, not per leaf: a model has a few dtypes and up to 10^5 leaves, and JAX's dtype
    # checks were a fifth of this function's time there.
    is_key: dict[Any, bool] = {}
    names: dict[Any, str] = {}
    for raw_path, variable in nnx.to_flat_state(state):
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        if isinstance(value, (bool, int, float)):
            leaves.append(
                TargetLeaf(
                    path=_keypaths.to_keypath(raw_path),
                    raw_path=tuple(raw_path),
                    variable=variable,
                    shape=(),
                    dtype=np.asarray(value).dtype.name,
                    scalar_type=type(value),
                )
            )
            continue
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            continue  # strings and other non-array state are not checkpointed as arrays.
        abstract = isinstance(value, jax.ShapeDtypeStruct)
        shape, dtype, key_impl = tuple(value.shape), value.dtype, None
        if dtype not in is_key:
            is_key[dtype] = bool(jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key))
        if is_key[dtype]:
            key_impl = value.dtype._impl if abstract else jax.random.key_impl(value)
            data = jax.eval_shape(jax.random.key_data, value)
            shape, dtype = tuple(data.shape), data.dtype
        if dtype not in names:
            names[dtype] = str(jax.numpy.dtype(dtype).name)
        leaves.append(
            TargetLeaf(
                path=_keypaths.to_keypath(raw_path),
                raw_path=tuple(raw_path),
                variable=variable,
                shape=shape,
                dtype=names[dtype],
                sharding=getattr(value, "sharding", None),
                key_impl=key_impl,
                abstract=abstract,
            )
        )
    return leaves


def apply_rename(
    leaves: Mapping[KeyPath, LeafInfo], rename: Mapping[str, str] | None
) -> dict[KeyPath, tuple[LeafInfo, str | None]]:
    """Map checkpoint keys through ``rename`` (regex -> replacement, applied in order).

    Returns:
      New key path -> (checkpoint leaf, original key when it changed).

    Raises:
      InvalidArgumentError: a pattern is not a valid regex, or two keys get one name.
    """
    if not rename:
        return {path: (leaf, None) for path, leaf in leaves.items()}
    try:
        rules = [(re.compile(pattern), repl) for pattern, repl in rename.items()]
    except re.error as err:
        raise InvalidArgumentError(
            f"rename pattern {err.pattern!r} is not a valid regular expression: {err.msg}."
        ) from err
    out: dict[KeyPath, tuple[LeafInfo, str | None]] = {}
    for path, leaf in leaves.items():
        name = original = _keypaths.join(path)
        for rule, repl in rules:
            name = rule.sub(repl, name)
        new_path = _keypaths.split(name)
        if new_path in out:
            other = out[new_path][1] or _keypaths.join(out[new_path][0].path)
            raise InvalidArgumentError(
                f"rename maps both {other!r} and {original!r} to {name!r}; make the patterns "
                "tell them apart."
            )
        out[new_path] = (leaf, original if name != original else None)
    return out


Transform = Callable[[Any], Any]


def apply_transform(
    ckpt: Mapping[KeyPath, tuple[LeafInfo, str | None]],
    transform: Mapping[str, Transform] | None,
) -> dict[KeyPath, tuple[LeafInfo, tuple[Transform, ...]]]:
    """For each key (after ``rename``), the functions of every ``transform`` pattern that
    matches it, in order, and the leaf they give: its shape and dtype from ``jax.eval_shape``,
    so the report is right before any byte is read.

    Raises:
      InvalidArgumentError: a pattern is not a valid regex, a value is not callable, or a
        function cannot take the array it is given.
    """
    if not transform:
        return {}
    try:
        rules = [(re.compile(pattern), fn) for pattern, fn in transform.items()]
    except re.error as err:
        raise InvalidArgumentError(
            f"transform pattern {err.pattern!r} is not a valid regular expression: {err.msg}."
        ) from err
    for pattern, fn in transform.items():
        if not callable(fn):
            raise InvalidArgumentError(
                f"transform[{pattern!r}] must be a function of one array, got {type(fn).__name__}."
            )
    import jax

    out: dict[KeyPath, tuple[LeafInfo, tuple[Transform, ...]]] = {}
    for path, (leaf, _) in ckpt.items():
        name = _keypaths.join(path)
        fns = tuple(fn for rule, fn in rules if rule.search(name))
        if not fns:
            continue
        value = run_transforms(
            name,
            fns,
            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
            abstract=True,
            where=f" on a {leaf.dtype}{shape_text(leaf.shape)} array",
        )
        shape, dtype = tuple(value.shape), str(value.dtype)
        out[path] = (dataclasses.replace(leaf, shape=shape, dtype=dtype), fns)
    return out


def run_transforms(
    name: str, fns: tuple[Transform, ...], value: Any, *, abstract: bool, where: str = ""
) -> Any:
    """``value`` through ``fns`` in order: under ``jax.eval_shape`` when ``abstract`` (shapes
    and dtypes only), else on the real array.

    Raises:
      TransformError: a function raised; the message names the key and the error.
    """
    import jax

    try:
        for fn in fns:
            value = jax.eval_shape(fn, value) if abstract else fn(value)
    except Exception as err:  # the user's function: any error, on one line
        raise TransformError(
            f"transform of {name!r}{where} failed ({clip(first_line(err, width=None), 120)}); "
            "fix the function or narrow its pattern."
        ) from err
    return value


@_untrusted.no_gc()
def build_report(
    info: CheckpointInfo,
    target_leaves: list[TargetLeaf],
    rename: Mapping[str, str] | None = None,
    transform: Mapping[str, Transform] | None = None,
    stack: Mapping[str, int] | None = None,
    unstack: Mapping[str, int] | None = None,
) -> LoadReport:
    """Classify every key of the checkpoint and the target (after ``rename``, then ``stack``
    and ``unstack``, then ``transform``); checkpoint keys holding "/" match the nested target
    keys they spell."""
    target_paths = {t.path for t in target_leaves}
    renamed, notes = _match_slash_keys(apply_rename(info.leaves, rename), target_paths)
    # No target (convert): the layer options act on the checkpoint's own keys.
    ckpt, layers, problems = apply_layers(
        renamed, target_paths if target_leaves else None, stack, unstack
    )
    transformed = apply_transform(ckpt, transform)
    entries = []
    for t in target_leaves:
        name = _keypaths.join(t.path)
        if t.path not in ckpt:
            entries.append(KeyStatus(name, "missing", None, t.shape, t.dtype))
            continue
        stored, source = ckpt[t.path]
        leaf, fns = transformed.get(t.path, (stored, ()))
        if leaf.shape != t.shape:
            status: Status = "shape mismatch"
        elif leaf.dtype != t.dtype:
            status = "dtype mismatch"
        else:
            status = "matched"
        entries.append(
            KeyStatus(
                name,
                status,
                leaf,
                t.shape,
                t.dtype,
                source,
                transformed=bool(fns),
                stored=stored if fns else None,
                transforms=fns,
                layers=layers.get(t.path),
            )
        )
    for path, (stored, source) in ckpt.items():
        if path not in target_paths:
            leaf, fns = transformed.get(path, (stored, ()))
            entries.append(
                KeyStatus(
                    _keypaths.join(path),
                    "unexpected",
                    leaf,
                    source=source,
                    transformed=bool(fns),
                    stored=stored if fns else None,
                    transforms=fns,
                    layers=layers.get(path),
                )
            )
    return LoadReport(
        path=str(info.path),
        format=info.format,
        entries=tuple(entries),
        step=info.step,
        item=info.item,
        notes=notes,
        info=info,
        layer_problems=tuple(problems),
        key_options={"rename": rename, "transform": transform, "stack": stack, "unstack": unstack},
        abstract_keys=frozenset(_keypaths.join(t.path) for t in target_leaves if t.abstract),
    )


def _match_slash_keys(
    ckpt: dict[KeyPath, tuple[LeafInfo, str | None]], target_paths: set[KeyPath]
) -> tuple[dict[KeyPath, tuple[LeafInfo, str | None]], tuple[str, ...]]:
    """Match checkpoint keys holding "/" (Gemma's flat ``{'transformer/layer_0/attn/q_einsum':
    {'w': ...}}``) to the nested target keys they spell, where the target has those and not
    the key itself; and the report's note saying so."""
    moved: list[KeyPath] = []
    out: dict[KeyPath, tuple[LeafInfo, str | None]] = {}
    for path, (leaf, source) in ckpt.items():
        nested = _keypaths.spelled(path) if _keypaths.has_slash(path) else path
        if (
            nested != path
            and path not in target_paths
            and nested in target_paths
            and nested not in ckpt
            and nested not in out
        ):
            out[nested] = (leaf, source or _keypaths.show(path))
            moved.append(path)
            continue
        out[path] = (leaf, source)
    if not moved:
        return out, ()
    example = moved[0]
    return out, (
        f"keys holding '/' ({len(moved)} array{'s' if len(moved) > 1 else ''}, e.g. "
        f"{clip(_keypaths.show(example), 80)}) were matched to the nested keys they spell "
        f"({clip(_keypaths.join(example), 80)}); pass rename=... to map them otherwise",
    )


def compare(
    path: str | os.PathLike,
    target: Any,
    *,
    step: int | None = None,
    item: str | None = None,
    rename: Mapping[str, str] | None = None,
    transform: Mapping[str, Transform] | None = None,
    stack: Mapping[str, int] | None = None,
    unstack: Mapping[str, int] | None = None,
) -> LoadReport:
    """Compare a checkpoint's keys, shapes and dtypes with a target's, from metadata only.

    Args:
      path: a checkpoint folder, a ``CheckpointManager`` root, or a step folder; local or
        ``gs://``.
      target: a model (concrete, or abstract from ``nnx.eval_shape``), any NNX graph node such
        as ``nnx.Optimizer``, or an ``nnx.State``.
      step: under a manager root, the step to compare; the latest by default.
      item: the item to compare when the step holds several.
      rename: regex -> replacement, applied in order to checkpoint keys spelled ``a/b/c``.
      transform: regex -> function of one array, for checkpoint keys (after ``rename``) whose
        array needs changing on load: ``{r"proj/kernel$": lambda w: w.T}`` turns a PyTorch
        ``[out, in]`` weight into an NNX ``[in, out]`` kernel. Every matching pattern
        applies, in order. Shapes and dtypes come from ``jax.eval_shape``: no byte is read.
      stack: regex -> axis, for a per-layer checkpoint (``layers/0/...``) into a scanned
        target: the regex is in the per-layer spelling with one capture group holding the
        layer index and its separator, removed from the name (Orbax ``model_surgery.stack``'s
        convention): ``{r"layers/(\\d+/)": 0}``. Applied after ``rename``, before
        ``transform``.
      unstack: regex -> axis, the reverse: a scanned checkpoint's stacked array into a
        per-layer target, each layer sliced at ``axis`` (``{r"^decoder/layers/(\\d+/)": 1}``
        for MaxText's layer axis 1).

    Returns:
      A :class:`LoadReport`; ``report.ok`` is True when a strict restore will succeed.

    Raises:
      CheckpointError: the checkpoint cannot be read, or ``target`` is not NNX state.
    """
    info = inspect(path, step=step, item=item)
    return build_report(info, flatten_target(target), rename, transform, stack, unstack)
