"""MetaImage (.mha, .mhd + raw) through SimpleITK: voxels in (i, j, k[, c]) order and an RAS+ affine.

ITK's physical space is LPS; the affine is converted by negating its first two rows, as for every LPS format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import VolumeError
from .geometry import LPS_TO_RAS

METAIMAGE_SUFFIXES = (".mha", ".mhd")


def read_metaimage(path: Path):
    """(data (i, j, k[, c]), affine RAS+, SimpleITK metadata dict). Vector pixels become the last axis."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise VolumeError(f"{path}: is {image.GetDimension()}D (size {image.GetSize()}); "
                          "napari-sam-ft needs a 3D volume")
    array = sitk.GetArrayViewFromImage(image)  # (k, j, i[, c]) in C order, a view on ITK's buffer
    data = np.array(np.transpose(array, (2, 1, 0, *range(3, array.ndim))))  # own the memory, (i, j, k[, c])
    metadata = {key: image.GetMetaData(key) for key in image.GetMetaDataKeys()}
    return data, itk_affine(image), metadata


def itk_affine(image) -> np.ndarray:
    """The voxel (i, j, k) -> RAS+ mm affine of a SimpleITK image (origin, spacing, direction are LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine


def write_metaimage(path: Path, data_ijk: np.ndarray, affine_ras: np.ndarray) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data_ijk, (2, 1, 0))))
    affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    image.SetSpacing(tuple(float(value) for value in spacing))
    image.SetDirection(tuple(float(value) for value in (affine_lps[:3, :3] / spacing).reshape(-1)))
    image.SetOrigin(tuple(float(value) for value in affine_lps[:3, 3]))
    sitk.WriteImage(image, str(path), useCompression=True)
