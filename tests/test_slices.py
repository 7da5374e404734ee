"""One slice-selection grammar for the CLI, the widgets and sessions (napari_sam_ft.slices)."""

import pytest

from napari_sam_ft.slices import SliceSelectionError, parse_slice_list, parse_slice_range


def test_a_slice_list_reads_indices_inclusive_dash_ranges_and_python_ranges():
    assert parse_slice_list("62,70,78") == [62, 70, 78]
    assert parse_slice_list("3,5-7") == [3, 5, 6, 7]  # A-B includes B
    assert parse_slice_list("3:6, 10") == [3, 4, 5, 10]  # A:B excludes B
    assert parse_slice_list("0:10:4") == [0, 4, 8]
    assert parse_slice_list("25:", num_slices=28) == [25, 26, 27]
    assert parse_slice_list("4,4,2-4") == [2, 3, 4]


@pytest.mark.parametrize("text, message", [
    ("5,40", r"slice\(s\) \[40\] are out of range 0\.\.29"),
    ("a-b", "cannot read slice list item 'a-b'"),
    ("7-3", "needs A <= B"),
    ("9:9", "selects no slices"),
    ("-2", "cannot read"),
    (",", "names no slices"),
    ("1:2:3:4", "cannot read"),
])
def test_a_bad_slice_list_says_what_to_type(text, message):
    with pytest.raises(SliceSelectionError, match=message):
        parse_slice_list(text, num_slices=30)


def test_a_slice_range_is_one_python_style_span():
    assert parse_slice_range(None, 30) == (0, 29)
    assert parse_slice_range("5:20", 30) == (5, 19)
    assert parse_slice_range(":3", 30) == (0, 2)
    assert parse_slice_range("28:", 30) == (28, 29)
    with pytest.raises(SliceSelectionError, match="out of range: need 0 <= A < B <= 30"):
        parse_slice_range("5:99", 30)
    with pytest.raises(SliceSelectionError, match="must look like A:B"):
        parse_slice_range("5-9", 30)
    assert issubclass(SliceSelectionError, ValueError)  # the CLI reports it as a usage error
