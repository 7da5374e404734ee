"""The ``Volume`` value and the one way in and out: ``read_volume``, ``read_labels``, ``read_channels`` and
``write_volume`` dispatch on the file type to one module per format family.

A file becomes a ``Volume`` whose ``array`` is (Z, Y, X) with Z the slicing axis; masks are written back in the
file's own voxel order and affine so they overlay the input in any viewer (ITK-SNAP, 3D Slicer, napari).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import VolumeError
from .geometry import display_order
from .nifti import NIFTI_SUFFIXES, read_nifti, write_nifti
from .tiff_npy import NPY_SUFFIXES, TIFF_SUFFIXES, read_npy, read_tiff, write_npy, write_tiff

SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + NPY_SUFFIXES


@dataclass
class Volume:
    """A 3D scan ready for slice-by-slice segmentation.

    ``array`` is (Z, Y, X): Z is the slicing axis. ``file_axes`` says which voxel axis of the file each
    of Z, Y, X came from, so a mask can be put back in the file's order. ``affine`` is the file's
    4x4 voxel-to-world matrix (in the file's voxel order); ``spacing`` is (z, y, x) in mm.

    A multi-sequence volume from ``read_channels`` has a (Z, Y, X, C) array with C = 2 or 3 co-registered
    channels (``channel_names`` says where each came from); ``shape`` is still the spatial (Z, Y, X).
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

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial (Z, Y, X) shape, also for a multi-channel volume."""
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

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
        return strip_suffix(self.source_path.name)

    def to_file_order(self, array_zyx: np.ndarray) -> np.ndarray:
        """Put a (Z, Y, X) array (e.g. a mask) back into the file's voxel order."""
        flipped_axes = tuple(axis for axis, flipped in enumerate(self.flips) if flipped)
        unflipped = np.flip(array_zyx, flipped_axes) if flipped_axes else array_zyx
        return np.transpose(unflipped, np.argsort(self.file_axes))

    def napari_scale_translate(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translate for napari layers, so that layers of one scan overlay in world units."""
        scale = tuple(float(s) for s in self.spacing)
        # World position of the displayed array's first voxel, along each displayed axis.
        first_voxel = np.zeros(4)
        first_voxel[3] = 1.0
        for display_axis, file_axis in enumerate(self.file_axes):
            if self.flips[display_axis]:
                first_voxel[file_axis] = self.shape[display_axis] - 1
        world = self.affine @ first_voxel
        translate = tuple(float(world[axis]) for axis in self.file_axes)
        return scale, translate

    def with_array(self, array_zyx: np.ndarray) -> "Volume":
        """A volume with the same geometry and another array of the same (Z, Y, X) shape."""
        if tuple(array_zyx.shape[:3]) != self.shape or array_zyx.ndim not in (3, 4):
            raise VolumeError(f"array shape {array_zyx.shape} does not match volume shape {self.shape}")
        names = self.channel_names if array_zyx.ndim == 4 else ()
        return Volume(array_zyx, self.spacing, self.affine, self.file_axes, self.source_path,
                      self.file_format, self.header, names, self.flips)


def strip_suffix(filename: str) -> str:
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem


def file_format_of(path: str | os.PathLike) -> str:
    lower = str(path).lower()
    if lower.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if lower.endswith(TIFF_SUFFIXES):
        return "tiff"
    if lower.endswith(NPY_SUFFIXES):
        return "npy"
    raise VolumeError(f"{path}: unsupported file type; napari-sam-ft reads {', '.join(SUPPORTED_SUFFIXES)}")


def read_volume(path: str | os.PathLike, *, slicing_axis: int | None = None, channel: int | None = None,
                check_values: bool = True) -> Volume:
    """Read a NIfTI, TIFF or .npy file into a ``Volume`` with (Z, Y, X) array.

    ``slicing_axis`` is the file voxel axis to slice along (NIfTI default: 2, the third voxel axis;
    TIFF/npy default: 0, the first). ``channel`` picks one channel or time point of a 4D file.
    Raises ``VolumeError`` naming the file and the problem for anything that is not a usable 3D scan.
    """
    path = Path(path)
    file_format = file_format_of(path)
    data, affine, header = _read_any(path, file_format)
    data = _select_3d(data, path, channel)
    array, affine, spacing, file_axes, flips = display_order(data, affine, slicing_axis, file_format, path)
    if check_values:
        check_intensities(array, path)
    return Volume(array, spacing, affine, file_axes, path, file_format, header, flips=flips)


def _read_any(path: Path, file_format: str):
    """(data, affine, header) of a file, any parser failure turned into one ``VolumeError``."""
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    try:
        if file_format == "nifti":
            return read_nifti(path)
        if file_format == "tiff":
            return read_tiff(path)
        return read_npy(path)
    except VolumeError:
        raise
    except Exception as error:  # any parser failure is an unreadable file, said once, clearly
        raise VolumeError(f"{path}: cannot read this {file_format} file ({type(error).__name__}: {error})") from error


def _channel_axis(data: np.ndarray) -> int:
    """The channel (or time) axis of 4D data: the last one (NIfTI, channels-last), or the first if smaller."""
    return data.ndim - 1 if data.shape[-1] <= data.shape[0] else 0


def _check_voxel_type(data: np.ndarray, path: Path) -> None:
    if data.dtype.kind not in "biuf":  # bool, integers, floats: not complex, timedelta, strings or records
        raise VolumeError(f"{path}: has voxels of type {data.dtype}; expected real numbers")
    if 0 in data.shape:
        raise VolumeError(f"{path}: is empty (shape {tuple(data.shape)})")


def _select_3d(data: np.ndarray, path: Path, channel: int | None) -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] == 1 and channel is None:
        data = data[..., 0]
    if data.ndim == 4:
        channel_axis = _channel_axis(data)
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
    a plain single-channel (Z, Y, X) volume. A contiguous range of a memory-mapped 4D file stays mapped;
    any other choice, and a list of files, is copied into memory in the files' own voxel type.
    """
    if isinstance(source, (str, os.PathLike)):
        volume = _read_4d_channels(Path(source), channels, slicing_axis)
    else:
        volume = _stack_channel_files([Path(path) for path in source], channels, slicing_axis)
    if volume.array.ndim == 4 and volume.array.shape[-1] == 1:
        volume = Volume(volume.array[..., 0], volume.spacing, volume.affine, volume.file_axes, volume.source_path,
                        volume.file_format, volume.header)
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
    data, affine, header = _read_any(path, file_format)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise VolumeError(f"{path}: has {data.ndim} dimensions (shape {tuple(data.shape)}); expected a 3D or 4D volume")
    _check_voxel_type(data, path)
    channel_axis = 3 if file_format == "nifti" else _channel_axis(data)
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
        if not np.allclose(volume.affine, first.affine, atol=1e-3):
            raise VolumeError(f"{volume.source_path}: its voxel-to-world geometry differs from {first.source_path}'s; "
                              "channels must be co-registered on one grid (resample them first)")
        if volume.file_axes != first.file_axes or volume.flips != first.flips:
            raise VolumeError(f"{volume.source_path}: its voxel order differs from {first.source_path}'s; "
                              "channels must be co-registered on one grid (resample them first)")
    array = np.stack([np.asarray(volume.array) for volume in volumes], axis=-1)
    names = tuple(volume.source_path.name for volume in volumes)
    return Volume(array, first.spacing, first.affine, first.file_axes, first.source_path, first.file_format,
                  first.header, names, first.flips)


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


def read_labels(path: str | os.PathLike, like: Volume | None = None, *, slicing_axis: int | None = None) -> Volume:
    """Read a label file with the same axis handling as ``read_volume`` (or as ``like``)."""
    if like is not None and slicing_axis is None:
        slicing_axis = like.file_axes[0]
    labels = read_volume(path, slicing_axis=slicing_axis, check_values=False)
    array = np.asarray(labels.array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise VolumeError(f"{path}: label file contains NaN or infinite values")
        array = np.rint(array)
    if array.min() < 0:
        raise VolumeError(f"{path}: label file contains negative label ids")
    labels.array = array.astype(np.uint16 if array.max() < 65536 else np.uint32)
    if like is not None and labels.shape != like.shape:
        raise VolumeError(f"{path}: labels have shape {labels.shape} but the image has {like.shape}")
    return labels


def write_volume(path: str | os.PathLike, array_zyx: np.ndarray, like: Volume | None = None) -> Path:
    """Write a (Z, Y, X) array, e.g. a mask, atomically, in ``like``'s voxel order and geometry."""
    path = Path(path)
    file_format = file_format_of(path)
    like = like or Volume(np.asarray(array_zyx))
    data = like.to_file_order(np.asarray(array_zyx))
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        if file_format == "nifti":
            write_nifti(temporary, data, like.affine, like.header)
        elif file_format == "tiff":
            write_tiff(temporary, data, np.sqrt((like.affine[:3, :3] ** 2).sum(axis=0)))
        else:
            write_npy(temporary, data)

    atomic_write(path, write)
    return path
