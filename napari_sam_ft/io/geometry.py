"""Voxel order and geometry: which file axis napari shows as Z, Y and X, which of them run backwards for the
radiological view, and where each voxel lies in the world.

Format readers give voxels in the file's own (i, j, k) order with a 4x4 voxel-to-world affine in RAS+ mm; this
module turns that into the displayed (Z, Y, X) view and back, so every format shares one code path:

- ``display_order``: file data -> the (Z, Y, X) view (a transpose and flips, no copy) and its geometry;
- ``display_to_file``/``world_affine``: the 4x4 matrices displayed index (z, y, x, 1) -> file index (i, j, k, 1)
  -> RAS world (x, y, z, 1);
- ``grid_alignment``/``align_to_grid``: put a label file's voxels on an image's displayed grid by world geometry
  (another voxel order, flipped axes, or a crop of the same grid), or say that the grids differ.

Oblique scans are honoured, not refused: the affine is kept exactly (in ``world_affine`` and in every file we
write), the displayed order follows the nearest patient axes, and the spacing is the length of each voxel axis.
Only a viewer that can show nothing but axis-aligned scale and translate loses the small rotation on screen; the
voxels of a mask stay on the scan's own voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VolumeError

# Formats whose files hold no world geometry: their arrays are already (Z, Y, X), with at most a spacing.
ARRAY_FORMATS = ("tiff", "npy")
# Two grids are one when voxel centres agree to this fraction of a voxel, and axes to this cosine error.
GRID_TOLERANCE_VOXELS = 0.05
DIRECTION_TOLERANCE = 1e-3
# A voxel larger than this (mm) is a damaged header, not a scan.
MAX_VOXEL_MM = 1e5
# An axis more than this many degrees from the nearest patient axis makes a scan "oblique" (said, not refused).
OBLIQUE_DEGREES = 0.5
# NRRD/ITK spaces as the signs that turn their (x, y, z) into RAS+; ITK takes a space without patient
# orientation (scanner-xyz, 3D-right-handed, none given) as LPS, and so do we, so Slicer and we agree.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def has_world_geometry(file_format: str) -> bool:
    """Whether files of this format say where their voxels lie (NIfTI, NRRD, MHA, MGZ, DICOM do; TIFF, npy not)."""
    return file_format not in ARRAY_FORMATS


def default_slicing_axis(file_format: str) -> int:
    """The file voxel axis sliced by default: the third (k, the slice axis of NIfTI, NRRD, DICOM...), or the
    first of a (Z, Y, X) TIFF stack or .npy array."""
    return 2 if has_world_geometry(file_format) else 0


def slicing_axes(slicing_axis: int, file_format: str = "nifti") -> tuple[int, int, int]:
    """File voxel axes in (Z, Y, X) order for a given file slicing axis, without reorienting.

    Files with world geometry store (I, J, K) with K the slice axis, so their natural (Z, Y, X) is (2, 1, 0):
    axial slices of an RAS/LPS scan. TIFF stacks and .npy arrays are already (Z, Y, X). The two in-plane axes
    keep the natural order.
    """
    if slicing_axis not in (0, 1, 2):
        raise VolumeError(f"slicing axis must be 0, 1 or 2, got {slicing_axis}")
    natural = (2, 1, 0) if has_world_geometry(file_format) else (0, 1, 2)
    in_plane = [axis for axis in natural if axis != slicing_axis]
    return (slicing_axis, in_plane[0], in_plane[1])


def display_order(data: np.ndarray, affine, slicing_axis: int | None, file_format: str, path: Path):
    """File data (3D, or 4D with channels last) as a (Z, Y, X[, C]) view, with its geometry.

    Every format with world geometry is shown radiologically (``radiological_axes``), so an NRRD, a NIfTI and
    a DICOM copy of one scan display identically. Returns (array, affine, spacing, file_axes, flips); only views
    are made, so memory-mapped data stays lazy.
    """
    if slicing_axis is None:
        slicing_axis = default_slicing_axis(file_format)
    file_axes = slicing_axes(slicing_axis, file_format)
    flips = (False, False, False)
    if has_world_geometry(file_format):
        file_axes, flips = radiological_axes(affine, slicing_axis)
    affine, spacing = checked_geometry(affine, file_axes, path)
    return displayed(data, file_axes, flips), affine, spacing, file_axes, flips


def displayed(data: np.ndarray, file_axes, flips) -> np.ndarray:
    """File-ordered (i, j, k[, C]) data as the displayed (Z, Y, X[, C]) view (no copy)."""
    array = np.transpose(data, (*file_axes, *range(3, data.ndim)))
    flipped_axes = tuple(axis for axis, flipped in enumerate(flips) if flipped)
    return np.flip(array, flipped_axes) if flipped_axes else array  # a view: memory-mapped files stay lazy


def to_file_order(array_zyx: np.ndarray, file_axes, flips) -> np.ndarray:
    """The inverse of ``displayed``: a (Z, Y, X[, C]) array back in the file's voxel order (no copy)."""
    flipped_axes = tuple(axis for axis, flipped in enumerate(flips) if flipped)
    unflipped = np.flip(array_zyx, flipped_axes) if flipped_axes else array_zyx
    order = np.argsort(file_axes)
    return np.transpose(unflipped, (*order, *range(3, unflipped.ndim)))


def radiological_axes(affine: np.ndarray, slicing_axis: int) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """(Z, Y, X) file axes and flips that show a slice as radiologists read it.

    Rows run from anterior to posterior (axial) or superior to inferior (coronal, sagittal); columns run
    from the patient's right to left (axial, coronal) or anterior to posterior (sagittal).
    """
    codes = axis_codes(affine)
    if codes is None:  # a degenerate affine: keep the file's order rather than guess an orientation
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


def axis_codes(affine) -> tuple[str, str, str] | None:
    """The patient direction each voxel axis points to most ('R'/'L', 'A'/'P', 'S'/'I'), or None if degenerate."""
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(np.asarray(affine, dtype=float))
    except Exception:
        return None
    return None if None in codes else tuple(codes)  # type: ignore[return-value]


def checked_geometry(affine, file_axes: tuple[int, int, int], path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """The affine as floats and the (z, y, x) spacing; a header with NaN/inf geometry is refused."""
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise VolumeError(f"{path}: the header's voxel-to-world geometry is invalid (NaN or infinite values); "
                          "fix the header's pixel sizes/orientation")
    with np.errstate(over="ignore"):
        voxel_sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if not np.isfinite(voxel_sizes).all() or voxel_sizes.max() > MAX_VOXEL_MM:
        raise VolumeError(f"{path}: the header's voxel sizes ({', '.join(f'{size:.3g}' for size in voxel_sizes)}) mm "
                          "are not those of a scan; fix the header's pixel sizes/orientation")
    return affine, tuple(float(voxel_sizes[axis]) or 1.0 for axis in file_axes)


def display_to_file(shape_zyx, file_axes, flips) -> np.ndarray:
    """4x4 matrix: displayed index (z, y, x, 1) -> file voxel index (i, j, k, 1)."""
    matrix = np.zeros((4, 4))
    matrix[3, 3] = 1.0
    for display_axis, file_axis in enumerate(file_axes):
        flipped = bool(flips[display_axis])
        matrix[file_axis, display_axis] = -1.0 if flipped else 1.0
        matrix[file_axis, 3] = shape_zyx[display_axis] - 1 if flipped else 0.0
    return matrix


def world_affine(affine, shape_zyx, file_axes, flips) -> np.ndarray:
    """4x4 matrix: displayed index (z, y, x, 1) -> RAS+ world mm (x, y, z, 1)."""
    return np.asarray(affine, dtype=float) @ display_to_file(shape_zyx, file_axes, flips)


def obliquity_degrees(affine) -> float:
    """The largest angle (degrees) between a voxel axis and its nearest patient axis; 0 for axis-aligned scans."""
    directions = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(directions, axis=0)
    if not np.all(norms > 0):
        return 0.0
    cosines = np.abs(directions / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def is_oblique(affine) -> bool:
    return obliquity_degrees(affine) > OBLIQUE_DEGREES


def describe_geometry(affine, shape) -> str:
    """One line naming a grid: shape, spacing, origin (RAS mm), axis directions, and obliquity if any."""
    affine = np.asarray(affine, dtype=float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    codes = axis_codes(affine)
    sizes = ", ".join(f"{value:.4g}" for value in spacing)
    text = (f"shape {tuple(int(size) for size in shape)}, spacing ({sizes}) mm, "
            f"origin ({', '.join(f'{value:.4g}' for value in affine[:3, 3])}) mm RAS, "
            f"axes {''.join(codes) if codes else 'degenerate'}")
    angle = obliquity_degrees(affine)
    return text + (f", oblique by {angle:.1f} deg" if angle > OBLIQUE_DEGREES else "")


@dataclass(frozen=True)
class GridAlignment:
    """How the voxels of a source grid sit on a target grid: target[axis] = sign * source[source_axis] + offset.

    ``source_axes[t]`` is the source voxel axis along target axis t, ``signs[t]`` is +1 or -1, and ``offsets[t]``
    the target index of source index 0 along it (non-zero when the source is a crop of the target's grid).
    """

    source_axes: tuple[int, int, int]
    signs: tuple[int, int, int]
    offsets: tuple[int, int, int]


def grid_alignment(source_affine, target_affine, source_shape=(1, 1, 1)) -> GridAlignment | None:
    """The alignment of two voxel grids in one world, or None when their voxels are not one lattice.

    One lattice: the source's voxel axes are the target's up to order and sign, and every source voxel centre
    lies on a target voxel centre within ``GRID_TOLERANCE_VOXELS`` (checked at the corners of a source grid of
    ``source_shape``, so a spacing that differs by a fraction of a percent is refused when it adds up to a
    misplaced voxel across the grid).
    """
    source_affine = np.asarray(source_affine, dtype=float)
    target_affine = np.asarray(target_affine, dtype=float)
    try:
        source_to_target = np.linalg.solve(target_affine, source_affine)
    except np.linalg.LinAlgError:
        return None
    if not np.isfinite(source_to_target).all():
        return None
    rotation = source_to_target[:3, :3]
    rounded = np.rint(rotation)
    is_signed_permutation = (np.abs(rounded).sum(axis=0) == 1).all() and (np.abs(rounded).sum(axis=1) == 1).all()
    if not is_signed_permutation or np.abs(rotation - rounded).max() > DIRECTION_TOLERANCE:
        return None
    corners = np.array([[i, j, k, 1.0] for i in (0, source_shape[0] - 1) for j in (0, source_shape[1] - 1)
                        for k in (0, source_shape[2] - 1)])
    mapped = corners @ source_to_target.T
    exact = corners @ np.vstack([np.hstack([rounded, np.rint(source_to_target[:3, 3:])]), [0, 0, 0, 1]]).T
    if np.abs(mapped - exact).max() > GRID_TOLERANCE_VOXELS:
        return None
    offsets = np.rint(source_to_target[:3, 3])
    source_axes = tuple(int(np.flatnonzero(rounded[target_axis])[0]) for target_axis in range(3))
    signs = tuple(int(rounded[target_axis, source_axes[target_axis]]) for target_axis in range(3))
    return GridAlignment(source_axes, signs, tuple(int(value) for value in offsets))  # type: ignore[arg-type]


def align_to_grid(data_ijk: np.ndarray, alignment: GridAlignment, target_shape) -> np.ndarray | None:
    """``data_ijk`` resampled (exactly: a transpose, flips and a paste) onto a target grid of ``target_shape``.

    A source that is a crop of the target is pasted in with zeros around it; source voxels outside the target
    may only be zero (a label map cropped to the image loses nothing). Returns None when labelled voxels fall
    outside the target grid.
    """
    oriented = np.transpose(data_ijk, alignment.source_axes)
    flipped_axes = tuple(axis for axis, sign in enumerate(alignment.signs) if sign < 0)
    if flipped_axes:
        oriented = np.flip(oriented, flipped_axes)
    # After the flips, the first oriented voxel along a flipped axis is the source's last one.
    starts = [offset - (size - 1) if sign < 0 else offset
              for offset, size, sign in zip(alignment.offsets, oriented.shape, alignment.signs)]
    target = np.zeros(tuple(target_shape), dtype=oriented.dtype)
    source_window, target_window = [], []
    for start, size, target_size in zip(starts, oriented.shape, target_shape):
        low, high = max(start, 0), min(start + size, target_size)
        if high <= low:
            return None if np.any(oriented) else target
        source_window.append(slice(low - start, high - start))
        target_window.append(slice(low, high))
    inside = oriented[tuple(source_window)]
    if np.count_nonzero(inside) != np.count_nonzero(oriented):
        return None
    target[tuple(target_window)] = inside
    return target
