"""Segment a volume from a list of prompts (the CLI's ``segment`` and the widget's commit share this)."""

from __future__ import annotations

import numpy as np

from .click_search import predict_object
from .predictor import CancelCheck, ProgressCallback, VolumePredictor
from .prompts import SlicePrompt
from .propagate import DEFAULT_MIN_AREA_RATIO, DEFAULT_STOP_IOU, propagate_objects


def predict_prompt(predictor: VolumePredictor, prompt: SlicePrompt) -> np.ndarray:
    """One object's (H, W) mask on its slice (``click_search.predict_object``: window per prompt, clicks as boxes
    for box-trained models)."""
    return predict_object(predictor, prompt.slice_index, prompt.points, prompt.point_labels, prompt.box).mask


def segment_prompts(predictor: VolumePredictor, prompts: list[SlicePrompt], propagate: bool = False, *,
                    stop_iou: float = DEFAULT_STOP_IOU, min_area_ratio: float = DEFAULT_MIN_AREA_RATIO,
                    progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
    """Labels (Z, H, W) int32 from prompts; with ``propagate`` each label grows from its prompted slices.

    Prompts of one label on several slices are key slices of one object. Later prompts win where
    objects overlap on a prompted slice.
    """
    labels = np.zeros(predictor.volume.shape, np.int32)
    key_masks: dict[int, dict[int, np.ndarray]] = {}
    for done, prompt in enumerate(prompts):
        mask = predict_prompt(predictor, prompt)
        key_masks.setdefault(prompt.label, {})
        existing = key_masks[prompt.label].get(prompt.slice_index)
        key_masks[prompt.label][prompt.slice_index] = mask if existing is None else existing | mask
        if progress and not propagate:
            progress(done + 1, len(prompts))
    for step, (label, masks) in enumerate(sorted(key_masks.items())):
        if propagate:
            grown = propagate_objects(predictor, masks, stop_iou=stop_iou, min_area_ratio=min_area_ratio,
                                      should_cancel=should_cancel)
            labels[grown & (labels == 0)] = label
            if progress:
                progress(step + 1, len(key_masks))
        for slice_index, mask in masks.items():
            labels[slice_index][mask] = label
    return labels
