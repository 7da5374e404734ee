"""The scans of a cohort: from a manifest CSV, or from files, folders and globs, each with a unique name."""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..volume import VolumeError, file_format_of, strip_suffix

GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class Scan:
    """One task of a cohort run.

    ``image`` is a scan file or DICOM folder; ``labels`` the reference for ``evaluate``; ``prompts`` a JSON
    prompt file for ``segment``; ``slices`` ``A:B`` restricts the work to slices A..B-1 (empty: the run's
    default). ``scan_id`` names the scan's mask and done marker in the output folder (unique in the cohort).
    """

    image: str
    labels: str | None = None
    prompts: str | None = None
    slices: str | None = None
    scan_id: str = ""


def read_manifest(path: str | os.PathLike) -> list[Scan]:
    """Scans from a CSV with an ``image`` column and optional ``labels``, ``prompts``, ``slices``.

    Relative paths are relative to the manifest's folder; other columns (patient ids, notes) are ignored.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            header = [(name or "").strip().lower() for name in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"{path}: cannot read the manifest ({error})") from None
    if "image" not in header:
        raise ValueError(f"{path}: the manifest needs an 'image' column (and 'labels' for evaluate, 'prompts' for "
                         f"segment); its columns are {', '.join(header) or 'none'}")
    scans = []
    for row in rows:
        cells = {(key or "").strip().lower(): (value or "").strip() for key, value in row.items()}
        if not cells.get("image"):
            continue  # a blank line
        paths = {column: _relative_to(path.parent, cells.get(column)) for column in ("image", "labels", "prompts")}
        scans.append(Scan(paths["image"], paths["labels"], paths["prompts"], cells.get("slices") or None))
    if not scans:
        raise ValueError(f"{path}: the manifest lists no scans")
    return scans


def _relative_to(folder: Path, value: str | None) -> str | None:
    if not value:
        return None
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else folder / candidate)


def expand_inputs(inputs) -> list[Scan]:
    """Scans from file paths, folders and glob patterns, in the order given (each glob sorted).

    A folder contributes the scan files in it and in its subfolders; a folder holding DICOM files is one scan.
    """
    scans: list[Scan] = []
    for item in inputs:
        text = str(item)
        if GLOB_CHARACTERS & set(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise ValueError(f"{text}: no file matches this pattern")
            paths = [Path(match) for match in matches]
        else:
            paths = [Path(text).expanduser()]
        for path in paths:
            scans.extend(Scan(str(found)) for found in _scans_under(path))
    if not scans:
        raise ValueError("no scans found in " + ", ".join(str(item) for item in inputs))
    return scans


def scan_format(path: Path) -> str | None:
    """The format family of a file napari-sam-ft reads ("dicom" for one file of a series), or None."""
    try:
        return file_format_of(path)
    except VolumeError:
        return None


def _scans_under(path: Path) -> list[Path]:
    """A path's scans: itself if it is a file (or missing: reading it gives the scan its error row); for a folder,
    the folder itself when it holds DICOM files (one series, or several: the reader picks one), the scan files
    in it, and the scans of its subfolders."""
    if not path.is_dir():
        return [path]
    entries = sorted(entry for entry in path.iterdir() if not entry.name.startswith("."))
    formats = {entry: scan_format(entry) for entry in entries if entry.is_file()}
    found = [path] if "dicom" in formats.values() else []
    found += [entry for entry, kind in formats.items() if kind not in (None, "dicom")]
    for folder in (entry for entry in entries if entry.is_dir()):
        found.extend(_scans_under(folder))
    return found


def with_scan_ids(scans) -> list[Scan]:
    """The scans (``Scan`` objects or paths) with unique, file-name-safe ``scan_id`` values.

    The id is the image's name without its suffix; names that repeat get their parent folders' names in
    front (``patient1_t1``, ``patient2_t1``), and a number if that is not enough.
    """
    scans = [scan if isinstance(scan, Scan) else Scan(str(scan)) for scan in scans]
    if not scans:
        raise ValueError("the cohort has no scans")
    wanted = [scan.scan_id or None for scan in scans]
    depth_of = [0] * len(scans)
    names = [_safe(wanted[i] or _name_at_depth(scans[i].image, 0)) for i in range(len(scans))]
    for _ in range(8):  # add parent folders to names that clash, a level at a time
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        clashing = [i for i, name in enumerate(names) if counts[name] > 1 and wanted[i] is None]
        if not clashing:
            break
        for i in clashing:
            depth_of[i] += 1
            names[i] = _safe(_name_at_depth(scans[i].image, depth_of[i]))
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    if len(set(unique)) != len(unique):
        raise ValueError("scan ids are not unique; give each manifest row its own image")
    return [replace(scan, scan_id=name) for scan, name in zip(scans, unique)]


def _name_at_depth(image: str, depth: int) -> str:
    path = Path(image)
    parts = [part for part in path.parent.parts[-depth:] if part not in ("/", "")] if depth else []
    return "_".join([*parts, strip_suffix(path.name)])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"
