"""npe2 reader: scans and masks (NIfTI, NRRD/NHDR, Slicer .seg.nrrd, MHA/MHD, MGZ, DICOM series, 3D TIFF and .npy)
as Image or Labels layers that keep the file's geometry.

It claims only what it can read: a folder only when it holds DICOM, a TIFF or .npy only when it is a 3D
volume (a 2D picture or an RGB photo is left to napari's own reader). A claimed file that is not a usable
scan (NaN, constant, unreadable, a broken series) gives one napari error notification naming the file and
the problem, and no layer; the viewer stays usable. A folder with several series opens the largest CT/MR
series and says so, with a button to choose another; a 4D file opens each channel as its own 3D layer
(up to ``MAX_CHANNEL_LAYERS``; longer time series open their first volume, with a button to choose another).
No torch here: opening a file never imports the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._layer_data import (GEOMETRY_KEY, channel_layer_name, image_layer_data, labels_layer_data, scan_layers_data,
                          smallest_label_dtype, volume_from_layer)
from .io.content import looks_like_labels
from .volume import Volume, VolumeError, check_intensities, read_channels, read_labels, read_volume

# npe2's "accepted the file, opened no layers" value: napari then tries no other reader and raises nothing.
NO_LAYERS = [(None,)]
# Files only a medical-imaging reader opens: always ours (a damaged one gets our message, not napari's).
SCAN_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".seg.nrrd", ".mha", ".mhd", ".mgz", ".dcm")
# Files napari's own reader opens too: ours only when they hold a 3D volume.
ARRAY_SUFFIXES = (".tif", ".tiff", ".npy")
# A 4D file with at most this many channels (T1/T1c/T2/FLAIR) opens every channel as a layer.
MAX_CHANNEL_LAYERS = 4
RGB_SAMPLES = (3, 4)
# A folder is searched this far for a DICOM file before it is left to other readers (a zarr store holds thousands).
MAX_FILES_SNIFFED = 256


def single_path(path) -> str | None:
    if isinstance(path, (list, tuple)):
        return str(path[0]) if len(path) == 1 else None
    return str(path)


def get_reader(path: str | list[str]):
    """The reader function for a file or folder this plugin can read, or None so napari asks another plugin."""
    path = single_path(path)
    if path is None or not claims(Path(path)):
        return None
    return read_layers


def claims(path: Path) -> bool:
    """True for what this reader can open: a scan file, a DICOM folder or file, a 3D TIFF or .npy."""
    from .io.dicom import is_dicom_file

    lower = path.name.lower()
    if path.is_dir():
        return holds_dicom(path)
    if lower.endswith(SCAN_SUFFIXES):
        return True
    if lower.endswith(ARRAY_SUFFIXES):
        shape, rgb = array_file_shape(path)
        return shape is not None and not rgb and spatial_ndim(shape) >= 3
    return is_dicom_file(path)  # PACS exports often name files by UID or number, without a suffix


def holds_dicom(folder: Path) -> bool:
    """A DICOM file among the first ``MAX_FILES_SNIFFED`` files in or below ``folder`` (hidden ones skipped)."""
    from .io.dicom import is_dicom_file

    sniffed = 0
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(names):
            if name.startswith("."):
                continue
            if is_dicom_file(Path(root) / name):
                return True
            sniffed += 1
            if sniffed >= MAX_FILES_SNIFFED:
                return False
    return False


def array_file_shape(path: Path) -> tuple[tuple[int, ...] | None, bool]:
    """(shape, is_rgb) of a TIFF or .npy from its header alone; (None, False) when it cannot be parsed."""
    try:
        if path.name.lower().endswith(".npy"):
            array = np.load(str(path), mmap_mode="r", allow_pickle=False)
            rgb = array.ndim == 3 and array.shape[-1] in RGB_SAMPLES and array.dtype == np.uint8
            return tuple(array.shape), rgb
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            series = tif.series[0]
            return tuple(series.shape), "S" in series.axes
    except Exception:  # not parseable: napari's reader (or none) reports it
        return None, False


def spatial_ndim(shape) -> int:
    """Dimensions longer than one voxel: a (1, Y, X) stack is a 2D picture."""
    return sum(1 for size in shape if size > 1)


def read_layers(path: str | list[str], **_ignored) -> list[tuple]:
    """Layer data tuples for one file or DICOM folder; one error notification for anything unusable."""
    path = single_path(path)
    try:
        return read_layer_data_list(Path(path))
    except VolumeError as error:
        from napari.utils.notifications import show_error

        show_error(f"napari-sam-ft cannot open this {'folder' if Path(path).is_dir() else 'file'}: {error}")
        return NO_LAYERS


def read_layer_data_list(path: Path) -> list[tuple]:
    """The layer data tuples for ``path``; raises ``VolumeError`` for anything that is not a usable scan."""
    from .io.dicom import is_dicom_file
    from .io.dicom_seg import is_dicom_seg

    if is_dicom_seg(path):
        return [labels_layer_data(labels_on_open_scan(path, None))]
    if path.is_dir() or is_dicom_file(path):
        return read_dicom_layers(path)
    count = channel_count(path)
    if count <= 1:
        return [read_layer_data(path)]
    if count <= MAX_CHANNEL_LAYERS:
        return read_channel_layers(path, count)
    offer_choice(f"{path.name} holds {count} volumes (channels or time points); opened volume 0. To open another, "
                 "press 'Open another volume'.",
                 "Open another volume", [f"volume {channel}" for channel in range(count)],
                 lambda channel: [read_layer_data(path, channel=channel)])
    return [read_layer_data(path, channel=0)]


def channel_count(path: Path) -> int:
    """Channels (or time points) of a 4D file, from its header alone; 1 for a 3D file (or one the full read
    must judge). Readers put the channel axis last for formats with world geometry."""
    lower = path.name.lower()
    try:
        if lower.endswith(ARRAY_SUFFIXES):
            shape, _ = array_file_shape(path)
            return 1 if shape is None or len(shape) != 4 else int(min(shape[0], shape[-1]))
        if lower.endswith((".nii", ".nii.gz", ".mgz")):
            import nibabel as nib

            shape = nib.load(str(path)).shape
            return int(shape[3]) if len(shape) == 4 else 1
        if lower.endswith((".nrrd", ".nhdr")) and not lower.endswith(".seg.nrrd"):
            import nrrd

            header = nrrd.read_header(str(path))
            kinds = list(header.get("kinds") or [])
            sizes = [int(size) for size in header.get("sizes", [])]
            other = [size for size, kind in zip(sizes, kinds) if kind not in ("domain", "space")]
            return other[0] if len(sizes) == 4 and len(other) == 1 else 1
        if lower.endswith((".mha", ".mhd")):
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            return int(reader.GetNumberOfComponents())
    except Exception:  # an unreadable header: the full read says what is wrong with the file
        return 1
    return 1


def read_layer_data(path: Path, channel: int | None = None, series_uid: str | None = None) -> tuple:
    """One layer data tuple: Labels for a segmentation (on the grid of the open scan it lies on), otherwise an Image."""
    volume = read_volume(path, channel=channel, series_uid=series_uid, check_values=False)
    name = None if channel is None else channel_layer_name(volume.name, channel)
    if looks_like_labels(volume):
        volume = labels_on_open_scan(path, volume) if channel is None else volume
        array = np.asarray(volume.array)
        if np.issubdtype(array.dtype, np.floating):
            array = np.rint(array)
        return labels_layer_data(volume.with_array(array.astype(smallest_label_dtype(array))), name=name)
    check_intensities(volume.array, path)
    tell_if_oblique(volume)
    extra = {} if channel is None else {"channel": int(channel)}
    return image_layer_data(volume, name=name, **extra)


def open_scans() -> list:
    """Volumes of the scans open in the current viewer (Image layers with our geometry), newest first."""
    from napari import current_viewer
    from napari.layers import Image

    viewer = current_viewer()
    if viewer is None:
        return []
    return [volume_from_layer(layer.data, layer.metadata) for layer in reversed(viewer.layers)
            if isinstance(layer, Image) and GEOMETRY_KEY in layer.metadata and np.ndim(layer.data) == 3]


def labels_on_open_scan(path: Path, labels: Volume | None) -> Volume:
    """A label file put on the grid of the open scan it lies on (by world geometry: another voxel order, flipped
    axes, a Slicer segmentation cropped to its extent); on its own grid when no open scan shares its world.

    ``labels`` is the file read on its own (None for a DICOM SEG, which only exists over its series).
    """
    for scan in open_scans():
        if labels is not None and labels.shape == scan.shape and np.allclose(
                labels.world_affine, scan.world_affine, atol=1e-3):
            return labels  # already the scan's grid, shown the same way
        try:
            return read_labels(path, like=scan)
        except VolumeError:
            continue  # not this scan's grid; try the next
    if labels is None:
        raise VolumeError(f"{path}: is a DICOM SEG; open the DICOM series it segments first, then open the SEG "
                          "over it")
    return labels


def tell_if_oblique(volume) -> None:
    """Say once that napari shows an oblique scan on its voxel grid while masks keep the exact geometry."""
    if not volume.is_oblique:
        return
    from napari.utils.notifications import show_info

    from .io.geometry import obliquity_degrees

    show_info(f"{volume.name} is oblique ({obliquity_degrees(volume.affine):.1f} degrees from the patient axes): "
              "napari shows it on its own voxel grid, without the tilt; masks drawn on it are saved in its exact "
              "oblique geometry, so they overlay it in ITK-SNAP, Slicer or nibabel")


def read_channel_layers(path: Path, count: int) -> list[tuple]:
    """Every channel of a 4D file as its own Image layer, reading the file at most once per three channels."""
    layers = []
    for first in range(0, count, 3):
        chosen = list(range(first, min(first + 3, count)))
        volume = read_channels(path, chosen)
        layers.extend(scan_layers_data(volume, chosen))
    tell_if_oblique(volume)
    return layers


def read_dicom_layers(path: Path) -> list[tuple]:
    """The default series of a DICOM folder (the largest CT/MR one); when there are others, a button offers them."""
    from .io.dicom import list_dicom_series

    series = [info for info in list_dicom_series(path) if info.is_image]
    layer = read_layer_data(path)
    if len(series) > 1:
        source = layer[1]["metadata"][GEOMETRY_KEY]["header"]
        default = next((index for index, info in enumerate(series) if info.series_uid == source.series_uid), 0)
        offer_choice(f"{path.name} holds {len(series)} image series; opened {series[default].summary()}, the largest "
                     "CT/MR series. To open another, press 'Choose another series'.", "Choose another series",
                     [info.summary() for info in series],
                     lambda index: [read_layer_data(path, series_uid=series[index].series_uid)], default)
    return [layer]


def offer_choice(message: str, button: str, choices: list[str], open_choice, default: int = 0) -> None:
    """An info notification with a button that opens a picker; the picked item's layers go to the viewer."""
    from napari.utils.notifications import Notification, NotificationSeverity, notification_manager

    def pick(_notification_widget=None):
        from ._widgets.volume_picker import pick_and_open

        return pick_and_open(message, choices, open_choice, default)

    notification_manager.dispatch(Notification(message, severity=NotificationSeverity.INFO, actions=[(button, pick)]))
