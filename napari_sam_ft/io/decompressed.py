"""Large gzip-compressed files, decompressed once, streaming, into a cache file that is then memory-mapped.

nibabel reads a ``.nii.gz`` whole into memory (and a 512x512x600 CT is 300 MiB of int16 before any copy);
reading the cached uncompressed copy as a memory map keeps only the slices in use resident, and reopening the
same file costs nothing. The copy is keyed by the compressed file's resolved path, size and modification time,
so an edited file is decompressed anew; the folder keeps the most recently used copies under a byte budget.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import warnings
import zlib
from pathlib import Path

from .atomic import atomic_write
from .errors import VolumeError

GZIP_MAGIC = b"\x1f\x8b"
# A compressed file whose voxel data is at least this large is decompressed to the cache (smaller ones are
# read into memory as before: it is fast and avoids the disk write).
DECOMPRESS_TO_CACHE_BYTES = 64 << 20
CACHE_BUDGET_BYTES = 8 << 30
CHUNK_BYTES = 8 << 20  # streaming buffer: the only memory decompression takes


def cache_folder() -> Path:
    """``$NAPARI_SAM_FT_CACHE/decompressed`` (beside the embeddings), or the user cache folder's."""
    override = os.environ.get("NAPARI_SAM_FT_CACHE")
    if override:
        return Path(override) / "decompressed"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-sam-ft")) / "decompressed"


def is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == GZIP_MAGIC
    except OSError:
        return False


def cache_key(path: Path) -> str:
    """Which compressed file, in which version: resolved path, size and modification time."""
    status = path.stat()
    text = f"{path.resolve()}|{status.st_size}|{status.st_mtime_ns}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def decompressed_copy(path: str | os.PathLike, suffix: str) -> Path | None:
    """The cached uncompressed copy of gzip file ``path`` (made now if missing), or None if it cannot be made.

    ``suffix`` names the copy's format (e.g. ".nii"). A damaged gzip stream raises ``VolumeError``; a cache
    folder that cannot be written (read-only, full disk) warns and returns None, so the caller reads the file
    into memory instead.
    """
    path = Path(path)
    folder = cache_folder()
    target = folder / f"{cache_key(path)}{suffix}"
    if target.exists():
        os.utime(target)  # most recently used: kept longest
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _evict(folder, keep_free=_uncompressed_size_hint(path))
        atomic_write(target, lambda temporary: _decompress(path, temporary))
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise VolumeError(f"{path}: the gzip stream is damaged or truncated ({type(error).__name__}: {error})") \
            from error
    except OSError as error:
        warnings.warn(f"cannot decompress {path} into the cache folder {folder} ({error}); reading it into memory",
                      stacklevel=2)
        return None
    return target


def _decompress(path: Path, temporary: Path) -> None:
    with gzip.open(path, "rb") as source, open(temporary, "wb") as destination:
        shutil.copyfileobj(source, destination, CHUNK_BYTES)


def _uncompressed_size_hint(path: Path) -> int:
    """The gzip trailer's size field (the uncompressed size modulo 4 GiB): a hint for making room, no more."""
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int.from_bytes(handle.read(4), "little")


def _evict(folder: Path, keep_free: int) -> None:
    """Delete the least recently used copies until the folder plus ``keep_free`` bytes fits the budget."""
    entries = []
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue  # another process's copy in the making
        try:
            status = entry.stat()
        except OSError:
            continue
        entries.append((status.st_mtime, status.st_size, entry))
    total = sum(size for _, size, _ in entries) + keep_free
    for _, size, entry in sorted(entries):
        if total <= CACHE_BUDGET_BYTES:
            break
        try:
            entry.unlink(missing_ok=True)  # an open memory map of it stays valid (POSIX)
        except OSError:  # Windows refuses to delete a mapped file: it stays until unused
            continue
        total -= size
