"""Write realistic single-frame CT series with pydicom from a real volume, for the DICOM tests.

The series carry what scanners write (patient/study/series/frame-of-reference UIDs, ImagePositionPatient,
ImageOrientationPatient, PixelSpacing, SliceThickness, stored values with RescaleSlope/Intercept) under
random file names, so nothing can be read from the names or the directory order.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_ct_series(folder: Path, hounsfield_ijk: np.ndarray, affine_ras: np.ndarray, *, study_uid: str | None = None,
                    frame_of_reference_uid: str | None = None, description: str = "CT crop", series_number: int = 2,
                    intercept: float = -2048.0, slope: float = 1.0, bits_stored: int = 12, skip_slices=(),
                    seed: int = 0, compress: str | None = None) -> dict:
    """Write ``hounsfield_ijk`` (i = column, j = row, k = slice) with a RAS+ affine as one CT series.

    Stored pixels are (HU - intercept) / slope as uint16 with ``bits_stored`` significant bits. Slices in
    ``skip_slices`` are left out (a missing file). Returns the series UID, the files in slice order and the LPS
    affine of the series.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lps = LPS_FROM_RAS @ np.asarray(affine_ras, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_direction, column_direction = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    series_uid = generate_uid()
    stored = np.rint((np.asarray(hounsfield_ijk, float) - intercept) / slope)
    assert 0 <= stored.min() and stored.max() < 2 ** bits_stored, "values do not fit the stored bits"
    stored = stored.astype(np.uint16)
    files, sop_uids = [], []
    for k in range(stored.shape[2]):
        if k in skip_slices:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID, dataset.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        dataset.PatientName, dataset.PatientID = "Test^Crop", "T001"
        dataset.PatientBirthDate, dataset.PatientSex = "", "O"
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study_uid, series_uid
        dataset.FrameOfReferenceUID = frame_of_reference_uid
        dataset.StudyID, dataset.AccessionNumber, dataset.ReferringPhysicianName = "1", "A1", ""
        dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = "20260101"
        dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = "120000"
        dataset.Modality, dataset.SeriesDescription, dataset.Manufacturer = "CT", description, "pydicom"
        dataset.SeriesNumber, dataset.InstanceNumber = series_number, int(rng.integers(1, 10_000))  # meaningless order
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.PositionReferenceIndicator = ""
        dataset.ImageOrientationPatient = [f"{value:.8f}" for value in (*row_direction, *column_direction)]
        dataset.ImagePositionPatient = [f"{value:.6f}" for value in lps[:3] @ np.array([0.0, 0.0, k, 1.0])]
        dataset.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        dataset.SliceThickness = f"{spacing[2]:.6f}"
        dataset.KVP, dataset.SliceLocation = "120", f"{(lps @ np.array([0.0, 0.0, k, 1.0]))[2]:.6f}"
        dataset.RescaleIntercept, dataset.RescaleSlope, dataset.RescaleType = f"{intercept:g}", f"{slope:g}", "HU"
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.Rows, dataset.Columns = stored.shape[1], stored.shape[0]
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, bits_stored, bits_stored - 1
        dataset.PixelRepresentation = 0
        dataset.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # rows = j, columns = i
        if compress is not None:
            dataset.compress(compress)
        path = folder / uuid.UUID(bytes=rng.bytes(16)).hex  # no suffix, random order
        pydicom.dcmwrite(str(path), dataset, enforce_file_format=True)
        files.append(path)
        sop_uids.append(str(dataset.SOPInstanceUID))
    return {"series_uid": series_uid, "study_uid": study_uid, "files": files, "sop_uids": sop_uids, "lps": lps,
            "frame_of_reference_uid": frame_of_reference_uid}


SAMPLE_CT = Path(__file__).resolve().parents[1] / "napari_sam_ft" / "data" / "example_ct_sm.nii.gz"
SAMPLE_CT_LABELS = SAMPLE_CT.with_name("example_seg.nii.gz")


def ct_crop(size=(64, 64, 8)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (i, j, k) crop of the bundled sample CT (HU), its RAS affine and its labels, read with nibabel."""
    import nibabel as nib

    image, labels = nib.load(str(SAMPLE_CT)), nib.load(str(SAMPLE_CT_LABELS))
    data = np.asarray(image.dataobj)
    label_data = np.asarray(labels.dataobj)
    # Centre the crop on the labelled organs so the crop has structures in it.
    centre = np.round(np.argwhere(label_data > 0).mean(axis=0)).astype(int)
    start = [int(np.clip(c - s // 2, 0, n - s)) for c, s, n in zip(centre, size, data.shape)]
    crop = tuple(slice(a, a + s) for a, s in zip(start, size))
    affine = image.affine.copy()
    affine[:3, 3] = (image.affine @ np.array([*start, 1.0]))[:3]
    return np.asarray(data[crop], np.int16), affine, np.asarray(label_data[crop])
