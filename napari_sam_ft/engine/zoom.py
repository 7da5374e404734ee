"""Small objects are segmented on a zoomed crop of the slice, encoded at the model's full input size.

LiteMedSAM sees a whole slice at 256 x 256. A hippocampus on a 1 mm T1 (about 20 x 10 pixels), a lesion or a
rib's cross-section then covers a few cells of its 64 x 64 image embedding, and a box around it gives a blob in
a corner of the box, or nothing. So a box is decoded on the whole slice first; where its mask fills little of
it and the box is much smaller than the slice, it is decoded again on a square crop around it (``ZoomSettings``),
which the encoder sees at its full input size. The crop is encoded once per slice, crop and window, through the
same embedding cache as whole slices (keyed by the crop), and the mask is put back on the slice grid. The rule
and its constants were chosen on ../shared/cases and both samples with box prompts; ``napari-sam-ft bench
cases`` measures the result (docs/results/cases.md, and docs/benchmarks.md for before and after).

Zooming applies to the base model and to adapters trained on the zoomed crops too (box mode,
``finetune.data.zoomed_box_examples``); other adapters were trained on whole slices and keep seeing them.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from .predictor import Prediction, VolumePredictor


@dataclass(frozen=True)
class ZoomSettings:
    # Where the whole slice works, a box's mask fills much of it (an ellipse fills 0.79); a small structure the
    # model cannot resolve comes out as a blob in a corner of its box, or as nothing. Boxes whose mask fills less
    # than this share of them are decoded again, zoomed. (Zooming every small box loses on the 3 mm sample,
    # whose organs the whole slice already resolves.)
    min_fill: float = 0.5
    context: float = 2.0  # the crop's side: this many times the box's longest side...
    min_side: int = 32  # ...and at least this many slice pixels
    # A crop of this share of the slice's longest side or more gains little: the whole slice is decoded.
    max_fraction: float = 0.6


DEFAULT_ZOOM = ZoomSettings()


@dataclass(frozen=True)
class Crop:
    """A square window of a slice, in slice pixels: rows [top, bottom), columns [left, right)."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bottom - self.top, self.right - self.left

    def boxes_into(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(K, 4) slice boxes -> the same boxes in the crop's pixels."""
        return (np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
                - np.array([self.left, self.top, self.left, self.top], np.float32))

    def paste(self, crop_values: torch.Tensor, slice_shape: tuple[int, int], fill: float) -> torch.Tensor:
        """(..., h, w) values on the crop -> (..., H, W) on the slice, ``fill`` outside the crop."""
        full = torch.full((*crop_values.shape[:-2], *slice_shape), fill, dtype=crop_values.dtype)
        full[..., self.top:self.bottom, self.left:self.right] = crop_values
        return full


@dataclass(frozen=True)
class CroppedSlices:
    """The slices of a volume seen through one ``Crop``: what a zoomed predictor encodes. It has no geometry of
    its own on purpose; masks go back to the volume's grid with ``Crop.paste``."""

    array: np.ndarray  # (Z, h, w) or (Z, h, w, C): a view of the volume's array
    file_axes: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(size) for size in self.array.shape[:3])

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.array.shape[3]) if self.array.ndim == 4 else 1


def zooms(predictor: VolumePredictor) -> bool:
    """Whether small boxes are decoded zoomed: for the base model, and for an adapter that learnt the crops."""
    return _zoom_rule(predictor) is not None


def _zoom_rule(predictor: VolumePredictor) -> str | None:
    """Which boxes are decoded again zoomed: "underfilled" (the base model: those whose mask fills little of
    them), "every" (an adapter that learnt every small object on its crop only, ``finetune.data.
    zoomed_box_examples``), or None (an adapter trained on whole slices keeps seeing them)."""
    adapter = predictor.model.adapter
    if adapter is None:
        return "underfilled"
    return "every" if adapter.info.zooms_small_boxes else None


def zoom_crop(boxes_xyxy: np.ndarray, slice_shape: tuple[int, int],
              settings: ZoomSettings = DEFAULT_ZOOM) -> Crop | None:
    """The square crop, centred on the boxes' extent, to decode them on; None where the whole slice is better."""
    height, width = slice_shape
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    x0, y0 = float(boxes[:, 0].min()), float(boxes[:, 1].min())
    x1, y1 = float(boxes[:, 2].max()), float(boxes[:, 3].max())
    side = int(np.ceil(max(settings.context * max(x1 - x0, y1 - y0), settings.min_side)))
    if side >= settings.max_fraction * max(height, width):
        return None
    left = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, max(width - side, 0)))
    top = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, max(height - side, 0)))
    return Crop(top, min(top + side, height), left, min(left + side, width))


def cropped_predictor(predictor: VolumePredictor, crop: Crop) -> VolumePredictor:
    """A predictor for ``crop`` of every slice, in ``predictor``'s window, sharing its model and cache."""
    zoomed = copy.copy(predictor)
    zoomed.volume = CroppedSlices(predictor.volume.array[:, crop.top:crop.bottom, crop.left:crop.right],
                                  tuple(predictor.volume.file_axes))
    zoomed.volume_hash = hashlib.blake2b(f"{predictor.volume_hash}|crop {crop}".encode(), digest_size=16).hexdigest()
    zoomed.window_is_automatic = False  # the window was chosen for the prompt on the whole slice already
    zoomed._current_slice = None
    zoomed.__dict__.pop("_window_siblings", None)
    zoomed.__dict__.pop("_windows_used", None)
    return zoomed


def decode_boxes(predictor: VolumePredictor, slice_index: int, boxes_xyxy: np.ndarray,
                 settings: ZoomSettings = DEFAULT_ZOOM) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Boxes of one object (or of objects close together) on one slice, decoded on the whole slice in one pass;
    those whose mask fills too little of them (``ZoomSettings.min_fill``; with an adapter that learnt the crops,
    all of them) are decoded again on one zoomed crop around them all, where they are small enough.

    Returns (K, H, W) bool masks, (K,) predicted IoU and (K, 1, h, w) low-res logits in the whole slice's frame.
    """
    boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
    logits, iou, low_res = predictor.decode(slice_index, None, None, boxes, None, multimask_output=False)
    masks, scores = (logits[:, 0] > 0).cpu().numpy(), iou[:, 0].cpu().numpy()
    rule = _zoom_rule(predictor)
    if rule is None:
        return masks, scores, low_res
    if rule == "every":
        to_zoom = np.arange(len(boxes))
    else:
        box_areas = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1.0)
        to_zoom = np.flatnonzero(masks.reshape(len(boxes), -1).sum(axis=1) / box_areas < settings.min_fill)
    crop = zoom_crop(boxes[to_zoom], predictor.slice_shape, settings) if to_zoom.size else None
    if crop is None:
        return masks, scores, low_res
    crop_logits, crop_iou, _ = cropped_predictor(predictor, crop).decode(
        slice_index, None, None, crop.boxes_into(boxes[to_zoom]), None, multimask_output=False)
    zoomed_logits = crop.paste(crop_logits.cpu().float(), predictor.slice_shape, fill=-20.0)
    masks, scores, low_res = masks.copy(), scores.copy(), low_res.clone()
    masks[to_zoom] = (zoomed_logits[:, 0] > 0).numpy()
    scores[to_zoom] = crop_iou[:, 0].cpu().numpy()
    preprocessing, low_res_size = predictor.model.preprocessing, predictor.model.sam.prompt_encoder.mask_input_size
    low_res[to_zoom] = preprocessing.slice_logits_to_low_res(zoomed_logits, low_res_size).to(low_res)
    return masks, scores, low_res


def predict_box(predictor: VolumePredictor, slice_index: int, box_xyxy: np.ndarray,
                settings: ZoomSettings = DEFAULT_ZOOM) -> Prediction:
    """One object from its box, zoomed where it is small (``decode_boxes``)."""
    masks, ious, low_res = decode_boxes(predictor, slice_index, box_xyxy, settings)
    return Prediction(masks[0], float(ious[0]), low_res[0])
