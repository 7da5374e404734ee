"""Fuzzing the DICOM series reader: damaged files in a series give a volume or one ``VolumeError``, nothing else.

Bounded like tests/test_fuzz.py (``NAPARI_SAM_FT_FUZZ_EXAMPLES`` fuzzes longer). The reader is called directly,
not through ``read_volume`` (which would turn any escaping exception into a generic message).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from dicom_series import write_ct_series
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_sam_ft.io.dicom import list_dicom_series, read_dicom
from napari_sam_ft.io.dicom_seg import read_dicom_seg, write_dicom_seg
from napari_sam_ft.io.errors import VolumeError

# pydicom warns about every invalid value it meets; damaged values are what these tests are made of.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXAMPLES = int(os.environ.get("NAPARI_SAM_FT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEED_FOLDER = Path(tempfile.mkdtemp(prefix="napari-sam-ft-dicom-seed-"))
HOUNSFIELD = (np.arange(12 * 10 * 4, dtype=np.int16).reshape(12, 10, 4) * 5 - 900)  # 4 slices: a lost middle one shows
AFFINE = np.array([[-0.7, 0, 0, 40.0], [0, -0.7, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
SEED = write_ct_series(SEED_FOLDER, HOUNSFIELD, AFFINE)
SEED_BYTES = [path.read_bytes() for path in SEED["files"]]


def _read_mutated(index: int, content: bytes):
    """read_dicom on the seed series with file ``index`` replaced by ``content``: the data, or None after a
    ``VolumeError``."""
    with tempfile.TemporaryDirectory() as folder:
        for number, original in enumerate(SEED_BYTES):
            (Path(folder) / f"file{number}").write_bytes(content if number == index else original)
        try:
            list_dicom_series(folder)
            data, affine, source = read_dicom(folder)
        except VolumeError as error:
            assert str(error), "a VolumeError must say what is wrong"
            return None
        assert data.ndim == 3 and np.isfinite(affine).all() and source.num_slices == data.shape[2]
        return data


def _mutate(content: bytes, data, start: int = 0, end: int | None = None) -> bytes:
    mutated = bytearray(content)
    end = len(mutated) if end is None else min(end, len(mutated))
    for position, value in data.draw(st.lists(st.tuples(st.integers(start, end - 1), st.integers(0, 255)),
                                              min_size=1, max_size=12)):
        mutated[position] = value
    return bytes(mutated)


def test_the_unmutated_seed_series_is_readable():
    assert np.array_equal(_read_mutated(-1, b""), HOUNSFIELD)


@FUZZ
@given(index=st.integers(0, 3), data=st.data())
def test_flipped_header_bytes_give_a_volume_or_a_volume_error(index, data):
    header_end = len(SEED_BYTES[index]) - HOUNSFIELD[:, :, 0].nbytes  # the pixel data is last
    _read_mutated(index, _mutate(SEED_BYTES[index], data, 132, header_end))


@FUZZ
@given(index=st.integers(0, 3), data=st.data())
def test_flipped_bytes_anywhere_give_a_volume_or_a_volume_error(index, data):
    _read_mutated(index, _mutate(SEED_BYTES[index], data))


@FUZZ
@given(index=st.integers(0, 3), data=st.data())
def test_truncated_files_are_refused_clearly(index, data):
    content = SEED_BYTES[index]
    cut = data.draw(st.integers(0, len(content) - 1))
    volume = _read_mutated(index, content[:cut])
    # Cut before the 'DICM' marker the file is no DICOM file; cut inside its SeriesInstanceUID it is a series of its
    # own: either way the other three slices are a valid series when the lost one was the first or the last.
    assert volume is None or (index in (0, 3) and volume.shape[2] == 3)


@FUZZ
@given(content=st.binary(max_size=2048))
def test_random_bytes_after_a_dicom_preamble_give_a_volume_or_a_volume_error(content):
    _read_mutated(1, b"\0" * 128 + b"DICM" + content)


SEED_LABELS = (HOUNSFIELD > 0).astype(np.uint8) + (HOUNSFIELD > 600)  # two segments on every slice
SEED_SOURCE = read_dicom(SEED_FOLDER)[2]
SEED_SEG = write_dicom_seg(SEED_FOLDER / "seed-seg" / "seg.dcm", SEED_LABELS, None, source=SEED_SOURCE).read_bytes()
shutil.rmtree(SEED_FOLDER / "seed-seg")  # not part of the seed series


def test_the_unmutated_seed_seg_reads_back():
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seg.dcm"
        path.write_bytes(SEED_SEG)
        assert np.array_equal(read_dicom_seg(path, SEED_SOURCE)[0], SEED_LABELS)


@FUZZ
@given(data=st.data())
def test_a_seg_with_flipped_bytes_gives_labels_on_the_source_grid_or_a_volume_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "seg.dcm"
        path.write_bytes(_mutate(SEED_SEG, data))
        try:
            labels, _ = read_dicom_seg(path, SEED_SOURCE)
        except VolumeError as error:
            assert str(error)
            return
        assert labels.shape == SEED_LABELS.shape


def teardown_module():
    shutil.rmtree(SEED_FOLDER, ignore_errors=True)
