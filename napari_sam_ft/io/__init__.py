"""Reading and writing scans and masks: one module per format family, plus geometry and windowing.

Every format reader returns the file's voxels in the file's own axis order (i, j, k[, channel]) and a 4x4
voxel-to-world affine in RAS+ millimetres (NIfTI's convention; LPS files are converted on reading), so one
geometry code path serves NIfTI, MGZ, NRRD/.seg.nrrd, MHA and DICOM alike. ``Volume`` is the one way through
the data: its ``array`` is what napari shows, (Z, Y, X), and ``world_affine`` maps it to the world.
"""

from .content import classify_contents, looks_like_labels
from .errors import VolumeError
from .volume import SUPPORTED_SUFFIXES, Volume, file_format_of, read_channels, read_labels, read_volume, write_volume

__all__ = ["SUPPORTED_SUFFIXES", "Volume", "VolumeError", "classify_contents", "file_format_of", "looks_like_labels",
           "read_channels", "read_labels", "read_volume", "write_volume"]
