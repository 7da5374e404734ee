"""npe2 writers: a Labels (or Image) layer to NIfTI, TIFF or .npy in the source scan's voxel order and affine.

Layers from our reader, sample data or widgets carry the source geometry in their metadata and are written
in the source file's voxel order and affine; other layers (or another file format than the source's) get
an affine made from the layer's scale and translate.
"""

from __future__ import annotations

import numpy as np

from ._layer_data import smallest_label_dtype, volume_from_layer
from .volume import write_volume


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer; ids are stored in the smallest unsigned integer type that holds them."""
    like = volume_from_layer(data, attributes.get("metadata"), attributes.get("scale"), attributes.get("translate"),
                             file_path=path)
    array = np.asarray(like.array)
    return [str(write_volume(path, array.astype(smallest_label_dtype(array), copy=False), like=like))]


def write_image(path: str, data, attributes: dict) -> list[str]:
    """Write one Image layer with its values unchanged."""
    like = volume_from_layer(data, attributes.get("metadata"), attributes.get("scale"), attributes.get("translate"),
                             file_path=path)
    return [str(write_volume(path, np.asarray(like.array), like=like))]

