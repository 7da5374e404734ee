"""Embedding cache: each slice is encoded once per (volume content, model, adapter, window, axis, precision).

Embeddings live in memory under a byte budget (least recently used slices are evicted first) and,
optionally, on disk under the user cache directory as one ``.npy`` per slice, so reopening the same
scan with the same model encodes nothing again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MEMORY_BUDGET_BYTES = 2 << 30
DEFAULT_DISK_BUDGET_BYTES = 8 << 30
# Eviction brings the disk tier down to this fraction of its budget, so it does not run on every write.
DISK_EVICTION_TARGET = 0.9
STALE_TEMPORARY_SECONDS = 3600  # a temporary file this old was left by a process that died mid-write
# Part of every key: bump it with any change to the code between a slice and its embedding (windowing,
# preprocessing, the encoder's layers), so embeddings cached on disk by an older version are never served.
EMBEDDING_CODE_VERSION = 2


def default_cache_dir() -> Path:
    """``$NAPARI_SAM_FT_CACHE`` or the platform's user cache directory."""
    override = os.environ.get("NAPARI_SAM_FT_CACHE")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-sam-ft")) / "embeddings"


def volume_content_hash(array: np.ndarray, slab_slices: int = 16) -> str:
    """A hash of the voxel values, shape and dtype, read slab by slab (memory-mapped files stay lazy)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((tuple(array.shape), str(array.dtype))).encode())
    for start in range(0, array.shape[0], slab_slices):
        digest.update(np.ascontiguousarray(array[start:start + slab_slices]).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Identifies one volume as the encoder sees it; a slice index completes the key.

    ``adapter_id`` is the adapter as the encoder sees it ("none" for adapters that leave the encoder alone);
    ``precision`` the encoder's autocast dtype ("bf16", "fp16", "fp32"), whose embeddings differ.
    """

    volume_hash: str
    model_id: str
    adapter_id: str
    window_key: str
    axis: int
    precision: str
    code_version: int = EMBEDDING_CODE_VERSION

    def digest(self) -> str:
        text = "|".join((self.volume_hash, self.model_id, self.adapter_id, self.window_key, str(self.axis),
                         self.precision, str(self.code_version)))
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


class EmbeddingCache:
    """Slice embeddings (C, h, w tensors) in memory under a byte budget, optionally backed by disk.

    Stored as float16: the error is far below the bf16 encoder's and a slice costs half the memory.
    Thread-safe, so a background encoding worker and a click handler can share it.
    """

    def __init__(self, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES, disk_dir: Path | str | None = None,
                 disk_budget_bytes: int = DEFAULT_DISK_BUDGET_BYTES):
        self.memory_budget_bytes = int(memory_budget_bytes)
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.disk_budget_bytes = int(disk_budget_bytes)
        self._entries: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self._disk_total: int | None = None  # bytes on disk, counted once then kept up to date
        self._disk_failed = False

    # -- lookups ---------------------------------------------------------------------------------
    def get(self, key: CacheKey, slice_index: int) -> torch.Tensor | None:
        entry_key = (key.digest(), int(slice_index))
        with self._lock:
            embedding = self._entries.get(entry_key)
            if embedding is not None:
                self._entries.move_to_end(entry_key)
                self.hits += 1
                return embedding
        embedding = self._read_disk(entry_key)
        if embedding is not None:
            self._put_memory(entry_key, embedding)
            with self._lock:
                self.hits += 1
            return embedding
        with self._lock:
            self.misses += 1
        return None

    def contains(self, key: CacheKey, slice_index: int) -> bool:
        entry_key = (key.digest(), int(slice_index))
        with self._lock:
            if entry_key in self._entries:
                return True
        path = self._disk_path(entry_key)
        return path is not None and path.exists()

    def put(self, key: CacheKey, slice_index: int, embedding: torch.Tensor) -> None:
        entry_key = (key.digest(), int(slice_index))
        stored = embedding.detach().to("cpu", torch.float16).contiguous()
        self._put_memory(entry_key, stored)
        self._write_disk(entry_key, stored)

    def cached_slices(self, key: CacheKey, num_slices: int) -> list[int]:
        return [index for index in range(num_slices) if self.contains(key, index)]

    @property
    def memory_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear_memory(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # -- memory tier -----------------------------------------------------------------------------
    def _put_memory(self, entry_key: tuple[str, int], embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        with self._lock:
            previous = self._entries.pop(entry_key, None)
            if previous is not None:
                self._bytes -= previous.numel() * previous.element_size()
            self._entries[entry_key] = embedding
            self._bytes += size
            while self._bytes > self.memory_budget_bytes and len(self._entries) > 1:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    # -- disk tier -------------------------------------------------------------------------------
    def _disk_path(self, entry_key: tuple[str, int]) -> Path | None:
        if self.disk_dir is None:
            return None
        return self.disk_dir / entry_key[0] / f"slice_{entry_key[1]:05d}.npy"

    def _read_disk(self, entry_key: tuple[str, int]) -> torch.Tensor | None:
        path = self._disk_path(entry_key)
        if path is None or not path.exists():
            return None
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)  # a damaged entry is re-encoded, never trusted
            return None
        if array.dtype != np.float16 or array.ndim != 3:
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recency for eviction
        except OSError:  # a read-only cache still serves its embeddings
            pass
        return torch.from_numpy(array)

    def _write_disk(self, entry_key: tuple[str, int], embedding: torch.Tensor) -> None:
        """Write one embedding atomically; a full or read-only disk leaves the memory tier working."""
        path = self._disk_path(entry_key)
        if path is None or self._disk_failed or path.exists():
            return
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                np.save(handle, embedding.numpy(), allow_pickle=False)
            os.replace(temporary, path)
        except OSError as error:
            try:
                temporary.unlink(missing_ok=True)
            except OSError:  # e.g. the cache folder is a file: no temporary was made
                pass
            self._disk_failed = True
            warnings.warn(f"embedding cache: cannot write to {self.disk_dir} ({error}); "
                          "embeddings are kept in memory only for this session", RuntimeWarning, stacklevel=3)
            return
        with self._lock:
            if self._disk_total is not None:
                self._disk_total += path.stat().st_size
            over_budget = self._disk_total is None or self._disk_total > self.disk_budget_bytes
        if over_budget:
            self._enforce_disk_budget()

    def _disk_entries(self) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every embedding on disk; files vanishing meanwhile are skipped."""
        assert self.disk_dir is not None
        entries = []
        now = time.time()
        for path in self.disk_dir.glob("*/*"):
            try:
                status = path.stat()
            except OSError:  # evicted by another process just now
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                if now - status.st_mtime > STALE_TEMPORARY_SECONDS:
                    path.unlink(missing_ok=True)
                continue
            if path.name.startswith("slice_") and path.suffix == ".npy":
                entries.append((status.st_mtime, status.st_size, path))
        return entries

    def _enforce_disk_budget(self) -> None:
        """Count the disk tier; above its budget, delete the least recently used slices down to 90 % of it."""
        with self._lock:
            entries = self._disk_entries()
            total = sum(size for _, size, _ in entries)
            if total > self.disk_budget_bytes:
                target = self.disk_budget_bytes * DISK_EVICTION_TARGET
                for _, size, path in sorted(entries):
                    if total <= target:
                        break
                    path.unlink(missing_ok=True)
                    total -= size
                    try:
                        path.parent.rmdir()  # only succeeds once a volume's folder is empty
                    except OSError:
                        pass
            self._disk_total = total

    def disk_bytes(self) -> int:
        if self.disk_dir is None or not self.disk_dir.exists():
            return 0
        return sum(size for _, size, _ in self._disk_entries())

    def clear_disk(self) -> None:
        if self.disk_dir is not None and self.disk_dir.exists():
            shutil.rmtree(self.disk_dir, ignore_errors=True)
        with self._lock:
            self._disk_total = None
