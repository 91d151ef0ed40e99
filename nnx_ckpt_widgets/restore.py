"""``restore`` and ``load``: put a checkpoint into a live model, all or nothing.

The reading is the layout's (for every Orbax layout, one ``PyTreeCheckpointHandler`` partial
restore per batch over exactly the arrays that will be used, so a lenient restore reads only
those bytes). What this module adds is the bookkeeping around it: a report first, every new
value computed before the target is touched (a failed restore leaves it bit-for-bit as it
was), typed PRNG keys, casts that are always reported, progress, and errors that say what to do.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

from nnx_ckpt_widgets import _keypaths
from nnx_ckpt_widgets.compare import (
    READ_STATUSES,
    KeyStatus,
    LoadReport,
    TargetLeaf,
    Transform,
    build_report,
    flatten_target,
    mismatch_error,
    run_transforms,
)
from nnx_ckpt_widgets.errors import CorruptCheckpointError, InvalidArgumentError
from nnx_ckpt_widgets.layouts import ReadRequest
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect

__all__ = ["apply_report", "load", "read_batches", "restore"]

T = TypeVar("T")
MissingPolicy = Literal["keep", "zeros"]
UnexpectedPolicy = Literal["ignore", "error"]
Progress = Callable[[int, int], None]
_MISSING = ("keep", "zeros")
_UNEXPECTED = ("ignore", "error")
# Arrays are read in batches of about this many bytes, so progress can be reported and a
# batch's temporary buffers stay bounded; one Orbax call per batch costs a few milliseconds.
BATCH_BYTES = 64 * 2**20


def restore(
    path: str | os.PathLike,
    target: Any,
    *,
    step: int | None = None,
    item: str | None = None,
    strict: bool = True,
    missing: MissingPolicy = "keep",
    unexpected: UnexpectedPolicy = "ignore",
    rename: Mapping[str, str] | None = None,
    transform: Mapping[str, Transform] | None = None,
    cast: bool = False,
    progress: Progress | None = None,
) -> LoadReport:
    """Restore a checkpoint into ``target`` in place; on any error, ``target`` is unchanged.

    Args:
      path: a checkpoint folder (``nnx.State`` or pure dict), a ``CheckpointManager`` root, or
        a step folder; local or ``gs://``.
      target: a model, any NNX graph node such as ``nnx.Optimizer``, or an ``nnx.State``;
        concrete, or abstract from ``nnx.eval_shape`` (its Variables then receive arrays).
      step: under a manager root, the step to restore; the latest by default.
      item: the item to restore when the step holds several.
      strict: when True, any difference between checkpoint and target raises.
      missing: with ``strict=False``, what to do with target keys the checkpoint lacks:
        ``"keep"`` the target's current values, or fill ``"zeros"``.
      unexpected: with ``strict=False``, ``"ignore"`` checkpoint keys the target lacks, or
        raise on them (``"error"``).
      rename: regex -> replacement applied in order to checkpoint keys spelled ``a/b/c``
        before matching, e.g. ``{r"linear(\\d)": r"layer\\1"}``.
      transform: regex -> function of one array, applied after ``rename`` to the keys it
        matches, e.g. ``{r"proj/kernel$": lambda w: w.T}``; see :func:`compare`. The result
        must have the target's shape (and dtype, unless ``cast``); transformed keys are
        marked in the report.
      cast: allow casting arrays whose dtype differs from the target's; each cast is listed
        in the report.
      progress: called as ``progress(done_bytes, total_bytes)`` before the first read and
        after each batch of arrays, from the thread that restores.

    Returns:
      The :class:`LoadReport`, with each key's ``action`` and the totals restored.

    Raises:
      CheckpointMismatchError: the checkpoint does not fit and the options do not allow it.
      CheckpointError: another subclass when the checkpoint cannot be found or read.
    """
    info = inspect(path, step=step, item=item)
    report = build_report(info, flatten_target(target), rename, transform)
    return apply_report(
        report,
        target,
        strict=strict,
        missing=missing,
        unexpected=unexpected,
        cast=cast,
        progress=progress,
    )


def load(
    path: str | os.PathLike,
    factory: Callable[[], Any],
    *,
    step: int | None = None,
    item: str | None = None,
    strict: bool = True,
    missing: MissingPolicy = "keep",
    unexpected: UnexpectedPolicy = "ignore",
    rename: Mapping[str, str] | None = None,
    transform: Mapping[str, Transform] | None = None,
    cast: bool = False,
    progress: Progress | None = None,
) -> Any:
    """Build the model that ``factory`` makes, with its arrays taken from a checkpoint.

    The model is built abstractly (``nnx.eval_shape``), so no random initialisation is ever
    computed for restored arrays. With ``strict=False, missing="keep"``, keys the checkpoint
    lacks get the factory's own initial values, computed under ``jax.jit`` for those keys only.

    Args:
      path: as for :func:`restore`.
      factory: a function of no arguments that returns the model, e.g.
        ``lambda: MLP(4, rngs=nnx.Rngs(0))``.
      step, item, strict, missing, unexpected, rename, transform, cast, progress: as for
        :func:`restore`.

    Returns:
      The model, with every array concrete.

    Raises:
      CheckpointError: as for :func:`restore`.
    """
    from flax import nnx

    model = nnx.eval_shape(factory)

    def initial_values(leaves: list[TargetLeaf]) -> list[Any]:
        import jax

        wanted = [leaf.raw_path for leaf in leaves]

        def init():
            flat = dict(nnx.to_flat_state(nnx.state(factory())))
            return [flat[p].get_value() for p in wanted]

        return jax.jit(init)()  # XLA drops the initialisers of every other array.

    info = inspect(path, step=step, item=item)
    report = build_report(info, flatten_target(model), rename, transform)
    _apply(report, model, strict, missing, unexpected, cast, progress, initial_values)
    return model


def apply_report(
    report: LoadReport,
    target: Any,
    *,
    strict: bool = True,
    missing: MissingPolicy = "keep",
    unexpected: UnexpectedPolicy = "ignore",
    cast: bool = False,
    progress: Progress | None = None,
) -> LoadReport:
    """Restore into ``target`` from a report already built against it by :func:`compare`.

    The checkpoint is not looked up or inspected again: the report's ``info`` says where the
    arrays are. This is what the browser's Restore button calls.

    Args:
      report: a :class:`LoadReport` of ``target`` (``compare(path, target, ...)``).
      target, strict, missing, unexpected, cast, progress: as for :func:`restore`.

    Returns:
      The report of the restore, with each key's ``action``.

    Raises:
      InvalidArgumentError: the report was not built against ``target``'s keys.
      CheckpointError: as for :func:`restore`.
    """
    return _apply(report, target, strict, missing, unexpected, cast, progress, None)


def _apply(
    report: LoadReport,
    target: Any,
    strict: bool,
    missing: MissingPolicy,
    unexpected: UnexpectedPolicy,
    cast: bool,
    progress: Progress | None,
    fill_missing: Callable[[list[TargetLeaf]], list[Any]] | None,
) -> LoadReport:
    if missing not in _MISSING:
        raise InvalidArgumentError(f"missing must be one of {_MISSING}, got {missing!r}.")
    if unexpected not in _UNEXPECTED:
        raise InvalidArgumentError(f"unexpected must be one of {_UNEXPECTED}, got {unexpected!r}.")
    info = report.info
    if info is None:
        raise InvalidArgumentError(
            "This LoadReport carries no checkpoint to read from; build it with "
            "compare(path, target) or pass the path to restore()."
        )
    leaves = flatten_target(target)
    by_name = {_keypaths.join(leaf.path): leaf for leaf in leaves}
    wanted = {e.path for e in report.entries if e.status != "unexpected"}
    if wanted != set(by_name):
        raise InvalidArgumentError(
            f"The load report of {report.path} was built against another target (its keys "
            "differ from this target's); build it again with compare(path, target)."
        )
    _check_allowed(report, strict, missing, unexpected, cast, leaves, fill_missing)

    to_read = report.to_read
    arrays = read_arrays(
        info,
        [(_leaf_of(e), by_name[e.path]) for e in to_read],
        progress=progress,
        transforms=[e.transforms for e in to_read],
    )
    updates: list[tuple[TargetLeaf, Any]] = []
    actions: dict[str, Any] = {}
    for entry, value in zip(to_read, arrays, strict=True):
        updates.append((by_name[entry.path], value))
        actions[entry.path] = "cast" if entry.status == "dtype mismatch" else "restored"
    absent = [by_name[e.path] for e in report.entries if e.status == "missing"]
    if absent:
        if missing == "zeros":
            values = [_zeros(leaf) for leaf in absent]
        elif fill_missing is not None:
            values = list(fill_missing(absent))
        else:
            values = [None] * len(absent)
        for leaf, value in zip(absent, values, strict=True):
            actions[_keypaths.join(leaf.path)] = "zeros" if missing == "zeros" else "kept"
            if value is not None:
                updates.append((leaf, value))
    for entry in report.entries:
        if entry.status == "unexpected":
            actions[entry.path] = "ignored"

    # Everything is read and computed: only now is the target touched. Setting a Variable's
    # value cannot fail half-way for values whose shapes were checked above.
    _set_values(target, [(leaf, _as_scalar(leaf, value)) for leaf, value in updates])

    entries = tuple(dataclasses.replace(e, action=actions.get(e.path)) for e in report.entries)
    return dataclasses.replace(
        report,
        entries=entries,
        restored_arrays=len(to_read),
        restored_bytes=report.read_bytes,
    )


def _leaf_of(entry: KeyStatus) -> LeafInfo:
    leaf = entry.read_leaf
    assert leaf is not None, "a key to read has a checkpoint array"
    return leaf


def _set_values(target: Any, updates: list[tuple[TargetLeaf, Any]]) -> None:
    from flax import nnx

    # An nnx.State (or an nnx.data attribute) may hold plain arrays rather than Variables:
    # those are replaced in their container, through nnx.update.
    plain = {
        leaf.raw_path: value
        for leaf, value in updates
        if not isinstance(leaf.variable, nnx.Variable)
    }
    if plain:
        nnx.update(target, nnx.from_flat_state(plain))
    for leaf, value in updates:
        if isinstance(leaf.variable, nnx.Variable):
            leaf.variable.set_value(value)


def _as_scalar(leaf: TargetLeaf, value: Any) -> Any:
    """A Python scalar target gets a Python scalar back, whatever Orbax or jit returned."""
    if leaf.scalar_type is None:
        return value
    import numpy as np

    return leaf.scalar_type(np.asarray(value).item())


def _check_allowed(report, strict, missing, unexpected, cast, leaves, fill_missing) -> None:
    if strict:
        allowed = READ_STATUSES if cast else ("matched",)
        if any(e.status not in allowed for e in report.entries):
            raise mismatch_error(
                report,
                "pass strict=False to keep or zero missing keys and skip unexpected ones, "
                "rename=... for renamed layers, or cast=True for dtypes.",
            )
        return
    if report.shape_mismatched:
        raise mismatch_error(
            report,
            "shapes cannot be restored into another shape; change the model, or map the keys "
            "with rename={...}.",
        )
    if report.dtype_mismatched and not cast:
        raise mismatch_error(report, "pass cast=True to cast them, and every cast is reported.")
    if report.unexpected and unexpected == "error":
        raise mismatch_error(report, "pass unexpected='ignore' to skip them.")
    if missing == "keep" and fill_missing is None:
        abstract_names = {_keypaths.join(t.path) for t in leaves if t.abstract}
        abstract = [e.path for e in report.entries if e.status == "missing"]
        abstract = [p for p in abstract if p in abstract_names]
        if abstract:
            raise mismatch_error(
                report,
                "the target is abstract, so it has no values to keep for the missing keys; pass "
                "missing='zeros', or use load(path, factory) to initialise them.",
            )


def _zeros(leaf: TargetLeaf) -> Any:
    import jax
    import jax.numpy as jnp

    if leaf.scalar_type is not None:
        return leaf.scalar_type(0)
    if leaf.key_impl is not None:
        data = jnp.zeros(leaf.shape, leaf.dtype)
        return jax.random.wrap_key_data(data, impl=leaf.key_impl)
    value = jnp.zeros(leaf.shape, leaf.dtype)
    if leaf.sharding is not None:
        value = jax.device_put(value, leaf.sharding)
    return value


def read_arrays(
    info: CheckpointInfo,
    pairs: Sequence[tuple[LeafInfo, TargetLeaf]],
    *,
    progress: Progress | None = None,
    batch_bytes: int = BATCH_BYTES,
    transforms: Sequence[tuple[Transform, ...]] | None = None,
) -> list[Any]:
    """Read exactly the given checkpoint arrays, onto the targets' shardings and dtypes.

    Reads go to the checkpoint's layout in batches of about ``batch_bytes``. An array with
    ``transforms`` is read as stored onto the default device, passed through them, cast to
    the target's dtype and only then placed on the target's sharding.

    Raises:
      CorruptCheckpointError: the data cannot be read, or comes back in another shape.
    """
    if not pairs:
        if progress is not None:
            progress(0, 0)
        return []
    import jax

    location = info.location
    if location is None:
        raise InvalidArgumentError(
            f"The CheckpointInfo of {info.path} was not made by inspect(); pass the path."
        )
    default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    fns = list(transforms) if transforms is not None else [()] * len(pairs)
    requests = []
    for (leaf, target), chain in zip(pairs, fns, strict=True):
        # A key array's sharding describes the key, not its uint32 data: restore those locally.
        usable = target.key_impl is None and isinstance(target.sharding, jax.sharding.Sharding)
        requests.append(
            ReadRequest(
                stored_path=leaf.stored_path,
                shape=leaf.shape,
                dtype=leaf.dtype if chain else target.dtype,
                sharding=target.sharding if usable and not chain else default_sharding,
                scalar_type=target.scalar_type,
            )
        )
    total = sum(leaf.nbytes for leaf, _ in pairs)
    done = 0
    if progress is not None:
        progress(0, total)
    values: list[Any] = []
    for batch in read_batches(list(zip(pairs, requests, strict=True)), batch_bytes):
        values.extend(location.layout.read(location, [request for _, request in batch]))
        done += sum(leaf.nbytes for (leaf, _), _ in batch)
        if progress is not None:
            progress(done, total)
    out = []
    for (leaf, target), value, chain in zip(pairs, values, fns, strict=True):
        if target.scalar_type is not None:
            out.append(value)  # converted to the target's Python type when applied
            continue
        if chain:
            value = _transformed(info, leaf, target, value, chain)
        # Orbax hands typed PRNG keys back as keys already; check their data like any array.
        is_key = jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
        data = jax.random.key_data(value) if is_key else value
        if tuple(data.shape) != target.shape or str(data.dtype) != target.dtype:
            raise CorruptCheckpointError(
                f"Checkpoint at {info.item_dir} returned {leaf.name} as {data.dtype}"
                f"{tuple(data.shape)} instead of {target.dtype}{target.shape}; the target was "
                "left unchanged, restore the checkpoint from a copy or save it again."
            )
        if target.key_impl is not None and not is_key:
            value = jax.random.wrap_key_data(value, impl=target.key_impl)
        out.append(value)
    return out


def _transformed(
    info: CheckpointInfo, leaf: LeafInfo, target: TargetLeaf, value: Any, chain: tuple
) -> Any:
    """``value`` through the transform functions, in the target's dtype and on its sharding."""
    import jax

    # A failure here leaves the target unchanged: nothing has been applied yet.
    name = _keypaths.join(target.path)
    value = run_transforms(name, chain, value, abstract=False, where=f" from {info.path}")
    if str(value.dtype) != target.dtype:
        value = value.astype(target.dtype)  # allowed: the report said "dtype mismatch"
    if isinstance(target.sharding, jax.sharding.Sharding) and target.key_impl is None:
        value = jax.device_put(value, target.sharding)
    return value


def read_batches(
    items: Sequence[T], limit: int, size: Callable[[T], int] | None = None
) -> list[list[T]]:
    """Consecutive groups of ``items`` of at most ``limit`` bytes each (one big array makes a
    batch of its own): the unit of one ``Layout.read`` call.

    Args:
      items: what to read, in order.
      limit: bytes per batch.
      size: the bytes of one item; by default ``item[0][0].nbytes`` (restore's
        ``((leaf, target), request)`` pairs).
    """
    measure = size if size is not None else (lambda entry: entry[0][0].nbytes)
    batches: list[list[T]] = []
    total = 0
    for entry in items:
        nbytes = measure(entry)
        if not batches or total + nbytes > limit:
            batches.append([])
            total = 0
        batches[-1].append(entry)
        total += nbytes
    return batches
