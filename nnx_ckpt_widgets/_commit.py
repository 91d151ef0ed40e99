"""convert's output in a bucket: written under a hidden staging prefix, then committed.

A bucket has no rename, and no way to make several objects appear at once. So the output is
written beside ``dst`` under ``.NAME.<random>.converting/out/`` (a name no reader takes for a
checkpoint), and only once it is complete is it copied into ``dst`` object by object, inside
the bucket service, in an order that keeps every moment of the copy unreadable or complete:

1. the data no reader starts from (Orbax's ``ocdbt.process_0/d/...`` chunks, ``config.json``);
2. with ``overwrite``, the old output's objects that a reader starts from (and the old objects
   the new output replaces) are moved aside into the staging prefix, the most decisive first
   (``commit_success.txt``, ``_CHECKPOINT_METADATA``, ... ``_METADATA``; the safetensors
   index, then the ``.safetensors`` files), so old and new are never mixed;
3. the new output's remaining objects, the most decisive last: safetensors shards, then
   ``model.safetensors.index.json``; Orbax's ``array_metadatas``, ``_sharding``,
   ``manifest.ocdbt``, ``_METADATA``, ``orbax.checkpoint``, ``_CHECKPOINT_METADATA``, and
   ``commit_success.txt`` last;
4. the old objects the new output does not use are deleted, then the staging prefix.

A failure anywhere removes what this call copied into ``dst`` and puts back what it moved
aside; the staging prefix is deleted. A process killed during the copy (seconds: the bytes
are not sent again) leaves what the order above allows; :func:`nnx_ckpt_widgets.convert`'s
docstring says what, and which readers accept it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

from nnx_ckpt_widgets import _bucket
from nnx_ckpt_widgets.errors import CheckpointError, InvalidArgumentError, StorageError, first_line

STAGING_SUFFIX = ".converting"
# Names a reader starts from, least decisive first; everything else is data.
_ORBAX_ENTRIES = (
    "_sharding",
    "manifest.ocdbt",
    "_METADATA",
    "orbax.checkpoint",
    "_CHECKPOINT_METADATA",
    "commit_success.txt",
)


class _LeftInDst(StorageError):
    """A commit failed part-way and could not be undone: the message says what is left."""


def _rank(name: str) -> int | None:
    """Where an object a reader starts from comes in the copy (higher: later); None for
    data."""
    parts = name.split("/")
    base = parts[-1]
    if base.endswith(".safetensors.index.json"):
        return 2 + len(_ORBAX_ENTRIES)
    if base.endswith(".safetensors"):
        return 0
    if "array_metadatas" in parts[:-1]:
        return 1
    if base in _ORBAX_ENTRIES:
        return 2 + _ORBAX_ENTRIES.index(base)
    return None


def _order(name: str) -> tuple[int, int, str]:
    """Sort key of the copy: data first, then by rank, the deeper first within a rank (Orbax's
    per-process ``manifest.ocdbt`` before the top one, ``state/_METADATA`` before the
    checkpoint's ``_CHECKPOINT_METADATA``)."""
    rank = _rank(name)
    return (-1 if rank is None else rank, -name.count("/"), name)


def _at(base: Any, name: str) -> Any:
    return base / name if name else base


def exists(dst: Any) -> bool:
    """Whether ``dst`` exists in the bucket: an object of that name, or any object under
    ``dst/``."""
    return bool(_bucket.objects(dst))


@contextlib.contextmanager
def staged(dst: Any, overwrite: bool) -> Iterator[Any]:
    """A staging path beside ``dst`` (an ``etils.epath.Path`` of a ``gs://`` URL) to write the
    output into; committed into ``dst`` when the block completes, deleted in any case.

    Raises:
      InvalidArgumentError: ``dst`` appeared while the output was written (without
        ``overwrite``).
      StorageError: the bucket failed; nothing of this call is left at ``dst``.
    """
    staging = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}{STAGING_SUFFIX}"
    try:
        yield staging / "out"
        _commit(staging, dst, overwrite)
    except BaseException as err:
        cleaned = _remove_all(staging)
        # Errors that are not the bucket's (a transform, the source) say enough as they are.
        ours = isinstance(err, CheckpointError) and not isinstance(err, StorageError)
        if (
            not cleaned
            and isinstance(err, Exception)
            and not ours
            and not isinstance(err, _LeftInDst)
        ):
            # The bucket is gone: say so, and what may be left.
            raise StorageError(
                f"Writing {dst} failed ({first_line(err, 160)}); nothing was committed to "
                f"{dst}, but the hidden staging prefix {staging}/ may remain: delete it with "
                f"`gcloud storage rm -r {staging}` once the bucket answers."
            ) from err
        if isinstance(err, CheckpointError) or not isinstance(err, Exception):
            raise  # ours (a transform, the source, the bucket), or Ctrl-C
        transport = _bucket.error(dst, err, "write")
        raise (
            transport
            or StorageError(
                f"Writing {dst} failed ({type(err).__name__}: {first_line(err, 160)}); nothing "
                "was left there (the staging prefix was removed): check the bucket, or choose "
                "another destination."
            )
        ) from err
    if not _remove_all(staging):
        raise StorageError(
            f"{dst} was written and is complete, but its hidden staging prefix {staging}/ could "
            f"not be deleted; delete it with `gcloud storage rm -r {staging}`."
        )


def _remove_all(prefix: Any) -> bool:
    """Delete every object under ``prefix``; False when the bucket did not let us."""
    try:
        _bucket.remove([_at(prefix, n) for n in _bucket.objects(prefix)])
    except Exception:
        return False
    return True


def _commit(staging: Any, dst: Any, overwrite: bool) -> None:
    """Copy ``staging/out`` into ``dst`` in the order of the module docstring."""
    out, aside = staging / "out", staging / "old"
    new = sorted(_bucket.objects(out), key=_order)
    old = _bucket.objects(dst)
    if old and not overwrite:
        raise InvalidArgumentError(
            f"dst {dst} appeared while converting; pass overwrite=True to replace it, or choose "
            "another destination."
        )
    replaced = set(new)
    first = [n for n in new if _rank(n) is None and n not in old]
    later = [n for n in new if n not in first]
    moving = sorted(
        (n for n in old if n in replaced or _rank(n) is not None), key=_order, reverse=True
    )
    copied: list[str] = []
    moved: list[str] = []
    try:
        for name in first:
            _bucket.copy(_at(out, name), _at(dst, name))
            copied.append(name)
        for name in moving:
            _bucket.copy(_at(dst, name), _at(aside, name))
            _bucket.remove([_at(dst, name)])
            moved.append(name)
        for name in later:
            _bucket.copy(_at(out, name), _at(dst, name))
            copied.append(name)
    except BaseException as err:
        # Back as it was: ours out (the most decisive first), the old objects in (the most
        # decisive last); when the bucket is gone as well, the error says what is left.
        try:
            _bucket.remove([_at(dst, n) for n in sorted(copied, key=_order, reverse=True)])
            for name in reversed(moved):
                _bucket.copy(_at(aside, name), _at(dst, name))
            undone = True
        except Exception:
            undone = False
        if not undone:
            raise _LeftInDst(
                f"Committing {dst} failed after {len(copied)} of {len(new)} objects "
                f"({first_line(err, 160)}), and they could not be taken back: {dst} holds part "
                "of the new output, which no reader takes for a complete checkpoint (the "
                "objects readers start from come last)"
                + (f", and {len(moved)} objects of the old output are in {aside}/" if moved else "")
                + f"; delete {dst} and {staging} with `gcloud storage rm -r` and convert again."
            ) from err
        raise
    stale = [n for n in old if n not in replaced and n not in moving]
    try:
        _bucket.remove([_at(dst, n) for n in stale])
    except StorageError as err:
        raise StorageError(
            f"{dst} was written and is complete, but {len(stale)} old objects it does not use "
            f"could not be deleted ({first_line(err, 160)}); delete them with "
            "`gcloud storage rm`, or convert again with overwrite=True."
        ) from err
