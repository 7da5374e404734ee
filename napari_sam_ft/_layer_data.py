"""Volumes <-> napari layer data tuples, keeping the scan's geometry with every layer.

A layer made from a ``Volume`` carries the volume's whole geometry (affine, voxel order, flips, spacing, the
source file and its header, class names, and ``world_affine``: displayed index (z, y, x, 1) -> RAS world mm) in
``layer.metadata[GEOMETRY_KEY]``, so a mask drawn on it is written back in the scan's own geometry. A layer
without it (napari's *new labels layer* button, ``viewer.add_labels``) adopts the geometry of the scan whose
voxel grid it lies on, or is refused: ``volume_for_layer``. No Qt here: the reader, writer, sample data and
widgets all share these functions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from .io.geometry import default_slicing_axis, slicing_axes
from .volume import Volume, VolumeError, choose_window, file_format_of

GEOMETRY_KEY = "napari_sam_ft_geometry"
# Two layers lie on one voxel grid when their data-to-world matrices agree to this (mm, and relative).
GRID_TOLERANCE_MM = 1e-3


def geometry_metadata(volume: Volume, **extra) -> dict:
    """Everything of a ``Volume`` but its voxels, as plain layer metadata (``extra`` adds e.g. the channel)."""
    geometry = {item.name: getattr(volume, item.name) for item in dataclasses.fields(volume) if item.name != "array"}
    geometry["affine"] = np.asarray(volume.affine, dtype=float).copy()
    geometry["source_path"] = None if volume.source_path is None else str(volume.source_path)
    geometry["shape"] = tuple(int(size) for size in volume.shape)
    geometry["world_affine"] = np.asarray(volume.world_affine, dtype=float)
    geometry.update(extra)
    return geometry


def volume_from_geometry(array: np.ndarray, geometry: dict) -> Volume:
    """The ``Volume`` that ``geometry_metadata`` described, holding ``array`` (same spatial shape)."""
    names = {item.name for item in dataclasses.fields(Volume) if item.name != "array"}
    values = {name: geometry[name] for name in names if name in geometry}
    if values.get("source_path"):
        values["source_path"] = Path(values["source_path"])
    if np.ndim(array) == 3:
        values["channel_names"] = ()
    return Volume(array, **values)


def volume_from_layer(data, metadata: dict | None, scale=None, translate=None, file_path=None) -> Volume:
    """A ``Volume`` for one layer's data: with its stored scan geometry, or else one made from scale and translate.

    ``file_path`` (the file it will be written to) sets the voxel order of a layer without scan geometry: the
    one ``read_volume`` gives such a file, so it reads back as the same (Z, Y, X) array. Raises ``VolumeError``
    for anything that is not a single-channel 3D array.
    """
    array = three_d_array(data)
    geometry = (metadata or {}).get(GEOMETRY_KEY)
    if geometry is not None and tuple(geometry["shape"]) == tuple(array.shape):
        return volume_from_geometry(array, geometry)
    return scale_translate_volume(array, scale, translate, file_path)


def three_d_array(data) -> np.ndarray:
    """A layer's full-resolution data as a 3D array; ``VolumeError`` for anything else."""
    array = data[0] if isinstance(data, (list, tuple)) else data  # multiscale: full resolution level
    ndim = getattr(array, "ndim", None)
    if ndim != 3:
        what = f"{ndim}D" if ndim is not None else f"a {type(array).__name__}"
        raise VolumeError(f"this layer is {what} with shape {tuple(getattr(array, 'shape', ()))}; "
                          "napari-sam-ft segments single-channel 3D volumes (Z, Y, X)")
    return np.asarray(array)


def scale_translate_volume(array: np.ndarray, scale, translate, file_path=None) -> Volume:
    """A ``Volume`` whose world is napari's own for a layer with only scale and translate (no scan geometry)."""
    scale = np.ones(3) if scale is None else np.asarray(scale, dtype=float)[-3:]
    translate = np.zeros(3) if translate is None else np.asarray(translate, dtype=float)[-3:]
    file_axes = (0, 1, 2) if file_path is None else default_file_axes(file_path)
    affine = np.eye(4)  # in file voxel order: layer axis i is file axis file_axes[i]
    for layer_axis, file_axis in enumerate(file_axes):
        affine[file_axis, file_axis] = scale[layer_axis]
        affine[file_axis, 3] = translate[layer_axis]
    return Volume(array, tuple(float(value) for value in scale), affine, file_axes)


def default_file_axes(path) -> tuple[int, int, int]:
    """The file voxel axes ``read_volume`` takes as (Z, Y, X) for a file like ``path`` (its default slicing)."""
    file_format = file_format_of(path)
    return slicing_axes(default_slicing_axis(file_format), file_format)


# --- which scan a layer was drawn on ------------------------------------------------------------------------

def data_to_world(scale, translate, rotate=None, shear=None, affine=None) -> np.ndarray:
    """napari's 4x4 data-to-world matrix of a 3D layer (affine after scale, translate, rotate and shear)."""
    from napari.utils.transforms import Affine, CompositeAffine

    physical = CompositeAffine(scale=np.asarray(scale, float)[-3:], translate=np.asarray(translate, float)[-3:],
                               rotate=None if rotate is None else np.asarray(rotate, float)[-3:, -3:],
                               shear=None if shear is None else np.asarray(shear, float)[-3:], ndim=3)
    matrix = physical.affine_matrix
    if affine is not None:
        affine = np.asarray(getattr(affine, "affine_matrix", affine), float)
        matrix = affine[-4:, -4:] @ matrix
    return matrix


def layer_data_to_world(layer) -> np.ndarray:
    return data_to_world(layer.scale, layer.translate, layer.rotate, layer.shear, layer.affine)


def same_grid(shape_a, matrix_a: np.ndarray, shape_b, matrix_b: np.ndarray) -> bool:
    """True when two layers have the same voxel grid in napari's world: same shape, same data-to-world matrix."""
    return (tuple(shape_a) == tuple(shape_b)
            and np.allclose(matrix_a, matrix_b, rtol=1e-6, atol=GRID_TOLERANCE_MM))


def describe_grid(name: str, shape, matrix: np.ndarray) -> str:
    scale = np.sqrt((matrix[:3, :3] ** 2).sum(axis=0))
    return (f"'{name}' (shape {tuple(int(size) for size in shape)}, scale {tuple(round(float(v), 4) for v in scale)}, "
            f"translate {tuple(round(float(v), 3) for v in matrix[:3, 3])})")


def volume_for_layer(name: str, data, attributes: dict, scan_layers=(), file_path=None) -> Volume:
    """The geometry to write a layer with: its own scan geometry, or that of the scan whose grid it lies on.

    ``attributes`` is the layer's state (napari's writer argument: metadata, scale, translate, rotate, shear,
    affine); ``scan_layers`` are the other open layers. A layer without scan geometry adopts the geometry of
    the open scan layers with the same shape and the same data-to-world transform (napari's *new labels
    layer* button makes exactly that). It is refused, with the reason, when scans are open but none (or
    several different ones) lie on its grid, and when it is rotated, sheared or has an affine of its own.
    With no scan open it is written in napari's world, its scale and translate.
    """
    array = three_d_array(data)
    metadata = attributes.get("metadata") or {}
    if GEOMETRY_KEY in metadata and tuple(metadata[GEOMETRY_KEY]["shape"]) == tuple(array.shape):
        return volume_from_layer(array, metadata, file_path=file_path)
    matrix = data_to_world(attributes.get("scale", (1, 1, 1)), attributes.get("translate", (0, 0, 0)),
                           attributes.get("rotate"), attributes.get("shear"), attributes.get("affine"))
    scans = [layer for layer in scan_layers if GEOMETRY_KEY in layer.metadata and np.ndim(layer.data) >= 3]
    matches = [layer for layer in scans
               if same_grid(layer.metadata[GEOMETRY_KEY]["shape"], layer_data_to_world(layer), array.shape, matrix)]
    worlds = {np.round(layer.metadata[GEOMETRY_KEY]["world_affine"], 4).tobytes() for layer in matches}
    if len(worlds) == 1:
        return volume_from_layer(array, {GEOMETRY_KEY: matches[0].metadata[GEOMETRY_KEY]}, file_path=file_path)
    this = describe_grid(name, array.shape, matrix)
    if len(worlds) > 1:
        raise VolumeError(f"cannot save {this}: it lies on the voxel grid of several scans with different world "
                          f"geometry ({', '.join(repr(layer.name) for layer in matches)}); the file would not know "
                          "which scan it overlays. Close the other scans, then save again")
    if scans:
        others = "; ".join(describe_grid(layer.name, layer.metadata[GEOMETRY_KEY]["shape"], layer_data_to_world(layer))
                           for layer in scans)
        raise VolumeError(f"cannot save {this}: it lies on the voxel grid of no open scan ({others}), so its world "
                          "geometry is unknown and the file would not overlay the scan. Make the labels layer from "
                          "the scan (select the scan, then napari's 'New labels layer' button, or add_labels with the "
                          "scan's shape, scale and translate)")
    if not np.allclose(matrix[:3, :3], np.diag(np.diag(matrix[:3, :3])), atol=1e-9):
        raise VolumeError(f"cannot save {this}: it is rotated or sheared in napari and no scan geometry says what "
                          "that means in patient coordinates")
    return scale_translate_volume(array, np.diag(matrix)[:3], matrix[:3, 3], file_path)


# --- layer data tuples ---------------------------------------------------------------------------------------

def image_layer_data(volume: Volume, name: str | None = None, **geometry_extra) -> tuple:
    """An Image layer data tuple, shown through the same intensity window the model sees ("auto")."""
    scale, translate = volume.napari_scale_translate()
    window = choose_window(volume.array, "auto")
    meta = {
        "name": name or volume.name,
        "scale": scale,
        "translate": translate,
        "colormap": "gray",
        "contrast_limits": (window.low, window.high),
        "metadata": {GEOMETRY_KEY: geometry_metadata(volume, **geometry_extra)},
    }
    return volume.array, meta, "image"


def channel_layer_name(name: str, channel: int) -> str:
    return f"{name} [channel {channel}]"


def channel_layers_data(volume: Volume, channels, name: str | None = None) -> list[tuple]:
    """One Image layer per channel of a (Z, Y, X, C) volume, each named after its channel.

    ``channels`` are the file's channel numbers of the C planes; each layer records its own one
    (geometry "channel"), so a session saved on it reopens that channel.
    """
    base = name or volume.name
    return [image_layer_data(volume.with_array(volume.array[..., index]), name=channel_layer_name(base, channel),
                             channel=int(channel))
            for index, channel in enumerate(channels)]


def scan_layers_data(volume: Volume, channels=None) -> list[tuple]:
    """A scan as the Segment widget takes it: one 3D Image layer, or one per channel of a (Z, Y, X, C) volume.

    ``channels`` are the file channels the volume holds (a session's choice); one channel names its layer.
    """
    if volume.array.ndim == 4:
        return channel_layers_data(volume, channels if channels else range(volume.num_channels))
    if channels:
        return [image_layer_data(volume, name=channel_layer_name(volume.name, channels[0]), channel=int(channels[0]))]
    return [image_layer_data(volume)]


def layer_channel(layer) -> int | None:
    """The file channel an Image layer shows (a 4D file opened channel by channel), or None."""
    return (layer.metadata.get(GEOMETRY_KEY) or {}).get("channel")


def labels_layer_data(volume: Volume, name: str | None = None, class_names: dict[int, str] | None = None) -> tuple:
    """A Labels layer data tuple; ``class_names`` (id -> name; default: the volume's) are kept in the metadata."""
    scale, translate = volume.napari_scale_translate()
    metadata: dict = {GEOMETRY_KEY: geometry_metadata(volume)}
    class_names = class_names or volume.class_names
    if class_names:
        metadata["class_names"] = dict(class_names)
    meta = {"name": name or volume.name, "scale": scale, "translate": translate, "metadata": metadata}
    return volume.array, meta, "labels"


def smallest_label_dtype(array: np.ndarray) -> np.dtype:
    """uint8, uint16 or uint32, whichever holds every label id of ``array``."""
    if array.size == 0:
        return np.dtype(np.uint8)
    if np.min(array) < 0:
        raise VolumeError("labels contain negative ids; label files hold ids 0, 1, 2, ...")
    highest = int(np.max(array))
    for dtype in (np.uint8, np.uint16, np.uint32):
        if highest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise VolumeError(f"label id {highest} does not fit in 32 bits")
