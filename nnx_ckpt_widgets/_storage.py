"""Where checkpoint files live: a local folder today, a bucket through the same few calls.

Every layout reads through these functions only: one listing per folder (names of files and of
subfolders together), small files read whole, and the TensorStore key-value spec under which
Orbax keeps the arrays. A layout never touches ``os`` or ``pathlib`` itself, so a storage
backend added here serves every layout at once.

Local paths are ``pathlib.Path``; a URL keeps its scheme and is never turned into a local path.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from nnx_ckpt_widgets.errors import CheckpointNotFoundError, InvalidArgumentError

# Schemes Orbax 0.12 cannot read (only gs:// reaches a cloud driver; orbax issue 359).
_UNSUPPORTED_SCHEMES = ("s3://", "az://", "abfs://", "hdfs://", "http://", "https://")

AnyPath = Any  # pathlib.Path, or an etils.epath.Path for a URL


@dataclasses.dataclass(frozen=True)
class Listing:
    """One folder, listed once: the names of its files and of its subfolders."""

    path: AnyPath
    files: frozenset[str]
    dirs: frozenset[str]
    is_file: bool = False  # the path is a file (a .safetensors file, say), not a folder

    @property
    def names(self) -> frozenset[str]:
        return self.files | self.dirs

    def __contains__(self, name: object) -> bool:
        return name in self.files or name in self.dirs


def as_path(path: str | os.PathLike[str] | AnyPath) -> AnyPath:
    """The path object every layout works with, from what the user passed.

    Raises:
      InvalidArgumentError: the URL's scheme is one Orbax cannot read.
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
    for scheme in _UNSUPPORTED_SCHEMES:
        if text.startswith(scheme):
            raise InvalidArgumentError(
                f"Cannot read {text}: Orbax 0.12 reads only local folders and gs:// buckets "
                "(S3 support is orbax issue 359); copy the checkpoint to a local folder or "
                "mount the bucket as one, and pass that path."
            )
    return Path(text).expanduser()


def absolute(path: AnyPath) -> AnyPath:
    """``path`` made absolute, as Orbax requires; a URL already is."""
    return path.absolute() if isinstance(path, Path) else path


def listdir(path: AnyPath) -> Listing | None:
    """List ``path`` once; None when it is not a folder (missing, or a file).

    Raises:
      CheckpointNotFoundError: the folder exists but cannot be listed.
    """
    files: set[str] = set()
    dirs: set[str] = set()
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                (dirs if entry.is_dir() else files).add(entry.name)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        raise CheckpointNotFoundError(
            f"Cannot list checkpoint folder {path}: {err.strerror}; check its permissions."
        ) from err
    return Listing(path, frozenset(files), frozenset(dirs))


def exists(path: AnyPath) -> bool:
    return os.path.exists(path)


def is_file(path: AnyPath) -> bool:
    return os.path.isfile(path)


def read_bytes(path: AnyPath) -> bytes:
    """Read a small file whole (raises ``OSError``)."""
    return Path(path).read_bytes()


def kvstore(path: AnyPath) -> dict[str, Any]:
    """The TensorStore key-value store spec of a folder."""
    return {"driver": "file", "path": str(absolute(path))}


def read_json(file: AnyPath, what: str) -> Any:
    """Parse a small JSON file of a checkpoint.

    Raises:
      CorruptCheckpointError: it cannot be read or is not JSON.
    """
    import json

    from nnx_ckpt_widgets.errors import CorruptCheckpointError

    try:
        return json.loads(read_bytes(file))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"Checkpoint at {file.parent} is damaged: {file.name} ({what}) is not valid JSON; "
            "restore it from a copy or save it again."
        ) from err


def size(path: AnyPath) -> int:
    """A file's size in bytes (raises ``OSError``)."""
    return os.path.getsize(path)


def is_local(path: AnyPath) -> bool:
    """Whether ``path`` is on this machine's file system (not a URL)."""
    return isinstance(path, Path)


def read_into(path: AnyPath, offset: int, buffer: memoryview) -> int:
    """Fill ``buffer`` with the bytes at ``offset`` of a local file; returns how many it got
    (fewer at the file's end; raises ``OSError``)."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(offset)
        done = 0
        while done < len(buffer):
            got = handle.readinto(buffer[done:])
            if not got:
                break
            done += got
        return done


def read_range(path: AnyPath, offset: int, length: int) -> bytes:
    """Read ``length`` bytes at ``offset`` of a file, or fewer at its end (raises ``OSError``)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)
