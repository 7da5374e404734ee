"""The ``Volume`` value and the one way in and out: ``read_volume``, ``read_labels``, ``read_channels`` and
``write_volume`` dispatch on the file type to one module per format family.

Every format module follows one contract: its reader returns the voxels in the file's own axis order
(i, j, k[, c]), a 4x4 voxel-to-world affine in RAS+ mm, and the file's metadata. ``geometry.display_order`` then
makes the (Z, Y, X) view napari and the model see (radiological for every format with world geometry), and a
``Volume`` carries both: ``array`` as displayed, and ``affine``/``file_axes``/``flips`` to put a mask back on the
file's own voxels. ``Volume.world_affine`` is the one voxel-to-world mapping of what is displayed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_write
from .errors import VolumeError
from .geometry import (align_to_grid, describe_geometry, display_order, displayed, grid_alignment,
                       has_world_geometry, is_oblique, to_file_order, world_affine)
from .metaimage import METAIMAGE_SUFFIXES, read_metaimage, write_metaimage
from .nifti import MGZ_SUFFIXES, NIFTI_SUFFIXES, read_nibabel, write_mgz, write_nifti
from .nrrd import NRRD_SUFFIXES, SEG_NRRD_SUFFIXES, read_nrrd, read_seg_nrrd, write_nrrd, write_seg_nrrd
from .tiff_npy import NPY_SUFFIXES, TIFF_SUFFIXES, read_npy, read_tiff, write_npy, write_tiff

DICOM_SUFFIXES = (".dcm",)
# Headers whose voxels live in a second file: read, but written as their single-file form.
DETACHED_SUFFIXES = {".nhdr": ".nrrd", ".mhd": ".mha"}


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan (or a label map on a scan's grid) ready for slice-by-slice segmentation; an immutable value.

    ``array`` is (Z, Y, X): Z is the slicing axis. ``file_axes`` says which voxel axis of the file each
    of Z, Y, X came from and ``flips`` which of them run backwards (the radiological view), so a mask can be put
    back in the file's order. ``affine`` is the file's 4x4 voxel-to-world matrix (file voxel order, RAS+ mm);
    ``world_affine`` is the same mapping for the displayed (Z, Y, X) array. ``spacing`` is (z, y, x) in mm.

    A multi-sequence volume from ``read_channels`` has a (Z, Y, X, C) array with C = 2 or 3 co-registered
    channels (``channel_names`` says where each came from); ``shape`` is still the spatial (Z, Y, X).
    A label map read from a file that names its classes (a Slicer .seg.nrrd) has ``class_names`` (id -> name)
    and ``class_colors`` (id -> (r, g, b) in 0..1). ``header`` is the format's own metadata (a nibabel header,
    an NRRD header dict, a ``DicomSource``...). Use ``with_array`` or ``dataclasses.replace`` for a changed copy.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    file_axes: tuple[int, int, int] = (0, 1, 2)
    source_path: Path | None = None
    file_format: str = "npy"
    header: object | None = None
    channel_names: tuple[str, ...] = ()
    # Display axes (Z, Y, X) that run backwards relative to the file, for the radiological view.
    flips: tuple[bool, bool, bool] = (False, False, False)
    class_names: dict[int, str] = field(default_factory=dict)
    class_colors: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial (Z, Y, X) shape, also for a multi-channel volume."""
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

    @property
    def file_shape(self) -> tuple[int, int, int]:
        """The spatial shape in the file's (i, j, k) voxel order."""
        return tuple(self.shape[axis] for axis in np.argsort(self.file_axes))  # type: ignore[return-value]

    @property
    def num_channels(self) -> int:
        return 1 if self.array.ndim == 3 else int(self.array.shape[3])

    @property
    def num_slices(self) -> int:
        return int(self.array.shape[0])

    @property
    def name(self) -> str:
        if self.source_path is None:
            return "volume"
        if self.file_format == "dicom" and self.source_path.is_dir():
            return self.source_path.name  # a series folder: its name may hold dots (UIDs), not a suffix
        return strip_suffix(self.source_path.name)

    @property
    def world_affine(self) -> np.ndarray:
        """4x4 matrix: displayed index (z, y, x, 1) -> RAS+ world mm (x, y, z, 1), oblique or not."""
        return world_affine(self.affine, self.shape, self.file_axes, self.flips)

    @property
    def is_oblique(self) -> bool:
        """Whether the voxel axes are tilted from the patient axes (kept exactly; napari's scale/translate can't)."""
        return is_oblique(self.affine)

    def describe_geometry(self) -> str:
        """The file grid in one line (shape, spacing, origin, axis codes), for messages."""
        return describe_geometry(self.affine, self.file_shape)

    def to_file_order(self, array_zyx: np.ndarray) -> np.ndarray:
        """Put a (Z, Y, X) array (e.g. a mask) back into the file's voxel order."""
        return to_file_order(array_zyx, self.file_axes, self.flips)

    def napari_scale_translate(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translate for napari layers, so that scans of one patient space overlay in napari, whatever
        their extent or voxel order.

        napari's world axis d is the patient (RAS) axis nearest displayed axis d, signed to grow with the displayed
        index (-R for a column running right to left), and the translate is the first voxel's coordinate on it.
        Taking the first voxel's RAS coordinate unsigned would shift a scan of another extent by twice the
        difference of origins along every flipped axis. An oblique scan gets its nearest patient axes.
        """
        scale = tuple(float(s) for s in self.spacing)
        world = self.world_affine
        translate = []
        for display_axis in range(3):
            direction = world[:3, display_axis]
            patient_axis = int(np.argmax(np.abs(direction)))
            translate.append(float(np.sign(direction[patient_axis]) * world[patient_axis, 3]))
        return scale, tuple(translate)

    def with_array(self, array_zyx: np.ndarray) -> "Volume":
        """A volume with the same geometry and another array of the same (Z, Y, X) shape."""
        if tuple(array_zyx.shape[:3]) != self.shape or array_zyx.ndim not in (3, 4):
            raise VolumeError(f"array shape {array_zyx.shape} does not match volume shape {self.shape}")
        names = self.channel_names if array_zyx.ndim == 4 else ()
        return dataclasses.replace(self, array=array_zyx, channel_names=names)


@dataclass(frozen=True)
class FileFormat:
    """One format family: its suffixes and its reader/writer following the ``io`` contract.

    ``read(path)`` returns (data (i, j, k[, c]), affine RAS+ mm, metadata); ``write(path, data (i, j, k), like,
    class_names, class_colors)`` writes a mask in ``like``'s geometry (None: the format is read-only).
    """

    name: str
    suffixes: tuple[str, ...]
    read: Callable
    write: Callable | None = None


def _read_dicom(path: Path, series_uid: str | None = None):
    from . import dicom  # pydicom is imported only when a DICOM series is opened

    return dicom.read_dicom(path, series_uid=series_uid)


def _write_dicom_seg(path: Path, labels_zyx: np.ndarray, like: "Volume", class_names, class_colors) -> None:
    from . import dicom_seg  # highdicom is imported only when a DICOM SEG is written

    dicom_seg.write_dicom_seg(path, labels_zyx, like, class_names)


def _write_nifti(path, data_ijk, like, class_names, class_colors) -> None:
    write_nifti(path, data_ijk, like.affine, like.header if like.file_format == "nifti" else None)


def _write_mgz(path, data_ijk, like, class_names, class_colors) -> None:
    write_mgz(path, data_ijk, like.affine)


def _write_nrrd(path, data_ijk, like, class_names, class_colors) -> None:
    write_nrrd(path, data_ijk, like.affine)


def _write_seg_nrrd(path, data_ijk, like, class_names, class_colors) -> None:
    write_seg_nrrd(path, data_ijk, like.affine, class_names, class_colors)


def _write_metaimage(path, data_ijk, like, class_names, class_colors) -> None:
    write_metaimage(path, data_ijk, like.affine)


def _write_tiff(path, data_ijk, like, class_names, class_colors) -> None:
    write_tiff(path, data_ijk, np.sqrt((like.affine[:3, :3] ** 2).sum(axis=0)))


def _write_npy(path, data_ijk, like, class_names, class_colors) -> None:
    write_npy(path, data_ijk)


FORMATS: dict[str, FileFormat] = {fmt.name: fmt for fmt in (
    FileFormat("nifti", NIFTI_SUFFIXES, read_nibabel, _write_nifti),
    FileFormat("mgz", MGZ_SUFFIXES, read_nibabel, _write_mgz),
    FileFormat("seg_nrrd", SEG_NRRD_SUFFIXES, read_seg_nrrd, _write_seg_nrrd),
    FileFormat("nrrd", NRRD_SUFFIXES, read_nrrd, _write_nrrd),
    FileFormat("metaimage", METAIMAGE_SUFFIXES, read_metaimage, _write_metaimage),
    FileFormat("dicom", DICOM_SUFFIXES, _read_dicom),  # a .dcm mask is a DICOM SEG, written by write_volume
    FileFormat("tiff", TIFF_SUFFIXES, read_tiff, _write_tiff),
    FileFormat("npy", NPY_SUFFIXES, read_npy, _write_npy),
)}
SUPPORTED_SUFFIXES = tuple(suffix for fmt in FORMATS.values() for suffix in fmt.suffixes)
# Longest first, so ".seg.nrrd" is found before ".nrrd" and ".nii.gz" before ".gz".
_SUFFIX_FORMATS = sorted(((suffix, fmt.name) for fmt in FORMATS.values() for suffix in fmt.suffixes),
                         key=lambda item: -len(item[0]))


def strip_suffix(filename: str) -> str:
    for suffix, _ in _SUFFIX_FORMATS:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem


def file_format_of(path: str | os.PathLike) -> str:
    """The format family of a path by its suffix; a folder (or a suffix-less DICOM file) is a DICOM series."""
    lower = str(path).lower()
    for suffix, name in _SUFFIX_FORMATS:
        if lower.endswith(suffix):
            return name
    if Path(path).is_dir() or _is_dicom_file(Path(path)):
        return "dicom"
    raise VolumeError(f"{path}: unsupported file type; napari-sam-ft reads {', '.join(SUPPORTED_SUFFIXES)} "
                      "and DICOM folders")


def _is_dicom_file(path: Path) -> bool:
    try:
        from .dicom import is_dicom_path
    except ImportError:
        return False
    return path.is_file() and is_dicom_path(path)


def read_volume(path: str | os.PathLike, *, slicing_axis: int | None = None, channel: int | None = None,
                check_values: bool = True, series_uid: str | None = None) -> Volume:
    """Read a scan (NIfTI, MGZ, NRRD, MHA, DICOM series, TIFF or .npy) into a ``Volume`` with (Z, Y, X) array.

    ``slicing_axis`` is the file voxel axis to slice along (default: 2, the third voxel axis, for formats with
    world geometry; 0, the first, for TIFF/npy). ``channel`` picks one channel or time point of a 4D file.
    ``series_uid`` picks one series of a DICOM folder that holds several. Raises ``VolumeError`` naming the
    file and the problem for anything that is not a usable 3D scan.
    """
    path = Path(path)
    file_format = file_format_of(path)
    data, affine, header = read_file(path, file_format, series_uid)
    data = _select_3d(data, path, channel, file_format)
    array, affine, spacing, file_axes, flips = display_order(data, affine, slicing_axis, file_format, path)
    if check_values:
        check_intensities(array, path)
    names, colors = _classes_of(header)
    return Volume(array, spacing, affine, file_axes, path, file_format, header, (), flips, names, colors)


def read_file(path: Path, file_format: str, series_uid: str | None = None):
    """(data (i, j, k[, c]), affine RAS+, metadata) of a file, any parser failure turned into one ``VolumeError``."""
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if series_uid is not None and file_format != "dicom":
        raise VolumeError(f"{path}: is not a DICOM series; a series UID only chooses among a DICOM folder's series")
    try:
        if file_format == "dicom":
            return _read_dicom(path, series_uid)
        return FORMATS[file_format].read(path)
    except VolumeError:
        raise
    except ImportError as error:
        raise VolumeError(f"{path}: reading {file_format} needs a module that is missing ({error})") from error
    except Exception as error:  # any parser failure is an unreadable file, said once, clearly
        raise VolumeError(f"{path}: cannot read this {file_format} file ({type(error).__name__}: {error})") from error


def _classes_of(header) -> tuple[dict[int, str], dict[int, tuple[float, float, float]]]:
    """Class names and colours a reader found in the file (a .seg.nrrd's segments), else none."""
    if isinstance(header, dict):
        return dict(header.get("class_names") or {}), dict(header.get("class_colors") or {})
    return {}, {}


def _channel_axis(data: np.ndarray) -> int:
    """The channel (or time) axis of 4D data: the last one (NIfTI, channels-last), or the first if smaller."""
    return data.ndim - 1 if data.shape[-1] <= data.shape[0] else 0


def _check_voxel_type(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind not in "biuf":  # bool, integers, floats: not complex, timedelta, strings or records
        raise VolumeError(f"{path}: has voxels of type {data.dtype}; expected real numbers")
    if 0 in data.shape:
        raise VolumeError(f"{path}: is empty (shape {tuple(data.shape)})")


def _select_3d(data: np.ndarray, path: Path, channel: int | None, file_format: str = "npy") -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] == 1 and channel is None:
        data = data[..., 0]
    if data.ndim == 4:
        # Readers of formats with world geometry put channels last; a bare array may have them first.
        channel_axis = 3 if has_world_geometry(file_format) else _channel_axis(data)
        count = data.shape[channel_axis]
        if channel is None:
            raise VolumeError(
                f"{path}: is 4D with shape {tuple(data.shape)}; choose a channel or time point with "
                f"channel=N (CLI: --channel N), N from 0 to {count - 1}")
        if not 0 <= channel < count:
            raise VolumeError(f"{path}: channel {channel} is out of range 0..{count - 1}")
        data = np.take(data, channel, axis=channel_axis)
    if data.ndim == 2 or (data.ndim == 3 and min(data.shape) == 1):
        raise VolumeError(f"{path}: is 2D with shape {tuple(data.shape)}; napari-sam-ft needs a 3D volume")
    if data.ndim != 3:
        raise VolumeError(f"{path}: has {data.ndim} dimensions (shape {tuple(data.shape)}); expected a 3D volume")
    _check_voxel_type(data, path)
    return data


MAX_MODEL_CHANNELS = 3  # SAM's encoder takes an RGB image


def read_channels(source, channels=None, *, slicing_axis: int | None = None, check_values: bool = True) -> Volume:
    """Read co-registered sequences as one multi-channel ``Volume`` whose array is (Z, Y, X, C).

    ``source`` is a 4D file (channels or time points on its last axis, e.g. a 4D NIfTI) or a list of 3D
    files of one grid (e.g. T1, T2 and FLAIR). ``channels`` picks which channels, in order, feed the
    model's red, green and blue inputs (default: all of them, at most three). One chosen channel gives
    a plain single-channel (Z, Y, X) volume, in the same display order and geometry. A contiguous range of a
    memory-mapped 4D file stays mapped; any other choice, and a list of files, is copied into memory in the
    files' own voxel type.
    """
    if isinstance(source, (str, os.PathLike)):
        volume = _read_4d_channels(Path(source), channels, slicing_axis)
    else:
        volume = _stack_channel_files([Path(path) for path in source], channels, slicing_axis)
    if volume.array.ndim == 4 and volume.array.shape[-1] == 1:
        volume = volume.with_array(volume.array[..., 0])  # keeps the flips: the same display as every channel
    if check_values:
        check_intensities(volume.array, volume.source_path)
    return volume


def _chosen_channels(channels, count: int, what: str) -> list[int]:
    if channels is None:
        if count > MAX_MODEL_CHANNELS:
            raise VolumeError(f"{what} has {count} channels; choose up to {MAX_MODEL_CHANNELS} of 0..{count - 1} "
                              "for the model's three input channels")
        return list(range(count))
    chosen = [channels] if isinstance(channels, (int, np.integer)) else list(channels)
    if not 1 <= len(chosen) <= MAX_MODEL_CHANNELS:
        raise VolumeError(f"choose 1 to {MAX_MODEL_CHANNELS} channels for the model's input, got {len(chosen)}")
    for channel in chosen:
        if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or not 0 <= channel < count:
            raise VolumeError(f"{what}: channel {channel!r} is out of range 0..{count - 1}")
    return [int(channel) for channel in chosen]


def _read_4d_channels(path: Path, channels, slicing_axis: int | None) -> Volume:
    file_format = file_format_of(path)
    data, affine, header = read_file(path, file_format)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise VolumeError(f"{path}: has {data.ndim} dimensions (shape {tuple(data.shape)}); expected a 3D or 4D volume")
    _check_voxel_type(data, path)
    channel_axis = 3 if has_world_geometry(file_format) else _channel_axis(data)
    data = np.moveaxis(data, channel_axis, -1)
    chosen = _chosen_channels(channels, data.shape[-1], str(path))
    if chosen == list(range(chosen[0], chosen[-1] + 1)):
        data = data[..., chosen[0]:chosen[-1] + 1]  # a view: memory-mapped files stay mapped
    else:
        data = data[..., chosen]
    array, affine, spacing, file_axes, flips = display_order(data, affine, slicing_axis, file_format, path)
    names = tuple(f"{path.name}[{channel}]" for channel in chosen)
    return Volume(array, spacing, affine, file_axes, path, file_format, header, names, flips)


def _stack_channel_files(paths: list[Path], channels, slicing_axis: int | None) -> Volume:
    if not paths:
        raise VolumeError("no files given for the channels")
    chosen = _chosen_channels(channels, len(paths), f"{len(paths)} files")
    volumes = [read_volume(paths[index], slicing_axis=slicing_axis, check_values=False) for index in chosen]
    first = volumes[0]
    for volume in volumes[1:]:
        if volume.shape != first.shape:
            raise VolumeError(f"{volume.source_path}: shape {volume.shape} differs from {first.source_path}'s "
                              f"{first.shape}; channels must be co-registered on one grid")
        if not np.allclose(volume.world_affine, first.world_affine, atol=1e-3):
            raise VolumeError(f"{volume.source_path}: its voxel-to-world geometry differs from {first.source_path}'s; "
                              "channels must be co-registered on one grid (resample them first)")
    array = np.stack([np.asarray(volume.array) for volume in volumes], axis=-1)
    names = tuple(volume.source_path.name for volume in volumes)
    return dataclasses.replace(first, array=array, channel_names=names)


def check_intensities(array: np.ndarray, path: Path | str | None = None) -> None:
    """Refuse NaN/inf and constant volumes (or channels), reading slab by slab so memory-mapped files stay lazy.

    ``array`` is (Z, Y, X) or (Z, Y, X, C); each channel of a multi-channel volume must vary.
    """
    where = f"{path}: " if path is not None else ""
    if 0 in array.shape:
        raise VolumeError(f"{where}is empty (shape {tuple(array.shape)})")
    channels = 1 if array.ndim == 3 else array.shape[-1]
    low, high = np.full(channels, np.inf), np.full(channels, -np.inf)
    floating = np.issubdtype(array.dtype, np.floating)
    # About 32 MiB per slab whatever the slice size: bounded memory, few Python iterations.
    slab_slices = max(1, (32 << 20) // max(1, array[0].nbytes))
    for start in range(0, array.shape[0], slab_slices):
        slab = np.asarray(array[start:start + slab_slices])
        if floating and not np.isfinite(slab).all():
            bad = int((~np.isfinite(slab)).sum())
            raise VolumeError(f"{where}contains {bad} NaN or infinite voxels in slices "
                              f"{start}..{start + len(slab) - 1}; fix or mask them before segmenting")
        # Reductions over axes, not a reshape: a flipped or transposed memory-mapped view is not copied.
        spatial = tuple(range(3))
        low = np.minimum(low, slab.min(axis=spatial).reshape(-1))
        high = np.maximum(high, slab.max(axis=spatial).reshape(-1))
    for channel in range(channels):
        if low[channel] == high[channel]:
            which = f"channel {channel} " if channels > 1 else ""
            raise VolumeError(f"{where}{which}is constant (every voxel is {float(low[channel]):g}); "
                              "there is nothing to segment")


def read_labels(path: str | os.PathLike, like: Volume | None = None, *, slicing_axis: int | None = None,
                series_uid: str | None = None) -> Volume:
    """Read a label file as a ``Volume`` of integer class ids (uint16, or uint32 beyond 65535).

    Without ``like``, the labels get the display order ``read_volume`` gives the file. With ``like`` (the image
    they label), they are put on the image's displayed grid by world geometry, whatever their own voxel order:
    NIfTI labels for an NRRD or DICOM image, a flipped axis, or a crop of the image grid (a Slicer segmentation
    stored on its segments' extent) are all aligned exactly. Labels whose voxels do not lie on the image's
    voxels are refused with a message naming both geometries; nothing is resampled by guess. A label array
    without world geometry (TIFF, .npy) is taken in the image's file voxel order, which ``write_volume`` writes.
    The result has ``like``'s geometry, so masks derived from it are written where the image lies.
    """
    path = Path(path)
    file_format = file_format_of(path)
    if file_format == "dicom" and _is_dicom_seg(path):
        return _read_dicom_seg_labels(path, like)
    data, affine, header = read_file(path, file_format, series_uid)
    data = label_ids(_select_3d(data, path, None, file_format), path)
    names, colors = _classes_of(header)
    if like is None or not has_world_geometry(like.file_format) and has_world_geometry(file_format):
        array, affine, spacing, file_axes, flips = display_order(data, affine, slicing_axis, file_format, path)
        labels = Volume(array, spacing, affine, file_axes, path, file_format, header, (), flips, names, colors)
        if like is not None and labels.shape != like.shape:
            raise VolumeError(f"{path}: labels have shape {labels.shape} but the image has {like.shape}")
        return labels
    if has_world_geometry(file_format):
        array = _on_image_grid(data, affine, like, path)
    else:
        if tuple(data.shape) != like.file_shape:
            raise VolumeError(f"{path}: labels have shape {tuple(data.shape)} but the image's voxels are "
                              f"{like.file_shape} (in its file order)")
        array = displayed(data, like.file_axes, like.flips)
    return dataclasses.replace(like, array=np.ascontiguousarray(array), source_path=path, channel_names=(),
                               class_names=names, class_colors=colors)


def _is_dicom_seg(path: Path) -> bool:
    from .dicom_seg import is_dicom_seg

    return is_dicom_seg(path)


def _read_dicom_seg_labels(path: Path, like: Volume | None) -> Volume:
    """A DICOM SEG on the grid of the DICOM series it references (``like``, read from that series)."""
    from .dicom import DicomSource
    from .dicom_seg import read_dicom_seg

    if like is None or not isinstance(like.header, DicomSource):
        raise VolumeError(f"{path}: is a DICOM SEG; it is read over the DICOM series it segments, so open that "
                          "series as the image")
    data_ijk, names = read_dicom_seg(path, like.header)
    array = displayed(label_ids(data_ijk, path), like.file_axes, like.flips)
    return dataclasses.replace(like, array=np.ascontiguousarray(array), source_path=path, channel_names=(),
                               class_names=dict(names), class_colors={})


def label_ids(data: np.ndarray, path: Path) -> np.ndarray:
    """Label voxels as non-negative integer ids (uint16, or uint32 beyond 65535); NaN or negative are refused."""
    array = np.asarray(data)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise VolumeError(f"{path}: label file contains NaN or infinite values")
        array = np.rint(array)
    if array.size and array.min() < 0:
        raise VolumeError(f"{path}: label file contains negative label ids")
    return array.astype(np.uint16 if not array.size or array.max() < 65536 else np.uint32)


def _on_image_grid(data_ijk: np.ndarray, affine: np.ndarray, like: Volume, path: Path) -> np.ndarray:
    """Label voxels (file order) moved onto ``like``'s displayed grid by world geometry, or a clear refusal."""
    alignment = grid_alignment(affine, like.world_affine, data_ijk.shape)
    aligned = None if alignment is None else align_to_grid(data_ijk, alignment, like.shape)
    if aligned is None:
        image = like.source_path or "the image"
        raise VolumeError(
            f"{path}: the labels do not lie on the image's voxel grid, so they cannot be aligned without "
            f"resampling. Labels: {describe_geometry(affine, data_ijk.shape)}. Image {image}: "
            f"{like.describe_geometry()}. Resample the labels onto the image (e.g. in 3D Slicer or with "
            "SimpleITK) first")
    return aligned


def write_volume(path: str | os.PathLike, array_zyx: np.ndarray, like: Volume | None = None, *,
                 class_names: dict[int, str] | None = None,
                 class_colors: dict[int, tuple[float, float, float]] | None = None) -> Path:
    """Write a (Z, Y, X) array, e.g. a mask, atomically, on ``like``'s voxels in its world geometry.

    The format follows the suffix: .nii/.nii.gz, .mgz, .nrrd (LPS space directions), .seg.nrrd (a Slicer
    segmentation; ``class_names`` and ``class_colors`` name and colour its segments), .mha/.mhd, .dcm (a DICOM
    SEG referencing ``like``'s DICOM series), .tif or .npy (the file's voxel order, with only a spacing).
    Class names default to ``like``'s.
    """
    path = Path(path)
    file_format = file_format_of(path)
    detached = next((suffix for suffix in DETACHED_SUFFIXES if path.name.lower().endswith(suffix)), None)
    if detached:
        # A header beside a separate data file cannot be replaced atomically as one file (nor renamed safely).
        raise VolumeError(f"{path}: cannot write a detached header and data file; write "
                          f"{DETACHED_SUFFIXES[detached]} (one file) instead")
    array_zyx = np.asarray(array_zyx)
    like = like or Volume(array_zyx)
    if tuple(array_zyx.shape[:3]) != like.shape:
        raise VolumeError(f"{path}: the array to write has shape {tuple(array_zyx.shape)} but its reference volume "
                          f"{like.source_path or ''} has {like.shape}")
    names = like.class_names if class_names is None else class_names
    colors = like.class_colors if class_colors is None else class_colors
    path.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "dicom":
        atomic_write(path, lambda temporary: _write_dicom_seg(temporary, array_zyx, like, names, colors))
        return path
    data = like.to_file_order(array_zyx)
    atomic_write(path, lambda temporary: FORMATS[file_format].write(temporary, data, like, names, colors))
    return path
