"""The segment widget's propagation bookkeeping (Qt-free): weakest slice, and which slices the user corrected."""

from __future__ import annotations

import numpy as np

from napari_sam_ft._widgets.propagation_review import PropagationReview


def test_corrections_are_found_by_content_and_keys_are_never_listed():
    preview = np.zeros((8, 6, 6), np.uint8)
    preview[2:6, 2:4, 2:4] = 1
    review = PropagationReview()
    review.record(preview, {2: 0.9, 3: 0.95, 4: float("nan"), 5: 0.7}, keys=[4])
    assert review.weakest_slice() == 5 and review.span() == (2, 5)
    assert "5: 0.70" in review.summary() and 4 not in review.scores
    assert review.corrected_slices(preview) == []

    preview[3, 0, 0] = 1  # painted
    preview[5] = 0  # erased
    preview[7, 1, 1] = 1  # painted where propagation left nothing
    preview[4, 5, 5] = 1  # the key slice edited: still a key, not a correction
    assert review.corrected_slices(preview) == [3, 5, 7]
    assert review.weakest_slice(exclude=review.corrected_slices(preview)) == 2
    review.clear()
    assert not review.active and review.corrected_slices(preview) == []
