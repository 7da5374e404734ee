"""Automatic segmentation of a whole volume in one call.

With the base model, each slice gets a grid of prompts inside the body, as SAM's automatic mask generator
does (points for SAM-style models, a multi-scale box grid for box-trained LiteMedSAM/MedSAM); the masks are filtered by predicted IoU and stability, de-duplicated, and the 2D
objects are linked across slices into 3D instances. With an adapter that carries a no-prompt class head,
the head's class labels are returned instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .predictor import Cancelled, CancelCheck, ProgressCallback, VolumePredictor


@dataclass(frozen=True)
class AutomaticSettings:
    points_per_side: int = 10
    # Box grids for box-trained models (LiteMedSAM, MedSAM): (box size as a fraction of the body's extent,
    # boxes per side). Three scales cover organs from kidney to liver size.
    box_scales: tuple[tuple[float, int], ...] = ((0.6, 2), (0.35, 4), (0.2, 7))
    pred_iou_threshold: float = 0.75
    stability_threshold: float = 0.7
    stability_offset: float = 1.0
    duplicate_iou: float = 0.6
    min_area_fraction: float = 0.0015  # of the slice
    max_area_fraction: float = 0.5  # of the body: larger masks are the body itself, not an object
    foreground_threshold: float = 0.08  # windowed intensity above which a pixel is body, not air
    min_foreground_fraction: float = 0.02  # slices with less body than this are skipped
    link_iou: float = 0.3  # 2D objects on neighbouring slices overlapping this much are one 3D object
    min_instance_voxels: int = 30
    # Prompts per decoder pass; None: 8 on a CPU, where larger batches spill the caches and run slower
    # per prompt, 64 on an accelerator.
    prompt_batch: int | None = None


def body_mask(slice_01: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels brighter than air, holes filled: where prompts are worth placing."""
    foreground = ndimage.binary_opening(slice_01 > threshold, iterations=1)
    return ndimage.binary_fill_holes(foreground)


def grid_points(mask: np.ndarray, points_per_side: int) -> np.ndarray:
    """(N, 2) xy points of a regular grid over the slice that fall inside ``mask``."""
    height, width = mask.shape
    offset_y, offset_x = height / (2 * points_per_side), width / (2 * points_per_side)
    ys = np.linspace(offset_y, height - offset_y, points_per_side)
    xs = np.linspace(offset_x, width - offset_x, points_per_side)
    grid = np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)
    inside = mask[np.clip(grid[:, 1].astype(int), 0, height - 1), np.clip(grid[:, 0].astype(int), 0, width - 1)]
    return grid[inside].astype(np.float32)


def grid_boxes(mask: np.ndarray, scales: tuple[tuple[float, int], ...]) -> np.ndarray:
    """(N, 4) xyxy boxes tiling the body's bounding box at several sizes; boxes mostly off the body are dropped."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0], rows[-1], cols[0], cols[-1]
    boxes = []
    for fraction, per_side in scales:
        box_height, box_width = (bottom - top) * fraction, (right - left) * fraction
        for center_y in np.linspace(top + box_height / 2, bottom - box_height / 2, per_side):
            for center_x in np.linspace(left + box_width / 2, right - box_width / 2, per_side):
                box = (center_x - box_width / 2, center_y - box_height / 2, center_x + box_width / 2,
                       center_y + box_height / 2)
                inside = mask[int(box[1]):int(box[3]) + 1, int(box[0]):int(box[2]) + 1]
                if inside.size and inside.mean() >= 0.5:
                    boxes.append(box)
    return np.array(boxes, np.float32).reshape(-1, 4)


def _mask_iou_matrix(masks: torch.Tensor) -> torch.Tensor:
    flat = masks.reshape(masks.shape[0], -1).float()
    intersection = flat @ flat.T
    areas = flat.sum(dim=1)
    return intersection / (areas[:, None] + areas[None, :] - intersection).clamp(min=1.0)


def _decode_candidates(predictor: VolumePredictor, slice_index: int, body: np.ndarray,
                       settings: AutomaticSettings, work_shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid prompts on one slice -> candidate logits (M, h, w) on ``work_shape`` and predicted IoUs (M,).

    Box-trained models get a multi-scale box grid; SAM-style models a point grid with three masks each.
    """
    use_boxes = predictor.model.spec.automatic_prompt == "box"
    prompts = grid_boxes(body, settings.box_scales) if use_boxes else grid_points(body, settings.points_per_side)
    all_logits, all_scores = [], []
    batch_size = settings.prompt_batch or (8 if predictor.model.device.type == "cpu" else 64)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        if use_boxes:
            logits, scores, _ = predictor.decode(slice_index, None, None, batch, None, multimask_output=False,
                                                 output_shape=work_shape, min_score=settings.pred_iou_threshold)
        else:
            logits, scores, _ = predictor.decode(slice_index, batch[:, None, :], np.ones((len(batch), 1), np.float32),
                                                 None, None, multimask_output=True, output_shape=work_shape,
                                                 min_score=settings.pred_iou_threshold)
        all_logits.append(logits.flatten(0, 1))
        all_scores.append(scores.flatten(0, 1).float())
    if not all_logits:
        return torch.zeros((0, *work_shape)), torch.zeros(0)
    return torch.cat(all_logits), torch.cat(all_scores)


def work_shape_for(height: int, width: int, longest_side: int = 256) -> tuple[int, int]:
    """The grid candidates are filtered on: the slice itself, or a coarser one for large slices."""
    scale = min(1.0, longest_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def slice_objects(predictor: VolumePredictor, slice_index: int,
                  settings: AutomaticSettings = AutomaticSettings()) -> np.ndarray:
    """Automatic 2D objects on one slice with the base model -> (H, W) int32, 0 = background, 1..n objects."""
    image = predictor.slice_intensity(slice_index)
    height, width = image.shape
    labels = np.zeros((height, width), np.int32)
    body = body_mask(image, settings.foreground_threshold)
    if body.mean() < settings.min_foreground_fraction:
        return labels
    work_shape = work_shape_for(height, width)
    work_body = torch.from_numpy(body)
    if work_shape != (height, width):
        work_body = torch.nn.functional.interpolate(work_body[None, None].float(), size=work_shape)[0, 0] > 0.5
    logits, scores = _decode_candidates(predictor, slice_index, body, settings, work_shape)
    # Stability: how little the mask changes when the logit threshold moves (SAM's stability score).
    high = (logits > settings.stability_offset).flatten(1).sum(1).float()
    low = (logits > -settings.stability_offset).flatten(1).sum(1).float().clamp(min=1.0)
    masks = (logits > 0) & work_body
    area = masks.flatten(1).sum(1).float()
    work_pixels = work_shape[0] * work_shape[1]
    keep = ((scores >= settings.pred_iou_threshold) & (high / low >= settings.stability_threshold)
            & (area >= settings.min_area_fraction * work_pixels)
            & (area <= settings.max_area_fraction * work_body.sum()))
    masks, scores, logits = masks[keep], scores[keep], logits[keep]
    if len(scores) == 0:
        return labels
    order = torch.argsort(scores, descending=True)
    masks, scores, logits = masks[order], scores[order], logits[order]
    overlaps = _mask_iou_matrix(masks)
    chosen: list[int] = []
    for candidate in range(len(scores)):
        if all(overlaps[candidate, previous] < settings.duplicate_iou for previous in chosen):
            chosen.append(candidate)
    chosen_logits = logits[chosen]
    if work_shape != (height, width):  # only the kept objects are brought to full resolution
        chosen_logits = torch.nn.functional.interpolate(chosen_logits[:, None], size=(height, width),
                                                        mode="bilinear", align_corners=False)[:, 0]
    chosen_masks = ((chosen_logits > 0) & torch.from_numpy(body)).numpy()
    # Paint the least confident first so the most confident object wins where masks overlap.
    for rank in range(len(chosen), 0, -1):
        labels[chosen_masks[rank - 1]] = rank
    return labels


def link_slices(slice_labels: dict[int, np.ndarray], shape: tuple[int, int, int],
                settings: AutomaticSettings = AutomaticSettings()) -> np.ndarray:
    """Link per-slice objects into 3D instances by overlap with the previous slice -> (Z, H, W) int32.

    Works slice by slice: besides the result (whose unlabelled slices are never written, so cost no
    memory), nothing of the volume's size is allocated.
    """
    volume_labels = np.zeros(shape, np.int32)
    next_instance = 1
    previous_index = None
    for index in sorted(slice_labels):
        labels = slice_labels[index]
        previous = volume_labels[previous_index] if previous_index == index - 1 else None
        for object_id in (value for value in np.unique(labels) if value):
            mask = labels == object_id
            instance = 0
            if previous is not None:
                candidates, counts = np.unique(previous[mask], return_counts=True)
                best_iou = 0.0
                for candidate, count in zip(candidates, counts):
                    if candidate == 0:
                        continue
                    iou = count / (mask.sum() + (previous == candidate).sum() - count)
                    if iou >= settings.link_iou and iou > best_iou:
                        instance, best_iou = int(candidate), iou
            if instance == 0:
                instance, next_instance = next_instance, next_instance + 1
            volume_labels[index][mask & (volume_labels[index] == 0)] = instance
        previous_index = index
    sizes = np.zeros(next_instance, np.int64)
    for index in slice_labels:
        sizes += np.bincount(volume_labels[index].ravel(), minlength=next_instance)
    # Drop small instances and renumber the rest 1..n in order of first appearance.
    kept = np.flatnonzero(sizes >= settings.min_instance_voxels)
    kept = kept[kept > 0]
    remap = np.zeros(next_instance, np.int32)
    remap[kept] = np.arange(1, len(kept) + 1)
    for index in slice_labels:
        volume_labels[index] = remap[volume_labels[index]]
    return volume_labels


def head_field_of_view(predictor: VolumePredictor) -> dict | None:
    """The active class head's field of view for this volume, or None (then every slice, uncropped).

    A fine-tuned head records, per training volume, the slices and the square window its annotations
    lie in (``finetune.data.FieldOfView``). It is found again on a volume of the same shape; a head trained
    on the window ("cropped") only works on that window, so it warns when the volume does not match.
    """
    head = predictor.model.class_head
    views = [view for view in getattr(head, "fields_of_view", None) or []
             if tuple(view["volume_shape"]) == (predictor.volume.num_slices, *predictor.slice_shape)]
    if len(views) == 1:
        return views[0]
    if getattr(head, "cropped", False):
        import warnings

        warnings.warn("this adapter's automatic head was trained on a window around the annotations of a volume "
                      "of another shape: segmenting whole slices instead, expect lower accuracy", stacklevel=2)
    return None


def class_slice_ranges(view: dict | None, class_ids) -> dict[int, tuple[int, int]]:
    """{head channel: (start, stop)} of the classes whose slice range the field of view records (an adapter
    trained since the ranges were recorded: every class); a class is not looked for outside its range."""
    recorded = (view or {}).get("class_slices") or {}
    return {channel: (int(recorded[str(class_id)][0]), int(recorded[str(class_id)][1]))
            for channel, class_id in enumerate(class_ids, start=1) if str(class_id) in recorded}


def channels_outside(class_ranges: dict[int, tuple[int, int]], slice_index: int) -> list[int]:
    """The head channels whose class's slice range (``class_slice_ranges``) does not hold ``slice_index``."""
    return [channel for channel, (first, stop) in class_ranges.items() if not first <= slice_index < stop]


def head_channels(logits: torch.Tensor, outside_per_slice) -> np.ndarray:
    """(B, 1 + K, H, W) class-head logits -> (B, H, W) channel indices, slice b never given a channel of
    ``outside_per_slice[b]`` (its pixels go to the next likeliest channel). Inference and training's validation
    both label through this, so the score that picks the kept checkpoint is the one inference will reach."""
    if any(outside_per_slice):  # copied only when a channel is excluded: the caller's logits stay as they were
        logits = logits.clone()
        for position, outside in enumerate(outside_per_slice):
            logits[position, list(outside)] = -torch.inf
    return logits.argmax(dim=1).cpu().numpy()


@torch.inference_mode()
def class_head_labels(predictor: VolumePredictor, slice_indices, batch_size: int = 4,
                      progress: ProgressCallback | None = None,
                      should_cancel: CancelCheck | None = None) -> dict[int, np.ndarray]:
    """The active adapter's no-prompt head on slices -> {slice index: (H, W) label ids of the training labels}.

    Slices outside the head's field of view are background without encoding, and a class is not found outside
    its own slice range (``class_slice_ranges``); inside the field of view, slices are run ``batch_size`` at a
    time, on the window the head was trained on when it was trained on a window
    (encoded here, rounded to float16 as the cache stores it) or on whole cached embeddings.
    """
    model = predictor.model
    height, width = predictor.slice_shape
    lookup = np.array((0, *model.class_ids), dtype=np.int32)
    view = head_field_of_view(predictor)
    indices = [int(index) for index in slice_indices]
    labels = {index: np.zeros((height, width), np.int32) for index in indices}
    if view is not None:
        indices = [index for index in indices if view["slices"][0] <= index < view["slices"][1]]
    cropped = view is not None and view.get("cropped", False)
    class_ranges = class_slice_ranges(view, model.class_ids)
    rows, cols = (slice(*view["rows"]), slice(*view["cols"])) if cropped else (slice(0, height), slice(0, width))
    out_height, out_width = rows.stop - rows.start, cols.stop - cols.start
    for start in range(0, len(indices), batch_size):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"automatic segmentation cancelled after {start} of {len(indices)} slices")
        chunk = indices[start:start + batch_size]
        if cropped:
            images = np.stack([predictor.slice_image(index)[rows, cols] for index in chunk])
            embeddings = predictor.encode_batch(images).half().float()
        else:
            embeddings = torch.cat([predictor.embedding(index) for index in chunk])
        logits = model.preprocessing.logits_to_slice(model.class_head(model.sam, embeddings), out_height, out_width)
        classes = head_channels(logits, [channels_outside(class_ranges, index) for index in chunk])
        for index, slice_classes in zip(chunk, classes):
            labels[index][rows, cols] = lookup[slice_classes]
        if progress:
            progress(min(start + batch_size, len(indices)), len(indices))
    return labels


def refined_head_labels(predictor: VolumePredictor, slice_indices, progress: ProgressCallback | None = None,
                        should_cancel: CancelCheck | None = None) -> dict[int, np.ndarray]:
    """``class_head_labels``, then the classes the adapter lists as better boxed (``engine.box_refinement``)
    redrawn by the base model from a box around each piece."""
    from .box_refinement import base_predictor, refine_with_boxes, refined_classes

    labels = class_head_labels(predictor, slice_indices, progress=progress, should_cancel=should_cancel)
    classes = refined_classes(predictor.model)
    if not classes:
        return labels
    with_objects = {index: slice_labels for index, slice_labels in labels.items()
                    if np.isin(slice_labels, classes).any()}
    return {**labels, **refine_with_boxes(base_predictor(predictor), with_objects, classes, should_cancel)}


def segment_slice(predictor: VolumePredictor, slice_index: int,
                  settings: AutomaticSettings = AutomaticSettings()) -> np.ndarray:
    """Automatic labels of one slice: class ids with an adapter's class head, else object ids."""
    if predictor.model.class_head is not None:
        return refined_head_labels(predictor, [slice_index])[int(slice_index)]
    return slice_objects(predictor, slice_index, settings)


def segment_volume(predictor: VolumePredictor, *, slice_indices=None, settings: AutomaticSettings = AutomaticSettings(),
                   progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None) -> np.ndarray:
    """Automatic labels for the whole volume (or ``slice_indices``) -> (Z, H, W) int32.

    Slices holding only air are skipped without encoding. With a class head the labels are the
    adapter's class ids (slices outside its field of view skipped too); otherwise they are 3D instance
    ids 1..n.
    """
    volume = predictor.volume
    indices = list(range(volume.num_slices)) if slice_indices is None else [int(index) for index in slice_indices]
    worth = [index for index in indices
             if body_mask(predictor.slice_intensity(index), settings.foreground_threshold).mean()
             >= settings.min_foreground_fraction]
    if predictor.model.class_head is not None:
        labels = np.zeros(volume.shape[:3], np.int32)
        for index, slice_label in refined_head_labels(predictor, worth, progress=progress,
                                                      should_cancel=should_cancel).items():
            labels[index] = slice_label
        return labels
    total = len(worth)
    slice_labels: dict[int, np.ndarray] = {}
    for done, index in enumerate(worth):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"automatic segmentation cancelled after {done} of {total} slices")
        if progress:
            progress(done, total)
        slice_labels[index] = segment_slice(predictor, index, settings)
    if progress:
        progress(total, total)
    return link_slices(slice_labels, volume.shape, settings)


def match_instances_to_classes(instances: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Give each automatic 3D instance the reference class it overlaps most (for scoring only).

    Instances overlapping no reference class become background. This is the usual oracle matching
    for class-agnostic automatic segmentation.
    """
    result = np.zeros(reference.shape, np.int32)
    for instance in (value for value in np.unique(instances) if value):
        mask = instances == instance
        classes, counts = np.unique(reference[mask], return_counts=True)
        best = int(classes[np.argmax(counts)])
        # Only keep the instance if most of it lies inside that class.
        if best != 0 and counts.max() >= 0.5 * mask.sum():
            result[mask & (result == 0)] = best
    return result
