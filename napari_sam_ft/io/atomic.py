"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename over ``path``: readers see the old file or the new one.

    The new file keeps the permissions of the file it replaces (a new file gets the usual 0666 - umask,
    not the private 0600 of a temporary file).
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(descriptor)
    temporary_path = Path(temporary)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
        write(temporary_path)
        with open(temporary_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary_path, mode)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise

