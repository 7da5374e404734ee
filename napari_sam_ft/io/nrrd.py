"""NRRD/NHDR through pynrrd, and 3D Slicer segmentations (.seg.nrrd) through slicerio.

Readers follow the ``napari_sam_ft.io`` contract: voxels in the file's (i, j, k[, c]) order, a 4x4
voxel-to-world affine in RAS+ mm (NRRD's LPS and LAS spaces are converted by sign), and the header. Writers
put a mask in the reference image's voxel order with LPS space directions, as Slicer and ITK write NRRD.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MAX_COMPRESSION_EXPANSION, VolumeError, refuse_oversized_header
from .geometry import LPS_TO_RAS

NRRD_SUFFIXES = (".nrrd", ".nhdr")
SEG_NRRD_SUFFIXES = (".seg.nrrd",)

# The sign that turns each NRRD space's (x, y, z) into RAS+. Spaces without a patient orientation
# (scanner-xyz, 3D-right-handed, ...) or none at all are taken as LPS, as ITK and Slicer take them.
SPACE_TO_RAS_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0), "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0), "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0), "lps": (-1.0, -1.0, 1.0),
}
SPATIAL_KINDS = ("domain", "space")
SEGMENT_COLOR_FALLBACK = (0.5, 0.5, 0.5)


def read_nrrd(path: Path):
    """(data (i, j, k[, c]), affine RAS+, header dict). A non-spatial axis (vector, list, time) goes last."""
    import nrrd

    _check_declared_size(path, nrrd.read_header(str(path)))
    data, header = nrrd.read(str(path), index_order="F")
    spatial = _spatial_axes(header, data.ndim, path)
    other = [axis for axis in range(data.ndim) if axis not in spatial]
    if len(other) > 1:
        raise VolumeError(f"{path}: has {len(other)} non-spatial axes (kinds {header.get('kinds')}); "
                          "expected a 3D volume, with at most one channel or time axis")
    data = np.transpose(data, (*spatial, *other))
    return data, nrrd_affine(header, spatial, path), header


# Bytes per voxel of NRRD's type names (its spec allows several spellings of each).
NRRD_TYPE_BYTES = {**dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
                   **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t",
                                    "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
                   **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32",
                                    "uint32_t", "float"), 4),
                   **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                                    "signed long long int", "int64", "int64_t", "ulonglong", "unsigned long long",
                                    "unsigned long long int", "uint64", "uint64_t", "double"), 8)}


def _check_declared_size(path: Path, header: dict) -> None:
    """Refuse a header that declares more voxels than its data can hold, before anything allocates them."""
    sizes = [int(size) for size in np.asarray(header.get("sizes", []), dtype=np.int64).reshape(-1)]
    if not sizes or min(sizes) < 1:
        raise VolumeError(f"{path}: the header's sizes {tuple(sizes)} are not a volume")
    declared = int(np.prod(sizes, dtype=object)) * NRRD_TYPE_BYTES.get(str(header.get("type", "")).lower(), 8)
    encoding = str(header.get("encoding", "raw")).lower()
    data_file = header.get("data file") or header.get("datafile")
    stored = path.parent / str(data_file) if data_file else path
    if encoding in ("text", "txt", "ascii") or not stored.is_file():
        return  # numbers as text, or data in several files: pynrrd's own checks apply
    available = stored.stat().st_size * (1 if encoding == "raw" else MAX_COMPRESSION_EXPANSION)
    refuse_oversized_header(path, sizes, header.get("type"), declared, available)


def _spatial_axes(header: dict, ndim: int, path: Path) -> list[int]:
    directions = header.get("space directions")
    if directions is not None:
        rows = np.asarray(directions, dtype=float)
        spatial = [axis for axis in range(min(ndim, len(rows))) if np.isfinite(rows[axis]).all()]
    elif header.get("kinds") is not None:
        spatial = [axis for axis, kind in enumerate(header["kinds"]) if str(kind).lower() in SPATIAL_KINDS]
    else:
        spatial = list(range(ndim))
    if len(spatial) == 2 or ndim == 2:
        raise VolumeError(f"{path}: is 2D (sizes {tuple(header.get('sizes', ()))}); napari-sam-ft needs a 3D volume")
    if len(spatial) != 3:
        raise VolumeError(f"{path}: has {len(spatial)} spatial axes (sizes {tuple(header.get('sizes', ()))}); "
                          "expected a 3D volume")
    return spatial


def space_to_ras(space: str | None) -> np.ndarray:
    """4x4 diagonal matrix from an NRRD space's coordinates to RAS+."""
    key = (space or "lps").lower().removesuffix("-time")
    key = key[:3] if key in ("rast", "last", "lpst") else key  # the same spaces with a time axis
    signs = SPACE_TO_RAS_SIGNS.get(key, SPACE_TO_RAS_SIGNS["lps"])
    return np.diag([*signs, 1.0])


def nrrd_affine(header: dict, spatial_axes: list[int], path: Path) -> np.ndarray:
    """The voxel (i, j, k) -> RAS+ mm affine of an NRRD header: space directions and origin, or spacings."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is not None:
        rows = np.asarray(directions, dtype=float)
        if rows.ndim != 2 or rows.shape[1] != 3:
            raise VolumeError(f"{path}: space directions are {rows.shape[1] if rows.ndim == 2 else '?'}-dimensional; "
                              "napari-sam-ft reads volumes in 3D space")
        affine[:3, :3] = rows[spatial_axes].T  # each NRRD row is one voxel axis's step in space
    elif header.get("spacings") is not None:
        spacings = np.asarray(header["spacings"], dtype=float)
        affine[:3, :3] = np.diag([spacings[axis] if np.isfinite(spacings[axis]) else 1.0 for axis in spatial_axes])
    origin = header.get("space origin")
    if origin is not None:
        origin = np.asarray(origin, dtype=float).reshape(-1)
        if origin.shape != (3,):
            raise VolumeError(f"{path}: space origin has {origin.size} values; expected 3")
        affine[:3, 3] = origin
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path}: the header's space directions/origin are invalid (degenerate or NaN); "
                          "fix the header's geometry")
    return space_to_ras(header.get("space")) @ affine


def nrrd_header(affine_ras: np.ndarray, extra: dict | None = None) -> dict:
    """A pynrrd header with LPS space directions and origin for a (i, j, k) array of the given RAS affine."""
    affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=float)  # the same sign flip both ways
    header = {
        "space": "left-posterior-superior",
        "space directions": affine_lps[:3, :3].T,
        "space origin": affine_lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    header.update(extra or {})
    return header


def write_nrrd(path: Path, data_ijk: np.ndarray, affine_ras: np.ndarray) -> None:
    import nrrd

    nrrd.write(str(path), np.asarray(data_ijk), nrrd_header(affine_ras), index_order="F")


# --- Slicer segmentations ------------------------------------------------------------------------------


def read_seg_nrrd(path: Path):
    """(labels (i, j, k), affine RAS+, metadata) of a Slicer .seg.nrrd; segments become one label map.

    Class ids are the segments' label values when those are unique; a segmentation with overlapping layers
    (the same label value in several layers) numbers its segments 1, 2, ... in header order instead. Where
    segments overlap, the one listed later wins (said in ``metadata["overlaps"]``). ``metadata`` holds
    ``class_names`` and ``class_colors`` (id -> name, id -> (r, g, b) in 0..1) and the slicerio fields.
    """
    import nrrd
    import slicerio

    _check_declared_size(path, nrrd.read_header(str(path)))
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except (OSError, ValueError, KeyError) as error:
        raise VolumeError(f"{path}: not a readable Slicer segmentation ({error})") from error
    voxels = segmentation.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise VolumeError(f"{path}: a Slicer segmentation must hold a 3D label map or 4D layers")
    layers = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    segments = list(segmentation.get("segments") or [])
    label_values = [int(segment.get("labelValue", 1)) for segment in segments]
    renumber = len(set(label_values)) != len(label_values)
    labels = np.zeros(layers.shape[1:], dtype=np.uint16)
    names, colors, overlaps = {}, {}, []
    for index, segment in enumerate(segments):
        class_id = index + 1 if renumber else label_values[index]
        layer = int(segment.get("layer", 0))
        if not 0 <= layer < layers.shape[0]:
            raise VolumeError(f"{path}: segment {segment.get('name')!r} is on layer {layer}, "
                              f"but the file has {layers.shape[0]}")
        mask = layers[layer] == label_values[index]
        if np.any(labels[mask]):
            overlaps.append(str(segment.get("name", class_id)))
        labels[mask] = class_id
        names[class_id] = str(segment.get("name") or f"segment {class_id}")
        colors[class_id] = tuple(float(value) for value in segment.get("color", SEGMENT_COLOR_FALLBACK))[:3]
    if not segments:  # a bare label map saved as .seg.nrrd: its ids are its classes
        labels = np.asarray(layers.max(axis=0), dtype=np.uint16) if voxels.ndim == 4 else voxels.astype(np.uint16)
    affine = LPS_TO_RAS @ np.asarray(segmentation["ijkToLPS"], dtype=float)
    metadata = {key: value for key, value in segmentation.items() if key not in ("voxels", "segments")}
    metadata.update(class_names=names, class_colors=colors, overlaps=tuple(overlaps))
    return labels, affine, metadata


def write_seg_nrrd(path: Path, labels_ijk: np.ndarray, affine_ras: np.ndarray,
                   class_names: dict[int, str] | None = None, class_colors: dict | None = None) -> None:
    """A Slicer segmentation: one layer, one segment per class id present or named, names and colours kept."""
    import slicerio

    labels_ijk = np.asarray(labels_ijk)
    if labels_ijk.size and (labels_ijk.min() < 0 or labels_ijk.max() > 255):
        dtype = np.uint16
    else:
        dtype = np.uint8
    present = {int(value) for value in np.unique(labels_ijk) if value != 0}
    class_ids = sorted(present | {int(key) for key in (class_names or {}) if int(key) != 0})
    segments = []
    for class_id in class_ids:
        where = np.nonzero(labels_ijk == class_id)
        extent = ([int(value) for axis in where for value in (axis.min(), axis.max())]
                  if where[0].size else [0, -1, 0, -1, 0, -1])
        segments.append({
            "id": f"Segment_{class_id}", "labelValue": class_id, "layer": 0, "extent": extent,
            "name": str((class_names or {}).get(class_id, f"Segment_{class_id}")),
            "color": [float(value) for value in (class_colors or {}).get(class_id, default_color(class_id))],
        })
    segmentation = {"voxels": labels_ijk.astype(dtype), "ijkToLPS": LPS_TO_RAS @ np.asarray(affine_ras, dtype=float),
                    "segments": segments, "encoding": "gzip"}
    slicerio.write_segmentation(str(path), segmentation)


def default_color(class_id: int) -> tuple[float, float, float]:
    """A distinct colour per class id (golden-angle hues), for segments without one."""
    import colorsys

    return colorsys.hsv_to_rgb((class_id * 0.618033988749895) % 1.0, 0.65, 0.95)
