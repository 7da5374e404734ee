"""Volumes <-> napari layer data tuples, keeping the scan's geometry with every layer.

A layer made from a ``Volume`` carries the volume's geometry (affine, voxel order, spacing, NIfTI header)
in ``layer.metadata[GEOMETRY_KEY]``, so a mask drawn on it is written back in the input's voxel order and
affine. No Qt here: the reader, writer, sample data and widgets all share these functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .volume import Volume, VolumeError, choose_window, file_format_of, slicing_axes

GEOMETRY_KEY = "napari_sam_ft_geometry"
# Labels hold small non-negative integer ids; an integer image with more distinct values is a scan.
MAX_LABEL_IDS = 1000


def geometry_metadata(volume: Volume) -> dict:
    """The part of a ``Volume`` that is not voxel values, as plain layer metadata."""
    return {
        "affine": np.asarray(volume.affine, dtype=float).copy(),
        "spacing": tuple(float(value) for value in volume.spacing),
        "file_axes": tuple(int(axis) for axis in volume.file_axes),
        "flips": tuple(bool(flip) for flip in volume.flips),
        "shape": tuple(int(size) for size in volume.shape),
        "source_path": None if volume.source_path is None else str(volume.source_path),
        "file_format": volume.file_format,
        "header": volume.header,
    }


def volume_from_layer(data, metadata: dict | None, scale=None, translate=None, file_path=None) -> Volume:
    """A ``Volume`` for layer data: with the stored geometry, or else one built from scale and translate.

    The stored geometry (the source file's voxel order and affine) is used when ``file_path`` is None or
    of the source's format. Otherwise the voxel order is the one ``read_volume`` gives a file like
    ``file_path``, so a written file reads back as the same (Z, Y, X) array. Raises ``VolumeError`` for
    anything that is not a single-channel 3D array.
    """
    array = data[0] if isinstance(data, (list, tuple)) else data  # multiscale: full resolution level
    ndim = getattr(array, "ndim", None)
    if ndim != 3:
        what = f"{ndim}D" if ndim is not None else f"a {type(array).__name__}"
        raise VolumeError(f"this layer is {what} with shape {tuple(getattr(array, 'shape', ()))}; "
                          "napari-sam-ft segments single-channel 3D volumes (Z, Y, X)")
    array = np.asarray(array)
    geometry = (metadata or {}).get(GEOMETRY_KEY)
    same_format = file_path is None or geometry is None or geometry["file_format"] == file_format_of(file_path)
    if geometry is not None and tuple(geometry["shape"]) == tuple(array.shape) and same_format:
        source = geometry["source_path"]
        return Volume(array, tuple(geometry["spacing"]), np.asarray(geometry["affine"], dtype=float),
                      tuple(geometry["file_axes"]), Path(source) if source else None, geometry["file_format"],
                      geometry["header"], flips=tuple(geometry.get("flips", (False, False, False))))
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
    return slicing_axes(2 if file_format == "nifti" else 0, file_format)


def looks_like_labels(volume: Volume) -> bool:
    """True for integer-valued, non-negative volumes with few distinct values (a segmentation)."""
    array = volume.array
    sample = np.asarray(array[:: max(1, array.shape[0] // 16)])
    if sample.dtype == bool:
        return True
    if np.issubdtype(sample.dtype, np.floating):
        name = (volume.name or "").lower()
        hinted = any(word in name for word in ("seg", "label", "mask"))
        if not hinted or not np.isfinite(sample).all() or not np.array_equal(sample, np.rint(sample)):
            return False
    elif not np.issubdtype(sample.dtype, np.integer):
        return False
    if sample.size and sample.min() < 0:
        return False
    return len(np.unique(sample)) <= MAX_LABEL_IDS


def image_layer_data(volume: Volume, name: str | None = None) -> tuple:
    """An Image layer data tuple, shown through the same intensity window the model sees ("auto")."""
    scale, translate = volume.napari_scale_translate()
    window = choose_window(volume.array, "auto")
    meta = {
        "name": name or volume.name,
        "scale": scale,
        "translate": translate,
        "colormap": "gray",
        "contrast_limits": (window.low, window.high),
        "metadata": {GEOMETRY_KEY: geometry_metadata(volume)},
    }
    return volume.array, meta, "image"


def labels_layer_data(volume: Volume, name: str | None = None, class_names: dict[int, str] | None = None) -> tuple:
    """A Labels layer data tuple; ``class_names`` (id -> name) are kept in the layer metadata."""
    scale, translate = volume.napari_scale_translate()
    metadata: dict = {GEOMETRY_KEY: geometry_metadata(volume)}
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
