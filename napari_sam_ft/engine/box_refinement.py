"""The base model's box around each object the automatic head found, where that segments a class better.

A few-shot class head finds a structure on its own but draws its outline less exactly than a box-trained model
given a box: on the lesions of ../shared/cases, held-out automatic Dice lung1 0.848 -> 0.917 and brain2 0.729 ->
0.848 (decoder-scope head, 2026-12-06) when each piece the head found is boxed and segmented again by the base
model, as a user's box would be (``click_search.predict_object``: the window chosen under the box, small boxes
zoomed). On the deep-brain structures of mni152 it loses (amygdala 0.683 -> 0.628): the head's boxes there are
no better than its masks. So training checks it on the validation slices, class by class, and the adapter lists
the classes that gained (``box_refined_classes``); only those are refined at inference.

The base model segments the boxes, not the adapted one: a head-only adapter's decoder learnt the head's task
and no longer follows boxes (brain2, decoder scope: 0.116).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..models.registry import LoadedModel
from .predictor import CancelCheck, Cancelled, VolumePredictor
from .prompts import box_from_mask

# Pieces smaller than this are left as the head drew them: a box around a few pixels names nothing.
MIN_PIECE_PIXELS = 4
# A class is refined only when refining gains at least this much validation Dice: a tie keeps the head's own.
MIN_GAIN = 0.01


def base_model(model: LoadedModel) -> LoadedModel:
    """``model`` without its adapter: itself when none is attached, else a copy of the base network (made once
    per attached adapter), so that the adapter stays active for everything else."""
    attached = model.adapter
    if attached is None:
        return model
    copy = attached.base_model
    if copy is None:
        from ..finetune.adapters import base_model_copy

        copy = attached.base_model = base_model_copy(model)
    return copy


def base_predictor(predictor: VolumePredictor) -> VolumePredictor:
    """A predictor of the base model on the same volume and cache, on the automatic window (chosen per box on a
    CT), as a user's box with the base model is segmented."""
    return VolumePredictor(base_model(predictor.model), predictor.volume, window="auto", cache=predictor.cache)


def refined_classes(model: LoadedModel) -> tuple[int, ...]:
    """The class ids the active adapter's training found better segmented by boxing the head's objects."""
    attached = model.adapter
    if attached is None or model.class_head is None:
        return ()
    return tuple(int(value) for value in attached.info.metadata.get("box_refined_classes", []))


def refine_with_boxes(predictor: VolumePredictor, slice_labels: dict[int, np.ndarray], class_ids,
                      should_cancel: CancelCheck | None = None) -> dict[int, np.ndarray]:
    """{slice: (H, W) class labels} -> the same with each class of ``class_ids`` redrawn: every connected piece
    of it is boxed and segmented by ``predictor``'s model (``predict_object``). Other classes keep their pixels;
    where a redrawn piece meets them, they win. ``should_cancel()`` is checked before every slice."""
    from .click_search import predict_object

    classes = [int(value) for value in class_ids]
    refined = {}
    for done, (index, labels) in enumerate(slice_labels.items()):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"automatic segmentation cancelled while redrawing boxes, after {done} of "
                            f"{len(slice_labels)} slices")
        result = np.where(np.isin(labels, classes), 0, labels).astype(labels.dtype)
        for class_id in classes:
            pieces, count = ndimage.label(labels == class_id)
            for piece in range(1, count + 1):
                mask = pieces == piece
                if mask.sum() < MIN_PIECE_PIXELS:
                    result[mask & (result == 0)] = class_id
                    continue
                redrawn = predict_object(predictor, index, box=box_from_mask(mask)).mask
                result[redrawn & (result == 0)] = class_id
        refined[index] = result
    return refined
