"""What the last propagation put into the preview, so the user can check it and re-propagate after corrections.

Qt-free bookkeeping for the segment widget: each grown slice's predicted IoU (the weakest is where to look first),
the key slices it grew from, and a digest of every slice it wrote. A slice whose preview no longer matches its
digest was corrected by the user (painted, erased or prompted again); corrected, key and committed slices are
the keys of a re-propagation, which regrows only the slices between them (``engine.propagate.regrow_between_keys``).
"""

from __future__ import annotations

import hashlib

import numpy as np

SHOWN_SLICES = 8  # the weakest slices listed in the panel


def slice_digest(mask: np.ndarray) -> bytes:
    """A short digest of one (H, W) preview slice's mask."""
    return hashlib.blake2b(np.ascontiguousarray(np.asarray(mask) > 0).tobytes(), digest_size=16).digest()


class PropagationReview:
    """The last propagation's per-slice predicted IoU, key slices and written-slice digests."""

    def __init__(self):
        self.scores: dict[int, float] = {}
        self.keys: set[int] = set()
        self._written: dict[int, bytes] = {}

    @property
    def active(self) -> bool:
        return bool(self.keys)

    def clear(self) -> None:
        self.scores, self.keys, self._written = {}, set(), {}

    def record(self, preview: np.ndarray, written: dict[int, float], keys) -> None:
        """After a propagation wrote slices ``written`` ({slice: predicted IoU}) into ``preview``, from ``keys``."""
        self.keys = {int(key) for key in keys}
        for index, score in written.items():
            self.scores[int(index)] = float(score)
            self._written[int(index)] = slice_digest(preview[index])
        for key in self.keys:
            self.scores.pop(key, None)
            self._written.pop(key, None)

    def span(self) -> tuple[int, int] | None:
        """The first and last slice the propagation covered (keys included): where committed slices are keys."""
        covered = self.keys | set(self._written)
        return (min(covered), max(covered)) if covered else None

    def corrected_slices(self, preview: np.ndarray) -> list[int]:
        """Slices the user changed since the propagation wrote them: a written slice whose mask differs, or any
        other slice that holds a mask now. Keys are not listed (they are keys already)."""
        if not self.active:
            return []
        corrected = {index for index, digest in self._written.items() if slice_digest(preview[index]) != digest}
        preview = np.asarray(preview)
        with_content = np.flatnonzero(preview.reshape(preview.shape[0], -1).any(axis=1))
        corrected.update(int(index) for index in with_content if int(index) not in self._written)
        return sorted(corrected - self.keys)

    def weakest_slice(self, exclude=()) -> int | None:
        """The grown slice with the lowest predicted IoU (not one in ``exclude``, e.g. corrected ones)."""
        candidates = {index: score for index, score in self.scores.items() if index not in set(exclude)}
        return min(candidates, key=candidates.get) if candidates else None

    def summary(self) -> str:
        """One line for the panel: how many slices grew and the weakest of them, lowest predicted IoU first."""
        if not self.scores:
            return "propagation: no slice grown beyond the key slices" if self.keys else ""
        weakest = sorted(self.scores.items(), key=lambda item: item[1])[:SHOWN_SLICES]
        listed = " · ".join(f"{index}: {score:.2f}" for index, score in weakest)
        return f"predicted IoU of {len(self.scores)} grown slices, lowest first: {listed}"
