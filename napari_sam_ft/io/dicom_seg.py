"""DICOM SEG through highdicom: label maps written as binary segmentations that reference their source series,
so PACS viewers, OHIF and 3D Slicer draw them on the right images; and read back onto the source grid.

Each label id becomes one segment (segment numbers 1..N in label order); the label id itself is kept as the
segment's tracking ID ("label 5"), so reading the file back gives the same ids, and class names become the
segment labels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .dicom import DicomSource
from .errors import VolumeError

TRACKING_ID = "label {}"
TRACKING_PATTERN = re.compile(r"^label (\d+)$")
SEG_MODALITY = "SEG"


def dicom_source_of(like) -> DicomSource:
    """The ``DicomSource`` of a volume read from DICOM (or the source itself)."""
    if isinstance(like, DicomSource):
        return like
    for candidate in (getattr(like, "metadata", None), getattr(like, "header", None)):
        if isinstance(candidate, DicomSource):
            return candidate
        if isinstance(candidate, dict) and isinstance(candidate.get("dicom"), DicomSource):
            return candidate["dicom"]
    raise VolumeError("a DICOM SEG references the DICOM series it segments: open the image from a DICOM series "
                      "first, or write the mask as .nii.gz/.nrrd")


def write_dicom_seg(path: str | os.PathLike, labels_zyx: np.ndarray, like, class_names: dict[int, str] | None = None,
                    source: DicomSource | None = None) -> Path:
    """Write a (Z, Y, X) label map shown over ``like`` (a ``Volume`` read from DICOM) as a binary DICOM SEG.

    ``source`` may be given instead of ``like``'s own (then ``labels_zyx`` must already be in the file's
    (i, j, k) order when ``like`` is None). Empty slices are left out, as the standard allows.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    path = Path(path)
    source = source or dicom_source_of(like)
    labels_ijk = like.to_file_order(np.asarray(labels_zyx)) if like is not None else np.asarray(labels_zyx)
    datasets = source.source_datasets()
    rows, columns = int(datasets[0].Rows), int(datasets[0].Columns)
    if labels_ijk.shape != (columns, rows, source.num_slices):
        raise VolumeError(f"{path}: the mask has shape {labels_ijk.shape} (i, j, k) but series {source.series_uid} "
                          f"is {columns}x{rows}x{source.num_slices}")
    if labels_ijk.dtype.kind not in "biu" or (labels_ijk.size and labels_ijk.min() < 0):
        raise VolumeError(f"{path}: a DICOM SEG needs non-negative integer labels, got {labels_ijk.dtype}")
    label_ids = [int(value) for value in np.unique(labels_ijk) if value != 0]
    if not label_ids:
        raise VolumeError(f"{path}: the mask is empty; a DICOM SEG needs at least one labelled voxel")
    frames = np.transpose(labels_ijk, (2, 1, 0))  # (slice k, row j, column i), the source images' order
    segment_map = np.zeros(frames.shape, np.uint16 if len(label_ids) < 65536 else np.uint32)
    descriptions = []
    algorithm = hd.AlgorithmIdentificationSequence(name="napari-sam-ft", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    for segment_number, label_id in enumerate(label_ids, start=1):
        segment_map[frames == label_id] = segment_number
        name = (class_names or {}).get(label_id) or f"label {label_id}"
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=segment_number, segment_label=str(name)[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm,
            tracking_id=TRACKING_ID.format(label_id), tracking_uid=hd.UID()))
    segmentation = hd.seg.Segmentation(
        source_images=datasets, pixel_array=segment_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=9000,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-sam-ft",
        manufacturer_model_name="napari-sam-ft", software_versions=__version__, device_serial_number="0",
        series_description=f"napari-sam-ft segmentation of {source.description or source.modality}"[:64],
        omit_empty_frames=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temporary: segmentation.save_as(str(temporary)))
    return path


def is_dicom_seg(path: str | os.PathLike) -> bool:
    """A DICOM file whose modality is SEG."""
    import pydicom

    from .dicom import is_dicom_file

    if not Path(path).is_file() or not is_dicom_file(path):
        return False
    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["Modality"]).Modality) == \
            SEG_MODALITY
    except Exception:
        return False


def read_dicom_seg(path: str | os.PathLike, source: DicomSource) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG as an (i, j, k) label map on its source series' grid, and {label id: segment label}.

    Frames are matched to the source slices by the SOP instances they reference, so the map overlays the
    series whatever order the frames are stored in. A SEG of another series is refused.
    """
    import highdicom as hd

    path = Path(path)
    try:
        segmentation = hd.seg.segread(str(path))
    except Exception as error:
        raise VolumeError(f"{path}: not a readable DICOM SEG ({type(error).__name__}: {error})") from error
    referenced = {str(item.SeriesInstanceUID) for item in getattr(segmentation, "ReferencedSeriesSequence", [])}
    if source.series_uid not in referenced:
        raise VolumeError(f"{path}: segments series {', '.join(sorted(referenced)) or '(none)'}, not the image's "
                          f"series {source.series_uid}")
    numbers = [int(number) for number in segmentation.get_segment_numbers()]
    label_of = {}
    for number in numbers:
        description = segmentation.get_segment_description(number)
        match = TRACKING_PATTERN.match(str(getattr(description, "tracking_id", "") or ""))
        label_of[number] = int(match.group(1)) if match else number
    referenced_instances = {str(uid) for _, _, uid in segmentation.get_source_image_uids()}
    present = [uid for uid in source.sop_instance_uids if uid in referenced_instances]
    if not present:
        raise VolumeError(f"{path}: references none of the {source.num_slices} images of series {source.series_uid}")
    try:
        planes = segmentation.get_pixels_by_source_instance(present, combine_segments=True,
                                                            assert_missing_frames_are_empty=True)
    except Exception as error:
        raise VolumeError(f"{path}: its frames cannot be mapped onto the source images "
                          f"({type(error).__name__}: {error})") from error
    dtype = np.uint16 if max(label_of.values()) < 65536 else np.uint32
    lookup = np.zeros(max(numbers) + 1, dtype)
    for number, label_id in label_of.items():
        lookup[number] = label_id
    frames = np.zeros((source.num_slices, *planes.shape[1:]), dtype)
    index_of = {uid: index for index, uid in enumerate(source.sop_instance_uids)}
    for plane, uid in zip(planes, present):
        frames[index_of[uid]] = lookup[plane]
    names = {label_of[number]: str(segmentation.get_segment_description(number).segment_label) for number in numbers}
    return np.transpose(frames, (2, 1, 0)), names
