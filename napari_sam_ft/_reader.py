"""npe2 reader: NIfTI, TIFF and .npy volumes as Image or Labels layers that keep the file's geometry.

A file that is not a usable 3D scan (2D, 4D without a chosen channel, NaN, constant, unreadable) gives one
napari error notification naming the file and the problem, and no layer; the viewer stays usable.
"""

from __future__ import annotations

import os

import numpy as np

from ._layer_data import image_layer_data, labels_layer_data, looks_like_labels, smallest_label_dtype
from .volume import SUPPORTED_SUFFIXES, VolumeError, check_intensities, read_volume

# npe2's "accepted the file, opened no layers" value: napari then tries no other reader and raises nothing.
NO_LAYERS = [(None,)]


def get_reader(path: str | list[str]):
    """The reader function for one supported file, or None so napari asks another plugin."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(SUPPORTED_SUFFIXES):
        return None
    return read_layers


def read_layers(path: str | list[str], **_ignored) -> list[tuple]:
    """Layer data tuples for one file: a Labels layer for a segmentation, otherwise an Image layer."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        return [read_layer_data(path)]
    except VolumeError as error:
        from napari.utils.notifications import show_error

        show_error(f"napari-sam-ft cannot open this file: {error}")
        return NO_LAYERS


def read_layer_data(path: str | os.PathLike) -> tuple:
    """One layer data tuple for ``path``; raises ``VolumeError`` for a file that is not a usable 3D volume."""
    volume = read_volume(path, check_values=False)
    if looks_like_labels(volume):
        array = np.asarray(volume.array)
        if np.issubdtype(array.dtype, np.floating):
            array = np.rint(array)
        return labels_layer_data(volume.with_array(array.astype(smallest_label_dtype(array))))
    check_intensities(volume.array, path)
    return image_layer_data(volume)
