"""Simulate a user from reference labels, segment, and score: the engine behind ``napari-sam-ft evaluate``."""

from __future__ import annotations

import time

import numpy as np
import torch

from .engine.automatic import match_instances_to_classes, segment_volume
from .engine.predictor import CancelCheck, Cancelled, ProgressCallback, VolumePredictor
from .engine.prompts import box_from_mask, interior_point
from .metrics import score_labels, score_masks

PROMPT_MODES = ("box", "point", "none")


def parse_slice_range(text: str | None, num_slices: int) -> tuple[int, int]:
    """``A:B`` (B exclusive, either side may be empty) -> (first, last) inclusive, checked against the volume."""
    if not text:
        return 0, num_slices - 1
    try:
        first_text, last_text = text.split(":")
        first = int(first_text) if first_text.strip() else 0
        stop = int(last_text) if last_text.strip() else num_slices
    except ValueError:
        raise ValueError(f"--slices must look like A:B (e.g. 5:20), got {text!r}") from None
    if not 0 <= first < stop <= num_slices:
        raise ValueError(f"--slices {text} is out of range: need 0 <= A < B <= {num_slices}")
    return first, stop - 1


def segment_with_reference_prompts(predictor: VolumePredictor, reference: np.ndarray, prompt_mode: str,
                                   slice_indices, class_ids, progress: ProgressCallback | None = None,
                                   should_cancel: CancelCheck | None = None) -> dict[int, np.ndarray]:
    """One simulated prompt per object per slice (a reference box, or one click deep inside it).

    Each object is segmented on its own, as a user prompting one structure at a time would get it; all
    objects of a slice share one batched decoder pass. Returns {class id: (Z, H, W) bool mask}.
    """
    masks_by_class = {class_id: np.zeros(reference.shape, bool) for class_id in class_ids}
    slice_indices = list(slice_indices)
    for done, index in enumerate(slice_indices):
        if should_cancel is not None and should_cancel():
            raise Cancelled("evaluation cancelled")
        present = [class_id for class_id in class_ids if (reference[index] == class_id).any()]
        if present:
            references = [reference[index] == class_id for class_id in present]
            if prompt_mode == "box":
                boxes = np.stack([box_from_mask(mask) for mask in references])
                logits, _, _ = predictor.decode(index, None, None, boxes, None, multimask_output=False)
                logits = logits[:, 0]
            else:
                points = np.stack([interior_point(mask) for mask in references])[:, None, :]
                logits, scores, _ = predictor.decode(index, points, np.ones((len(present), 1), np.float32), None,
                                                     None, multimask_output=True)
                logits = logits[torch.arange(len(present)), scores.argmax(dim=1)]
            for class_id, object_logits in zip(present, logits):
                masks_by_class[class_id][index] = (object_logits > 0).cpu().numpy()
        if progress:
            progress(done + 1, len(slice_indices))
    return masks_by_class


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
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"unknown prompt mode {prompt_mode!r}; choose one of {', '.join(PROMPT_MODES)}")
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
                   "window": predictor.window.key, "slices": [first, last], "seconds": round(seconds, 2),
                   "encoder_passes": predictor.encoder_calls})
    if prompt_mode == "none" and predictor.model.class_head is None:
        report["matching"] = "each automatic instance scored as the reference class it overlaps most"
    return report, prediction
