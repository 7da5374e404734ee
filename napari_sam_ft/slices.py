"""Slice selections typed by users (CLI options, widget fields, session files): one grammar, two parsers.

* ``parse_slice_list("3,5-7,10:20:5", num_slices)`` -> sorted unique indices. Items are separated by commas:
  ``N`` one slice; ``A-B`` slices A to B *inclusive* (as page ranges are typed); ``A:B`` or ``A:B:step`` a
  Python slice (B *exclusive*; ``A:`` runs to the last slice).
* ``parse_slice_range("A:B", num_slices)`` -> (first, last) inclusive: one contiguous Python-style span (either
  side may be empty), for commands that work on a block of slices (``evaluate --slices``).

Both check every index against ``0..num_slices-1`` and raise ``SliceSelectionError`` (a ``ValueError``) with a
message that shows what to type. No Qt here.
"""

from __future__ import annotations

SLICE_LIST_HELP = "indices like 62,70,78, inclusive ranges A-B, or Python ranges A:B (B excluded) and A:B:step"


class SliceSelectionError(ValueError):
    """A slice list or range that cannot be read, or that names slices outside the volume."""


def _index(text: str, item: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SliceSelectionError(f"cannot read slice list item {item!r}: use {SLICE_LIST_HELP}") from None
    if value < 0:
        raise SliceSelectionError(f"slice list item {item!r}: slice indices start at 0")
    return value


def _item_indices(item: str, num_slices: int | None) -> range:
    if ":" in item:
        parts = item.split(":")
        if len(parts) > 3 or not parts[0]:
            raise SliceSelectionError(f"cannot read slice list item {item!r}: use {SLICE_LIST_HELP}")
        start = _index(parts[0], item)
        if parts[1]:
            stop = _index(parts[1], item)
        elif num_slices is not None:
            stop = num_slices
        else:
            raise SliceSelectionError(f"slice list item {item!r}: an open range A: needs the number of slices")
        step = _index(parts[2], item) if len(parts) == 3 and parts[2] else 1
        if step == 0 or stop <= start:
            raise SliceSelectionError(f"slice list item {item!r} selects no slices (A:B needs A < B, step >= 1)")
        return range(start, stop, step)
    first, dash, last = item.partition("-")
    low = _index(first, item)
    high = _index(last, item) if dash else low
    if high < low:
        raise SliceSelectionError(f"slice list item {item!r}: an inclusive range A-B needs A <= B")
    return range(low, high + 1)


def parse_slice_list(text: str, num_slices: int | None = None) -> list[int]:
    """Comma-separated ``N``, ``A-B`` (inclusive), ``A:B`` / ``A:B:step`` (B excluded) -> sorted unique indices."""
    indices: set[int] = set()
    for item in str(text).replace(" ", "").split(","):
        if item:
            indices.update(_item_indices(item, num_slices))
    if num_slices is not None:
        outside = sorted(index for index in indices if index >= num_slices)
        if outside:
            raise SliceSelectionError(f"slice(s) {outside} are out of range 0..{num_slices - 1}")
    if not indices:
        raise SliceSelectionError(f"the slice list {text!r} names no slices")
    return sorted(indices)


def parse_slice_range(text: str | None, num_slices: int) -> tuple[int, int]:
    """``A:B`` (B excluded; an empty side is the volume's start or end; None or "" the whole volume) ->
    (first, last) inclusive."""
    if not text:
        return 0, num_slices - 1
    try:
        first_text, stop_text = str(text).split(":")
        first = int(first_text) if first_text.strip() else 0
        stop = int(stop_text) if stop_text.strip() else num_slices
    except ValueError:
        raise SliceSelectionError(f"a slice range must look like A:B (e.g. 5:20, B excluded), got {text!r}") from None
    if not 0 <= first < stop <= num_slices:
        raise SliceSelectionError(f"slice range {text} is out of range: need 0 <= A < B <= {num_slices}")
    return first, stop - 1
