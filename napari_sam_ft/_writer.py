"""npe2 writers: a Labels (or Image) layer to a file that overlays its scan in world coordinates.

A layer from our reader, sample data or widgets carries its scan's geometry in its metadata. Any other
layer (napari's *new labels layer* button, ``viewer.add_labels``) adopts the geometry of the open scan whose
voxel grid it lies on, or is refused with the reason (``_layer_data.volume_for_layer``): never a guess.
Every write is atomic. No torch here: opening and saving stay free of the model's imports.
"""

from __future__ import annotations

import functools

import numpy as np

from ._layer_data import smallest_label_dtype, volume_for_layer
from .volume import VolumeError, write_volume


class SaveRefused(RuntimeError):
    """A layer that cannot be written so that it overlays its scan; the message says why.

    Not a ``ValueError`` (as ``VolumeError`` is): napari takes a writer's ValueError for "not my format" and
    replaces the reason with a generic warning.
    """


def refusing_to_guess(write):
    """Turn a writer's ``VolumeError`` into ``SaveRefused``, so napari shows its message as it is."""

    @functools.wraps(write)
    def checked(path: str, data, attributes: dict) -> list[str]:
        try:
            return write(path, data, attributes)
        except VolumeError as error:
            raise SaveRefused(str(error)) from None

    return checked


def open_layers() -> list:
    """The layers of the viewer napari is saving from (none outside a viewer)."""
    from napari import current_viewer

    viewer = current_viewer()
    return [] if viewer is None else list(viewer.layers)


def class_names_of(attributes: dict) -> dict[int, str]:
    """Label id -> name from the layer's metadata ("class_names") or its features table ("index"/"name")."""
    names = {int(key): str(value) for key, value in ((attributes.get("metadata") or {}).get("class_names") or {}).items()}
    features = attributes.get("features")
    if features is not None and {"index", "name"} <= set(getattr(features, "columns", ())):
        for index, name in zip(features["index"], features["name"]):
            if int(index) > 0:
                names.setdefault(int(index), str(name))
    return names


@refusing_to_guess
def write_labels(path: str, data, attributes: dict) -> list[str]:
    """Write one Labels layer; ids are stored in the smallest unsigned integer type that holds them.

    Class names (for .seg.nrrd and DICOM SEG) come from the layer, else from its scan's geometry.
    """
    like = volume_for_layer(attributes.get("name", "labels"), data, attributes, open_layers(), file_path=path)
    array = np.asarray(like.array)
    mask = array.astype(smallest_label_dtype(array), copy=False)
    return [str(write_volume(path, mask, like=like, class_names=class_names_of(attributes) or None))]


@refusing_to_guess
def write_image(path: str, data, attributes: dict) -> list[str]:
    """Write one Image layer with its values unchanged."""
    like = volume_for_layer(attributes.get("name", "image"), data, attributes, open_layers(), file_path=path)
    return [str(write_volume(path, np.asarray(like.array), like=like))]
