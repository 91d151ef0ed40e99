"""``restore`` and ``load``: put a checkpoint into a live model, all or nothing.

The decision is the plan's (:mod:`nnx_ckpt_widgets.plan`): one action per key, or a refusal,
made before anything is read. The reading is the layout's (for every Orbax layout, one
``PyTreeCheckpointHandler`` partial restore per batch over exactly the arrays that will be
used, so a lenient restore reads only those bytes). What this module adds is the transaction
around it: every new value is read, transformed and cast before the target is touched; the
commit then sets them all with Ctrl-C deferred, and puts every old value back if any set fails;
restores into one target are serialised. Casts are always reported, in the returned report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from nnx_ckpt_widgets import _failures, _keypaths, _untrusted
from nnx_ckpt_widgets.compare import (
    KeyStatus,
    LoadReport,
    TargetLeaf,
    Transform,
    build_report,
    flatten_target,
    run_transforms,
)
from nnx_ckpt_widgets.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    ShardingMismatchError,
    TargetError,
    TransformError,
    first_line,
)
from nnx_ckpt_widgets.layouts import ReadRequest, read_batches
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, inspect
from nnx_ckpt_widgets.plan import (
    MissingPolicy,
    RestoreOptions,
    RestorePlan,
    UnexpectedPolicy,
    make_plan,
)

__all__ = ["apply_plan", "apply_report", "load", "restore"]

Progress = Callable[[int, int], None]
# Arrays are read in batches of about this many bytes, so progress can be reported and a
# batch's temporary buffers stay bounded; one Orbax call per batch costs a few milliseconds.
BATCH_BYTES = 64 * 2**20


@_untrusted.no_gc()  # see _execute
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
    stack: Mapping[str, int] | None = None,
    unstack: Mapping[str, int] | None = None,
) -> LoadReport:
    """Restore a checkpoint into ``target`` in place; on any error, ``target`` is unchanged.

    Args:
      path: a checkpoint folder (``nnx.State`` or pure dict), a root of steps, a step folder,
        or safetensors (a file, or a folder of shards with their index); local or ``gs://``.
      target: a model, any NNX graph node such as ``nnx.Optimizer``, or an ``nnx.State``;
        concrete, or abstract from ``nnx.eval_shape`` (its Variables then receive arrays).
      step: under a root of steps, the step to restore; the latest intact one by default.
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
      stack: regex -> axis: per-layer checkpoint keys into one stacked target array (a
        scanned model); see :func:`compare`.
      unstack: regex -> axis: a stacked checkpoint array into per-layer target arrays, e.g.
        ``{r"^decoder/layers/(\\d+/)": 1}``; each stacked array is read once and sliced.

    Returns:
      The :class:`LoadReport`, with each key's ``action`` and the totals restored.

    Raises:
      CheckpointMismatchError: the checkpoint does not fit and the options do not allow it,
        or nothing in it matches the target.
      TransformError: a ``transform`` function raised.
      TargetError: the target refused a value; every value was put back.
      CheckpointError: another subclass when the checkpoint cannot be found or read.
    """
    options = RestoreOptions(strict, missing, unexpected, cast)
    info = inspect(path, step=step, item=item)
    # Locked from the comparison on: the plan is carried out on the very arrays it was made
    # from, flattened once (at 10^5 leaves, flattening a model is a fifth of a restore's time).
    with _target_lock(target):
        leaves = flatten_target(target)
        report = build_report(info, leaves, rename, transform, stack, unstack)
        return _execute(make_plan(report, options), target, progress, None, leaves)


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
    stack: Mapping[str, int] | None = None,
    unstack: Mapping[str, int] | None = None,
    return_report: bool = False,
) -> Any:
    """Build the model that ``factory`` makes, with its arrays taken from a checkpoint.

    The model is built abstractly (``nnx.eval_shape``), so no random initialisation is ever
    computed for restored arrays. With ``strict=False, missing="keep"``, keys the checkpoint
    lacks get the factory's own initial values, computed under ``jax.jit`` for those keys only.

    Args:
      path: as for :func:`restore`.
      factory: a function of no arguments that returns the model, e.g.
        ``lambda: MLP(4, rngs=nnx.Rngs(0))``.
      step, item, strict, missing, unexpected, rename, transform, cast, progress, stack,
        unstack: as for :func:`restore`.
      return_report: also return the :class:`LoadReport` of the restore (every cast, kept
        and ignored key), as Hugging Face's ``output_loading_info=True`` does.

    Returns:
      The model, with every array concrete; ``(model, report)`` with ``return_report=True``.

    Raises:
      CheckpointError: as for :func:`restore`.
    """
    from flax import nnx

    options = RestoreOptions(strict, missing, unexpected, cast, initialise=True)
    try:
        model = nnx.eval_shape(factory)
    except Exception as err:  # the caller's code: a sharding that does not fit, or a bug
        found = _failures.read_error(path, err)
        if isinstance(found, ShardingMismatchError):
            raise found from err
        raise InvalidArgumentError(
            f"The model factory given to load({str(path)!r}) failed ({type(err).__name__}: "
            f"{first_line(err, 160)}); it must take no arguments and return an NNX model."
        ) from err

    def initial_values(leaves: list[TargetLeaf]) -> list[Any]:
        import jax

        wanted = [leaf.raw_path for leaf in leaves]

        def init() -> list[Any]:
            flat = dict(nnx.to_flat_state(nnx.state(factory())))
            return [flat[p].get_value() for p in wanted]

        return jax.jit(init)()  # XLA drops the initialisers of every other array.

    info = inspect(path, step=step, item=item)
    leaves = flatten_target(model)  # nobody else holds the new model: no lock needed
    report = build_report(info, leaves, rename, transform, stack, unstack)
    report = _execute(make_plan(report, options), model, progress, initial_values, leaves)
    return (model, report) if return_report else model


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
    arrays are.

    Args:
      report: a :class:`LoadReport` of ``target`` (``compare(path, target, ...)``).
      target, strict, missing, unexpected, cast, progress: as for :func:`restore`.

    Returns:
      The report of the restore, with each key's ``action``.

    Raises:
      InvalidArgumentError: the report was not built against ``target``'s keys.
      CheckpointError: as for :func:`restore`.
    """
    plan = make_plan(report, RestoreOptions(strict, missing, unexpected, cast))
    return _execute(plan, target, progress, None)


def apply_plan(plan: RestorePlan, target: Any, *, progress: Progress | None = None) -> LoadReport:
    """Carry out a plan (``compare(path, target).plan(...)``) on the target it was made for.

    This is what the browser's Restore button calls: the status it showed is this plan.

    Args:
      plan: a :class:`~nnx_ckpt_widgets.plan.RestorePlan` of ``target``.
      target: the model the plan's report was built against.
      progress: as for :func:`restore`.

    Returns:
      The report of the restore, with each key's ``action``.

    Raises:
      InvalidArgumentError: the plan was made for another target (other keys, shapes or
        dtypes).
      CheckpointMismatchError: the plan is a refusal.
      CheckpointError: as for :func:`restore`.
    """
    return _execute(plan, target, progress, None)


# 10^5 leaves: each new array, Variable update and report entry is a long-lived object, and
# the only cycles are Flax's (to_flat_state leaves two small tuples a leaf, collected once the
# collector resumes). Running, its full collections walked the whole heap over and over: 6 s
# of a 17 s restore of 10^5 leaves (see _untrusted.no_gc).
@_untrusted.no_gc()
def _execute(
    plan: RestorePlan,
    target: Any,
    progress: Progress | None,
    fill_missing: Callable[[list[TargetLeaf]], list[Any]] | None,
    flat: list[TargetLeaf] | None = None,
) -> LoadReport:
    """Read what ``plan`` reads and commit it to ``target`` all at once; ``flat`` is
    ``flatten_target(target)`` when the caller already holds it under the target's lock."""
    report = plan.report
    info = report.info
    if info is None:
        raise InvalidArgumentError(
            "This LoadReport carries no checkpoint to read from; build it with "
            "compare(path, target) or pass the path to restore()."
        )
    with _target_lock(target):
        if flat is None:
            flat = flatten_target(target)
        leaves = [_placed_on_mesh(info.path, leaf) for leaf in flat]
        by_name = {_keypaths.join(leaf.path): leaf for leaf in leaves}
        planned = {
            e.path: (e.target_shape, e.target_dtype)
            for e in report.entries
            if e.status != "unexpected"
        }
        if planned != {name: (t.shape, t.dtype) for name, t in by_name.items()}:
            raise InvalidArgumentError(
                f"The restore plan of {report.path} was made for another target (its keys, "
                "shapes or dtypes differ from this target's); build it again with "
                "compare(path, target)."
            )
        if plan.refusal is not None:
            raise plan.error()

        to_read = plan.to_read
        plain = [e for e in to_read if e.layers is None]
        layered = [e for e in to_read if e.layers is not None]
        total = plan.read_bytes
        plain_bytes = sum(e.nbytes for e in plain)

        def plain_progress(done: int, _total: int) -> None:
            if progress is not None:
                progress(done, total)

        arrays = read_arrays(
            info,
            [(_leaf_of(e), by_name[e.path]) for e in plain],
            progress=plain_progress,
            transforms=[e.transforms for e in plain],
        )
        updates = [(by_name[e.path], v) for e, v in zip(plain, arrays, strict=True)]
        if layered:

            def layer_progress(done: int) -> None:
                if progress is not None:
                    progress(plain_bytes + done, total)

            values = _read_layered(info, layered, by_name, layer_progress)
            updates.extend((by_name[e.path], v) for e, v in zip(layered, values, strict=True))
        actions = {key.key: key.action for key in plan.keys}
        absent = [by_name[e.path] for e in report.entries if e.status == "missing"]
        if absent:
            if plan.options.missing == "zeros":
                updates.extend((leaf, _zeros(leaf)) for leaf in absent)
            elif fill_missing is not None:
                updates.extend(zip(absent, fill_missing(absent), strict=True))
        # Everything is read and computed: only now is the target touched, all at once.
        _commit(report.path, target, [(leaf, _as_scalar(leaf, v)) for leaf, v in updates])

    entries = tuple(dataclasses.replace(e, action=actions.get(e.path)) for e in report.entries)
    return dataclasses.replace(
        report,
        entries=entries,
        restored_arrays=len(to_read),
        restored_bytes=plan.read_bytes,
    )


# One lock per target (a model, or another graph node): two restores into the same target,
# from a cell and from the browser's button say, run one after the other, so the target ends
# up with all of one checkpoint or all of the other. Targets that cannot be weakly referenced
# share one lock.
_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_SHARED_LOCK = threading.RLock()


def _target_lock(target: Any) -> threading.RLock:
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(target)
            if lock is None:
                lock = _LOCKS[target] = threading.RLock()
        except TypeError:  # not hashable, or not weakly referenceable
            return _SHARED_LOCK
        return lock


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block ends, then deliver it.

    Only the main thread receives signals, so elsewhere there is nothing to defer. A Ctrl-C
    that arrives inside the block is handed to the handler that was there before (Python's
    raises KeyboardInterrupt, Jupyter's interrupts the cell) once the block is done.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def _commit(where: str, target: Any, updates: list[tuple[TargetLeaf, Any]]) -> None:
    """Set every value, or none: a failure puts every old value back."""
    old = [(leaf, _current(leaf)) for leaf, _ in updates]
    with _sigint_deferred():
        try:
            _set_values(target, updates)
        except BaseException as err:
            _put_back(target, old)
            if not isinstance(err, Exception):
                raise
            raise TargetError(
                f"Restoring {where} into the target failed while setting its values "
                f"({type(err).__name__}: {first_line(err, 160)}); every value was put back, "
                "so the target is as it was: check that it is the model the checkpoint was "
                "compared with."
            ) from err


def _placed_on_mesh(path: Any, leaf: TargetLeaf) -> TargetLeaf:
    """The leaf with its sharding checked and, on an abstract mesh (``nnx.eval_shape`` under
    ``jax.set_mesh``), bound to the mesh that is set: before anything is read, and once for
    the reads, the zero-fills and the transforms alike.

    Raises:
      ShardingMismatchError: the sharding cannot hold the array on this machine.
    """
    if leaf.key_impl is not None or leaf.sharding is None:
        return leaf  # a key array's sharding describes the key, not its data
    name = _keypaths.join(leaf.path)
    sharding = _failures.target_sharding(path, name, leaf.shape, leaf.sharding)
    return leaf if sharding is leaf.sharding else dataclasses.replace(leaf, sharding=sharding)


def _transform_input_sharding(target: TargetLeaf) -> Any:
    """Where a transform's input goes: replicated on the target's mesh when it has one (a
    transform that jits then runs on the devices of the mesh that is set), else one device."""
    import jax

    sharding = target.sharding
    if isinstance(sharding, jax.sharding.NamedSharding) and target.key_impl is None:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _current(leaf: TargetLeaf) -> Any:
    from flax import nnx

    if isinstance(leaf.variable, nnx.Variable):
        return leaf.variable.get_raw_value()
    return leaf.variable  # a plain array in its container: flatten_target holds the value


def _put_back(target: Any, old: list[tuple[TargetLeaf, Any]]) -> None:
    """Undo a partial :func:`_set_values`: raw values, so no hook runs twice."""
    from flax import nnx

    plain = {leaf.raw_path: v for leaf, v in old if not isinstance(leaf.variable, nnx.Variable)}
    if plain:
        nnx.update(target, nnx.from_flat_state(plain))
    for leaf, value in old:
        if isinstance(leaf.variable, nnx.Variable):
            leaf.variable.set_raw_value(value)


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

    location = info.located()
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
                sharding=(
                    _transform_input_sharding(target)
                    if chain
                    else target.sharding
                    if usable
                    else default_sharding
                ),
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
        if (tuple(data.shape) != target.shape or str(data.dtype) != target.dtype) and chain:
            raise TransformError(
                f"transform of {_keypaths.join(target.path)!r} from {info.path} returned "
                f"{data.dtype}{tuple(data.shape)} on the real array, not the "
                f"{target.dtype}{target.shape} it gave on its shape; make the function depend "
                "only on the array's shape and dtype."
            )
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


def _read_layered(
    info: CheckpointInfo,
    entries: Sequence[KeyStatus],
    targets: Mapping[str, TargetLeaf],
    progress: Callable[[int], None],
    batch_bytes: int = BATCH_BYTES,
) -> list[Any]:
    """The values of stacked and unstacked keys, in ``entries``' order.

    Each stored array is read once, as stored, into host memory: a stacked array is sliced
    for all its layers as soon as it arrives (``unstack``), and the layers of one target are
    stacked as soon as they arrive (``stack``). Reads go in batches of about ``batch_bytes``
    of stored arrays, so host memory holds one batch besides the values already made.
    """

    location = info.located()
    # Group the entries by the stored arrays they need: all layers of one stacked array
    # (unstack) are one group, so that array is read once.
    groups: dict[tuple, list[int]] = {}
    for i, entry in enumerate(entries):
        assert entry.layers is not None
        key = tuple(leaf.stored_path for leaf in entry.layers.parts)
        groups.setdefault(key, []).append(i)

    def group_bytes(item: tuple[tuple, list[int]]) -> int:
        layers = entries[item[1][0]].layers
        assert layers is not None
        return sum(leaf.nbytes for leaf in layers.parts)

    values: list[Any] = [None] * len(entries)
    done = 0
    progress(0)
    for batch in read_batches(list(groups.items()), batch_bytes, group_bytes):
        leaves: dict[tuple, LeafInfo] = {}
        for _, members in batch:
            layers = entries[members[0]].layers
            assert layers is not None
            leaves.update((leaf.stored_path, leaf) for leaf in layers.parts)
        requests = [
            ReadRequest(stored_path=leaf.stored_path, shape=leaf.shape, dtype=leaf.dtype, host=True)
            for leaf in leaves.values()
        ]
        read = dict(zip(leaves, location.layout.read(location, requests), strict=True))
        for _, members in batch:
            for i in members:
                entry, layers = entries[i], entries[i].layers
                assert layers is not None
                value = layers.combine([read[leaf.stored_path] for leaf in layers.parts])
                values[i] = _placed(info, entry, targets[entry.path], value)
        del read
        done += sum(leaf.nbytes for leaf in leaves.values())
        progress(done)
    return values


def _placed(info: CheckpointInfo, entry: KeyStatus, target: TargetLeaf, value: Any) -> Any:
    """A host array made of layers, through the key's transforms, in the target's dtype and
    on its sharding."""
    import jax
    import jax.numpy as jnp

    if entry.transforms:
        value = run_transforms(
            entry.path,
            entry.transforms,
            jax.device_put(value, _transform_input_sharding(target)),
            abstract=False,
            where=f" from {info.path}",
        )
    if tuple(value.shape) != target.shape:
        raise TransformError(
            f"transform of {entry.path!r} from {info.path} returned {value.dtype}"
            f"{tuple(value.shape)} on the real array, not the {target.dtype}{target.shape} it "
            "gave on its shape; make the function depend only on the array's shape and dtype."
        )
    if str(value.dtype) != target.dtype:
        value = value.astype(target.dtype)  # allowed: the plan said "cast"
    if target.key_impl is not None:
        return jax.random.wrap_key_data(jnp.asarray(value), impl=target.key_impl)
    if isinstance(target.sharding, jax.sharding.Sharding):
        return jax.device_put(value, target.sharding)
    return jnp.asarray(value)
