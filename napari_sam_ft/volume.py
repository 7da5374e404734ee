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


class VolumeError(ValueError):
    """A file that cannot be used as a 3D volume; the message names the file and the problem."""


@dataclass
class Volume:
    """A 3D scan ready for slice-by-slice segmentation.

    ``array`` is (Z, Y, X): Z is the slicing axis. ``file_axes`` says which voxel axis of the file each
    of Z, Y, X came from, so a mask can be put back in the file's order. ``affine`` is the file's
    4x4 voxel-to-world matrix (in the file's voxel order); ``spacing`` is (z, y, x) in mm.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    file_axes: tuple[int, int, int] = (0, 1, 2)
    source_path: Path | None = None
    file_format: str = "npy"
    header: object | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

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
        return np.transpose(array_zyx, np.argsort(self.file_axes))

    def napari_scale_translate(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Scale and translate for napari layers, so that layers of one scan overlay in world units."""
        scale = tuple(float(s) for s in self.spacing)
        origin = self.affine[:3, 3]
        translate = tuple(float(origin[axis]) if axis < 3 else 0.0 for axis in self.file_axes)
        return scale, translate

    def with_array(self, array_zyx: np.ndarray) -> "Volume":
        """A volume with the same geometry and another array of the same (Z, Y, X) shape."""
        if tuple(array_zyx.shape) != self.shape:
            raise VolumeError(f"array shape {array_zyx.shape} does not match volume shape {self.shape}")
        return Volume(array_zyx, self.spacing, self.affine, self.file_axes, self.source_path,
                      self.file_format, self.header)


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
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    try:
        if file_format == "nifti":
            data, affine, header = _read_nifti(path)
        elif file_format == "tiff":
            data, affine, header = _read_tiff(path)
        else:
            data, affine, header = _read_npy(path)
    except VolumeError:
        raise
    except Exception as error:  # any parser failure is an unreadable file, said once, clearly
        raise VolumeError(f"{path}: cannot read this {file_format} file ({type(error).__name__}: {error})") from error

    data = _select_3d(data, path, channel)
    if slicing_axis is None:
        slicing_axis = 2 if file_format == "nifti" else 0
    file_axes = slicing_axes(slicing_axis, file_format)
    voxel_sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = tuple(float(voxel_sizes[axis]) or 1.0 for axis in file_axes)
    array = np.transpose(data, file_axes)
    if check_values:
        check_intensities(array, path)
    return Volume(array, spacing, np.asarray(affine, dtype=float), file_axes, path, file_format, header)


def _read_nifti(path: Path):
    import nibabel as nib

    image = nib.load(str(path))
    # asanyarray keeps an uncompressed file memory-mapped instead of loading it whole.
    data = np.asanyarray(image.dataobj)
    return data, image.affine, image.header


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


def _select_3d(data: np.ndarray, path: Path, channel: int | None) -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] == 1 and channel is None:
        data = data[..., 0]
    if data.ndim == 4:
        count = data.shape[-1] if data.shape[-1] <= data.shape[0] else data.shape[0]
        channel_axis = data.ndim - 1 if data.shape[-1] <= data.shape[0] else 0
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
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise VolumeError(f"{path}: has non-numeric voxels ({data.dtype})")
    return data


def check_intensities(array: np.ndarray, path: Path | str | None = None) -> None:
    """Refuse NaN/inf and constant volumes, reading slab by slab so large memory-mapped files stay lazy."""
    where = f"{path}: " if path is not None else ""
    low, high = np.inf, -np.inf
    floating = np.issubdtype(array.dtype, np.floating)
    for start in range(0, array.shape[0], 32):
        slab = np.asarray(array[start:start + 32])
        if floating and not np.isfinite(slab).all():
            bad = int((~np.isfinite(slab)).sum())
            raise VolumeError(f"{where}contains {bad} NaN or infinite voxels in slices {start}..{start + len(slab) - 1}; "
                              "fix or mask them before segmenting")
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
    if low == high:
        raise VolumeError(f"{where}is constant (every voxel is {low:g}); there is nothing to segment")


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
            image = nib.Nifti1Image(np.ascontiguousarray(data), like.affine, header=header)
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


def atomic_write(path: Path, write) -> None:
    """Call ``write(temporary_path)`` then rename over ``path``: readers see the old file or the new one."""
    path = Path(path)
    suffix = "".join(path.suffixes) or ".tmp"
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    os.close(descriptor)
    temporary_path = Path(temporary)
    try:
        write(temporary_path)
        with open(temporary_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary_path, path)
    except BaseException:
        temporary_path.unlink(missing_ok=True)
        raise


# --- intensity windowing -------------------------------------------------------------------------------

def looks_like_ct(array: np.ndarray) -> bool:
    """CT in Hounsfield units: air near -1000 and values mostly within [-1024, 3071]."""
    sample = np.asarray(array[:: max(1, array.shape[0] // 16)])
    low, high = float(np.percentile(sample, 0.5)), float(np.percentile(sample, 99.5))
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


def choose_window(array: np.ndarray, window: str | tuple[float, float] = "auto") -> Window:
    """Pick an intensity window: a CT preset, MRI percentile clipping, min-max, or (level, width)."""
    if isinstance(window, (tuple, list)):
        level, width = float(window[0]), float(window[1])
        return Window(level - width / 2, level + width / 2, "custom")
    if window == "auto":
        window = "soft_tissue" if looks_like_ct(array) else "percentile"
    if window in CT_WINDOW_PRESETS:
        level, width = CT_WINDOW_PRESETS[window]
        return Window(level - width / 2, level + width / 2, window)
    sample = np.asarray(array[:: max(1, array.shape[0] // 32)], dtype=np.float32)
    if window == "percentile":
        low, high = np.percentile(sample, MRI_PERCENTILES)
        if high <= low:
            low, high = float(sample.min()), float(sample.max())
        return Window(float(low), float(high), "percentile")
    if window == "minmax":
        return Window(float(np.min(array)), float(np.max(array)), "minmax")
    raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)} or give (level, width)")
