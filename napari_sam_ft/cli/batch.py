"""``napari-sam-ft batch auto|segment|evaluate``: one job over many scans, on dask.distributed.

A thin layer over ``napari_sam_ft.batch.run_cohort``: parse, run, print one line per scan and a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_model_options, parse_window, progress_bar

JOB_HELP = {
    "auto": "automatically segment every scan (an adapter's class head labels its classes)",
    "segment": "segment every scan from its JSON prompt file (manifest column 'prompts', or --prompts for all)",
    "evaluate": "simulate prompts from each scan's reference labels and score it (manifest column 'labels')",
}


def register(subparsers) -> None:
    batch = subparsers.add_parser(
        "batch", help="run auto, segment or evaluate over many scans on a local or existing dask cluster",
        description="One job over many scans: one dask task per scan, the model loaded once per worker, masks "
        "and OUTDIR/results.csv + results.json written as scans finish. A second run skips finished scans. "
        "See docs/batch.md.")
    jobs = batch.add_subparsers(dest="job", metavar="JOB", required=True)
    for job, text in JOB_HELP.items():
        parser = jobs.add_parser(job, help=text, description=text)
        add_cohort_options(parser, job)
        parser.set_defaults(run=run_batch)


def add_cohort_options(parser, job: str) -> None:
    from ..volume import WINDOW_CHOICES

    parser.add_argument("inputs", nargs="*", metavar="SCAN",
                        help="scan files, folders (every scan in them; a DICOM series folder is one scan) or globs")
    parser.add_argument("--manifest", default=None,
                        help="CSV with an 'image' column and 'labels' (evaluate), 'prompts' (segment), optional "
                        "'slices' (A:B) per scan; relative paths are relative to the CSV")
    parser.add_argument("-o", "--output-dir", required=True, metavar="OUTDIR",
                        help="masks go to OUTDIR/masks, rows to OUTDIR/results.csv and results.json")
    add_model_options(parser)
    parser.add_argument("--window", default="auto",
                        help=f"intensity window: {', '.join(WINDOW_CHOICES)} or LEVEL,WIDTH (default auto; an "
                        "adapter's own window when it has one)")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="file voxel axis to slice along")
    parser.add_argument("--channel", type=int, default=None, help="channel or time point of 4D files")
    if job != "segment":
        parser.add_argument("--slices", default=None, help="only slices A:B (B exclusive) of scans without their own")
    if job == "evaluate":
        parser.add_argument("--prompt", choices=("box", "point", "none"), default="box",
                            help="box: one reference box per object per slice; point: one click inside it; "
                            "none: automatic segmentation")
        parser.add_argument("--classes", default=None, help="comma-separated label ids to score (default: all)")
    if job == "segment":
        parser.add_argument("--prompts", default=None, help="one JSON prompt file for scans without their own")
        parser.add_argument("--propagate", action="store_true", help="grow each object through neighbouring slices")
        parser.add_argument("--stop-iou", type=float, default=None, help="propagation stops below this predicted IoU")
    parser.add_argument("--mask-format", choices=("nii.gz", "nii", "nrrd", "seg.nrrd", "mha", "mgz", "tif", "npy"),
                        default="nii.gz",
                        help="file type of the masks (default nii.gz; always in the input's geometry)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="an existing dask scheduler, e.g. tcp://host:8786 (its workers must reach the scans "
                       "and OUTDIR)")
    where.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker processes of the local cluster (default: one per core that memory allows, or "
                       "one per GPU)")
    parser.add_argument("--resources", default=None, metavar="NAME=N[,NAME=N]",
                        help="dask resources each scan needs, e.g. GPU=1 for workers started with --resources GPU=1")
    parser.add_argument("--overwrite", action="store_true", help="redo scans an earlier run already finished")
    parser.add_argument("--cache-dir", default=None,
                        help="embedding cache folder on each worker (default: the worker's local scratch folder)")


def parse_resources(text: str | None) -> dict[str, float] | None:
    if not text:
        return None
    resources = {}
    for item in text.split(","):
        name, _, amount = item.partition("=")
        try:
            resources[name.strip()] = float(amount)
        except ValueError:
            raise ValueError(f"--resources must look like GPU=1 or GPU=1,MEMORY=8e9; got {text!r}") from None
        if not name.strip():
            raise ValueError(f"--resources must look like GPU=1 or GPU=1,MEMORY=8e9; got {text!r}")
    return resources


def cohort_settings(args):
    from ..batch import CohortSettings, ModelChoice

    classes = getattr(args, "classes", None)
    try:
        class_ids = tuple(int(value) for value in classes.split(",")) if classes else None
    except ValueError:
        raise ValueError(f"--classes must be comma-separated label ids, got {classes!r}") from None
    model = ModelChoice(args.model, args.checkpoint, str(Path(args.adapter).resolve()) if args.adapter else None,
                        args.device, args.precision)
    return CohortSettings(mode=args.job, model=model, window=parse_window(args.window),
                          prompt=getattr(args, "prompt", "box"), slices=getattr(args, "slices", None),
                          classes=class_ids, prompts=getattr(args, "prompts", None),
                          propagate=getattr(args, "propagate", False), stop_iou=getattr(args, "stop_iou", None),
                          axis=args.axis, channel=args.channel, mask_suffix=f".{args.mask_format}")


def cohort_scans(args) -> list:
    from ..batch import expand_inputs, read_manifest

    if bool(args.manifest) == bool(args.inputs):
        raise ValueError("give either --manifest FILE or scan files/folders/globs (not both, not neither)")
    if args.manifest:
        return read_manifest(args.manifest)
    if args.job == "evaluate":
        raise ValueError("batch evaluate pairs each scan with its labels: give them as a --manifest CSV with "
                         "'image' and 'labels' columns")
    return expand_inputs(args.inputs)


def run_batch(args) -> int:
    from ..batch import run_cohort

    settings = cohort_settings(args)
    scans = cohort_scans(args)

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    with progress_bar(f"batch {args.job}", len(scans), unit="scan") as update:
        table = run_cohort(scans, args.output_dir, settings, scheduler=args.scheduler, workers=args.workers,
                           resources=parse_resources(args.resources), overwrite=args.overwrite,
                           cache_dir=args.cache_dir, disk_cache=not args.no_disk_cache, progress=update, report=say)
    print_rows(table)
    failed = int((table["status"] != "ok").sum())
    summary = f"{len(table) - failed} of {len(table)} scans ok"
    if args.job == "evaluate" and failed < len(table):
        summary += f", mean Dice {table.loc[table['status'] == 'ok', 'dice'].astype(float).mean():.3f}"
    wall = table.attrs.get("wall_seconds", 0.0)
    ran = int((~table["resumed"].astype(bool)).sum())
    if ran and wall > 0:
        workers = table.attrs["workers"]
        summary += (f"; {ran} scan{'s' if ran != 1 else ''} in {wall:.1f} s = {3600 * ran / wall:.0f} scans/hour on "
                    f"{workers} worker{'s' if workers != 1 else ''}")
    print(f"{summary}; results in {Path(args.output_dir) / 'results.csv'}")
    if failed:
        print(f"napari-sam-ft batch: {failed} scan{'s' if failed > 1 else ''} failed (status error in results.csv)",
              file=sys.stderr)
        return 1
    return 0


def print_rows(table) -> None:
    for row in table.itertuples(index=False):
        if row.status != "ok":
            outcome = str(row.error)
        elif row.mode == "evaluate":
            outcome = f"dice {float(row.dice):.3f}"
        else:
            outcome = f"{int(row.objects)} objects"
        when = "done earlier" if row.resumed else f"{float(row.seconds):6.1f} s on {row.worker}"
        print(f"{row.scan_id:<32} {row.status:<5} {outcome:<40} {when}")
