"""Is a file a scan or a label map? Decided by more than the value count, because an 8-bit or low-range 16-bit
scan has as few distinct values as a segmentation with many classes.

The evidence, strongest first: the format (a Slicer .seg.nrrd, a DICOM SEG or a file naming its classes is
labels; a DICOM CT/MR series is a scan), the voxel type (fractional, negative or NaN values are a scan), the
file name (seg, label, mask, dseg, aseg, annotation), a BIDS-style JSON sidecar with acquisition fields (a
scan), and last the voxels themselves: a label map is piecewise constant (neighbouring labelled voxels almost
always hold the same id), a scan is not (noise and gradients make neighbours differ), so a noisy uint8 MR with
200 grey levels is an image and a 100-class segmentation is labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

# A label map holds at most this many ids; more distinct integers are a scan.
MAX_LABEL_IDS = 1000
# This few distinct values is a (binary or few-class) mask whatever its layout.
FEW_VALUES = 8
# Of neighbouring voxel pairs touching a non-zero voxel, at least this fraction are equal in a label map.
PIECEWISE_CONSTANT_FRACTION = 0.5  # measured: segmentations 82-99 %, 8-bit and 0..300 scans 7-17 %
LABEL_NAME_PATTERN = re.compile(r"(^|[^a-z])(seg|segs|segmentation|label|labels|labelmap|mask|masks|dseg|aseg|"
                                r"aparc|annotation|annotations|roi|gt)([^a-z]|$)")
# Acquisition fields of a BIDS/dcm2niix sidecar: the file beside it is a scan.
ACQUISITION_FIELDS = ("RepetitionTime", "EchoTime", "MagneticFieldStrength", "FlipAngle", "KVP", "XRayExposure",
                      "ConvolutionKernel", "SliceThickness", "ImageType", "ScanningSequence")
SAMPLE_SLICES = 16


def classify_contents(volume) -> tuple[str, str]:
    """("labels" or "image", the reason in a few words) for a ``Volume``; pure, reads a sample of slices."""
    file_format = getattr(volume, "file_format", "")
    header = getattr(volume, "header", None)
    if file_format == "seg_nrrd" or getattr(volume, "class_names", None):
        return "labels", "the file names its segments"
    if getattr(header, "modality", None) in ("CT", "MR", "PT", "NM", "US", "CR", "DX", "MG", "XA"):
        return "image", f"a DICOM {header.modality} series"
    sample = _sample(volume.array)
    if sample.dtype == bool:
        return "labels", "boolean voxels"
    if sample.dtype.kind not in "iuf":
        return "image", f"{sample.dtype} voxels"
    if sample.dtype.kind == "f" and (not np.isfinite(sample).all() or not np.array_equal(sample, np.rint(sample))):
        return "image", "fractional values"
    if sample.size and sample.min() < 0:
        return "image", "negative values"
    name = _name_of(volume)
    if name and LABEL_NAME_PATTERN.search(name):
        return "labels", f"the name {name!r}"
    if _sidecar_says_scan(getattr(volume, "source_path", None)):
        return "image", "its JSON sidecar has acquisition fields"
    if sample.dtype.kind == "f":
        return "image", "floating-point voxels without a label name"
    values = np.unique(sample)
    if len(values) > MAX_LABEL_IDS:
        return "image", f"more than {MAX_LABEL_IDS} distinct values"
    if len(values) <= FEW_VALUES:
        return "labels", f"{len(values)} distinct values"
    fraction = equal_neighbour_fraction(sample)
    if fraction >= PIECEWISE_CONSTANT_FRACTION:
        return "labels", f"piecewise constant ({fraction:.0%} of neighbours equal)"
    return "image", f"{len(values)} grey levels that vary voxel to voxel ({fraction:.0%} of neighbours equal)"


def looks_like_labels(volume) -> bool:
    """True when ``classify_contents`` calls the volume a label map."""
    return classify_contents(volume)[0] == "labels"


def equal_neighbour_fraction(array: np.ndarray) -> float:
    """Of the in-plane neighbouring voxel pairs with a non-zero voxel, the fraction holding equal values."""
    equal = total = 0
    for axis in (-1, -2):
        first = np.moveaxis(array, axis, 0)
        left, right = first[1:], first[:-1]
        touching = (left != 0) | (right != 0)
        total += int(touching.sum())
        equal += int(((left == right) & touching).sum())
    return equal / total if total else 1.0


def _sample(array: np.ndarray) -> np.ndarray:
    """About ``SAMPLE_SLICES`` evenly spaced slices (full resolution: neighbours must stay neighbours)."""
    return np.asarray(array[:: max(1, array.shape[0] // SAMPLE_SLICES)])


def _name_of(volume) -> str:
    path = getattr(volume, "source_path", None)
    return Path(path).name.lower() if path else ""


def _sidecar_says_scan(path) -> bool:
    if not path:
        return False
    path = Path(path)
    stem = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".mgz", ".tif", ".tiff", ".npy"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    sidecar = path.with_name(stem + ".json")
    try:
        fields = json.loads(sidecar.read_text()) if sidecar.is_file() and sidecar.stat().st_size < (1 << 20) else {}
    except (OSError, ValueError):
        return False
    return isinstance(fields, dict) and any(key in fields for key in ACQUISITION_FIELDS)
