"""NIfTI (.nii, .nii.gz) and FreeSurfer MGH/MGZ through nibabel: voxels in the file's (i, j, k) order and its
RAS+ affine (both formats store RAS+ natively)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MAX_COMPRESSION_EXPANSION, refuse_oversized_header

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MGZ_SUFFIXES = (".mgz", ".mgh")
# MGH stores only these voxel types; a mask of another integer type is written as int32.
MGH_DTYPES = (np.uint8, np.int16, np.int32, np.float32)


def read_nibabel(path: Path):
    """(data, affine, header): data in (i, j, k[, t]) order, memory-mapped when uncompressed and unscaled."""
    import nibabel as nib

    image = nib.load(str(path))
    _check_declared_size(path, image.header)
    cached = _decompressed_copy(path, image.header)
    if cached is not None:
        image = nib.load(str(cached))  # the same bytes uncompressed: memory-mapped below
    proxy = image.dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    if (slope, inter) == (1.0, 0.0) or not hasattr(proxy, "get_unscaled"):
        # asanyarray keeps an uncompressed file memory-mapped instead of loading it whole.
        return np.asanyarray(proxy), image.affine, image.header
    return _scaled(proxy.get_unscaled(), slope, inter), image.affine, image.header


def _decompressed_copy(path: Path, header) -> Path | None:
    """A large .nii.gz's (or .mgz's) uncompressed copy in the cache, so it is memory-mapped, not read whole."""
    from . import decompressed

    declared = int(np.prod(header.get_data_shape(), dtype=object)) * header.get_data_dtype().itemsize
    if declared < decompressed.DECOMPRESS_TO_CACHE_BYTES or not decompressed.is_gzip(path):
        return None
    uncompressed_suffix = ".mgh" if path.name.lower().endswith(".mgz") else ".nii"
    return decompressed.decompressed_copy(path, uncompressed_suffix)


# Kept under its old name: napari_sam_ft.volume re-exports it.
MAX_GZIP_EXPANSION = MAX_COMPRESSION_EXPANSION


def _check_declared_size(path: Path, header) -> None:
    """Refuse a header that declares more voxel data than the file can hold, before anything reads it."""
    shape = tuple(int(size) for size in header.get_data_shape())
    declared = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    expansion = MAX_COMPRESSION_EXPANSION if path.name.lower().endswith((".gz", ".mgz")) else 1
    refuse_oversized_header(path, shape, header.get_data_dtype(), declared, path.stat().st_size * expansion)


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




def write_nifti(path: Path, data_ijk: np.ndarray, affine: np.ndarray, header=None) -> None:
    """Write voxels in (i, j, k) order with ``affine``; ``header`` (the image's) keeps its other fields."""
    import nibabel as nib

    header = header.copy() if header is not None and hasattr(header, "copy") else None
    # NIfTI stores voxels x-fastest (Fortran order): the (Z, Y, X) -> file transpose of a C-ordered mask is
    # already that, so no copy is made (a C-ordered copy of a 600-slice mask took seconds to re-transpose).
    image = nib.Nifti1Image(np.asfortranarray(data_ijk), affine, header=header)
    image.set_data_dtype(data_ijk.dtype)
    if np.issubdtype(data_ijk.dtype, np.integer):
        image.header.set_slope_inter(1, 0)
    nib.save(image, str(path))


def write_mgz(path: Path, data_ijk: np.ndarray, affine: np.ndarray) -> None:
    import nibabel as nib

    data = np.asarray(data_ijk)
    if data.dtype not in MGH_DTYPES:
        data = data.astype(np.int32 if np.issubdtype(data.dtype, np.integer) or data.dtype == bool else np.float32)
    nib.save(nib.MGHImage(data, np.asarray(affine, dtype=float)), str(path))
