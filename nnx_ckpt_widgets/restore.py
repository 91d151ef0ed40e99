"""``restore`` and ``load``: put a checkpoint into a live model, all or nothing.

The work is Orbax's: one ``PyTreeCheckpointHandler`` restore with ``partial_restore=True`` over
exactly the arrays that will be used, so a lenient restore reads only those bytes. What this
module adds is the bookkeeping around it: a report first, every new value computed before the
target is touched (a failed restore leaves it bit-for-bit as it was), typed PRNG keys, casts
that are always reported, and errors that say what to do.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

from nnx_ckpt_widgets._locate import locate
from nnx_ckpt_widgets.compare import (
    KeyStatus,
    LoadReport,
    TargetLeaf,
    build_report,
    flatten_target,
    mismatch_error,
)
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    InvalidArgumentError,
    first_line,
)
from nnx_ckpt_widgets.metadata import CheckpointInfo, LeafInfo, info_from_location

__all__ = ["load", "restore"]

MissingPolicy = Literal["keep", "zeros"]
UnexpectedPolicy = Literal["ignore", "error"]
_MISSING = ("keep", "zeros")
_UNEXPECTED = ("ignore", "error")


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
    cast: bool = False,
) -> LoadReport:
    """Restore a checkpoint into ``target`` in place; on any error, ``target`` is unchanged.

    Args:
      path: a checkpoint folder (``nnx.State`` or pure dict), a ``CheckpointManager`` root, or
        a step folder.
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
      cast: allow casting arrays whose dtype differs from the target's; each cast is listed
        in the report.

    Returns:
      The :class:`LoadReport`, with each key's ``action`` and the totals restored.

    Raises:
      CheckpointMismatchError: the checkpoint does not fit and the options do not allow it.
      CheckpointError: another subclass when the checkpoint cannot be found or read.
    """
    return _restore(
        path, target, step, item, strict, missing, unexpected, rename, cast, fill_missing=None
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
    cast: bool = False,
) -> Any:
    """Build the model that ``factory`` makes, with its arrays taken from a checkpoint.

    The model is built abstractly (``nnx.eval_shape``), so no random initialisation is ever
    computed for restored arrays. With ``strict=False, missing="keep"``, keys the checkpoint
    lacks get the factory's own initial values, computed under ``jax.jit`` for those keys only.

    Args:
      path: as for :func:`restore`.
      factory: a function of no arguments that returns the model, e.g.
        ``lambda: MLP(4, rngs=nnx.Rngs(0))``.
      step, item, strict, missing, unexpected, rename, cast: as for :func:`restore`.

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

    _restore(
        path,
        model,
        step,
        item,
        strict,
        missing,
        unexpected,
        rename,
        cast,
        fill_missing=initial_values,
    )
    return model


def _restore(
    path,
    target,
    step,
    item,
    strict,
    missing,
    unexpected,
    rename,
    cast,
    fill_missing: Callable[[list[TargetLeaf]], list[Any]] | None,
) -> LoadReport:
    if missing not in _MISSING:
        raise InvalidArgumentError(f"missing must be one of {_MISSING}, got {missing!r}.")
    if unexpected not in _UNEXPECTED:
        raise InvalidArgumentError(f"unexpected must be one of {_UNEXPECTED}, got {unexpected!r}.")
    info = info_from_location(locate(path, step=step, item=item))
    leaves = flatten_target(target)
    report = build_report(info, leaves, rename)
    _check_allowed(report, strict, missing, unexpected, cast, leaves, fill_missing)

    by_name = {"/".join(leaf.path): leaf for leaf in leaves}
    to_read = [e for e in report.entries if e.status in ("matched", "dtype mismatch")]
    arrays = _read_arrays(info, [(e.checkpoint, by_name[e.path]) for e in to_read])

    updates: list[tuple[TargetLeaf, Any]] = []
    actions: dict[str, str] = {}
    for entry, value in zip(to_read, arrays):
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
        for leaf, value in zip(absent, values):
            name = "/".join(leaf.path)
            actions[name] = "zeros" if missing == "zeros" else "kept"
            if value is not None:
                updates.append((leaf, value))
    for entry in report.entries:
        if entry.status == "unexpected":
            actions[entry.path] = "ignored"

    # Everything is read and computed: only now is the target touched. Setting a Variable's
    # value cannot fail half-way for values whose shapes were checked above.
    _apply(target, [(leaf, _as_scalar(leaf, value)) for leaf, value in updates])

    entries = tuple(_with_action(e, actions.get(e.path)) for e in report.entries)
    return LoadReport(
        path=report.path,
        format=report.format,
        entries=entries,
        step=report.step,
        item=report.item,
        restored_arrays=len(to_read),
        restored_bytes=sum(e.checkpoint.nbytes for e in to_read),
    )


def _apply(target: Any, updates: list[tuple[TargetLeaf, Any]]) -> None:
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


def _with_action(entry: KeyStatus, action: str | None) -> KeyStatus:
    import dataclasses

    return dataclasses.replace(entry, action=action)


def _check_allowed(report, strict, missing, unexpected, cast, leaves, fill_missing) -> None:
    if strict:
        allowed = ("matched", "dtype mismatch") if cast else ("matched",)
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
        abstract = [e.path for e in report.entries if e.status == "missing"]
        abstract = [
            p for p in abstract if any("/".join(t.path) == p and t.abstract for t in leaves)
        ]
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


def _read_arrays(info: CheckpointInfo, pairs: list[tuple[LeafInfo, TargetLeaf]]) -> list[Any]:
    """Read exactly the given checkpoint arrays, onto the targets' shardings and dtypes."""
    if not pairs:
        return []
    import jax
    import orbax.checkpoint as ocp

    default_sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    item: dict = {}
    restore_args: dict = {}
    for leaf, target in pairs:
        if target.scalar_type is not None:
            # Python scalars go through Orbax's scalar handler, which takes no sharding.
            _nest(item, leaf.stored_path, target.scalar_type(0))
            _nest(restore_args, leaf.stored_path, ocp.RestoreArgs())
            continue
        # A key array's sharding describes the key, not its uint32 data: restore those locally.
        usable = target.key_impl is None and _is_sharding(target.sharding)
        sharding = target.sharding if usable else default_sharding
        dtype = target.dtype
        _nest(item, leaf.stored_path, jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding))
        _nest(restore_args, leaf.stored_path, ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype))
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(
                info.item_dir.absolute(),  # Orbax rejects relative paths; inspect accepts them
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
        values = [_get(restored, leaf.stored_path) for leaf, _ in pairs]
    except CheckpointError:
        raise
    except Exception as err:  # Orbax and TensorStore raise many types for damaged data.
        raise CorruptCheckpointError(
            f"Checkpoint at {info.item_dir} could not be read: {_reason(err)}; "
            "the target was left unchanged, restore the checkpoint from a copy or save it again."
        ) from err
    out = []
    for (leaf, target), value in zip(pairs, values):
        if target.scalar_type is not None:
            out.append(value)  # converted to the target's Python type when applied
            continue
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


def _reason(err: BaseException) -> str:
    """The most precise line in an error's chain: Orbax wraps TensorStore's precise error in a
    vague one, but the innermost can also be a bare token (a ``StopIteration`` saying ``0``)."""
    chain, seen = [err], {id(err)}
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None:
        if id(inner) in seen:
            break
        seen.add(id(inner))
        chain.append(inner)
    for candidate in reversed(chain):
        text = str(candidate).strip()
        if " " in text.split("\n", 1)[0] and "<bound method" not in text:
            return first_line(candidate)
    return first_line(err)


def _is_sharding(sharding: Any) -> bool:
    import jax

    return isinstance(sharding, jax.sharding.Sharding)


def _nest(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        try:
            tree = tree[part]
        except (KeyError, TypeError) as err:
            raise CheckpointMismatchError(
                f"Orbax returned no value for {'/'.join(path)}; the target was left unchanged."
            ) from err
    return tree
