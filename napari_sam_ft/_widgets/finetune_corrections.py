"""Which slices of a Labels layer the user changed since the last adapt ("Learn from my corrections").

A per-slice digest of the label data is kept at each adapt; comparing digests finds the changed slices
whatever way they were edited (brush, fill, undo, a commit from the segment panel, a script), and costs
a few bytes per slice instead of a copy of the volume.
"""

from __future__ import annotations

import hashlib

import numpy as np


def slice_digests(labels_zyx: np.ndarray) -> list[bytes]:
    """One short digest of each (Y, X) slice."""
    array = np.asarray(labels_zyx)
    if array.ndim == 2:
        array = array[None]
    return [hashlib.blake2b(np.ascontiguousarray(array[index]).tobytes(), digest_size=16).digest()
            for index in range(array.shape[0])]


class CorrectionTracker:
    """Remembers label layers' contents at the last adapt and reports the slices changed since."""

    def __init__(self):
        self._snapshots: dict[int, list[bytes]] = {}  # id(layer) -> per-slice digests

    def snapshot(self, layer) -> None:
        """Mark ``layer``'s current content as what the last adapt saw."""
        self._snapshots[id(layer)] = slice_digests(layer.data)

    def is_tracking(self, layer) -> bool:
        return id(layer) in self._snapshots

    def changed_slices(self, layer) -> list[int]:
        """Slices whose labels differ from the snapshot (every slice when the layer was never snapshotted)."""
        current = slice_digests(layer.data)
        previous = self._snapshots.get(id(layer))
        if previous is None or len(previous) != len(current):
            return list(range(len(current)))
        return [index for index, (old, new) in enumerate(zip(previous, current)) if old != new]
