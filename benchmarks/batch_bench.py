"""Cohort throughput: scans per hour of ``batch evaluate`` with 1 and 2 (or more) local worker processes.

The cohort is the real scans (the bundled sample CT and MR and the four cases of ../shared/cases), each
box-prompted on ``--slices`` labelled slices, repeated until it has ``--scans`` scans. Every worker count
gets a fresh LocalCluster and no embedding cache (each task encodes its slices), so the runs do the same
work. Printed and written to ``docs/results/batch.md`` and ``batch.json`` (date, CPU, torch, settings):

* tasks: scans per hour from the first task sent to the last row back (model loads on the workers included);
* overall: scans per hour including starting the cluster;
* the ratio of each worker count's task throughput to one worker's.

    napari-sam-ft bench batch -- [--workers 1,2] [--scans 12] [--slices 6] [--cases ct,mr,...] [--output DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPOSITORY = Path(__file__).resolve().parents[1]
CASES = REPOSITORY.parent / "shared" / "cases"
CASE_FILES = {
    "ct": None,  # the bundled samples
    "mr": None,
    "mni152": ("mni152_t1.nii.gz", "mni152_aal_amygdala_pallidum_hippocampus.nii.gz"),
    "brain2": ("pyradiomics_brain2_mr.nrrd", "pyradiomics_brain2_label.nrrd"),
    "lung1": ("pyradiomics_lung1_ct.nrrd", "pyradiomics_lung1_label.nrrd"),
    "ctchest": ("slicer_ctchest.nrrd", "slicer_ctchest.seg.nrrd"),
}


def case_paths(name: str) -> tuple[Path, Path]:
    from napari_sam_ft.sample import sample_paths

    if CASE_FILES[name] is None:
        return sample_paths(name)
    image, labels = (CASES / file for file in CASE_FILES[name])
    if not image.exists() or not labels.exists():
        raise SystemExit(f"{image} or {labels} is missing: the benchmark reads ../shared/cases beside the repository")
    return image, labels


def labelled_slices(image: Path, labels: Path, count: int) -> str:
    """``A:B``: ``count`` consecutive slices around the middle of the labelled ones."""
    import numpy as np

    from napari_sam_ft.volume import read_labels, read_volume

    reference = read_labels(labels, like=read_volume(image)).array
    labelled = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(axis=1))
    first = max(0, min(int(labelled[len(labelled) // 2]) - count // 2, reference.shape[0] - count))
    return f"{first}:{first + count}"


def cohort(names: list[str], scans: int, slices: int) -> list:
    from napari_sam_ft.batch import Scan

    base = []
    for name in names:
        image, labels = case_paths(name)
        base.append(Scan(str(image), str(labels), slices=labelled_slices(image, labels, slices)))
    return [base[index % len(base)] for index in range(scans)]  # repeats get their own ids (name-2, ...)


def measure(scans: list, workers: int, folder: Path) -> dict:
    from napari_sam_ft.batch import CohortSettings, run_cohort

    started = time.perf_counter()
    table = run_cohort(scans, folder / f"workers-{workers}", CohortSettings(mode="evaluate"), workers=workers,
                       disk_cache=False, overwrite=True)
    overall = time.perf_counter() - started
    failed = table[table["status"] != "ok"]
    if len(failed):
        raise SystemExit(f"{len(failed)} scans failed: {list(failed['error'])}")
    tasks = float(table.attrs["wall_seconds"])
    return {"workers": workers, "scans": len(table), "task_seconds": round(tasks, 1),
            "overall_seconds": round(overall, 1),
            "scans_per_hour": round(3600 * len(table) / tasks, 1),
            "scans_per_hour_overall": round(3600 * len(table) / overall, 1),
            "mean_dice": round(float(table["dice"].astype(float).mean()), 4),
            "workers_used": int(table["worker"].nunique())}


def write_results(record: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    (output / "batch.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["# Cohort throughput (`napari-sam-ft bench batch`)", "",
             f"{record['date']}, {record['cpu']} ({record['cores']} cores), torch {record['torch']}; "
             f"{record['scans']} scans of {', '.join(record['cases'])}, {record['slices']} box-prompted slices each, "
             "`batch evaluate`, no embedding cache.", "",
             "| workers | scans | task s | scans/hour (tasks) | scans/hour (with start-up) | vs 1 worker | mean Dice |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in record["runs"]:
        lines.append(f"| {row['workers']} | {row['scans']} | {row['task_seconds']} | {row['scans_per_hour']} | "
                     f"{row['scans_per_hour_overall']} | {row['speedup']:.2f}x | {row['mean_dice']} |")
    lines += ["", f"Command: `{record['command']}`", ""]
    (output / "batch.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--scans", type=int, default=12, help="scans in the cohort (the cases repeated; default 12)")
    parser.add_argument("--slices", type=int, default=6, help="labelled slices evaluated per scan (default 6)")
    parser.add_argument("--cases", default=",".join(CASE_FILES), help=f"cases to use (default {','.join(CASE_FILES)})")
    parser.add_argument("--output", default=str(REPOSITORY / "docs" / "results"),
                        help="folder for batch.md and batch.json (default docs/results)")
    args = parser.parse_args(argv)
    import torch

    from napari_sam_ft.batch.worker import usable_cpus
    from napari_sam_ft.devices import cpu_model_name

    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = set(names) - set(CASE_FILES)
    if unknown:
        raise SystemExit(f"unknown cases {', '.join(sorted(unknown))}; choose from {', '.join(CASE_FILES)}")
    worker_counts = [int(value) for value in args.workers.split(",")]
    scans = cohort(names, args.scans, args.slices)
    runs = []
    with tempfile.TemporaryDirectory(prefix="napari-sam-ft-batch-bench-") as folder:
        for workers in worker_counts:
            print(f"{workers} worker{'s' if workers > 1 else ''}: {len(scans)} scans…", file=sys.stderr)
            runs.append(measure(scans, workers, Path(folder)))
    baseline = next((run["scans_per_hour"] for run in runs if run["workers"] == 1), runs[0]["scans_per_hour"])
    for run in runs:
        run["speedup"] = round(run["scans_per_hour"] / baseline, 2)
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model_name(),
              "cores": usable_cpus(), "machine": platform.machine(), "python": platform.python_version(),
              "torch": torch.__version__, "cases": names, "scans": len(scans), "slices": args.slices,
              "command": "napari-sam-ft bench batch -- " + " ".join(argv or []), "runs": runs,
              "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(f"{'workers':>7} {'scans':>5} {'task s':>7} {'scans/h':>8} {'scans/h (start-up)':>19} {'vs 1':>6} "
          f"{'Dice':>6}")
    for run in runs:
        print(f"{run['workers']:>7} {run['scans']:>5} {run['task_seconds']:>7} {run['scans_per_hour']:>8} "
              f"{run['scans_per_hour_overall']:>19} {run['speedup']:>5.2f}x {run['mean_dice']:>6}")
    write_results(record, Path(args.output))
    print(f"wrote {Path(args.output) / 'batch.md'} and batch.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
