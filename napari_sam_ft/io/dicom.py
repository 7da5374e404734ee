"""DICOM image series: find the series in a folder, sort their slices along the slice normal, and read them.

pydicom reads the tags and decodes the pixel data (pylibjpeg, libjpeg, openjpeg and pyjpegls plug into it
for compressed transfer syntaxes); the geometry is computed here from ImageOrientationPatient,
ImagePositionPatient and PixelSpacing, never from file names or InstanceNumber.

``read_dicom`` follows the format-reader contract of ``napari_sam_ft.io``: it returns the voxels in the
file's own order (i = column, j = row, k = slice index sorted along the slice normal), a 4x4 voxel-to-world
affine in RAS+ millimetres (DICOM's patient space is LPS: the first two rows are negated) and a
``DicomSource`` that says which instances the slices came from, for writing a DICOM SEG that references them.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VolumeError

DICM_OFFSET = 128  # Part 10 files: a 128-byte preamble, then the magic bytes
VOLUME_MODALITIES = ("CT", "MR")  # preferred when a folder holds several series
NON_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG", "DOC")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR index, not an image
# Slice positions may differ from even spacing by this much (mm, or this fraction of the spacing).
POSITION_TOLERANCE_MM = 0.01
POSITION_TOLERANCE_FRACTION = 0.05
ORIENTATION_TOLERANCE = 1e-4
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# Which package decodes which compressed transfer syntax, for the message when none is installed.
DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg (or pillow, or gdcm)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg (or pillow, or gdcm)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg (or gdcm)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg (or gdcm)",
    "1.2.840.10008.1.2.4.80": "pyjpegls, or pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.81": "pyjpegls, or pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg (or pillow, or gdcm)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg (or pillow, or gdcm)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg >= 2.0",
}


@dataclass(frozen=True)
class SeriesInfo:
    """One series found in a folder, as a picker lists it."""

    series_uid: str
    modality: str
    description: str
    num_slices: int
    rows: int
    columns: int
    files: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int, int]:
        """(columns, rows, slices): the (i, j, k) shape ``read_dicom`` gives."""
        return (self.columns, self.rows, self.num_slices)

    @property
    def is_image(self) -> bool:
        return self.modality not in NON_IMAGE_MODALITIES

    def summary(self) -> str:
        description = f" '{self.description}'" if self.description else ""
        return (f"{self.series_uid} ({self.modality}{description}, {self.num_slices} slices of "
                f"{self.columns}x{self.rows})")


@dataclass(frozen=True)
class DicomSource:
    """Where the slices of a volume read from DICOM came from: what a DICOM SEG must reference.

    ``sop_instance_uids``, ``files`` and ``positions`` are in the volume's slice order k (sorted along the
    slice normal); ``positions`` are the ImagePositionPatient values (LPS mm) of those slices.
    """

    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    modality: str
    description: str
    sop_class_uid: str
    sop_instance_uids: tuple[str, ...]
    files: tuple[str, ...]
    positions: tuple[tuple[float, float, float], ...]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    transfer_syntax: str
    chosen_message: str

    @property
    def num_slices(self) -> int:
        return len(self.sop_instance_uids)

    def source_datasets(self):
        """The source instances' headers (no pixel data), in slice order, re-read from their files.

        Refuses files that changed since the volume was read, so a SEG never references the wrong images.
        """
        import pydicom

        datasets = []
        for path, uid in zip(self.files, self.sop_instance_uids):
            try:
                dataset = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as error:
                raise VolumeError(f"{path}: the source DICOM file cannot be read any more "
                                  f"({type(error).__name__}: {error})") from error
            if str(dataset.SOPInstanceUID) != uid:
                raise VolumeError(f"{path}: holds SOP instance {dataset.SOPInstanceUID}, not {uid} as when the series "
                                  "was read; the source folder changed")
            datasets.append(dataset)
        return datasets


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM Part 10 file: the magic bytes 'DICM' after the 128-byte preamble (suffixes are not trusted)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(DICM_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _candidate_files(folder: Path):
    """Every regular file under ``folder``, hidden ones skipped, in a stable order."""
    for root, directories, names in os.walk(folder):
        directories[:] = sorted(name for name in directories if not name.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                yield Path(root) / name


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A DICOM file, or a folder holding at least one (in it or below it)."""
    path = Path(path)
    if path.is_dir():
        return any(is_dicom_file(candidate) for candidate in _candidate_files(path))
    return path.is_file() and is_dicom_file(path)


# The tags the reader uses; they are decoded when the header is read, so a damaged one is named with its file.
USED_KEYWORDS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID",
                 "Modality", "SeriesDescription", "Rows", "Columns", "NumberOfFrames", "ImageOrientationPatient",
                 "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
                 "RescaleIntercept", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel")


def _read_header(path: Path):
    import pydicom

    keyword = None
    try:
        header = pydicom.dcmread(str(path), stop_before_pixels=True)
        for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID"):
            header.file_meta.get(keyword)
        for keyword in USED_KEYWORDS:
            header.get(keyword)
        return header
    except Exception as error:
        where = f" (tag {keyword})" if keyword else ""
        raise VolumeError(f"{path}: not a readable DICOM file{where} ({type(error).__name__}: {error})") from error


def _scan_folder(folder: Path) -> dict[str, list[tuple[Path, object]]]:
    """{series instance UID: [(file, header), ...]} of the DICOM files under ``folder`` (DICOMDIRs skipped)."""
    series: dict[str, list[tuple[Path, object]]] = defaultdict(list)
    for candidate in _candidate_files(folder):
        if not is_dicom_file(candidate):
            continue
        header = _read_header(candidate)
        if str(getattr(header.file_meta, "MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid:
            raise VolumeError(f"{candidate}: has no SeriesInstanceUID; cannot tell which series it belongs to")
        series[uid].append((candidate, header))
    return series


def _series_info(uid: str, members: list[tuple[Path, object]]) -> SeriesInfo:
    first = members[0][1]
    frames = sum(int(header.get("NumberOfFrames", 1) or 1) for _, header in members)
    return SeriesInfo(uid, str(first.get("Modality", "")), str(first.get("SeriesDescription", "")), frames,
                      int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0),
                      tuple(str(path) for path, _ in members))


def _folder_of(path: Path) -> tuple[Path, str | None]:
    """The folder to scan and, when one file of a series was given, that file's series UID."""
    if not path.exists():
        raise VolumeError(f"{path}: file or folder not found")
    if path.is_dir():
        return path, None
    if not is_dicom_file(path):
        raise VolumeError(f"{path}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    return path.parent, str(_read_header(path).get("SeriesInstanceUID", "")) or None


def list_dicom_series(path: str | os.PathLike) -> list[SeriesInfo]:
    """The series in a DICOM folder (or in the folder of one DICOM file), largest first."""
    folder, _ = _folder_of(Path(path))
    try:
        return _largest_first(_scan_folder(folder), folder)
    except VolumeError:
        raise
    except Exception as error:
        raise VolumeError(f"{folder}: damaged DICOM data ({type(error).__name__}: {error})") from error


def _largest_first(scanned: dict, folder: Path) -> list[SeriesInfo]:
    if not scanned:
        raise VolumeError(f"{folder}: holds no DICOM files")
    series = [_series_info(uid, members) for uid, members in scanned.items()]
    return sorted(series, key=lambda info: (-info.num_slices * info.rows * info.columns, info.series_uid))


def choose_series(series: list[SeriesInfo], series_uid: str | None, where: Path,
                  given_file_series: str | None = None) -> tuple[SeriesInfo, str]:
    """The series to read and a sentence saying which one and why."""
    listing = "; ".join(info.summary() for info in series)
    if series_uid is not None:
        chosen = next((info for info in series if info.series_uid == series_uid), None)
        if chosen is None:
            raise VolumeError(f"{where}: no series with UID {series_uid}; the series here are: {listing}")
        return chosen, f"series {chosen.summary()}, chosen by its UID"
    if given_file_series is not None:
        chosen = next(info for info in series if info.series_uid == given_file_series)
        return chosen, f"series {chosen.summary()}, the series of the file given"
    images = [info for info in series if info.is_image]
    if not images:
        raise VolumeError(f"{where}: holds no image series, only {listing}")
    preferred = [info for info in images if info.modality in VOLUME_MODALITIES] or images
    chosen = preferred[0]  # ``series`` is sorted largest first
    if len(series) == 1:
        return chosen, f"series {chosen.summary()}, the only series in {where}"
    others = "; ".join(info.summary() for info in series if info is not chosen)
    kind = "CT/MR " if chosen.modality in VOLUME_MODALITIES else ""
    return chosen, (f"series {chosen.summary()}, the largest {kind}series of {len(series)} in {where} "
                    f"(choose another with --series UID: {others})")


def read_dicom(path: str | os.PathLike, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray, DicomSource]:
    """Read one DICOM image series as (data (i, j, k), affine RAS+ mm, ``DicomSource``).

    ``path`` is a folder, or any file of the series (the whole series is then read from its folder).
    ``series_uid`` picks a series when the folder holds several; by default the largest CT/MR series is read
    and ``DicomSource.chosen_message`` says so. CT and other rescaled data are in their real units
    (Hounsfield): int16 when every value is an integer that fits, int32 beyond, float32 for fractional slopes.
    """
    try:
        return _read_series(Path(path), series_uid)
    except VolumeError:
        raise
    except Exception as error:  # a damaged value the checks above did not foresee: still one clear message
        raise VolumeError(f"{path}: damaged DICOM data ({type(error).__name__}: {error})") from error


def _read_series(path: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray, DicomSource]:
    folder, file_series = _folder_of(path)
    scanned = _scan_folder(folder)
    chosen, message = choose_series(_largest_first(scanned, folder), series_uid, folder, file_series)
    members = scanned[chosen.series_uid]
    where = f"{folder}: series {chosen.series_uid}"
    if not chosen.is_image:
        raise VolumeError(f"{where} is a {chosen.modality} object, not an image series; open it as labels "
                          "over its source series")
    _refuse_multiframe(members, where)
    ordered, orientation, spacing_rc, step = _sorted_slices(members, where)
    data = _pixel_data(ordered, where)
    affine = _affine(orientation, spacing_rc, step, ordered[0][1])
    first = ordered[0][1]
    source = DicomSource(
        series_uid=chosen.series_uid, study_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")), modality=chosen.modality,
        description=chosen.description, sop_class_uid=str(first.get("SOPClassUID", "")),
        sop_instance_uids=tuple(str(header.SOPInstanceUID) for _, header in ordered),
        files=tuple(str(path) for path, _ in ordered),
        positions=tuple(tuple(float(value) for value in header.ImagePositionPatient) for _, header in ordered),
        orientation=tuple(float(value) for value in orientation), pixel_spacing=spacing_rc,
        slice_spacing=float(np.linalg.norm(step)),
        transfer_syntax=str(getattr(first.file_meta, "TransferSyntaxUID", "")), chosen_message=message)
    return data, affine, source


def _refuse_multiframe(members, where: str) -> None:
    for path, header in members:
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{where}: {path} is a multi-frame (enhanced) image with {header.NumberOfFrames} "
                              "frames; napari-sam-ft reads classic single-frame series only (convert it with "
                              "dcm2niix or emf2sf first)")


def _vector(header, keyword: str, length: int, path: Path, where: str) -> np.ndarray:
    value = header.get(keyword)
    if value is None or len(value) != length:
        raise VolumeError(f"{where}: {path} has no valid {keyword}; its slice geometry is unknown")
    vector = np.asarray([float(item) for item in value])
    if not np.isfinite(vector).all():
        raise VolumeError(f"{where}: {path} has a non-finite {keyword} {list(vector)}")
    return vector


def _sorted_slices(members, where: str):
    """Slices sorted along the normal, after checking that they form one evenly spaced grid.

    Returns (ordered [(path, header)], orientation (6,), (row spacing, column spacing), step vector (LPS mm)).
    """
    for path, header in members:
        if not all(isinstance(header.get(keyword), int) and header.get(keyword) > 0 for keyword in ("Rows", "Columns")):
            raise VolumeError(f"{where}: {path} has no valid Rows/Columns; it is not a usable image")
    path0, header0 = members[0]
    orientation = _vector(header0, "ImageOrientationPatient", 6, path0, where)
    spacing_rc = tuple(float(value) for value in _vector(header0, "PixelSpacing", 2, path0, where))
    size = (int(header0.Rows), int(header0.Columns))
    for path, header in members[1:]:
        other = _vector(header, "ImageOrientationPatient", 6, path, where)
        if not np.allclose(other, orientation, atol=ORIENTATION_TOLERANCE):
            raise VolumeError(f"{where} mixes slice orientations: {path0} has {list(np.round(orientation, 5))}, "
                              f"{path} has {list(np.round(other, 5))}; choose a series of one orientation")
        if (int(header.Rows), int(header.Columns)) != size:
            raise VolumeError(f"{where} mixes image sizes: {path0} is {size[1]}x{size[0]}, {path} is "
                              f"{int(header.Columns)}x{int(header.Rows)}")
        other_spacing = tuple(float(value) for value in _vector(header, "PixelSpacing", 2, path, where))
        if not np.allclose(other_spacing, spacing_rc, rtol=1e-4):
            raise VolumeError(f"{where} mixes pixel spacings: {path0} has {spacing_rc}, {path} has {other_spacing}")
    row_direction, column_direction = orientation[:3], orientation[3:]
    if min(np.linalg.norm(row_direction), np.linalg.norm(column_direction)) < 0.5:
        raise VolumeError(f"{where}: ImageOrientationPatient {list(orientation)} is degenerate")
    row_direction, column_direction = (row_direction / np.linalg.norm(row_direction),
                                       column_direction / np.linalg.norm(column_direction))
    orientation = np.concatenate([row_direction, column_direction])
    normal = np.cross(row_direction, column_direction)
    positions = np.stack([_vector(header, "ImagePositionPatient", 3, path, where) for path, header in members])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    ordered = [members[index] for index in order]
    positions, distances = positions[order], distances[order]
    if len(ordered) == 1:
        thickness = float(header0.get("SpacingBetweenSlices") or header0.get("SliceThickness") or 1.0)
        return ordered, orientation, spacing_rc, normal * abs(thickness)
    gaps = np.diff(distances)
    duplicate = int(np.argmin(gaps))
    if gaps[duplicate] < POSITION_TOLERANCE_MM:
        raise VolumeError(f"{where} has two slices at the same position {distances[duplicate]:.3f} mm along the "
                          f"normal: {ordered[duplicate][0]} and {ordered[duplicate + 1][0]} (several acquisitions, "
                          "echoes or time points in one series are not supported)")
    spacing = float(np.median(gaps))
    tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE_FRACTION * spacing)
    uneven = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
    if uneven.size:
        described = ", ".join(
            f"{gaps[index]:.3f} mm between slice {index} at {distances[index]:.3f} mm ({Path(ordered[index][0]).name}) "
            f"and slice {index + 1} at {distances[index + 1]:.3f} mm ({Path(ordered[index + 1][0]).name})"
            for index in uneven[:5])
        missing = sum(max(0, int(round(gaps[index] / spacing)) - 1) for index in uneven)
        hint = f"; about {missing} slice(s) missing" if missing else ""
        raise VolumeError(f"{where} is unevenly spaced: the slices are {spacing:.3f} mm apart but there are gaps of "
                          f"{described}{hint}. Export the complete series, or resample it")
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    expected = positions[0] + np.arange(len(ordered))[:, None] * step
    if np.abs(positions - expected).max() > tolerance or np.linalg.norm(np.cross(step, normal)) > tolerance:
        raise VolumeError(f"{where}: the slice positions do not lie along the slice normal (gantry tilt or a "
                          "sheared series); resample it to an orthogonal grid first")
    return ordered, orientation, spacing_rc, step


def _affine(orientation: np.ndarray, spacing_rc: tuple[float, float], step: np.ndarray, first_header) -> np.ndarray:
    """Voxel (i = column, j = row, k = slice) to RAS+ mm."""
    lps = np.eye(4)
    lps[:3, 0] = orientation[:3] * spacing_rc[1]  # along a row: the column index i, spaced by the column spacing
    lps[:3, 1] = orientation[3:] * spacing_rc[0]  # down a column: the row index j
    lps[:3, 2] = step
    lps[:3, 3] = [float(value) for value in first_header.ImagePositionPatient]
    return LPS_TO_RAS @ lps


def _rescale(header) -> tuple[float, float]:
    slope = header.get("RescaleSlope")
    intercept = header.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def _output_dtype(ordered) -> np.dtype:
    """int16/int32 when the stored range maps to integers that fit, float32 for fractional rescaling."""
    bits_stored = {int(header.get("BitsStored", header.get("BitsAllocated", 16))) for _, header in ordered}
    signed = {int(header.get("PixelRepresentation", 0)) for _, header in ordered}
    scales = {_rescale(header) for _, header in ordered}
    if not all(slope.is_integer() and intercept.is_integer() for slope, intercept in scales):
        return np.dtype(np.float32)
    bits, is_signed = max(bits_stored), 1 in signed
    raw_low, raw_high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if is_signed else (0, 2 ** bits - 1)
    ends = [raw * slope + intercept for slope, intercept in scales for raw in (raw_low, raw_high)]
    for candidate in (np.int16, np.int32):
        if np.iinfo(candidate).min <= min(ends) and max(ends) <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _pixel_data(ordered, where: str) -> np.ndarray:
    """The slices' rescaled pixels as an (i, j, k) view of a (k, j, i) C-ordered array."""
    import pydicom

    first = ordered[0][1]
    rows, columns = int(first.Rows), int(first.Columns)
    if int(first.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(f"{where}: has {first.SamplesPerPixel} samples per pixel (colour images); "
                          "expected a greyscale scan")
    volume = np.empty((len(ordered), rows, columns), _output_dtype(ordered))
    for index, (path, _) in enumerate(ordered):
        try:
            dataset = pydicom.dcmread(str(path))
        except Exception as error:
            raise VolumeError(f"{where}: {path} cannot be read ({type(error).__name__}: {error})") from error
        pixels = _decoded_pixels(dataset, path, where)
        if pixels.shape != (rows, columns):
            raise VolumeError(f"{where}: {path} decodes to {pixels.shape} pixels, not the {rows}x{columns} its "
                              "header declares")
        slope, intercept = _rescale(dataset)
        # pydicom masks the pixels to BitsStored, so the type chosen from the declared range holds them.
        volume[index] = pixels if (slope, intercept) == (1.0, 0.0) else (
            pixels.astype(np.float64 if volume.dtype.kind == "f" else np.int64) * slope + intercept)
    if volume.dtype == np.int32 and volume.size and \
            np.iinfo(np.int16).min <= volume.min() <= volume.max() <= np.iinfo(np.int16).max:
        volume = volume.astype(np.int16)  # 16 stored bits could exceed int16 after the intercept; these values do not
    return volume.transpose(2, 1, 0)


def _decoded_pixels(dataset, path: Path, where: str) -> np.ndarray:
    """``dataset.pixel_array``; a missing decoder or damaged pixel data is one message naming the transfer syntax."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID")
    syntax_name = f"{syntax.name} ({syntax})" if syntax is not None else "an unknown transfer syntax"
    if "PixelData" not in dataset:
        raise VolumeError(f"{where}: {path} has no pixel data")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise VolumeError(f"{where}: {path} is compressed as {syntax_name}, which no installed DICOM decoder "
                          "reads; convert the series to an uncompressed or JPEG/JPEG 2000 transfer syntax "
                          "(e.g. gdcmconv --raw)") from None
    if not decoder.is_available:
        needs = DECODER_HINTS.get(str(syntax), ", ".join(decoder.missing_dependencies) or "a decoder plugin")
        raise VolumeError(f"{where}: {path} is compressed as {syntax_name} and no decoder for it is installed; "
                          f"install {needs}")
    try:
        pixels = dataset.pixel_array
    except Exception as error:
        raise VolumeError(f"{where}: {path} has unreadable pixel data ({syntax_name}): "
                          f"{type(error).__name__}: {error}") from error
    return np.asarray(pixels)
