"""Reading and writing scans and masks: one module per format family, plus geometry and windowing.

Every format reader returns the file's voxels in the file's own axis order (i, j, k[, channel]) and a 4x4
voxel-to-world affine in RAS+ millimetres (NIfTI's convention; LPS files are converted on reading), so one
geometry code path serves NIfTI, NRRD, MHA, MGZ and DICOM alike.
"""

from .errors import VolumeError

__all__ = ["VolumeError"]
