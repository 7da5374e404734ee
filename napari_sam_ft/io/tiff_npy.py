"""TIFF stacks and .npy arrays: already (Z, Y, X); a diagonal affine carries the TIFF's pixel sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TIFF_SUFFIXES = (".tif", ".tiff")
NPY_SUFFIXES = (".npy",)


def read_tiff(path: Path):
    import tifffile

    with tifffile.TiffFile(str(path)) as tif:
        data = tif.asarray()
        spacing_zyx = [1.0, 1.0, 1.0]
        imagej = tif.imagej_metadata or {}
        if "spacing" in imagej:
            spacing_zyx[0] = float(imagej["spacing"])
        page = tif.pages[0]
        for index, tag_name in ((2, "XResolution"), (1, "YResolution")):
            tag = page.tags.get(tag_name)
            if tag is not None:
                numerator, denominator = tag.value
                if numerator:
                    spacing_zyx[index] = float(denominator) / float(numerator)
    affine = np.diag([*spacing_zyx, 1.0])
    return data, affine, None


def read_npy(path: Path):
    data = np.load(str(path), mmap_mode="r", allow_pickle=False)
    return data, np.eye(4), None



def write_tiff(path: Path, data_zyx: np.ndarray, spacing_zyx) -> None:
    import tifffile

    imagej = _imagej_dtype_ok(data_zyx)
    tifffile.imwrite(str(path), np.ascontiguousarray(data_zyx), imagej=imagej,
                     resolution=(1.0 / spacing_zyx[2], 1.0 / spacing_zyx[1]),
                     metadata={"spacing": float(spacing_zyx[0]), "unit": "mm"} if imagej else None)


def write_npy(path: Path, data_zyx: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.ascontiguousarray(data_zyx), allow_pickle=False)


def _imagej_dtype_ok(data: np.ndarray) -> bool:
    return data.dtype in (np.uint8, np.uint16, np.float32)
