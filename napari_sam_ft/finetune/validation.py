"""Decoder passes used by training and scoring, and Dice on annotated slices.

``decode_prompts`` and ``class_logits`` return logits on the slice grid (the same resizing the engine
uses), with gradients when called with grad enabled. ``score_slices`` is the validation metric:

* ``box`` / ``point``: one object per connected piece of a class on a slice, prompted with its tight
  box / its deepest interior point; the mean Dice over objects.
* ``none``: the automatic head's argmax labels; per class, Dice over all scored slices together, then
  the mean over the classes present in the reference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..engine.automatic import head_channels
from ..engine.prompts import box_from_mask, interior_point, objects_on_slice
from ..models.registry import Preprocessing

PROMPTED_MODES = ("box", "point")
MODE_VALIDATION = {"box": ("box",), "point": ("point",), "none": ("none",), "mixed": ("box", "none")}


def decode_prompts(sam: nn.Module, preprocessing: Preprocessing, embedding: torch.Tensor, height: int, width: int,
                   boxes_xyxy: np.ndarray | None = None, points_xy: np.ndarray | None = None,
                   point_labels: np.ndarray | None = None) -> torch.Tensor:
    """N objects on one slice: (1, 256, 64, 64) embedding plus (N, 4) boxes and/or (N, P, 2) points with
    (N, P) labels (-1 pads a shorter list) -> (N, 1, H, W) slice-grid logits (single-mask output)."""
    point_prompt, box_prompt = preprocessing.prompt_tensors(height, width, embedding.device, points_xy,
                                                            point_labels, boxes_xyxy)
    sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=None)
    low_res, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=False)
    return preprocessing.logits_to_slice(low_res, height, width)


def pad_points(point_sets: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-object ((P_i, 2) coords, (P_i,) labels) -> (N, P, 2), (N, P) padded with SAM's "not a point" (-1)."""
    longest = max(len(labels) for _, labels in point_sets)
    coords = np.zeros((len(point_sets), longest, 2), np.float32)
    labels = np.full((len(point_sets), longest), -1, np.int64)
    for index, (object_coords, object_labels) in enumerate(point_sets):
        coords[index, :len(object_labels)] = object_coords
        labels[index, :len(object_labels)] = object_labels
    return coords, labels


def class_logits(head: nn.Module, sam: nn.Module, preprocessing: Preprocessing, embeddings: torch.Tensor,
                 shapes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """The automatic head on (B, 256, 64, 64) embeddings -> one (1 + K, H_i, W_i) logit map per slice."""
    low_res = head(sam, embeddings)
    return [preprocessing.logits_to_slice(low_res[index:index + 1], height, width)[0]
            for index, (height, width) in enumerate(shapes)]


def dice_score(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(prediction.sum()) + int(reference.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, reference).sum()) / total


class ClassDice:
    """Per-class Dice accumulated over several slices (intersection and sizes summed first)."""

    def __init__(self, class_ids: Sequence[int]):
        self.class_ids = tuple(int(value) for value in class_ids)
        self.intersection = dict.fromkeys(self.class_ids, 0)
        self.predicted = dict.fromkeys(self.class_ids, 0)
        self.reference = dict.fromkeys(self.class_ids, 0)

    def add(self, predicted_labels: np.ndarray, reference_labels: np.ndarray) -> None:
        for class_id in self.class_ids:
            predicted = predicted_labels == class_id
            reference = reference_labels == class_id
            self.intersection[class_id] += int(np.logical_and(predicted, reference).sum())
            self.predicted[class_id] += int(predicted.sum())
            self.reference[class_id] += int(reference.sum())

    def per_class(self) -> dict[int, float]:
        """Dice of every class present in the reference."""
        return {class_id: 2.0 * self.intersection[class_id] / (self.predicted[class_id] + self.reference[class_id])
                for class_id in self.class_ids if self.reference[class_id] > 0}

    def mean(self) -> float:
        scores = self.per_class()
        return float(np.mean(list(scores.values()))) if scores else float("nan")


@torch.no_grad()
def predict_class_labels(head: nn.Module, sam: nn.Module, preprocessing: Preprocessing, embedding: torch.Tensor,
                         class_ids: Sequence[int], height: int, width: int,
                         outside_channels: Sequence[int] = ()) -> np.ndarray:
    """(1, 256, 64, 64) embedding -> (H, W) int32 label ids from the automatic head's argmax, as the engine
    labels (``engine.automatic.head_channels``): never a channel of ``outside_channels``, the classes whose slice
    range does not hold this slice."""
    logits = class_logits(head, sam, preprocessing, embedding, [(height, width)])[0]
    lookup = np.array((0, *class_ids), np.int32)
    return lookup[head_channels(logits[None], [outside_channels])[0]]


@torch.no_grad()
def predict_prompted(sam: nn.Module, preprocessing: Preprocessing, embedding: torch.Tensor,
                     masks: Sequence[np.ndarray], mode: str, chunk: int = 16) -> list[np.ndarray]:
    """The objects a user would get from the tight box (``box``) or the deepest point (``point``) of each
    (H, W) mask on one slice, decoded ``chunk`` prompts per decoder pass."""
    predictions: list[np.ndarray] = []
    for start in range(0, len(masks), chunk):
        group = masks[start:start + chunk]
        height, width = group[0].shape
        if mode == "box":
            logits = decode_prompts(sam, preprocessing, embedding, height, width,
                                    boxes_xyxy=np.stack([box_from_mask(mask) for mask in group]))
        else:
            points = np.stack([interior_point(mask) for mask in group])[:, None]
            logits = decode_prompts(sam, preprocessing, embedding, height, width, points_xy=points,
                                    point_labels=np.ones((len(group), 1), np.int64))
        predictions.extend((logits[:, 0] > 0).cpu().numpy())
    return predictions


def score_slices(sam: nn.Module, preprocessing: Preprocessing, embeddings: Sequence[torch.Tensor],
                 labels: Sequence[np.ndarray], class_ids: Sequence[int], modes: Sequence[str],
                 head: nn.Module | None = None,
                 outside_channels: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Dice per mode over annotated slices; ``embeddings[i]`` (1, 256, 64, 64) belongs to ``labels[i]`` (H, W),
    on which the automatic head never gives a channel of ``outside_channels[i]`` (default: none excluded)."""
    scores: dict[str, float] = {}
    for mode in modes:
        if mode in PROMPTED_MODES:
            values = []
            for embedding, slice_labels in zip(embeddings, labels):
                masks = [mask for _, mask in objects_on_slice(slice_labels, class_ids)]
                if masks:
                    predicted = predict_prompted(sam, preprocessing, embedding, masks, mode)
                    values.extend(dice_score(prediction, mask) for prediction, mask in zip(predicted, masks))
            scores[mode] = float(np.mean(values)) if values else float("nan")
        elif mode == "none":
            if head is None:
                scores[mode] = 0.0  # no automatic head yet: nothing is labelled
                continue
            accumulator = ClassDice(class_ids)
            for position, (embedding, slice_labels) in enumerate(zip(embeddings, labels)):
                outside = outside_channels[position] if outside_channels is not None else ()
                accumulator.add(predict_class_labels(head, sam, preprocessing, embedding, class_ids,
                                                     *slice_labels.shape, outside_channels=outside), slice_labels)
            scores[mode] = accumulator.mean()
        else:
            raise ValueError(f"unknown prompt mode {mode!r}")
    return scores
