"""Read and write 3D volumes (NIfTI, TIFF, .npy) as ``Volume`` objects, and window their intensities.

One way through the data: a file becomes a ``Volume`` whose ``array`` is (Z, Y, X) with Z the slicing
axis; masks are written back in the file's own voxel order and affine so they overlay the input in any
viewer (ITK-SNAP, 3D Slicer, napari).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io.errors import VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
TIFF_SUFFIXES = (".tif", ".tiff")
NPY_SUFFIXES = (".npy",)
SUPPORTED_SUFFIXES = NIFTI_SUFFIXES + TIFF_SUFFIXES + NPY_SUFFIXES

# Window presets for CT, as (level, width) in Hounsfield units.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_CHOICES = ("auto", *CT_WINDOW_PRESETS, "percentile", "minmax")
MRI_PERCENTILES = (0.5, 99.5)


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


def slicing_axes(slicing_axis: int, file_format: str = "nifti") -> tuple[int, int, int]:
    """File voxel axes in (Z, Y, X) order for a given file slicing axis.

    NIfTI stores (I, J, K) with K the slice axis, so its natural (Z, Y, X) is (2, 1, 0): axial slices of
    an RAS/LPS scan. TIFF stacks and .npy arrays are already (Z, Y, X). The two in-plane axes keep the
    natural order.
    """
    if slicing_axis not in (0, 1, 2):
        raise VolumeError(f"slicing axis must be 0, 1 or 2, got {slicing_axis}")
    natural = (2, 1, 0) if file_format == "nifti" else (0, 1, 2)
    in_plane = [axis for axis in natural if axis != slicing_axis]
    return (slicing_axis, in_plane[0], in_plane[1])


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
    array, affine, spacing, file_axes, flips = _display_order(data, affine, slicing_axis, file_format, path)
    if check_values:
        check_intensities(array, path)
    return Volume(array, spacing, affine, file_axes, path, file_format, header, flips=flips)


def _display_order(data: np.ndarray, affine, slicing_axis: int | None, file_format: str, path: Path):
    """File data (3D, or 4D with channels last) as a (Z, Y, X[, C]) view, with its geometry.

    Returns (array, affine, spacing, file_axes, flips); only views are made, so memory-mapped data stays lazy.
    """
    if slicing_axis is None:
        slicing_axis = 2 if file_format == "nifti" else 0
    file_axes = slicing_axes(slicing_axis, file_format)
    flips = (False, False, False)
    if file_format == "nifti":
        file_axes, flips = radiological_axes(affine, slicing_axis)
    affine, spacing = _checked_geometry(affine, file_axes, path)
    array = np.transpose(data, (*file_axes, *range(3, data.ndim)))
    flipped_axes = tuple(axis for axis, flipped in enumerate(flips) if flipped)
    if flipped_axes:
        array = np.flip(array, flipped_axes)  # a view: memory-mapped files stay lazy
    return array, affine, spacing, file_axes, flips


def _read_any(path: Path, file_format: str):
    """(data, affine, header) of a file, any parser failure turned into one ``VolumeError``."""
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    try:
        if file_format == "nifti":
            return _read_nifti(path)
        if file_format == "tiff":
            return _read_tiff(path)
        return _read_npy(path)
    except VolumeError:
        raise
    except Exception as error:  # any parser failure is an unreadable file, said once, clearly
        raise VolumeError(f"{path}: cannot read this {file_format} file ({type(error).__name__}: {error})") from error


def radiological_axes(affine: np.ndarray, slicing_axis: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(Z, Y, X) file axes and flips that show a NIfTI slice as radiologists read it.

    Rows run from anterior to posterior (axial) or superior to inferior (coronal, sagittal); columns run
    from the patient's right to left (axial, coronal) or anterior to posterior (sagittal).
    """
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(affine)
    except Exception:  # a degenerate affine: keep the file's order rather than guess an orientation
        return slicing_axes(slicing_axis, "nifti"), (False, False, False)
    if None in codes:
        return slicing_axes(slicing_axis, "nifti"), (False, False, False)
    in_plane = [axis for axis in (2, 1, 0) if axis != slicing_axis]
    for preferred in ("SI", "AP"):
        rows = [axis for axis in in_plane if codes[axis] in preferred]
        if rows:
            in_plane = [rows[0]] + [axis for axis in in_plane if axis != rows[0]]
            break
    file_axes = (slicing_axis, in_plane[0], in_plane[1])
    # Rows should increase toward P or I and columns toward L or P: flip in-plane axes that point R, A or S.
    flips = (False, codes[file_axes[1]] in "RAS", codes[file_axes[2]] in "RAS")
    return file_axes, flips


def _checked_geometry(affine, file_axes: tuple[int, int, int], path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The affine as floats and the (z, y, x) spacing; a header with NaN/inf geometry is refused."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{path}: the header's voxel-to-world geometry is invalid (NaN or infinite values); "
                          "fix the header's pixel sizes/orientation")
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return affine, tuple(float(voxel_sizes[axis]) or 1.0 for axis in file_axes)


def _read_nifti(path: Path):
    import nibabel as nib

    image = nib.load(str(path))
    _check_declared_size(path, image.header)
    proxy = image.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if (slope, inter) == (1.0, 0.0) or not hasattr(proxy, "get_unscaled"):
        # asanyarray keeps an uncompressed file memory-mapped instead of loading it whole.
        return np.asanyarray(proxy), image.affine, image.header
    return _scaled(proxy.get_unscaled(), slope, inter), image.affine, image.header


# Deflate expands at most ~1032:1, so a .nii.gz cannot hold more voxel bytes than this many times its size.
MAX_GZIP_EXPANSION = 1100


def _check_declared_size(path: Path, header) -> None:
    """Refuse a header that declares more voxel data than the file can hold (a damaged or truncated file),
    before anything tries to allocate or decompress that much."""
    shape = tuple(int(size) for size in header.get_data_shape())
    declared = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    expansion = MAX_GZIP_EXPANSION if path.name.lower().endswith(".gz") else 1
    available = path.stat().st_size * expansion
    if declared > available:
        raise VolumeError(f"{path}: the header declares {shape} voxels of {header.get_data_dtype()} "
                          f"({declared / 2**20:.1f} MiB) but the file can hold at most {available / 2**20:.1f} MiB; "
                          "it is truncated or its header is damaged")


def _scaled(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``raw * slope + inter`` (a NIfTI's scl_slope/scl_inter), computed slab by slab.

    nibabel would return the whole volume as float64 (1.2 GiB for a 512x512x600 CT). Integer data with an
    integer slope and intercept (CT stored as uint16 with intercept -1024) stays integer, in the smallest type
    holding its actual values; anything else becomes float32. The result keeps the file's (Fortran) layout,
    so (Z, Y, X) slices of it stay contiguous.
    """
    integer = raw.dtype.kind in "iub" and slope.is_integer() and inter.is_integer()
    axis = min(2, raw.ndim - 1)  # slabs along the NIfTI slice axis
    step = max(1, (4 << 20) // max(1, raw.nbytes // max(1, raw.shape[axis])))  # ~4 MiB of working memory
    slabs = [tuple(slice(start, start + step) if index == axis else slice(None) for index in range(raw.ndim))
             for start in range(0, raw.shape[axis], step)]
    dtype = np.dtype(np.float32)
    if integer and raw.size:
        low = min(int(np.min(raw[slab])) for slab in slabs)
        high = max(int(np.max(raw[slab])) for slab in slabs)
        ends = sorted((low * int(slope) + int(inter), high * int(slope) + int(inter)))
        dtype = next((np.dtype(candidate) for candidate in (np.int16, np.int32, np.int64)
                      if np.iinfo(candidate).min <= ends[0] and ends[1] <= np.iinfo(candidate).max), dtype)
    scaled = np.empty(raw.shape, dtype, order="F")
    with np.errstate(over="ignore", invalid="ignore"):  # a damaged header's huge slope gives inf: refused later
        for slab in slabs:
            values = np.asarray(raw[slab]).astype(dtype)
            values *= dtype.type(slope)
            values += dtype.type(inter)
            scaled[slab] = values
            del values  # before the next slab is made: one slab of working memory at a time
    return scaled


def _read_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        data = tif.asarray()
        spacing_zyx = [1.0, 1.0, 1.0]
        imagej = tif.imagej_metadata or {}
        if "spacing" in imagej:
            spacing_zyx[0] = float(imagej["spacing"])
        page = tif.pages[0]
        for index, tag_name in ((2, "XResolution"), (1, "YResolution")):
            tag = page.tags.get(tag_name)
            if tag is not None:
                numerator, denominator = tag.value
                if numerator:
                    spacing_zyx[index] = float(denominator) / float(numerator)
    affine = np.diag([*spacing_zyx, 1.0])
    return data, affine, None


def _read_npy(path: Path):
    data = np.load(str(path), mmap_mode="r", allow_pickle=False)
    return data, np.eye(4), None


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
    array, affine, spacing, file_axes, flips = _display_order(data, affine, slicing_axis, file_format, path)
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
            import nibabel as nib

            header = like.header.copy() if like.header is not None and hasattr(like.header, "copy") else None
            # NIfTI stores voxels x-fastest (Fortran order): the (Z, Y, X) -> file transpose of a C-ordered mask is
            # already that, so no copy is made (a C-ordered copy of a 600-slice mask took seconds to re-transpose).
            image = nib.Nifti1Image(np.asfortranarray(data), like.affine, header=header)
            image.set_data_dtype(data.dtype)
            if np.issubdtype(data.dtype, np.integer):
                image.header.set_slope_inter(1, 0)
            nib.save(image, str(temporary))
        elif file_format == "tiff":
            import tifffile

            spacing = np.sqrt((like.affine[:3, :3] ** 2).sum(axis=0))
            tifffile.imwrite(str(temporary), np.ascontiguousarray(data), imagej=_imagej_dtype_ok(data),
                             resolution=(1.0 / spacing[2], 1.0 / spacing[1]),
                             metadata={"spacing": float(spacing[0]), "unit": "mm"} if _imagej_dtype_ok(data) else None)
        else:
            with open(temporary, "wb") as handle:
                np.save(handle, np.ascontiguousarray(data), allow_pickle=False)

    atomic_write(path, write)
    return path


def _imagej_dtype_ok(data: np.ndarray) -> bool:
    return data.dtype in (np.uint8, np.uint16, np.float32)


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once at import: os.umask can only be read by setting it


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename over ``path``: readers see the old file or the new one.

    The new file keeps the permissions of the file it replaces (a new file gets the usual 0666 - umask,
    not the private 0600 of a temporary file).
    """
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(descriptor)
    temporary_path = Path(temporary)
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
        write(temporary_path)
        with open(temporary_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary_path, mode)
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


# --- intensity windowing -------------------------------------------------------------------------------

# Window statistics read at most this many voxels (4 MiB as float32), whatever the volume's size.
MAX_SAMPLE_VOXELS = 1 << 20


def intensity_sample(array: np.ndarray, slices: int) -> np.ndarray:
    """About ``slices`` evenly spaced slices of ``array``, thinned in-plane to ``MAX_SAMPLE_VOXELS`` voxels.

    Reading only these keeps a memory-mapped volume lazy; small volumes are sampled exactly as before.
    """
    sample = array[:: max(1, array.shape[0] // slices)]
    stride = 1
    while sample.shape[0] * -(-sample.shape[1] // stride) * -(-sample.shape[2] // stride) > MAX_SAMPLE_VOXELS:
        stride += 1
    return np.asarray(sample[:, ::stride, ::stride])


def looks_like_ct(array: np.ndarray) -> bool:
    """CT in Hounsfield units: air near -1000 and values mostly within [-1024, 3071]."""
    sample = intensity_sample(array, 16).astype(np.float32, copy=False)
    low, high = (float(value) for value in np.percentile(sample, (0.5, 99.5)))
    return low < -500.0 and low >= -3100.0 and high <= 4000.0


@dataclass(frozen=True)
class Window:
    """An intensity window mapping raw values linearly to [0, 1], clipped."""

    low: float
    high: float
    name: str = "custom"

    def apply(self, values: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(values, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-6)
        return np.clip(scaled, 0.0, 1.0)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.low:.6g}:{self.high:.6g}"


@dataclass(frozen=True)
class ChannelWindow(Window):
    """One window per channel of a (..., C) multi-channel image; ``low``/``high`` span all of them."""

    channels: tuple[Window, ...] = ()

    def apply(self, values: np.ndarray) -> np.ndarray:
        lows = np.array([window.low for window in self.channels], np.float32)
        widths = np.array([max(window.high - window.low, 1e-6) for window in self.channels], np.float32)
        return np.clip((np.asarray(values, dtype=np.float32) - lows) / widths, 0.0, 1.0)

    @property
    def key(self) -> str:
        return "channels[" + ";".join(window.key for window in self.channels) + "]"


def channel_window(windows: list[Window]) -> ChannelWindow:
    return ChannelWindow(min(window.low for window in windows), max(window.high for window in windows),
                         "+".join(window.name for window in windows), tuple(windows))


def choose_window(array: np.ndarray, window: str | tuple[float, float] = "auto") -> Window:
    """Pick an intensity window: a CT preset, MRI percentile clipping, min-max, or (level, width).

    A (Z, Y, X, C) array gets a ``ChannelWindow``: each channel windowed on its own, with the same choice
    for all, or with one choice per channel when ``window`` is a list of them (e.g. ["soft_tissue", "percentile"]).
    """
    if array.ndim == 4:
        count = array.shape[-1]
        per_channel = isinstance(window, list) and all(isinstance(item, (str, tuple, list)) for item in window)
        if per_channel and len(window) != count:
            raise ValueError(f"{len(window)} windows given for {count} channels")
        choices = window if per_channel else [window] * count
        return channel_window([choose_window(array[..., channel], choice) for channel, choice in enumerate(choices)])
    if isinstance(window, (tuple, list)):
        level, width = float(window[0]), float(window[1])
        return Window(level - width / 2, level + width / 2, "custom")
    if window == "auto":
        window = "soft_tissue" if looks_like_ct(array) else "percentile"
    if window in CT_WINDOW_PRESETS:
        level, width = CT_WINDOW_PRESETS[window]
        return Window(level - width / 2, level + width / 2, window)
    sample = intensity_sample(array, 32).astype(np.float32)
    if window == "percentile":
        low, high = np.percentile(sample, MRI_PERCENTILES)
        if high <= low:
            low, high = float(sample.min()), float(sample.max())
        return Window(float(low), float(high), "percentile")
    if window == "minmax":
        return Window(float(np.min(array)), float(np.max(array)), "minmax")
    raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)} or give (level, width)")
