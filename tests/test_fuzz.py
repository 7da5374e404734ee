"""Fuzzing the file readers and the prompt parser: any input gives a result or one clear error, nothing else.

Each property is bounded (``max_examples``, ``deadline``) so the whole file runs in well under a minute;
run with ``--hypothesis-seed=N`` to replay a failure. Set ``NAPARI_SAM_FT_FUZZ_EXAMPLES`` to fuzz longer.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from napari_sam_ft.engine.prompts import PromptError, SlicePrompt, load_prompts, parse_prompts
from napari_sam_ft.volume import Volume, VolumeError, read_volume

EXAMPLES = int(os.environ.get("NAPARI_SAM_FT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SUFFIXES = (".nii", ".nii.gz", ".tif", ".npy", ".nrrd", ".seg.nrrd", ".mha", ".mgz")
VOLUME_SHAPE = (6, 9, 11)  # (Z, Y, X) the prompts are validated against


def _valid_file_bytes(suffix: str) -> bytes:
    """A small valid volume in each format, the seed the mutations start from."""
    array = (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 7 - 300)
    if suffix in (".nii", ".nii.gz"):
        image = nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0]))
        raw = image.to_bytes()
        return gzip.compress(raw) if suffix == ".nii.gz" else raw
    if suffix in (".nrrd", ".seg.nrrd", ".mha", ".mgz"):
        return _library_written_bytes(suffix, array)
    buffer = io.BytesIO()
    if suffix == ".tif":
        tifffile.imwrite(buffer, array, imagej=True, resolution=(2.0, 2.0), metadata={"spacing": 2.5})
    else:
        np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _library_written_bytes(suffix: str, array: np.ndarray) -> bytes:
    """The seed as its own library writes it: pynrrd (LPS, a negative direction), slicerio, SimpleITK, nibabel."""
    import nrrd
    import SimpleITK as sitk
    import slicerio

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"seed{suffix}"
        if suffix == ".nrrd":
            nrrd.write(str(path), array, {"space": "left-posterior-superior", "kinds": ["domain"] * 3,
                                          "space directions": np.diag([-0.8, 0.8, 2.5]),
                                          "space origin": np.array([10.0, -4.0, 2.0])}, index_order="F")
        elif suffix == ".seg.nrrd":
            segmentation = slicerio.create_segmentation(array.shape, np.diag([0.8, 0.8, 2.5, 1.0]))
            slicerio.add_segment(segmentation, array > 0, {"name": "bright", "color": [1.0, 0.5, 0.0]})
            slicerio.add_segment(segmentation, array < -200, {"name": "dark"})
            slicerio.write_segmentation(str(path), segmentation)
        elif suffix == ".mha":
            sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0))), str(path))
        else:
            nib.save(nib.MGHImage(array, np.diag([0.8, 0.8, 2.5, 1.0])), str(path))
        return path.read_bytes()


VALID = {suffix: _valid_file_bytes(suffix) for suffix in SUFFIXES}
NIFTI_RAW = VALID[".nii"]


def _read_back(suffix: str, content: bytes) -> Volume | None:
    """``read_volume`` on ``content`` saved with ``suffix``: a usable volume, or None after a ``VolumeError``."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"fuzzed{suffix}"
        path.write_bytes(content)
        try:
            volume = read_volume(path)
        except VolumeError as error:
            assert str(error), "a VolumeError must say what is wrong"
            return None
        # A volume that was accepted must be usable: 3D, non-empty, every slice readable.
        assert volume.array.ndim == 3 and min(volume.shape) >= 1
        assert np.isfinite(volume.affine).all() and all(np.isfinite(volume.spacing))
        first, last = np.asarray(volume.array[0]), np.asarray(volume.array[-1])
        assert first.shape == last.shape == volume.shape[1:]
        return volume


def test_the_unmutated_seeds_are_readable():
    for suffix in SUFFIXES:
        assert _read_back(suffix, VALID[suffix]) is not None, suffix


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), content=st.binary(max_size=4096))
def test_random_bytes_never_escape_as_another_exception(suffix, content):
    _read_back(suffix, content)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_truncated_files_are_refused_clearly(suffix, data):
    content = VALID[suffix]
    cut = data.draw(st.integers(0, len(content) - 1))
    volume = _read_back(suffix, content[:cut])
    # Only an optional trailer may be lost (an MGH footer of scan parameters): then every voxel is still there.
    assert volume is None or suffix == ".tif" or np.array_equal(np.asarray(volume.array), _seed_voxels(suffix))


def _seed_voxels(suffix: str) -> np.ndarray:
    return np.array(_read_back(suffix, VALID[suffix]).array)


def _mutate(content: bytes, data, region: int | None = None) -> bytes:
    mutated = bytearray(content)
    end = len(mutated) if region is None else min(region, len(mutated))
    for position, value in data.draw(st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)),
                                              min_size=1, max_size=12)):
        mutated[position] = value
    return bytes(mutated)


@FUZZ
@given(suffix=st.sampled_from(SUFFIXES), data=st.data())
def test_files_with_flipped_bytes_give_a_volume_or_a_volume_error(suffix, data):
    _read_back(suffix, _mutate(VALID[suffix], data))


@FUZZ
@given(data=st.data(), compressed=st.booleans())
def test_nifti_headers_with_garbage_fields_give_a_volume_or_a_volume_error(data, compressed):
    # Mutations confined to the 348-byte header hit dims, datatype, pixdim, vox_offset and the affine.
    content = _mutate(NIFTI_RAW, data, region=348)
    _read_back(".nii.gz" if compressed else ".nii", gzip.compress(content) if compressed else content)


NRRD_FIELD_VALUES = {
    "type": st.sampled_from(["short", "uchar", "float", "double", "int64", "complex", "block", ""])
    | st.text(max_size=6),
    "dimension": st.integers(-1, 6).map(str) | st.text(max_size=3),
    "sizes": st.lists(st.integers(-2, 10**7), min_size=0, max_size=5).map(lambda sizes: " ".join(map(str, sizes))),
    "space": st.sampled_from(["left-posterior-superior", "RAS", "LAS", "scanner-xyz", "3D-right-handed", "LPST",
                              "nowhere"]),
    "space dimension": st.integers(-1, 5).map(str),
    "space directions": st.lists(st.sampled_from(["(1,0,0)", "(0,-0.8,0)", "(0,0,2.5)", "none", "(nan,0,0)",
                                                  "(1e308,1e308,0)", "(0,0)", "(0,0,0)", "((", "(a,b,c)"]),
                                 min_size=0, max_size=5).map(" ".join),
    "space origin": st.sampled_from(["(0,0,0)", "(1,2)", "(nan,0,0)", "(inf,1,2)", "0 0 0", "(1e400,0,0)"]),
    "kinds": st.lists(st.sampled_from(["domain", "space", "vector", "list", "RGB-color", "time", "???"]),
                      min_size=0, max_size=5).map(" ".join),
    "encoding": st.sampled_from(["raw", "gzip", "bzip2", "ascii", "hex", "zip"]),
    "endian": st.sampled_from(["little", "big", "middle"]),
    "spacings": st.sampled_from(["1 1 1", "nan 1 1", "0 0 0", "-1 2 3", "x"]),
}


@FUZZ
@given(data=st.data())
def test_nrrd_headers_with_damaged_fields_give_a_volume_or_a_volume_error(data):
    """Each header field of a valid NRRD replaced, dropped or garbled; the voxel bytes stay as written."""
    content = VALID[".nrrd"]
    head, _, payload = content.partition(b"\n\n")
    lines = head.decode("latin-1").split("\n")
    fields = data.draw(st.lists(st.sampled_from(sorted(NRRD_FIELD_VALUES)), min_size=1, max_size=4, unique=True))
    for name in fields:
        lines = [line for line in lines if not line.startswith(f"{name}:")]
        if data.draw(st.booleans()):  # replaced rather than dropped
            lines.append(f"{name}: {data.draw(NRRD_FIELD_VALUES[name])}")
    damaged = ("\n".join(lines) + "\n\n").encode("utf-8") + payload
    _read_back(data.draw(st.sampled_from([".nrrd", ".seg.nrrd"])), damaged)


@FUZZ
@given(array=hnp.arrays(dtype=st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(), hnp.unicode_string_dtypes()),
                        shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)))
def test_npy_arrays_of_any_type_and_shape_give_a_volume_or_a_volume_error(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    volume = _read_back(".npy", buffer.getvalue())
    if volume is not None:
        assert array.ndim in (3, 4) and np.issubdtype(volume.array.dtype, np.number) or volume.array.dtype == bool


# --- prompts ---------------------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(-10**30, 10**30)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.text(max_size=8), children, max_size=5), max_leaves=20)
NUMBERS = st.integers(-20, 40) | st.floats(-20, 40) | st.integers(-10**400, 10**400) | JSON_SCALARS
PROMPT_ITEMS = st.fixed_dictionaries({}, optional={
    "slice": NUMBERS,
    "label": NUMBERS,
    "box": st.lists(NUMBERS, max_size=5) | JSON_VALUES,
    "points": st.lists(st.lists(NUMBERS, max_size=3), max_size=4) | JSON_VALUES,
    "point_labels": st.lists(st.integers(-1, 2) | JSON_SCALARS, max_size=4) | JSON_VALUES,
    "extra": JSON_VALUES,
})


def _check_parsed(prompts: list[SlicePrompt]) -> None:
    num_slices, height, width = VOLUME_SHAPE
    for prompt in prompts:
        assert 0 <= prompt.slice_index < num_slices and prompt.label >= 1
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height  # continuous pixel coordinates
        if prompt.points is not None:
            assert ((prompt.points >= 0) & (prompt.points <= [width, height])).all()
            assert set(prompt.point_labels.tolist()) <= {0, 1} and len(prompt.point_labels) == len(prompt.points)


@FUZZ
@given(document=JSON_VALUES | st.lists(PROMPT_ITEMS, max_size=4) | st.fixed_dictionaries(
    {"prompts": st.lists(PROMPT_ITEMS, max_size=4)}))
def test_any_json_document_gives_valid_prompts_or_a_prompt_error(document):
    try:
        prompts = parse_prompts(document, VOLUME_SHAPE)
    except PromptError as error:
        assert str(error)
        return
    _check_parsed(prompts)


@FUZZ
@given(content=st.binary(max_size=512) | st.text(max_size=256).map(str.encode)
       | st.lists(PROMPT_ITEMS, max_size=3).map(lambda items: json.dumps(items).encode())
       | st.integers(4300, 4400).map(lambda digits: f'[{{"slice": {"7" * digits}, "box": [1, 1, 2, 2]}}]'.encode()))
def test_any_prompt_file_gives_valid_prompts_or_a_prompt_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.json"
        path.write_bytes(content)
        try:
            prompts = load_prompts(path, VOLUME_SHAPE)
        except PromptError as error:
            assert "prompts.json" in str(error)
            return
    _check_parsed(prompts)


@pytest.mark.parametrize("number", [10**400, -(10**400), 2**64])
def test_huge_integers_are_out_of_range_not_a_crash(number):
    for item in ({"slice": number, "box": [1, 1, 2, 2]}, {"slice": 1, "box": [number, 1, 2, 2]},
                 {"slice": 1, "points": [[1, number]]}):
        with pytest.raises(PromptError, match="out of range|finite number"):
            parse_prompts([item], VOLUME_SHAPE)


# --- what the fuzzer found (each crashed with another exception, or hung, before the fix) -----------------

@pytest.mark.parametrize("array, message", [
    (np.zeros((3, 4, 5), np.complex64), "voxels of type complex64"),
    (np.zeros((3, 4, 5), "timedelta64[Y]"), "voxels of type timedelta64"),
    (np.zeros((3, 0, 5), np.int16), "is empty"),
    (np.zeros((0, 4, 5), np.float32), "is empty"),
])
def test_npy_voxel_types_and_shapes_the_fuzzer_found(array, message, tmp_path):
    path = tmp_path / "found.npy"
    np.save(path, array)
    with pytest.raises(VolumeError, match=message):
        read_volume(path)


def test_a_compressed_header_declaring_gigabytes_is_refused_before_reading(tmp_path):
    header = bytearray(NIFTI_RAW)
    header[42:48] = np.array([20000, 20000, 20000], "<i2").tobytes()  # dim[1..3]: 16 TB of int16 voxels
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(VolumeError, match=r"declares \(20000, 20000, 20000\) voxels .* truncated or its header is "
                                          "damaged"):
        read_volume(path)
