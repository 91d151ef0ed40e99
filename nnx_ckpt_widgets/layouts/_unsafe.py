"""Formats this package refuses because loading them runs code: PyTorch pickles and ``.npz``
files holding object arrays.

Nothing here unpickles. A file is judged by its name plus its first bytes only: the zip
header that ``torch.save`` has written since PyTorch 1.6, or a pickle's protocol opcode
(``0x80`` and the protocol number) that older ``torch.save`` and plain ``pickle`` write. An
``.npz`` is a zip of ``.npy`` files; each member's header is parsed by NumPy's own header
reader (a literal, never code), and an object dtype there means its data is a pickle.
"""

from __future__ import annotations

import zipfile

from nnx_ckpt_widgets import _storage
from nnx_ckpt_widgets._storage import AnyPath, Listing
from nnx_ckpt_widgets.errors import UnsafeFormatError

# PyTorch's spellings: Transformers' pytorch_model.bin, torch.save's .pt/.pth, Lightning's .ckpt.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
NPZ_SUFFIX = ".npz"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = 0x80
# .npy headers are short; a member whose header is longer than this is not read further.
_NPY_HEADER_LIMIT = 1 << 16
_TORCH_WAY_OUT = (
    "convert it to safetensors first, where PyTorch is installed and the file is trusted "
    "(safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors'), "
    "or the Hugging Face Hub's convert space), then pass the .safetensors file or its folder"
)
_NPZ_WAY_OUT = (
    "convert it to safetensors first, where the file is trusted (np.load(path, "
    "allow_pickle=True), then safetensors.numpy.save_file of its numeric arrays), then pass "
    "the .safetensors file"
)


def unsafe_format(path: AnyPath) -> str | None:
    """What unsafe format the file at ``path`` is in (``PyTorch pickle (zip)``), or None.

    Only the name and a few header bytes are read; an unreadable file is None (the caller's
    usual error then applies).
    """
    name = path.name.lower()
    try:
        if name.endswith(PICKLE_SUFFIXES):
            head = _storage.read_range(path, 0, 4)
            if head.startswith(_ZIP_MAGIC):
                return "a PyTorch checkpoint (torch.save's zip of pickles)"
            if len(head) >= 2 and head[0] == _PICKLE_PROTO and 2 <= head[1] <= 5:
                return f"a PyTorch checkpoint in pickle format (protocol {head[1]})"
            return None
        if name.endswith(NPZ_SUFFIX) and _storage.is_local(path):
            return _object_npz(path)
    except OSError:
        return None
    return None


def _object_npz(path: AnyPath) -> str | None:
    import numpy as np

    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    continue
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    reader = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    _, _, dtype = reader(handle, max_header_size=_NPY_HEADER_LIMIT)
                if dtype.hasobject:
                    return (
                        f"a NumPy .npz archive whose array {member.filename[:-4]!r} holds "
                        "Python objects (stored as pickles)"
                    )
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None
    return None


def refuse(path: AnyPath, fmt: str) -> UnsafeFormatError:
    """The error for a file in an unsafe format: what it is, why not, and the way out."""
    way_out = _NPZ_WAY_OUT if path.name.lower().endswith(NPZ_SUFFIX) else _TORCH_WAY_OUT
    return UnsafeFormatError(
        f"Will not read {path}: it is {fmt}, and loading a pickle runs whatever code the file "
        f"holds; {way_out}."
    )


def unsafe_files(listing: Listing) -> list[tuple[str, str]]:
    """``(name, format)`` of every file of a folder in an unsafe format, sorted by name."""
    found = []
    for name in sorted(listing.files):
        if name.lower().endswith((*PICKLE_SUFFIXES, NPZ_SUFFIX)):
            fmt = unsafe_format(listing.path / name)
            if fmt is not None:
                found.append((name, fmt))
    return found


def ignored_notes(listing: Listing) -> tuple[str, ...]:
    """One note per unsafe file left unread beside the checkpoint that was read."""
    return tuple(
        f"{name} was ignored: it is {fmt}, and loading a pickle runs code; the checkpoint "
        "beside it was read instead."
        for name, fmt in unsafe_files(listing)
    )
