"""Voxel order and geometry: which file axis napari shows as Z, Y and X, which of them run backwards for the
radiological view, and where each voxel lies in the world.

Format readers give voxels in the file's own (i, j, k) order with a 4x4 voxel-to-world affine in RAS+ mm; this
module turns that into the displayed (Z, Y, X) view and back, so every format shares one code path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import VolumeError


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



def display_order(data: np.ndarray, affine, slicing_axis: int | None, file_format: str, path: Path):
    """File data (3D, or 4D with channels last) as a (Z, Y, X[, C]) view, with its geometry.

    Returns (array, affine, spacing, file_axes, flips); only views are made, so memory-mapped data stays lazy.
    """
    if slicing_axis is None:
        slicing_axis = 2 if file_format == "nifti" else 0
    file_axes = slicing_axes(slicing_axis, file_format)
    flips = (False, False, False)
    if file_format == "nifti":
        file_axes, flips = radiological_axes(affine, slicing_axis)
    affine, spacing = checked_geometry(affine, file_axes, path)
    array = np.transpose(data, (*file_axes, *range(3, data.ndim)))
    flipped_axes = tuple(axis for axis, flipped in enumerate(flips) if flipped)
    if flipped_axes:
        array = np.flip(array, flipped_axes)  # a view: memory-mapped files stay lazy
    return array, affine, spacing, file_axes, flips



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


def checked_geometry(affine, file_axes: tuple[int, int, int], path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The affine as floats and the (z, y, x) spacing; a header with NaN/inf geometry is refused."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{path}: the header's voxel-to-world geometry is invalid (NaN or infinite values); "
                          "fix the header's pixel sizes/orientation")
    voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return affine, tuple(float(voxel_sizes[axis]) or 1.0 for axis in file_axes)


