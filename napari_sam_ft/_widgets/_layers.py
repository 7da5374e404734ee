"""The layers the segment widget works with: prompt points and boxes, the preview, and the user's labels.

Prompt layers share the image's scale and translate, so their data coordinates are the image's voxel
indices (z, y, x). Commits go through napari's Labels edit history, so Ctrl-Z undoes them exactly.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import pandas as pd
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.colormaps import DirectLabelColormap

from .._layer_data import GEOMETRY_KEY, volume_from_layer
from ..volume import Volume
from ..engine.prompts import points_zyx_to_prompts, rectangle_zyx_to_box

POINTS_NAME = "SAM points"
BOXES_NAME = "SAM boxes"
PREVIEW_NAME = "SAM preview"
POSITIVE, NEGATIVE = "positive", "negative"
PREVIEW_VALUE = 1


@dataclass
class SlicePrompts:
    """Everything the user placed on one slice, in SAM coordinates (x = column, y = row)."""

    slice_index: int
    points_xy: np.ndarray | None = None  # (N, 2)
    point_labels: np.ndarray | None = None  # (N,) 1 positive, 0 negative
    box_xyxy: np.ndarray | None = None  # (4,)

    @property
    def empty(self) -> bool:
        return self.points_xy is None and self.box_xyxy is None


def geometry_kwargs(image: Image) -> dict:
    """Scale, translate and source geometry, so a new layer overlays ``image`` and saves in its affine."""
    kwargs = {"scale": tuple(image.scale), "translate": tuple(image.translate)}
    if GEOMETRY_KEY in image.metadata:
        kwargs["metadata"] = {GEOMETRY_KEY: image.metadata[GEOMETRY_KEY]}
    return kwargs


def make_points_layer(viewer, image: Image) -> Points:
    features = pd.DataFrame({"prompt": pd.Categorical([], categories=[POSITIVE, NEGATIVE])})
    layer = viewer.add_points(
        np.empty((0, 3)), ndim=3, name=POINTS_NAME, features=features, feature_defaults={"prompt": POSITIVE},
        face_color="prompt", face_color_cycle=["#00ff66", "#ff2244"], border_color="white", size=3,
        out_of_slice_display=False, scale=tuple(image.scale), translate=tuple(image.translate))
    layer.mode = "add"
    return layer


def make_boxes_layer(viewer, image: Image) -> Shapes:
    layer = viewer.add_shapes(ndim=3, name=BOXES_NAME, edge_color="#ffcc00", face_color="transparent",
                              edge_width=0.6, scale=tuple(image.scale), translate=tuple(image.translate))
    layer.mode = "add_rectangle"
    return layer


def make_preview_layer(viewer, image: Image) -> Labels:
    colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", PREVIEW_VALUE: "#00e5ff"})
    data = np.zeros(image.data.shape, dtype=np.uint8)
    return viewer.add_labels(data, name=PREVIEW_NAME, opacity=0.55, colormap=colormap, **geometry_kwargs(image))


def new_labels_layer(viewer, image: Image, name: str, data: np.ndarray | None = None) -> Labels:
    """A Labels layer over ``image`` (zeros unless ``data`` is given) that saves in the image's geometry."""
    data = np.zeros(image.data.shape, dtype=np.int32) if data is None else data
    return viewer.add_labels(data, name=name, **geometry_kwargs(image))


def slice_prompts(points: Points | None, boxes: Shapes | None, slice_index: int) -> SlicePrompts:
    """The points and the most recent box on ``slice_index``."""
    prompts = SlicePrompts(slice_index)
    if points is not None and len(points.data):
        positive = np.asarray(points.features["prompt"].astype(str) == POSITIVE)
        for prompt in points_zyx_to_prompts(points.data, positive):
            if prompt.slice_index == slice_index:
                prompts.points_xy, prompts.point_labels = prompt.points, prompt.point_labels
    if boxes is not None:
        for corners, shape_type in zip(boxes.data, boxes.shape_type):
            if shape_type != "rectangle" or np.asarray(corners).shape[-1] != 3:
                continue
            box_slice, box = rectangle_zyx_to_box(corners)
            if box_slice == slice_index and box[2] > box[0] and box[3] > box[1]:
                prompts.box_xyxy = box
    return prompts


def prompted_slices(points: Points | None, boxes: Shapes | None) -> list[int]:
    """Slices that hold at least one point or box."""
    slices: set[int] = set()
    if points is not None and len(points.data):
        slices.update(int(z) for z in np.rint(np.asarray(points.data)[:, 0]))
    if boxes is not None:
        slices.update(int(np.rint(np.asarray(corners)[:, 0].mean())) for corners in boxes.data
                      if np.asarray(corners).shape[-1] == 3)
    return sorted(slices)


class LayerVolume:
    """An image layer as a ``Volume``, made once and kept while the layer and its data stay the same."""

    def __init__(self):
        self._source: tuple | None = None  # (weak reference to the layer, the layer's data object)
        self._volume: Volume | None = None

    def cached(self, image: Image | None) -> Volume | None:
        if image is None or self._source is None:
            return None
        layer_ref, data = self._source
        return self._volume if layer_ref() is image and data is image.data else None

    def get(self, image: Image) -> Volume:
        """Raises ``VolumeError`` for a layer that is not a single-channel 3D volume."""
        volume = self.cached(image)
        if volume is None:
            volume = volume_from_layer(image.data, image.metadata, image.scale, image.translate)
            self._source, self._volume = (weakref.ref(image), image.data), volume
        return volume


def key_masks_for_propagation(preview: np.ndarray, points: Points, boxes: Shapes, current_slice: int,
                              committed_slice: np.ndarray | None) -> dict[int, np.ndarray]:
    """Preview masks on prompted slices; else the preview, or else the committed label, on the current slice.

    Only those slices of the preview are read (a large scan's whole preview is never compared on the GUI thread).
    """
    preview = np.asarray(preview)
    masks = {z: preview[z] > 0 for z in prompted_slices(points, boxes) if 0 <= z < preview.shape[0]}
    keys = {z: mask for z, mask in masks.items() if mask.any()}
    if not keys and (preview[current_slice] > 0).any():
        keys = {current_slice: preview[current_slice] > 0}
    if not keys and committed_slice is not None and committed_slice.any():
        keys = {current_slice: np.asarray(committed_slice, dtype=bool)}
    return keys


def current_slice_index(viewer, image: Image) -> int:
    """The image slice under the viewer's current z position."""
    z = float(image.world_to_data(viewer.dims.point)[0])
    return int(np.clip(np.rint(z), 0, image.data.shape[0] - 1))


def slices_with_content(volume_zyx: np.ndarray) -> np.ndarray:
    """Indices of the slices of a (Z, Y, X) array that hold any non-zero voxel."""
    volume = np.asarray(volume_zyx)
    return np.flatnonzero(volume.reshape(volume.shape[0], -1).any(axis=1))


def commit_mask(labels: Labels, slice_indices: np.ndarray, masks: np.ndarray, label_id: int,
                overwrite_other_labels: bool = False) -> tuple[int, int]:
    """Paint ``masks`` ((K, Y, X) bool, for slices ``slice_indices``) into ``labels`` as ``label_id`` as one
    undoable edit; returns (voxels changed, voxels of other labels kept).

    Only the given slices are read, so committing a few slices of a large scan stays quick on the GUI thread.
    Voxels that hold another label keep it unless ``overwrite_other_labels``.
    """
    data = labels.data
    slice_indices = np.asarray(slice_indices, dtype=np.intp)
    masks = np.asarray(masks, dtype=bool)
    if tuple(data.shape[1:]) != tuple(masks.shape[1:]) or len(slice_indices) != len(masks):
        raise ValueError(f"the labels layer {labels.name!r} has shape {tuple(data.shape)}, the mask slices "
                         f"{tuple(masks.shape)}")
    current = np.asarray(data[slice_indices])
    target = masks & (current != label_id)
    other = target & (current != 0)
    if not overwrite_other_labels:
        target &= ~other
    z, y, x = np.nonzero(target)
    kept = 0 if overwrite_other_labels else int(other.sum())
    if z.size == 0:
        return 0, kept
    with labels.block_history():  # one history item: a single Ctrl-Z restores the labels exactly
        labels.data_setitem((slice_indices[z], y, x), label_id)
    return int(z.size), kept
