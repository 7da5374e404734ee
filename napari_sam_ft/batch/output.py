"""The output folder of a cohort run: masks, one done marker per scan, and the results tables.

    OUTDIR/masks/<scan_id>.nii.gz   the mask, in the input's voxel order and geometry
    OUTDIR/scans/<scan_id>.json     the scan's row, written after its mask: the scan is done
    OUTDIR/results.csv, .json       every scan's row, written at the end of a run
    OUTDIR/.partial/                masks being written (renamed into masks/ when complete; removed at the end)

A mask is staged in ``.partial`` and renamed into ``masks/`` whole, so a worker killed while writing
leaves nothing in ``masks/``; the marker is the proof of completion that a resumed run trusts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..volume import atomic_write, write_volume

# The columns every results table starts with; per-class ``dice_<class>`` columns follow ``hd95``.
LEADING_COLUMNS = ("image", "labels", "status", "error", "dice", "hd95")
TRAILING_COLUMNS = ("seconds", "worker", "mask", "scan_id", "mode", "prompt", "slices", "window", "model", "adapter",
                    "device", "model_load_s", "objects", "labelled_voxels", "encoder_passes", "prompts", "resumed",
                    "task_key")


class CohortOutput:
    """Paths and writes under one cohort output folder (used by the client and by every worker)."""

    def __init__(self, root: str | os.PathLike, mask_suffix: str = ".nii.gz"):
        self.root = Path(root)
        self.mask_suffix = mask_suffix
        self.masks_dir = self.root / "masks"
        self.markers_dir = self.root / "scans"
        self.staging_dir = self.root / ".partial"

    def prepare(self) -> None:
        for folder in (self.masks_dir, self.markers_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def mask_path(self, scan_id: str) -> Path:
        return self.masks_dir / f"{scan_id}{self.mask_suffix}"

    def marker_path(self, scan_id: str) -> Path:
        return self.markers_dir / f"{scan_id}.json"

    @staticmethod
    def base_row(scan, settings, task_key: str) -> dict:
        return {"image": scan.image, "labels": scan.labels, "prompts": scan.prompts, "scan_id": scan.scan_id,
                "mode": settings.mode, "prompt": settings.prompt if settings.mode == "evaluate" else None,
                "status": "error", "error": None, "resumed": False, "task_key": task_key}

    def write_mask(self, scan_id: str, labels: np.ndarray, like, class_names: dict[int, str] | None = None) -> Path:
        """Write ``labels`` with ``like``'s geometry, complete, as ``masks/<scan_id>`` (segments named if it can)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staged = self.staging_dir / f"{uuid.uuid4().hex}-{scan_id}{self.mask_suffix}"
        dtype = np.uint16 if labels.max(initial=0) < 65536 else np.uint32
        write_volume(staged, labels.astype(dtype), like=like, class_names=class_names)
        final = self.mask_path(scan_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)  # same file system: the mask appears whole or not at all
        return final

    def record(self, row: dict) -> None:
        """Write the scan's done marker (its row), atomically."""
        path = self.marker_path(row["scan_id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(json_safe(row), indent=1)
        atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))

    def finished_row(self, scan, task_key: str) -> dict | None:
        """The row of an earlier run that finished ``scan`` with the same settings and model, if its mask is there."""
        try:
            row = json.loads(self.marker_path(scan.scan_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if row.get("status") != "ok" or row.get("task_key") != task_key or row.get("image") != scan.image:
            return None
        if not row.get("mask") or not Path(row["mask"]).is_file():
            return None
        return row

    def remove_staging(self) -> None:
        """Remove masks left half-written by workers that died (call when no task of the run is left)."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def write_results(self, rows: list[dict], about: dict):
        """``results.csv`` and ``results.json`` (the rows, and ``about`` the run); returns the table."""
        import pandas as pd

        table = results_table(rows)
        atomic_write(self.root / "results.csv", lambda temporary: table.to_csv(temporary, index=False))
        record = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **json_safe(about),
                  "rows": json_safe(table.astype(object).where(pd.notna(table), None).to_dict("records"))}
        text = json.dumps(record, indent=1)
        atomic_write(self.root / "results.json", lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
        return table


def results_table(rows: list[dict]):
    """One row per scan, the issue's columns first (image, labels, status, error, dice, per-class Dice)."""
    import pandas as pd

    per_class: list[str] = []
    others: list[str] = []
    for row in rows:
        for column in row:
            if column.startswith("dice_") and column not in per_class:
                per_class.append(column)
            elif column not in LEADING_COLUMNS and column not in TRAILING_COLUMNS and not column.startswith("dice_") \
                    and column not in others:
                others.append(column)
    columns = [*LEADING_COLUMNS, *per_class, *TRAILING_COLUMNS, *others]
    return pd.DataFrame([{column: row.get(column) for column in columns} for row in rows], columns=columns)


def json_safe(value):
    """``value`` with NaN/inf as None and numpy scalars and paths as plain JSON types."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return json_safe(asdict(value))
    return value
