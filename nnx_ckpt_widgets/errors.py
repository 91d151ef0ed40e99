"""The exceptions this package raises.

Every error is a :class:`CheckpointError`. Each message is one sentence that names the path,
what is wrong and the way out; the underlying Orbax or TensorStore error is chained as
``__cause__`` so nothing is hidden, but it is never the user's only explanation.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "IncompleteCheckpointError",
    "InvalidArgumentError",
    "ItemSelectionError",
    "ResourceExhaustedError",
    "ShardingMismatchError",
    "StorageError",
    "TargetError",
    "TransformError",
    "UnknownLayoutError",
    "UnsafeFormatError",
]


def _first(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def is_bare(err: BaseException) -> bool:
    """True when an error's first line is a bare token (a ``KeyError(0)`` says only ``0``)."""
    return " " not in _first(err)


def first_line(err: BaseException, width: int | None = 200) -> str:
    """The first line of an error's message, named by its type when the message alone is a bare
    token, cut at ``width`` characters unless None."""
    text = _first(err)
    if is_bare(err):
        text = f"{type(err).__name__} {text}".strip()
    return text if width is None else text[:width]


class CheckpointError(Exception):
    """Base class of every error raised by nnx_ckpt_widgets."""

    def __init__(self, message: str = ""):
        # One line, always: a key or folder name from a checkpoint may hold a newline.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist, or holds no checkpoint (or not the asked step or item)."""


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint was not finished: an interrupted save left a tmp folder or no commit."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint of a layout this package knows is damaged: its metadata or array data
    cannot be read."""


class UnknownLayoutError(CheckpointError):
    """The folder holds files, but in no layout this package knows; the message names what
    was found and the layouts that are supported."""


class UnsafeFormatError(UnknownLayoutError):
    """A format this package never reads because loading it runs code: PyTorch pickles
    (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) and ``.npz`` files holding object arrays. The
    message names the format and the way out (convert it to safetensors first)."""


class ItemSelectionError(CheckpointError):
    """A step holds several items and ``item=`` did not pick exactly one of them."""


class StorageError(CheckpointError):
    """The storage under a checkpoint cannot be used: a bucket that does not answer in time,
    refuses the credentials, or needs a package that is not installed. The message names the
    URL; nothing was changed."""


class InvalidArgumentError(CheckpointError, ValueError, TypeError):
    """An argument is not one this package accepts (a bad policy, pattern or target)."""


class TransformError(InvalidArgumentError):
    """A ``transform`` function raised, or returned something that does not fit the target:
    a bug in the caller's function, not in the checkpoint."""


class TargetError(CheckpointError):
    """The target cannot take the values: a Variable refused ``set_value``, or the target
    changed while it was being restored. Nothing of the restore was kept."""


class ResourceExhaustedError(CheckpointError, MemoryError):
    """The machine ran out of memory (host or device) while reading or placing arrays; the
    checkpoint is fine. Restore fewer arrays at a time, or onto a sharded target."""


class ShardingMismatchError(CheckpointError):
    """The devices, mesh or sharding asked for do not fit this machine or the array (a
    sharding naming devices that are not here, or a shape a mesh axis does not divide); the
    checkpoint is fine. Restore onto a target built for this machine's devices."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not fit the target; ``.report`` holds the full load report (a
    :class:`~nnx_ckpt_widgets.compare.LoadReport`; typed loosely so this module, the bottom of
    the package, imports nothing of ours)."""

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report
