"""What went wrong when Orbax, TensorStore, JAX or NumPy failed to read a checkpoint.

Those libraries raise ``ValueError``, ``RuntimeError`` or a bare ``Exception`` for everything:
a damaged chunk, a machine out of memory, a sharding that does not fit this machine. Calling
every one of them damage tells the user to throw away a good checkpoint, so each read site
hands the foreign error to :func:`read_error`, which looks through its whole chain (Orbax wraps
TensorStore's precise error in a vague one) and picks the class that says what happened:

=========================  ==========================================================
``StorageError``           a bucket that did not answer or refused access; a timeout
``ResourceExhaustedError`` ``MemoryError`` (NumPy's too), XLA ``RESOURCE_EXHAUSTED``,
                           no memory left for a thread
``ShardingMismatchError``  a shape a mesh axis does not divide, devices that are not
                           here, an abstract mesh with no concrete one to place it on
``CorruptCheckpointError`` TensorStore ``DATA_LOSS``, a file of the checkpoint gone,
                           undecodable or truncated bytes
``CheckpointError``        anything else: the read failed, and the cause is named, but
                           nothing says the checkpoint is damaged
=========================  ==========================================================

:func:`target_sharding` checks a read's sharding before anything is read, so a mismatch is
reported with the array's name rather than found half-way through a restore.
"""

from __future__ import annotations

import errno
import json
import re
from collections.abc import Iterator
from typing import Any

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets.errors import (
    CheckpointError,
    CorruptCheckpointError,
    ResourceExhaustedError,
    ShardingMismatchError,
    StorageError,
    first_line,
    is_bare,
)

__all__ = ["read_error", "reason", "target_sharding"]

# Words in the messages of XLA, TensorStore, Python and glibc; matched case-sensitively
# against every error of the chain.
_OUT_OF_MEMORY = (
    "RESOURCE_EXHAUSTED",
    "Out of memory",
    "out of memory",
    "can't start new thread",  # pthread_create: no memory left for the thread's stack
    "std::bad_alloc",
    "Cannot allocate memory",
)
_SHARDING = (
    "evenly divide",  # JAX: "should evenly divide the shape", "does not evenly divide"
    "should be divisible by",  # JAX 0.9: an output sharding that does not divide a dimension
    "incompatible devices",
    "not found in jax.local_devices",  # Orbax: a recorded device that is not here
    "available devices are different",  # Orbax: a recorded mesh of devices not here
    "jax.sharding.AbstractMesh",  # an nnx.eval_shape target with no concrete mesh
    "sharding passed to deserialization should be specified",
)
_DAMAGE = (
    "DATA_LOSS",
    "NOT_FOUND",  # TensorStore: a file the checkpoint's own index names is gone
    "OUT_OF_RANGE",  # a read past the end of a truncated file
    "Error decoding",
    "decompress",
    "Zstd",
    "zstd",
    "Truncated",
    "truncated",
    "checksum",
    "Unexpected end",
    "corrupt",
)
_UNAVAILABLE = ("DEADLINE_EXCEEDED", "UNAVAILABLE", "PERMISSION_DENIED")
# Python's own parsing errors: in metadata, they mean the file does not hold what Orbax wrote.
_PARSE_ERRORS = (
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    UnicodeDecodeError,
    RecursionError,
)
# TensorStore's errors begin with their status code: ``DATA_LOSS: Error decoding ...``.
_STATUS = re.compile(r"[A-Z][A-Z_]+: ")


def chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and every error it was raised from (``__cause__``, else ``__context__``)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def reason(err: BaseException) -> str:
    """The most precise line in an error's chain: Orbax wraps TensorStore's precise error in a
    vague one, but the innermost can also be a bare token (a ``StopIteration`` saying ``0``)."""
    for candidate in reversed(list(chain(err))):
        if not is_bare(candidate) and "<bound method" not in str(candidate):
            return first_line(candidate)
    return first_line(err)


def _found(err: BaseException, words: tuple[str, ...]) -> BaseException | None:
    for inner in chain(err):
        text = f"{type(inner).__name__}: {inner}"
        if any(word in text for word in words):
            return inner
    return None


def _why(matched: BaseException | None, err: BaseException) -> str:
    if matched is not None and not is_bare(matched) and "<bound method" not in str(matched):
        return first_line(matched)
    return reason(err)


def _out_of_memory(err: BaseException) -> BaseException | None:
    for inner in chain(err):
        if isinstance(inner, MemoryError) or (
            isinstance(inner, OSError) and inner.errno == errno.ENOMEM
        ):
            return inner
    return _found(err, _OUT_OF_MEMORY)


def _damage(err: BaseException, metadata: bool) -> BaseException | None:
    for inner in chain(err):
        if isinstance(inner, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
            return inner
        # A TensorStore error starts with its status code; a plain ValueError is Python's
        # (json and friends), which in metadata means the file is not what Orbax wrote.
        plain_value = isinstance(inner, ValueError) and not _STATUS.match(str(inner))
        if metadata and (isinstance(inner, _PARSE_ERRORS) or plain_value):
            return inner
    return _found(err, _DAMAGE)


def read_error(
    path: Any,
    err: BaseException,
    *,
    what: str = "Checkpoint",
    metadata: bool = False,
    unchanged: str = "any target was left unchanged",
    damaged: str = "restore it from a copy or save it again",
) -> CheckpointError:
    """The :class:`CheckpointError` that says what a foreign read error means.

    Args:
      path: the checkpoint (folder or file) being read; named in the message.
      err: what Orbax, TensorStore, JAX or NumPy raised.
      what: the message's subject, e.g. ``"Safetensors checkpoint"``.
      metadata: the read was of the checkpoint's metadata, where Python's own parsing errors
        (``KeyError``, ``TypeError``, a ``json`` error) mean the file is not what Orbax wrote.
      unchanged: what the failure did not change, as a clause of the message.
      damaged: the way out when the checkpoint is damaged.

    Returns:
      The error to raise ``from err``; ``err`` itself when it is already a CheckpointError.
    """
    if isinstance(err, CheckpointError):
        return err
    transport = _storage.storage_error(path, err)
    if isinstance(transport, CheckpointError):
        return transport
    where = f"{what} at {path}"
    if (inner := _out_of_memory(err)) is not None:
        return ResourceExhaustedError(
            f"{where} could not be read: the machine ran out of memory ({_why(inner, err)}); "
            f"the checkpoint is fine and {unchanged}, so free memory or read fewer arrays at "
            "once (restore part with strict=False, pick some with select=, or shard the target "
            "over more devices)."
        )
    if (inner := _found(err, _SHARDING)) is not None:
        return ShardingMismatchError(
            f"{where} could not be placed on the target's devices ({_why(inner, err)}); the "
            f"checkpoint is fine and {unchanged}, so restore onto shardings of this machine's "
            f"devices ({_devices()}) whose mesh axes divide each array's shape."
        )
    if (inner := _damage(err, metadata)) is not None:
        return CorruptCheckpointError(
            f"{where} is damaged: {_why(inner, err)}; {unchanged}, {damaged}."
        )
    if (inner := _found(err, _UNAVAILABLE)) is not None or any(
        isinstance(e, (TimeoutError, PermissionError)) for e in chain(err)
    ):
        return StorageError(
            f"Cannot read {path}: the storage refused or did not answer "
            f"({_why(inner, err)}); {unchanged}, check that the files are readable and the "
            "storage answers, then try again."
        )
    return CheckpointError(
        f"{where} could not be read ({reason(err)}); {unchanged}, and nothing shows that the "
        "checkpoint is damaged, so look at that cause before replacing the checkpoint."
    )


def _devices() -> str:
    try:
        import jax

        devices = jax.devices()
    except Exception:  # no backend at all: the message still stands without the count
        return "none found"
    platforms = sorted({d.platform for d in devices})
    return f"{len(devices)} {'/'.join(platforms)}"


def target_sharding(path: Any, name: str, shape: tuple[int, ...], sharding: Any) -> Any:
    """The sharding to read one array onto, checked before anything is read.

    A model built by ``nnx.eval_shape`` inside ``with jax.set_mesh(mesh)`` holds shardings on
    an *abstract* mesh (axis names and sizes, no devices), which Orbax cannot place arrays
    on: such a sharding is bound to the mesh set now, when it is the same mesh.

    Args:
      path: the checkpoint being read; named in the message.
      name: the array's key, named in the message.
      shape: the array's shape.
      sharding: the target's ``jax.sharding.Sharding``, or None.

    Returns:
      ``sharding``, or the same sharding on the concrete mesh that is set.

    Raises:
      ShardingMismatchError: no concrete mesh matches an abstract one, or the sharding does
        not split ``shape`` evenly.
    """
    import jax

    if not isinstance(sharding, jax.sharding.Sharding) or isinstance(
        sharding, jax.sharding.SingleDeviceSharding
    ):
        return sharding  # one device holds any shape
    mesh = getattr(sharding, "mesh", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        mesh, jax.sharding.AbstractMesh
    ):
        current = _concrete_mesh()
        if current is None or current.abstract_mesh != mesh:
            raise ShardingMismatchError(
                f"Checkpoint at {path}: the target's {name} is laid out on an abstract mesh "
                f"({_mesh_text(mesh)}) and no such mesh is set; the checkpoint is fine, so "
                "restore inside `with jax.set_mesh(mesh)`, or build the target with "
                "nnx.get_abstract_model(factory, mesh)."
            )
        sharding = jax.sharding.NamedSharding(
            current, sharding.spec, memory_kind=sharding.memory_kind
        )
    try:
        sharding.shard_shape(tuple(shape))
    except NotImplementedError:  # a sharding JAX cannot check ahead: Orbax will say
        return sharding
    except ValueError as err:  # jax's IndivisibleError
        raise ShardingMismatchError(
            f"Checkpoint at {path}: the target's {name} cannot be laid out as its sharding "
            f"says: {_uneven(sharding, shape, err)}; the checkpoint is fine, so shard it over "
            "mesh axes that divide its shape, or leave that dimension unsplit."
        ) from err
    return sharding


def _uneven(sharding: Any, shape: tuple[int, ...], err: BaseException) -> str:
    """``mesh(d=8) P('d', None) splits axis 0 of shape (12, 8) into 8 parts, which do not
    divide 12``, or JAX's own words."""
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
        return f"does not fit shape {tuple(shape)} ({first_line(err, 160)})"
    sizes = dict(mesh.shape)
    for axis, (size, part) in enumerate(zip(shape, spec, strict=False)):
        names = part if isinstance(part, (tuple, list)) else (part,)
        parts = 1
        for axis_name in names:
            parts *= sizes.get(axis_name, 1) if axis_name is not None else 1
        if size % parts:
            return (
                f"{_mesh_text(mesh)} {spec} splits axis {axis} of shape {tuple(shape)} into "
                f"{parts} parts, which do not divide {size}"
            )
    return f"{_mesh_text(mesh)} {spec} does not fit shape {tuple(shape)} ({first_line(err, 160)})"


def _concrete_mesh() -> Any:
    """The mesh of the enclosing ``jax.set_mesh``, or None."""
    import jax

    get_mesh = getattr(jax.sharding, "get_mesh", None)
    if get_mesh is None:
        return None
    mesh = get_mesh()
    return None if mesh is None or mesh.empty else mesh


def _mesh_text(mesh: Any) -> str:
    sizes = ",".join(f"{name}={size}" for name, size in dict(mesh.shape).items())
    return f"mesh({sizes})"
