"""Scanned and per-layer models: ``stack=`` and ``unstack=`` on load.

A scanned checkpoint holds every layer's weights stacked along one axis
(``decoder/layers/mlp/wi/kernel``, shape ``(emb, layers, mlp)`` in MaxText); a per-layer one
holds ``decoder/layers/0/mlp/wi/kernel``, ``decoder/layers/1/...``. Each option maps a regex to
an axis, written as Orbax's ``model_surgery.stack`` writes it: in the per-layer spelling, with
one capture group holding the layer index and its separator, which is removed from the name
(``{r"layers/(\\d+/)": 1}`` makes ``layers/3/mlp/wi/kernel`` into ``layers/mlp/wi/kernel``,
layer 3).

- ``unstack``: one stacked checkpoint array feeds per-layer target arrays, sliced at ``axis``.
- ``stack``: per-layer checkpoint arrays feed one stacked target array, the layer at ``axis``.

Both apply after ``rename`` and before ``transform``, so a transform sees the target's keys and
arrays. Everything here works from metadata; the arrays are combined by ``restore``, which
reads each stacked array once (``unstack``) or the layers of one target in bounded batches
(``stack``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets._keypaths import KeyPath
from nnx_ckpt_widgets._text import shape_text
from nnx_ckpt_widgets.errors import InvalidArgumentError
from nnx_ckpt_widgets.metadata import LeafInfo

Renamed = dict[KeyPath, tuple[LeafInfo, str | None]]


@dataclasses.dataclass(frozen=True)
class LayerSource:
    """Where one target array comes from when layers are stacked or unstacked.

    Attributes:
      kind: ``"unstack"`` (a slice of one stacked array) or ``"stack"`` (layers stacked).
      axis: the layer axis of the stacked array.
      parts: the stored arrays to read: the one stacked array, or the layers in order.
      index: for ``unstack``, the layer this target array is.
      stacked: the stacked array's key (checkpoint's for unstack, target's for stack).
    """

    kind: Literal["stack", "unstack"]
    axis: int
    parts: tuple[LeafInfo, ...]
    index: int | None = None
    stacked: str = ""

    def combine(self, parts: Sequence[Any]) -> Any:
        """This key's array from the host arrays of :attr:`parts`, in their order: layer
        ``index`` of the stacked array (a copy), or the layers stacked at ``axis``."""
        import numpy as np

        if self.kind == "unstack":
            return np.take(np.asarray(parts[0]), self.index or 0, axis=self.axis)
        return np.stack([np.asarray(p) for p in parts], axis=self.axis)

    @property
    def text(self) -> str:
        """``decoder/layers/mlp/wi/kernel[:, i]`` or ``layers/{0..3}/w stacked on axis 1``."""
        return self.spelled("i")

    def spelled(self, index: str) -> str:
        """:attr:`text` with the layer written as ``index`` (``"i"``, or ``"3"``)."""
        if self.kind == "unstack":
            rank = len(self.parts[0].shape)
            slices = [":"] * rank
            slices[self.axis] = index
            return f"{self.stacked}[{', '.join(slices)}]"
        names = [_keypaths.split(p.name) for p in self.parts]
        pattern = _keypaths.fold(names)
        folded = pattern[0][0] if len(pattern) == 1 else f"{len(self.parts)} layers"
        return f"{folded} stacked on axis {self.axis}"


@dataclasses.dataclass(frozen=True)
class _Rule:
    kind: Literal["stack", "unstack"]
    pattern: re.Pattern[str]
    axis: int


def _rules(kind: Literal["stack", "unstack"], option: Mapping[str, int] | None) -> list[_Rule]:
    rules = []
    for pattern, axis in (option or {}).items():
        try:
            compiled = re.compile(pattern)
        except re.error as err:
            raise InvalidArgumentError(
                f"{kind} pattern {pattern!r} is not a valid regular expression: {err.msg}."
            ) from err
        if compiled.groups != 1:
            raise InvalidArgumentError(
                f"{kind} pattern {pattern!r} has {compiled.groups} capture groups; it needs "
                r"exactly one, holding the layer index and its separator, e.g. r'layers/(\d+/)'."
            )
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise InvalidArgumentError(
                f"{kind}[{pattern!r}] must be an integer axis, got {type(axis).__name__}."
            )
        rules.append(_Rule(kind, compiled, axis))
    return rules


def _split(rule: _Rule, name: str) -> tuple[str, int | None, str] | None:
    """``(stacked name, layer index or None when not an integer, group text)``, or None."""
    match = rule.pattern.search(name)
    if match is None or match.group(1) is None:
        return None
    group = match.group(1)
    digits = re.search(r"\d+", group)
    stacked = name[: match.start(1)] + name[match.end(1) :]
    index = int(digits.group()) if digits and digits.group() == group.strip("/._-") else None
    return stacked, index, group


def _axis(rule: _Rule, rank: int, key: str) -> int:
    """The rule's axis for a stacked array of ``rank`` dimensions (negative counts back)."""
    axis = rule.axis + rank if rule.axis < 0 else rule.axis
    if not 0 <= axis < rank:
        raise InvalidArgumentError(
            f"{rule.kind} axis {rule.axis} is out of range for {key!r}, whose stacked array "
            f"has {rank} dimensions; pick an axis from {-rank} to {rank - 1}."
        )
    return axis


def _check_layers(kind: str, stacked: str, indices: list[int], count: int | None) -> str | None:
    """A problem with the layer indices of one stacked array, or None."""
    seen: set[int] = set()
    dups = sorted({i for i in indices if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
    if dups:
        return f"{kind} of {stacked!r}: layer {dups[0]} appears twice"
    want = count if count is not None else len(indices)
    gaps = sorted(set(range(want)) - seen)
    if gaps:
        return f"{kind} of {stacked!r}: layer {gaps[0]} of 0..{want - 1} is missing"
    extra = sorted(seen - set(range(want)))
    if extra:
        return (
            f"{kind} of {stacked!r}: {len(indices)} layers but the stacked array holds {want} "
            f"(layer {extra[0]} is out of range)"
        )
    return None


def _per_layer_names(rule: _Rule, ckpt: Renamed) -> set[KeyPath]:
    """Without a target (``convert``), the per-layer keys that ``unstack`` makes of each
    stacked key the rule fits: layer 0's name is tried with the index at each ``/``."""
    names: set[KeyPath] = set()
    for path, (leaf, _) in ckpt.items():
        name = _keypaths.join(path)
        for p in [0] + [i + 1 for i, ch in enumerate(name) if ch == "/"]:
            match = rule.pattern.search(name[:p] + "0/" + name[p:])
            if match is None or match.start(1) != p or match.group(1) != "0/":
                continue
            axis = _axis(rule, len(leaf.shape), name)
            names.update(
                _keypaths.split(f"{name[:p]}{i}/{name[p:]}") for i in range(leaf.shape[axis])
            )
            break
    return names


def apply_layers(
    ckpt: Renamed,
    target_paths: set[KeyPath] | None,
    stack: Mapping[str, int] | None,
    unstack: Mapping[str, int] | None,
) -> tuple[Renamed, dict[KeyPath, LayerSource], list[str]]:
    """Map the (renamed) checkpoint keys through ``unstack`` and ``stack``.

    With ``target_paths`` None (no target: ``convert``), ``unstack`` slices every stacked key
    its pattern fits into all its layers, and ``stack`` stacks every group of layers.

    Returns:
      The checkpoint keys in the target's spelling (stacked or sliced leaves carry the shape
      the target gets), where each such key comes from, and the problems found (gaps,
      duplicates, counts), each naming the key and the layer; a restore is refused while
      there are any.

    Raises:
      InvalidArgumentError: a pattern is not a regex, has no capture group or two, an axis is
        not an integer or out of range, or ``stack`` and ``unstack`` match the same key.
    """
    unstack_rules, stack_rules = _rules("unstack", unstack), _rules("stack", stack)
    if not unstack_rules and not stack_rules:
        return ckpt, {}, []
    if unstack_rules and stack_rules:
        for path in (*ckpt, *(target_paths or ())):
            name = _keypaths.join(path)
            if any(r.pattern.search(name) for r in unstack_rules) and any(
                r.pattern.search(name) for r in stack_rules
            ):
                raise InvalidArgumentError(
                    f"stack and unstack both match {name!r}; make their patterns tell the "
                    "keys apart."
                )
    out: Renamed = dict(ckpt)
    sources: dict[KeyPath, LayerSource] = {}
    problems: list[str] = []
    by_name = {_keypaths.join(p): p for p in ckpt}

    # unstack: target keys in per-layer spelling, fed by a stacked checkpoint key.
    for rule in unstack_rules:
        groups: dict[str, list[tuple[int | None, KeyPath, str]]] = {}
        wanted = target_paths if target_paths is not None else _per_layer_names(rule, ckpt)
        for target in sorted(wanted):
            name = _keypaths.join(target)
            split = _split(rule, name)
            if split is None or split[0] not in by_name or name in by_name:
                continue
            groups.setdefault(split[0], []).append((split[1], target, name))
        for stacked_name, members in groups.items():
            stored, source = ckpt[by_name[stacked_name]]
            bad = [name for index, _, name in members if index is None]
            if bad:
                problems.append(f"unstack of {stacked_name!r}: {bad[0]!r} has no integer layer")
                continue
            axis = _axis(rule, len(stored.shape), stacked_name)
            indices = [index for index, _, _ in members if index is not None]
            problem = _check_layers("unstack", stacked_name, indices, stored.shape[axis])
            if problem:
                problems.append(problem)
                continue
            del out[by_name[stacked_name]]
            shape = stored.shape[:axis] + stored.shape[axis + 1 :]
            for index, target, _ in members:
                sliced = dataclasses.replace(stored, path=target, shape=shape)
                out[target] = (sliced, source or stacked_name)
                sources[target] = LayerSource(
                    "unstack", axis, (stored,), index, source or stacked_name
                )

    # stack: per-layer checkpoint keys, feeding one stacked target key.
    for rule in stack_rules:
        stacks: dict[str, list[tuple[int | None, KeyPath]]] = {}
        for path in sorted(out):
            name = _keypaths.join(path)
            split = _split(rule, name)
            if split is None:
                continue
            if target_paths is not None and _keypaths.split(split[0]) not in target_paths:
                continue
            if path in sources:
                continue  # a slice of an unstacked array: not a stored layer to stack
            stacks.setdefault(split[0], []).append((split[1], path))
        for stacked_name, layer_members in stacks.items():
            bad = [_keypaths.join(p) for index, p in layer_members if index is None]
            if bad:
                problems.append(f"stack into {stacked_name!r}: {bad[0]!r} has no integer layer")
                continue
            indices = [i for i, _ in layer_members if i is not None]
            problem = _check_layers("stack", stacked_name, indices, None)
            if problem:
                problems.append(problem)
                continue
            ordered = [out[p][0] for _, p in sorted(layer_members, key=lambda m: m[0] or 0)]
            first = ordered[0]
            odd = [p for p in ordered if (p.shape, p.dtype) != (first.shape, first.dtype)]
            if odd:
                problems.append(
                    f"stack into {stacked_name!r}: {odd[0].name!r} is "
                    f"{odd[0].dtype}{shape_text(odd[0].shape)}, not "
                    f"{first.dtype}{shape_text(first.shape)} like {first.name!r}"
                )
                continue
            axis = _axis(rule, len(first.shape) + 1, stacked_name)
            shape = (*first.shape[:axis], len(ordered), *first.shape[axis:])
            target = _keypaths.split(stacked_name)
            for _, p in layer_members:
                del out[p]
            out[target] = (dataclasses.replace(first, path=target, shape=shape), None)
            parts = tuple(ordered)
            sources[target] = LayerSource("stack", axis, parts, None, stacked_name)
    return out, sources, problems


@dataclasses.dataclass(frozen=True)
class Suggestion:
    """Arguments that make a checkpoint's keys fit the model, found by :func:`suggest` and
    checked to match more keys before they are offered.

    Attributes:
      kwargs: the keyword arguments for ``compare``/``restore``, e.g. ``{"unstack": {...}}``.
      why: what was found, in one clause.
      code_of: the names of ``kwargs`` that :attr:`code` spells (all by default).
    """

    kwargs: dict[str, Any]
    why: str
    code_of: tuple[str, ...] = ()

    @property
    def code(self) -> str:
        """The arguments as Python to paste: ``unstack={r"^layers/(\\d+/)": 1}``."""
        parts = []
        for name, mapping in self.kwargs.items():
            if self.code_of and name not in self.code_of:
                continue
            items = ", ".join(f"r{_raw(k)}: {_value(v)}" for k, v in mapping.items())
            parts.append(f"{name}={{{items}}}")
        return ", ".join(parts)


def _raw(text: str) -> str:
    return f'"{text}"' if '"' not in text else f"'{text}'"


def _value(value: object) -> str:
    return f"r{_raw(value)}" if isinstance(value, str) else repr(value)


def _insertions(small: tuple[int, ...], big: tuple[int, ...], count: int) -> list[int]:
    """The axes at which inserting ``count`` into ``small`` gives ``big``."""
    if len(big) != len(small) + 1:
        return []
    return [a for a in range(len(big)) if (*small[:a], count, *small[a:]) == big]


def _per_layer_groups(
    keys: Mapping[KeyPath, tuple[tuple[int, ...], str]],
) -> dict[tuple[KeyPath, int], dict[int, tuple[tuple[int, ...], str]]]:
    """Keys that differ only by an integer component: ``(stacked path, position) -> {layer:
    (shape, dtype)}``, for groups of two or more layers numbered 0..N-1."""
    groups: dict[tuple[KeyPath, int], dict[int, tuple[tuple[int, ...], str]]] = {}
    for path, sig in keys.items():
        for j, part in enumerate(path[:-1]):
            if part.isdigit() and len(part) < 7:
                groups.setdefault((path[:j] + path[j + 1 :], j), {})[int(part)] = sig
    return {
        k: v
        for k, v in groups.items()
        if len(v) > 1 and set(v) == set(range(len(v))) and len(set(v.values())) == 1
    }


def _common_tail(a: KeyPath, b: KeyPath) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def suggest(
    missing: Mapping[KeyPath, tuple[tuple[int, ...], str]],
    unexpected: Mapping[KeyPath, tuple[tuple[int, ...], str]],
    rebuild: Callable[[dict[str, dict[str, object]]], int],
) -> Suggestion | None:
    """Spot a scanned-versus-per-layer mismatch, a doubled prefix (MaxText's
    ``params/params/``) or ``layers_0`` against ``layers/0``, and the arguments that fix it.

    Args:
      missing: the target's keys the checkpoint lacks, with their shapes and dtypes.
      unexpected: the checkpoint's keys the target lacks (after any ``rename`` already
        given), with theirs.
      rebuild: the number of keys that match with the given extra arguments; a suggestion is
        offered only when it matches more than the report does now.
    """
    candidates: list[tuple[dict[str, dict[str, object]], str]] = []
    # Per-layer model, scanned checkpoint (unstack), or the reverse (stack).
    for kind, layered, stacked_side in (
        ("unstack", missing, unexpected),
        ("stack", unexpected, missing),
    ):
        rename: dict[str, object] = {}
        option: dict[str, object] = {}
        found = []
        by_last: dict[str, list[KeyPath]] = {}
        for other in stacked_side:
            by_last.setdefault(other[-1], []).append(other)
        for (stacked, j), layers in _per_layer_groups(layered).items():
            shape, dtype = next(iter(layers.values()))
            matches = []
            for other in by_last.get(stacked[-1], ()):
                big, other_dtype = stacked_side[other]
                tail = _common_tail(other, stacked)
                axes = _insertions(shape, big, len(layers))
                if tail < len(stacked) - j or not axes or other_dtype != dtype:
                    continue
                ckpt_side = other if kind == "unstack" else stacked
                head_ckpt = "/".join(ckpt_side[: len(ckpt_side) - tail])
                matches.append((len(head_ckpt), head_ckpt, other, tail, axes[0]))
            if not matches:
                continue
            # Several checkpoint arrays may fit (an optimizer's moments have the parameters'
            # shapes): the one under the shortest prefix is the parameter itself.
            _, head_ckpt, other, tail, axis = min(matches)
            target_side = stacked if kind == "unstack" else other
            head_target = "/".join(target_side[: len(target_side) - tail])
            if head_ckpt != head_target:
                pattern = f"^{re.escape(head_ckpt)}/" if head_ckpt else "^"
                rename[pattern] = f"{head_target}/" if head_target else ""
            prefix = "/".join(stacked[:j])
            layer_pattern = f"^{re.escape(prefix)}/" if prefix else "^"
            if kind == "stack":  # the checkpoint side is per-layer, spelled after rename
                prefix_t = "/".join(target_side[:j]) if head_ckpt != head_target else prefix
                layer_pattern = f"^{re.escape(prefix_t)}/" if prefix_t else "^"
            option.setdefault(layer_pattern + r"(\d+/)", axis)
            found.append((stacked, len(layers), axis))
        if option:
            kwargs = ({"rename": rename} if rename else {}) | {kind: option}
            n_layers, axis = found[0][1], found[0][2]
            where = "checkpoint" if kind == "unstack" else "model"
            why = (
                f"the {where} stacks {n_layers} layers on axis {axis} where the other side "
                "has one key per layer"
            )
            candidates.append((kwargs, why))
    # A prefix the checkpoint adds to every key (MaxText's params/params/).
    heads: dict[str, int] = {}
    by_tail: dict[str, list[KeyPath]] = {}
    for m in missing:
        by_tail.setdefault(m[-1], []).append(m)
    for other in unexpected:
        for m in by_tail.get(other[-1], ()):
            tail = _common_tail(other, m)
            if tail == len(m) and len(other) > tail:
                head = "/".join(other[: len(other) - tail])
                heads[head] = heads.get(head, 0) + 1
    if heads:
        head = max(heads, key=lambda h: (heads[h], -len(h)))
        candidates.append(
            ({"rename": {f"^{re.escape(head)}/": ""}}, f"the checkpoint's keys start with {head}/")
        )
    # layers_0 against layers/0, both ways.
    ckpt_names = {"/".join(p) for p in unexpected}
    model_names = {"/".join(p) for p in missing}
    underscored = re.compile(r"(^|/)([A-Za-z][\w]*?)_(\d+)(?=/)")
    slashed = re.compile(r"(^|/)([A-Za-z][\w]*?)/(\d+)(?=/)")
    for source, target_names, rule, repl, why in (
        (
            ckpt_names,
            model_names,
            underscored,
            r"\1\2/\3",
            "the checkpoint numbers layers as name_0",
        ),
        (ckpt_names, model_names, slashed, r"\1\2_\3", "the checkpoint numbers layers as name/0"),
    ):
        hits = [n for n in source if rule.sub(repl, n) in target_names]
        if hits:
            candidates.append(({"rename": {rule.pattern: repl}}, why))
    best, best_matched = None, rebuild({})
    for kwargs, why in candidates:
        try:
            matched = rebuild(kwargs)
        except InvalidArgumentError:
            continue
        if matched > best_matched:
            best, best_matched = Suggestion(kwargs, why), matched
    return best
