"""Simulate a user from reference labels, segment, and score: the engine behind ``napari-sam-ft evaluate``."""

from __future__ import annotations

import time

import numpy as np

from .engine.automatic import match_instances_to_classes, segment_volume
from .engine.click_search import predict_object
from .engine.predictor import CancelCheck, Cancelled, ProgressCallback, VolumePredictor
from .engine.prompts import box_from_mask, interior_point, user_objects_on_slice
from .engine.propagate import propagate_objects
from .engine.window_choice import encoder_passes, windows_used
from .metrics import score_labels, score_masks

# How the simulated user prompts each reference object (``evaluate --prompt``).
EVALUATION_PROMPTS = ("box", "point", "point_box", "propagate", "none")


def reference_prompt(reference_mask: np.ndarray, prompt_mode: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The simulated user's prompt for one object on one slice: (click (1, 2) xy or None, box (4,) or None).

    ``box``: the tight reference box; ``point``: one click at the interior point (the pixel farthest from
    the border, so deterministic); ``point_box``: both.
    """
    click = interior_point(reference_mask)[None] if prompt_mode in ("point", "point_box") else None
    box = box_from_mask(reference_mask) if prompt_mode in ("box", "point_box") else None
    return click, box


def segment_with_reference_prompts(predictor: VolumePredictor, reference: np.ndarray, prompt_mode: str,
                                   slice_indices, class_ids, progress: ProgressCallback | None = None,
                                   should_cancel: CancelCheck | None = None) -> dict[int, np.ndarray]:
    """One simulated prompt per object per slice (a reference box, one click deep inside it, or both).

    An object is a connected piece of a class on a slice (``user_objects_on_slice``: specks left out): a user
    boxes the left and the right hippocampus apart, as one box around both would cover the brain between them.
    Each object is segmented on its own through the same ``predict_object`` the widget uses (window per prompt,
    clicks searched for box-trained models); a class's mask is the union of its objects'. Returns {class id:
    (Z, H, W) bool mask}.
    """
    masks_by_class = {class_id: np.zeros(reference.shape, bool) for class_id in class_ids}
    slice_indices = list(slice_indices)
    for done, index in enumerate(slice_indices):
        if should_cancel is not None and should_cancel():
            raise Cancelled("evaluation cancelled")
        for class_id, reference_mask in user_objects_on_slice(reference[index], class_ids):
            click, box = reference_prompt(reference_mask, prompt_mode)
            labels = None if click is None else np.ones(1, np.int64)
            masks_by_class[class_id][index] |= predict_object(predictor, index, click, labels, box).mask
        if progress:
            progress(done + 1, len(slice_indices))
    return masks_by_class


def propagate_from_largest_slice(predictor: VolumePredictor, reference: np.ndarray, slice_indices, class_ids,
                                 progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None
                                 ) -> tuple[dict[int, np.ndarray], dict[int, dict]]:
    """Each class from reference boxes on the one slice where it is largest (one box per object there), grown
    through ``slice_indices`` (``propagate_objects``: each object on its own).

    Returns ({class id: (Z, H, W) bool mask}, {class id: the key slice and, per side, the last slice
    reached and why growth stopped}).
    """
    slice_indices = list(slice_indices)
    low, high = slice_indices[0], slice_indices[-1]
    masks_by_class, reports = {}, {}
    for done, class_id in enumerate(class_ids):
        if should_cancel is not None and should_cancel():
            raise Cancelled("evaluation cancelled")
        areas = (reference[low:high + 1] == class_id).sum(axis=(1, 2))
        if not areas.any():
            continue
        key = low + int(np.argmax(areas))
        key_mask = np.zeros(predictor.slice_shape, bool)
        for _, reference_mask in user_objects_on_slice(reference[key], [class_id]):
            key_mask |= predict_object(predictor, key, None, None, box_from_mask(reference_mask)).mask
        sides: dict = {}
        if key_mask.any():
            masks_by_class[class_id] = propagate_objects(predictor, {key: key_mask}, slice_range=(low, high),
                                                         should_cancel=should_cancel, report=sides)
        else:
            masks_by_class[class_id] = np.zeros(reference.shape, bool)
            sides = {side: {"reached": key, "stop": "the key slice's mask is empty"} for side in ("below", "above")}
        reports[class_id] = {"key_slice": key, **sides}
        if progress:
            progress(done + 1, len(class_ids))
    return masks_by_class, reports


def compose_labels(masks_by_class: dict[int, np.ndarray], shape) -> np.ndarray:
    """One label array from per-class masks; smaller structures are painted last so they stay visible."""
    labels = np.zeros(shape, np.int32)
    for class_id, mask in sorted(masks_by_class.items(), key=lambda item: -int(item[1].sum())):
        labels[mask] = class_id
    return labels


def evaluate(predictor: VolumePredictor, reference: np.ndarray, prompt_mode: str = "box",
             slice_range: tuple[int, int] | None = None, class_ids=None, class_names: dict[int, str] | None = None,
             progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
             with_hd95: bool = True) -> tuple[dict, np.ndarray]:
    """Segment the volume as a user prompting from ``reference`` would, and score it per class.

    Returns the report (``dice`` = mean over classes present, ``per_class``, ``hd95``, settings) and the
    predicted (Z, H, W) labels.
    """
    if prompt_mode not in EVALUATION_PROMPTS:
        raise ValueError(f"unknown prompt mode {prompt_mode!r}; choose one of {', '.join(EVALUATION_PROMPTS)}")
    reference = np.asarray(reference)
    if reference.shape != predictor.volume.shape:
        raise ValueError(f"reference labels have shape {reference.shape} but the image has {predictor.volume.shape}")
    if not reference.any():
        raise ValueError("the reference labels are empty: there is nothing to evaluate against")
    first, last = slice_range if slice_range is not None else (0, predictor.volume.num_slices - 1)
    slice_indices = range(first, last + 1)
    reference_in_range = np.zeros_like(reference)  # no whole-volume boolean mask: a 600-slice CT stays in memory
    reference_in_range[first:last + 1] = reference[first:last + 1]
    if class_ids is None:
        class_ids = [int(value) for value in np.unique(reference_in_range) if value != 0]
    started = time.perf_counter()
    if prompt_mode == "none":
        automatic = segment_volume(predictor, slice_indices=slice_indices, progress=progress,
                                   should_cancel=should_cancel)
        if predictor.model.class_head is None:
            automatic = match_instances_to_classes(automatic, reference_in_range)
        prediction = np.zeros(reference.shape, np.int32)
        prediction[first:last + 1] = automatic[first:last + 1]
    elif prompt_mode == "propagate":
        masks_by_class, propagation = propagate_from_largest_slice(predictor, reference_in_range, slice_indices,
                                                                   class_ids, progress, should_cancel)
        prediction = compose_labels(masks_by_class, reference.shape)
    else:
        masks_by_class = segment_with_reference_prompts(predictor, reference_in_range, prompt_mode, slice_indices,
                                                        class_ids, progress, should_cancel)
        prediction = compose_labels(masks_by_class, reference.shape)
    seconds = time.perf_counter() - started
    # Scored on the slices in range only (views, no copies): outside them both label maps are empty.
    scored = slice(first, last + 1)
    if prompt_mode == "none":
        report = score_labels(prediction[scored], reference_in_range[scored], predictor.volume.spacing, class_ids,
                              class_names, with_hd95=with_hd95)
    else:
        report = score_masks({class_id: mask[scored] for class_id, mask in masks_by_class.items()},
                             reference_in_range[scored], predictor.volume.spacing, class_names, with_hd95)
    report.update({"prompt": prompt_mode, "model": predictor.model.name, "adapter": predictor.model.adapter_id,
                   "window": predictor.window.key, "windows_used": windows_used(predictor), "slices": [first, last],
                   "seconds": round(seconds, 2), "encoder_passes": encoder_passes(predictor)})
    if prompt_mode == "propagate":
        for name, entry in report["per_class"].items():
            entry["propagation"] = propagation[entry["label"]]
    if prompt_mode == "none" and predictor.model.class_head is None:
        report["matching"] = "each automatic instance scored as the reference class it overlaps most"
    return report, prediction
