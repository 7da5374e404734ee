"""Prompts: the documented JSON prompt file, napari-layer conversions, and prompts simulated from labels.

A prompt file is a JSON list; each item is one object on one slice::

    [{"slice": 14, "label": 1, "box": [x_min, y_min, x_max, y_max]},
     {"slice": 14, "label": 5, "points": [[x, y], [x, y]], "point_labels": [1, 0]}]

x is the column and y the row of the (Z, Y, X) volume, in continuous pixel units as SAM uses them: pixel
(column c, row r) covers [c, c + 1) x [r, r + 1), so its centre is (c + 0.5, r + 0.5) and a box enclosing
columns 10..20 is x_min = 10, x_max = 21. ``slice`` indexes Z (the slicing axis);
``label`` is the label id written for that object (default 1); ``point_labels`` are 1 for a positive and
0 for a negative click (default: all positive). An item may hold a box, points, or both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage


class PromptError(ValueError):
    """A prompt that cannot be used; the message names the item, the value and the allowed range."""


@dataclass
class SlicePrompt:
    """One object's prompt on one slice, in SAM's continuous pixel coordinates (x = column, y = row)."""

    slice_index: int
    label: int = 1
    box: np.ndarray | None = None  # (4,) x_min, y_min, x_max, y_max
    points: np.ndarray | None = None  # (N, 2) x, y
    point_labels: np.ndarray | None = field(default=None)  # (N,) 1 positive, 0 negative

    def to_json(self) -> dict:
        item: dict = {"slice": int(self.slice_index), "label": int(self.label)}
        if self.box is not None:
            item["box"] = [float(value) for value in self.box]
        if self.points is not None:
            item["points"] = [[float(x), float(y)] for x, y in self.points]
            item["point_labels"] = [int(value) for value in self.point_labels]
        return item


def _shown(value) -> str:
    """A number for a message; integers too long to print (Python refuses > 4300 digits) are summarised."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() <= 64:
            return str(value)
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if isinstance(value, float):
        return f"{value:g}"
    try:
        text = repr(value)
    except ValueError:  # a list holding an integer too long to print
        return f"a {type(value).__name__} holding a number too long to show"
    return text if len(text) <= 80 else text[:77] + "..."


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PromptError(f"{what} must be a finite number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise PromptError(f"{what} must be a finite number, got {_shown(value)}")
    return number


def _in_range(value: float, low: float, high: float, what: str) -> float:
    if not low <= value <= high:
        raise PromptError(f"{what} = {_shown(value)} is out of range {low:g}..{high:g}")
    return value


def parse_prompt_item(item, index: int, volume_shape: tuple[int, int, int]) -> SlicePrompt:
    """Validate one JSON item against a (Z, Y, X) volume shape and turn it into a ``SlicePrompt``."""
    num_slices, height, width = volume_shape
    where = f"prompt {index}"
    if not isinstance(item, dict):
        raise PromptError(f"{where}: must be an object with 'slice' and a 'box' and/or 'points', got {type(item).__name__}")
    unknown = set(item) - {"slice", "label", "box", "points", "point_labels"}
    if unknown:
        raise PromptError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    if "slice" not in item:
        raise PromptError(f"{where}: needs a 'slice' index (0..{num_slices - 1})")
    slice_value = item["slice"]
    if isinstance(slice_value, bool) or not isinstance(slice_value, int):
        raise PromptError(f"{where}: 'slice' must be an integer, got {_shown(slice_value)}")
    _in_range(slice_value, 0, num_slices - 1, f"{where}: slice")
    label = item.get("label", 1)
    if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label < 2**31:
        raise PromptError(f"{where}: 'label' must be a positive integer, got {_shown(label)}")
    box = None
    if "box" in item:
        raw = item["box"]
        if not isinstance(raw, list) or len(raw) != 4:
            raise PromptError(f"{where}: 'box' must be [x_min, y_min, x_max, y_max], got {_shown(raw)}")
        x0, y0, x1, y1 = (_number(value, f"{where}: box value") for value in raw)
        _in_range(x0, 0, width, f"{where}: box x_min")
        _in_range(x1, 0, width, f"{where}: box x_max")
        _in_range(y0, 0, height, f"{where}: box y_min")
        _in_range(y1, 0, height, f"{where}: box y_max")
        if x1 < x0 or y1 < y0:
            raise PromptError(f"{where}: box {raw} has x_max < x_min or y_max < y_min")
        box = np.array([x0, y0, x1, y1], np.float32)
    points = point_labels = None
    if "points" in item:
        raw = item["points"]
        if not isinstance(raw, list) or not raw or not all(isinstance(p, list) and len(p) == 2 for p in raw):
            raise PromptError(f"{where}: 'points' must be a non-empty list of [x, y] pairs, got {_shown(raw)}")
        if len(raw) > 1000:
            raise PromptError(f"{where}: {len(raw)} points is more than the 1000 allowed per object")
        points = np.array([[_number(x, f"{where}: point x"), _number(y, f"{where}: point y")] for x, y in raw], np.float32)
        for x, y in points:
            _in_range(float(x), 0, width, f"{where}: point x")
            _in_range(float(y), 0, height, f"{where}: point y")
        raw_labels = item.get("point_labels", [1] * len(raw))
        if not isinstance(raw_labels, list) or len(raw_labels) != len(raw) or any(
                value not in (0, 1) or isinstance(value, bool) for value in raw_labels):
            raise PromptError(f"{where}: 'point_labels' must list 0 or 1 for each of the {len(raw)} points")
        point_labels = np.array(raw_labels, np.int64)
    elif "point_labels" in item:
        raise PromptError(f"{where}: 'point_labels' given without 'points'")
    if box is None and points is None:
        raise PromptError(f"{where}: needs a 'box' or 'points'")
    return SlicePrompt(int(slice_value), int(label), box, points, point_labels)


def parse_prompts(data, volume_shape: tuple[int, int, int]) -> list[SlicePrompt]:
    """Validate a decoded JSON prompt document (a list of items, or {"prompts": [...]})."""
    if isinstance(data, dict) and "prompts" in data:
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptError(f"a prompt file must hold a JSON list of prompts, got {type(data).__name__}")
    if not data:
        raise PromptError("the prompt file holds no prompts")
    return [parse_prompt_item(item, index, volume_shape) for index, item in enumerate(data)]


def load_prompts(path: str | Path, volume_shape: tuple[int, int, int]) -> list[SlicePrompt]:
    """Read and validate a JSON prompt file for a volume of (Z, Y, X) ``volume_shape``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PromptError(f"{path}: cannot read prompt file ({error})") from error
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:  # ValueError: JSONDecodeError, or an integer too long to read
        raise PromptError(f"{path}: is not valid JSON ({error})") from error
    try:
        return parse_prompts(data, volume_shape)
    except PromptError as error:
        raise PromptError(f"{path}: {error}") from None


def save_prompts(path: str | Path, prompts: list[SlicePrompt]) -> None:
    from ..volume import atomic_write

    payload = json.dumps([prompt.to_json() for prompt in prompts], indent=1)
    atomic_write(Path(path), lambda temporary: temporary.write_text(payload, encoding="utf-8"))


# --- prompts simulated from reference masks (evaluation, fine-tuning) ----------------------------------

def box_from_mask(mask: np.ndarray, margin: float = 0.0) -> np.ndarray | None:
    """The (x_min, y_min, x_max, y_max) box enclosing a 2D mask's pixels, grown by ``margin``, within the slice.

    Continuous coordinates: a pixel (c, r) covers [c, c + 1) x [r, r + 1), so the far edges are one past the
    last pixel. (Boxes through the last pixels' centres cut half a pixel off every side, which costs
    LiteMedSAM several Dice points on small, upsampled slices.)
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return np.array([max(cols[0] - margin, 0), max(rows[0] - margin, 0),
                     min(cols[-1] + 1 + margin, width), min(rows[-1] + 1 + margin, height)], np.float32)


# A simulated user prompts each piece of a class they see, but not specks: pieces smaller than this fraction of
# the class's largest piece on the slice (a click on a fragment at a lung's apex finds the whole chest).
USER_MIN_PIECE_FRACTION = 0.1


def objects_on_slice(labels: np.ndarray, class_ids: Sequence[int],
                     min_fraction: float = 0.0) -> list[tuple[int, np.ndarray]]:
    """(class id, (H, W) bool mask) for every object on a label slice: each connected piece of a class.

    A user boxes or clicks each piece they see (a left and a right hippocampus are two boxes), so
    prompted training and scoring do the same; one box around both would cover the brain between them.
    Pieces smaller than ``min_fraction`` of their class's largest piece on the slice are left out.
    """
    present = set(np.unique(labels).tolist())
    objects = []
    for class_id in class_ids:
        if class_id not in present:
            continue
        pieces, count = ndimage.label(labels == class_id)
        areas = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
        objects.extend((class_id, pieces == piece + 1) for piece in range(count)
                       if areas[piece] >= min_fraction * areas.max())
    return objects


def user_objects_on_slice(labels: np.ndarray, class_ids: Sequence[int]) -> list[tuple[int, np.ndarray]]:
    """The objects a simulated user prompts on a label slice: ``objects_on_slice`` without the specks."""
    return objects_on_slice(labels, class_ids, USER_MIN_PIECE_FRACTION)


def pixel_centres_xy(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Pixel (row, column) indices -> (N, 2) float32 (x, y) of their centres, in SAM's continuous coordinates."""
    return np.stack([np.asarray(cols, np.float32) + 0.5, np.asarray(rows, np.float32) + 0.5], axis=-1)


def interior_point(mask: np.ndarray) -> np.ndarray | None:
    """The (x, y) centre of the pixel deepest inside a 2D mask (largest distance to its border)."""
    if not mask.any():
        return None
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return pixel_centres_xy(np.array([row]), np.array([col]))[0]


# napari puts pixel centres at integer coordinates; SAM's continuous coordinates put them at +0.5.
NAPARI_TO_PIXEL = 0.5


def points_zyx_to_prompts(points_zyx: np.ndarray, positive: np.ndarray, label: int = 1) -> list[SlicePrompt]:
    """napari Points data (N, 3) as (z, y, x) plus a positive flag per point -> one prompt per slice."""
    points_zyx = np.asarray(points_zyx, dtype=np.float32).reshape(-1, 3)
    in_plane_xy = points_zyx[:, [2, 1]] + NAPARI_TO_PIXEL
    positive = np.asarray(positive, dtype=bool).reshape(-1)
    prompts = []
    for slice_index in np.unique(np.rint(points_zyx[:, 0]).astype(int)):
        on_slice = np.rint(points_zyx[:, 0]).astype(int) == slice_index
        prompts.append(SlicePrompt(int(slice_index), label, None, in_plane_xy[on_slice],
                                   positive[on_slice].astype(np.int64)))
    return prompts


def rectangle_zyx_to_box(corners_zyx: np.ndarray) -> tuple[int, np.ndarray]:
    """A napari Shapes rectangle (4, 3) as (z, y, x) corners -> (slice index, xyxy box)."""
    corners = np.asarray(corners_zyx, dtype=np.float32).reshape(-1, 3)
    slice_index = int(np.rint(corners[:, 0].mean()))
    ys, xs = corners[:, 1] + NAPARI_TO_PIXEL, corners[:, 2] + NAPARI_TO_PIXEL
    return slice_index, np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def box_to_rectangle_zyx(slice_index: int, box_xyxy) -> np.ndarray:
    """A SAM box on a slice -> the (4, 3) napari rectangle corners, (z, y, x) with pixel centres at integers."""
    x0, y0, x1, y1 = (float(value) - NAPARI_TO_PIXEL for value in box_xyxy)
    z = float(slice_index)
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]])


def point_to_napari_zyx(slice_index: int, point_xy) -> np.ndarray:
    """A SAM (x, y) click on a slice -> the napari (z, y, x) point."""
    x, y = (float(value) - NAPARI_TO_PIXEL for value in point_xy)
    return np.array([float(slice_index), y, x])
