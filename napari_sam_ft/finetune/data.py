"""Training data from annotations: the slices a user labelled become (image slice, label slice) pairs.

Only slices the user annotated are used: by default every slice holding a nonzero label, or an explicit
list of reviewed slices (an explicitly listed slice without labels is a reviewed, truly empty slice and
teaches the automatic head "nothing here"). Unlabelled slices are never taken as background.
Several volumes can be combined; their label ids must mean the same structures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np

from ..engine.prompts import box_from_mask, objects_on_slice
from ..engine.window_choice import window_for_box
from ..engine.zoom import zoom_crop
from ..volume import Volume, Window, choose_window, looks_like_ct


class FinetuneDataError(ValueError):
    """Annotations that cannot train an adapter; the message says what to annotate."""


@dataclass
class VolumeAnnotations:
    """One image volume and the user's labels for it, both (Z, Y, X) (a 2D pair is one slice)."""

    image: np.ndarray | Volume
    labels: np.ndarray | Volume
    name: str = ""
    window: str | tuple[float, float] | Window = "auto"

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        image = self.image.array if isinstance(self.image, Volume) else np.asarray(self.image)
        labels = self.labels.array if isinstance(self.labels, Volume) else np.asarray(self.labels)
        if labels.ndim == 2:  # one 2D slice, its image grey (H, W) or multi-channel (H, W, C)
            labels, image = labels[None], image[None]
        where = f"volume {self.name!r}" if self.name else "volume"
        if image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[-1] not in (2, 3)):
            raise FinetuneDataError(f"{where}: the image must be (Z, Y, X) or (Z, Y, X, C) with 2 or 3 channels, "
                                    f"got shape {image.shape}")
        if labels.shape != image.shape[:3]:
            raise FinetuneDataError(f"{where}: labels shape {labels.shape} does not match image shape {image.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise FinetuneDataError(f"{where}: labels must hold integer label ids, got dtype {labels.dtype}")
        return image, labels


@dataclass
class AnnotatedSlice:
    """One training or validation example."""

    volume_index: int
    slice_index: int
    image_01: np.ndarray  # (H, W) or (H, W, 3) float32, windowed to [0, 1]
    labels: np.ndarray  # (H, W) int32 label ids; ids outside the trained classes are already 0
    # The raw slice (Hounsfield units) of a CT left on the automatic window, whose box prompts the engine
    # windows one by one (``engine.window_choice``); None for MRI, multi-channel images and explicit windows.
    raw: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])


@dataclass(frozen=True)
class FieldOfView:
    """Where the annotated structures lie in one (Z, H, W) volume: slices ``slices[0]..slices[1] - 1`` and a
    square window of rows ``rows[0]..rows[1] - 1`` and columns ``cols[0]..cols[1] - 1`` around them.

    Training on this window (resized to the model's input) magnifies small structures; inference finds the
    same window again from the adapter's metadata and skips the slices outside ``slices``.
    """

    volume_shape: tuple[int, int, int]
    slices: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]
    # Each class's own slice range (start, stop), by the same rule as ``slices``: a class is never found on a
    # slice outside it. Empty for adapters saved before it was recorded (then ``slices`` holds for every class).
    class_slices: tuple[tuple[int, tuple[int, int]], ...] = ()

    def crop(self, slice_2d: np.ndarray) -> np.ndarray:
        return slice_2d[self.rows[0]:self.rows[1], self.cols[0]:self.cols[1]]

    def to_json(self) -> dict:
        return {"volume_shape": list(self.volume_shape), "slices": list(self.slices), "rows": list(self.rows),
                "cols": list(self.cols),
                "class_slices": {str(class_id): list(extent) for class_id, extent in self.class_slices}}

    @classmethod
    def from_json(cls, record: dict) -> "FieldOfView":
        return cls(tuple(int(v) for v in record["volume_shape"]), tuple(int(v) for v in record["slices"]),
                   tuple(int(v) for v in record["rows"]), tuple(int(v) for v in record["cols"]),
                   tuple(sorted((int(key), (int(extent[0]), int(extent[1])))
                                for key, extent in (record.get("class_slices") or {}).items())))


# The window is the annotations' extent, grown by this fraction of it on every side plus a few pixels, and
# never smaller than MIN_FIELD_OF_VIEW_PX (LiteMedSAM sees 256 px: a 64 px window is magnified 4x). Tight:
# on mni152 (three small deep-brain structures, 1 mm T1) a window of 1.2x the extent instead of 1.6x
# (magnified 2.4x instead of 1.75x) took the held-out automatic Dice from 0.635 (400 decoder steps) to 0.684
# (300 steps), at the old learning rates.
FIELD_OF_VIEW_MARGIN = 0.1
FIELD_OF_VIEW_PAD_PX = 4
MIN_FIELD_OF_VIEW_PX = 64


def field_of_view(labels_zyx: np.ndarray, slice_indices: Sequence[int],
                  class_ids: Sequence[int] = ()) -> FieldOfView:
    """The window around the labels on ``slice_indices`` of a (Z, H, W) label volume.

    The slice range reaches one gap between annotated slices (at least 2 slices) past the first and last
    annotated slice: a structure continues a little beyond the slices a user spread their annotations over.
    Each of ``class_ids`` gets its own range by the same rule, from the slices it is painted on: on mni152 the
    pallidum (slices 66-79) was found on 5 held-out slices inside the whole range but beyond its own (61-65 and
    80, where only the hippocampus lies), 280 false pixels against 2,119 true ones on its held-out slices.
    """
    num_slices, height, width = labels_zyx.shape
    indices = sorted(int(index) for index in slice_indices)
    painted = np.zeros((height, width), bool)
    for index in indices:
        painted |= labels_zyx[index] != 0
    rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
    if rows.size == 0:
        return FieldOfView((num_slices, height, width), (0, num_slices), (0, height), (0, width))
    extent = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    side = int(min(max(math.ceil(extent * (1 + 2 * FIELD_OF_VIEW_MARGIN) + 2 * FIELD_OF_VIEW_PAD_PX),
                       MIN_FIELD_OF_VIEW_PX), height, width))

    def window(first: int, last: int, size: int) -> tuple[int, int]:
        start = int(round((first + last + 1) / 2 - side / 2))
        start = min(max(start, 0), size - side)
        return start, start + side

    def slice_range(annotated: list[int]) -> tuple[int, int]:
        gap = max(2, math.ceil((annotated[-1] - annotated[0]) / max(len(annotated) - 1, 1)))
        return max(annotated[0] - gap, 0), min(annotated[-1] + 1 + gap, num_slices)

    class_slices = []
    for class_id in sorted({int(value) for value in class_ids}):
        painted_on = [index for index in indices if (labels_zyx[index] == class_id).any()]
        if painted_on:
            class_slices.append((class_id, slice_range(painted_on)))
    return FieldOfView((num_slices, height, width), slice_range(indices), window(rows[0], rows[-1], height),
                       window(cols[0], cols[-1], width), tuple(class_slices))


@dataclass
class TrainingData:
    """Training and validation slices plus the classes the adapter learns."""

    train: list[AnnotatedSlice]
    validation: list[AnnotatedSlice]
    class_ids: tuple[int, ...]
    class_names: dict[int, str]
    windows: list[Window]
    volume_names: list[str] = field(default_factory=list)
    fields_of_view: list[FieldOfView] = field(default_factory=list)  # one per volume
    cropped: bool = False  # True: the slices are cut to ``fields_of_view``
    # The image volumes themselves (Volume or array, as given; one per volume), so that the engine can be run on
    # the validation slices as inference will run it (``finetune.refinement``). Empty: that check is skipped.
    images: list = field(default_factory=list)

    def cropped_to_fields_of_view(self) -> "TrainingData":
        """The same examples cut to each volume's field of view (see ``FieldOfView``)."""
        if self.cropped:
            return self

        def cut(example: AnnotatedSlice) -> AnnotatedSlice:
            view = self.fields_of_view[example.volume_index]
            return replace(example, image_01=np.ascontiguousarray(view.crop(example.image_01)),
                           labels=np.ascontiguousarray(view.crop(example.labels)),
                           raw=None if example.raw is None else np.ascontiguousarray(view.crop(example.raw)))

        return replace(self, train=[cut(example) for example in self.train],
                       validation=[cut(example) for example in self.validation], cropped=True)

    def class_indices(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) label ids -> (H, W) int64 channel indices: 0 background, k for ``class_ids[k - 1]``."""
        ids = np.asarray(self.class_ids, np.int64)
        positions = np.searchsorted(ids, labels)
        found = (positions < len(ids)) & (ids[np.minimum(positions, len(ids) - 1)] == labels)
        return np.where(found, positions + 1, 0).astype(np.int64)

    def describe(self) -> str:
        def where(items: list[AnnotatedSlice]) -> str:
            return ", ".join(f"{self.volume_names[s.volume_index] or s.volume_index}:{s.slice_index}"
                             if len(self.volume_names) > 1 else str(s.slice_index) for s in items)

        return (f"{len(self.train)} training slice(s) [{where(self.train)}], {len(self.validation)} validation "
                f"slice(s) [{where(self.validation)}], {len(self.class_ids)} class(es)")


def zoomed_box_examples(example: AnnotatedSlice, class_ids: Sequence[int],
                        max_crops: int | None = None) -> tuple[AnnotatedSlice, list[AnnotatedSlice]]:
    """The slice as an adapter that zooms decodes it -> (whole, crops): the whole slice labelled with only the
    objects too large to zoom, and one crop per small object (``engine.zoom.zoom_crop`` of its tight box, as
    inference takes it), each labelled with only the objects lying wholly inside it. With ``max_crops``, at
    most that many crops, spread evenly over the small objects in the order they are found (a chest slice holds
    ~25 rib cross-sections: every one of them would cost an encoder pass per view and per validation).

    A box-mode adapter learns from and is validated on exactly these, as it decodes every small box zoomed;
    objects cut by a crop's edge are left unlabelled, as a box is never drawn around a piece of one. ``whole``
    is returned even when nothing is left on it (it then teaches nothing).
    """
    objects = [mask for _, mask in objects_on_slice(example.labels, class_ids)]
    boxes = [box_from_mask(mask) for mask in objects]
    crops = [zoom_crop(box, example.shape) for box in boxes]
    large = np.zeros(example.shape, bool)
    for mask, crop in zip(objects, crops):
        if crop is None:
            large |= mask
    whole = replace(example, labels=np.where(large, example.labels, 0).astype(example.labels.dtype))
    small = spread_evenly([crop for crop in crops if crop is not None], max_crops)
    zoomed = []
    for crop in small:
        inside = np.zeros(example.shape, bool)
        for other, other_box in zip(objects, boxes):
            if (other_box[0] >= crop.left and other_box[1] >= crop.top and other_box[2] <= crop.right
                    and other_box[3] <= crop.bottom):
                inside |= other
        window = (slice(crop.top, crop.bottom), slice(crop.left, crop.right))
        labels = np.where(inside, example.labels, 0).astype(example.labels.dtype)
        zoomed.append(replace(example, image_01=np.ascontiguousarray(example.image_01[window]),
                              labels=np.ascontiguousarray(labels[window]), raw=None))
    return whole, zoomed


def spread_evenly(items: list, at_most: int | None) -> list:
    """``items``, or ``at_most`` of them spread evenly over the list (first and last kept)."""
    if at_most is None or len(items) <= at_most:
        return list(items)
    return [items[int(position)] for position in np.linspace(0, len(items) - 1, at_most).round()]


def windowed_per_prompt(example: AnnotatedSlice, class_ids: Sequence[int]) -> list[AnnotatedSlice]:
    """The slice as the engine segments box prompts on it where it chooses the window per prompt: one copy per
    window its objects' boxes choose (``engine.window_choice.window_for_box``), windowed so and labelled with
    only those objects, in the order the objects are found. A lung lesion is then learnt in the window its box is
    decoded in, not in the volume's soft-tissue window. A slice without raw intensities is returned as it is.
    """
    if example.raw is None:
        return [example]
    groups: dict[str, tuple[Window, np.ndarray]] = {}  # window key -> (window, its objects' pixels)
    for _, mask in objects_on_slice(example.labels, class_ids):
        window = window_for_box(example.raw, box_from_mask(mask))
        _, objects = groups.setdefault(window.key, (window, np.zeros(example.shape, bool)))
        objects |= mask
    if not groups:
        return [replace(example, raw=None)]
    return [replace(example, image_01=model_channels(window.apply(example.raw)),
                    labels=np.where(objects, example.labels, 0).astype(example.labels.dtype), raw=None)
            for window, objects in groups.values()]


def model_channels(slice_01: np.ndarray) -> np.ndarray:
    """A windowed slice as the encoder takes it: (H, W) grey or (H, W, 3); a two-channel slice's third channel
    is the mean of the two, as the engine's predictor makes it."""
    if slice_01.ndim == 3 and slice_01.shape[-1] == 2:
        slice_01 = np.concatenate([slice_01, slice_01.mean(axis=-1, keepdims=True)], axis=-1)
    return np.ascontiguousarray(slice_01, np.float32)


def annotated_slices(labels_zyx: np.ndarray) -> list[int]:
    """Indices of the slices holding at least one nonzero label."""
    labels_zyx = np.asarray(labels_zyx)
    if labels_zyx.ndim == 2:
        labels_zyx = labels_zyx[None]
    return [int(index) for index in np.flatnonzero(labels_zyx.reshape(labels_zyx.shape[0], -1).any(axis=1))]


def _per_volume(value, count: int, what: str) -> list[list[int] | None]:
    """None, one list for every volume, or one list (or None) per volume."""
    if value is None:
        return [None] * count
    value = list(value)
    if value and all(isinstance(item, (int, np.integer)) for item in value):
        return [[int(item) for item in value]] * count
    if len(value) != count:
        raise FinetuneDataError(f"{what}: give one slice list for every volume ({count}), got {len(value)}")
    return [None if item is None else [int(index) for index in item] for item in value]


def _spread_pick(count: int, wanted: int) -> list[int]:
    """``wanted`` positions out of ``count``, spread evenly and away from the ends."""
    return sorted({int(round(position)) for position in np.linspace(0, count - 1, wanted + 2)[1:-1]})


def build_training_data(volumes: Sequence[VolumeAnnotations], *, slices=None, validation_slices=None,
                        classes: Sequence[int] | None = None, class_names: dict[int, str] | None = None,
                        validation_fraction: float = 0.2) -> TrainingData:
    """Collect annotated slices of one or more volumes and hold some out for validation.

    ``slices``: None (every slice with a nonzero label), one list for all volumes, or one list per volume
    (the slices the user reviewed). ``validation_slices``: same forms; None holds out
    ``validation_fraction`` of the annotated slices (at least one), spread through the stack.
    ``classes``: the label ids to learn (others become background); default every id found.
    """
    if not volumes:
        raise FinetuneDataError("no image/labels pair was given")
    chosen = _per_volume(slices, len(volumes), "slices")
    held_out = _per_volume(validation_slices, len(volumes), "validation slices")
    candidates: list[tuple[int, int]] = []  # (volume index, slice index) the user annotated or reviewed
    arrays = []
    for volume_index, volume in enumerate(volumes):
        image, labels = volume.arrays()
        arrays.append((image, labels))
        annotated = annotated_slices(labels)
        listed = annotated if chosen[volume_index] is None else chosen[volume_index]
        for slice_index in listed:
            if not 0 <= slice_index < labels.shape[0]:
                raise FinetuneDataError(f"slice {slice_index} is out of range 0..{labels.shape[0] - 1} "
                                        f"(volume {volume.name or volume_index})")
        candidates.extend((volume_index, index) for index in sorted(set(listed)))
        for index in held_out[volume_index] or []:
            if not 0 <= index < labels.shape[0] or not labels[index].any():
                raise FinetuneDataError(f"validation slice {index} of volume {volume.name or volume_index} holds no "
                                        "annotations")
            if (volume_index, index) not in candidates:
                candidates.append((volume_index, index))
    with_labels = [(v, z) for v, z in candidates if arrays[v][1][z].any()]
    if not with_labels:
        raise FinetuneDataError("the labels hold no annotations on the chosen slices: paint at least 2 slices "
                                "(one is held out to check the adapter)")
    if len(candidates) < 2:
        volume_index, slice_index = candidates[0]
        raise FinetuneDataError(f"only one annotated slice (slice {slice_index}): fine-tuning needs at least 2, "
                                "one to train on and one held out to check the adapter")

    if any(item is not None for item in held_out):
        validation_keys = {(v, z) for v, items in enumerate(held_out) for z in items or []}
    elif len(with_labels) == 2 and len(candidates) == 2:
        # One slice trains and one checks: train on the one with more labelled pixels (a lesion's middle
        # rather than its tip), it teaches more than the other.
        validation_keys = {min(with_labels, key=lambda key: (np.count_nonzero(arrays[key[0]][1][key[1]]), key))}
    else:
        wanted = max(1, int(round(validation_fraction * len(with_labels))))
        wanted = min(wanted, len(with_labels) - 1) if len(candidates) == len(with_labels) else wanted
        validation_keys = {with_labels[position] for position in _spread_pick(len(with_labels), wanted)}
    train_keys = [key for key in candidates if key not in validation_keys]
    if not any(arrays[v][1][z].any() for v, z in train_keys):
        raise FinetuneDataError("after holding out the validation slices no annotated training slice is left: "
                                "annotate more slices")

    present = sorted({int(value) for v, z in candidates for value in np.unique(arrays[v][1][z]) if value != 0})
    if classes is None:
        class_ids = tuple(present)
    else:
        class_ids = tuple(sorted({int(value) for value in classes}))
        missing = [value for value in class_ids if value not in present]
        if missing:
            raise FinetuneDataError(f"class id(s) {missing} are not painted on any chosen slice "
                                    f"(found {present})")
        if not class_ids:
            raise FinetuneDataError("no class ids were given")
    names = {label: (class_names or {}).get(label, f"label {label}") for label in class_ids}

    windows = [volume.window if isinstance(volume.window, Window) else choose_window(image, volume.window)
               for volume, (image, _) in zip(volumes, arrays)]
    # As the engine: a single-channel CT left on "auto" has its box prompts windowed one by one.
    windowed_per_box = [isinstance(volume.window, str) and volume.window == "auto" and image.ndim == 3
                        and looks_like_ct(image) for volume, (image, _) in zip(volumes, arrays)]

    def example(volume_index: int, slice_index: int) -> AnnotatedSlice:
        image, labels = arrays[volume_index]
        slice_labels = np.asarray(labels[slice_index]).astype(np.int32)
        slice_labels[~np.isin(slice_labels, class_ids)] = 0
        windowed = windows[volume_index].apply(image[slice_index])
        raw = np.asarray(image[slice_index], np.float32) if windowed_per_box[volume_index] else None
        return AnnotatedSlice(volume_index, slice_index, model_channels(windowed), slice_labels, raw)

    return TrainingData(train=[example(v, z) for v, z in train_keys],
                        validation=[example(v, z) for v, z in sorted(validation_keys)],
                        class_ids=class_ids, class_names=names, windows=windows,
                        images=[volume.image if isinstance(volume.image, Volume) else image
                                for volume, (image, _) in zip(volumes, arrays)],
                        volume_names=[volume.name for volume in volumes],
                        fields_of_view=[field_of_view(labels, [z for v, z in candidates if v == volume_index],
                                                      class_ids) for volume_index, (_, labels) in enumerate(arrays)])
