"""Few-shot fine-tuning on real scans: 5 annotated slices per structure, every other labelled slice held out.

Cases: every entry of ``CASES/cases.json`` (mni152 amygdala/pallidum/hippocampus, the brain2 and lung1
lesions, ctchest) plus the bundled sample CT and MR. For each case the reference labels of 5 slices spread
through each structure play the user's annotations; every other labelled slice is held out and scored.
Rows per case:

* zero-shot automatic: the base model's automatic segmentation, each 3D instance given the reference
  class it overlaps most (oracle matching, generous to the base model);
* zero-shot box: a tight box around each structure on each held-out slice, decoded as the widget decodes it
  (``predict_object``: small boxes zoomed);
* after adapting with each scope (lora, decoder) in prompt mode none (the automatic head: its Dice, and
  the seconds per slice of automatic segmentation of the whole volume, encoding included) and box (box
  Dice), with the optimisation steps, training seconds and adapter size.

Dice is per class over all held-out slices (automatic) or per object (box), averaged over classes/objects.
The budget is in steps planned from the data, so the Dice does not depend on how busy the machine is;
``--with-load`` runs every training again beside a competing CPU-bound process to show it (same Dice,
more seconds). Rows are appended to ``OUT/finetune.jsonl`` as they finish; a second run skips the rows
already there (delete the file to start over), and ``OUT/finetune.md`` / ``.json`` are rewritten after each row.

    napari-sam-ft bench finetune -- --cases ../shared/cases [--names mni152,lung1] [--scopes lora,decoder]
        [--modes none,box] [--with-load] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE_CLASSES = {1: "spleen", 2: "right kidney", 3: "left kidney", 5: "liver", 6: "stomach"}


# -- cases ----------------------------------------------------------------------------------------
def load_cases(cases_dir: Path, names: list[str] | None):
    """(name, image Volume, reference labels (Z, H, W) int32 with only the case's classes, class names)."""
    from napari_sam_ft.sample import load_sample
    from napari_sam_ft.volume import read_labels, read_volume

    listing = cases_dir / "cases.json"
    if not listing.is_file():
        raise SystemExit(f"{listing} not found: give --cases the folder holding cases.json (../shared/cases)")
    entries = [(entry["name"], entry) for entry in json.loads(listing.read_text())["cases"]]
    entries += [("sample-ct", "ct"), ("sample-mr", "mr")]
    for name, entry in entries:
        if names and name not in names:
            continue
        if isinstance(entry, str):
            sample = load_sample(entry)
            image, labels, classes = sample.image, sample.labels.array, dict(SAMPLE_CLASSES)
        else:
            image = read_volume(cases_dir / entry["image"])
            labels = read_labels(cases_dir / entry["labels"], like=image).array
            classes = {int(key): value for key, value in entry["classes"].items()}
        reference = np.where(np.isin(labels, list(classes)), labels, 0).astype(np.int32)
        classes = {key: value for key, value in classes.items() if (reference == key).any()}
        yield name, image, reference, classes


def annotated_slices(reference: np.ndarray, class_ids, per_structure: int) -> list[int]:
    """``per_structure`` slices spread through each structure's extent (away from its ends), all together.

    A structure on few slices (the lesions lie on 3 thick slices) gets at most half of them, at least 2
    (then its first and last), so that slices are left to score.
    """
    chosen: set[int] = set()
    for class_id in class_ids:
        present = np.flatnonzero((reference == class_id).reshape(reference.shape[0], -1).any(axis=1))
        count = min(per_structure, max(2, len(present) // 2))
        if len(present) < 2 * count + 1:  # too few slices to stay away from the ends: use them
            positions = np.linspace(0, len(present) - 1, count)
        else:
            positions = np.linspace(0, len(present) - 1, count + 2)[1:-1]
        chosen.update(int(present[int(round(position))]) for position in positions)
    return sorted(chosen)


# -- scores ---------------------------------------------------------------------------------------
def box_dice(predictor, reference: np.ndarray, slices: list[int], class_ids) -> dict:
    """Dice of the tight-box prompt of every object (connected piece of a class) on the held-out slices,
    as a user boxes each piece they see (``engine.prompts.objects_on_slice``), through the widget's own
    ``predict_object`` (window per prompt, small boxes zoomed where the model does) ->
    {"box": mean over objects, "box_by_class": {class id: mean over its objects}}."""
    from napari_sam_ft.engine.click_search import predict_object
    from napari_sam_ft.engine.prompts import box_from_mask, objects_on_slice
    from napari_sam_ft.metrics import dice

    scores: dict[int, list[float]] = {}
    for z in slices:
        for class_id, mask in objects_on_slice(reference[z], class_ids):
            scores.setdefault(int(class_id), []).append(
                dice(predict_object(predictor, z, box=box_from_mask(mask)).mask, mask))
    every = [score for of_class in scores.values() for score in of_class]
    return {"box": float(np.mean(every)) if every else float("nan"),
            "box_by_class": {class_id: float(np.mean(of_class)) for class_id, of_class in sorted(scores.items())}}


def class_dice(labels: np.ndarray, reference: np.ndarray, class_ids) -> dict:
    """{class id: the Dice over all given slices together}."""
    from napari_sam_ft.metrics import dice

    return {int(class_id): float(dice(labels == class_id, reference == class_id)) for class_id in class_ids}


def automatic_dice(predictor, reference: np.ndarray, slices: list[int], class_ids) -> dict:
    """Automatic segmentation of ``slices`` scored against the reference (instances matched to classes) ->
    {"automatic": mean over classes, "automatic_by_class": {class id: Dice}}."""
    from napari_sam_ft.engine.automatic import match_instances_to_classes, segment_volume

    labels = segment_volume(predictor, slice_indices=slices)[slices]
    if predictor.model.class_head is None:
        labels = match_instances_to_classes(labels, reference[slices])
    by_class = class_dice(labels, reference[slices], class_ids)
    return {"automatic": float(np.mean(list(by_class.values()))), "automatic_by_class": by_class}


def whole_volume_seconds_per_slice(model, image, precision: str) -> tuple[float, float]:
    """Automatic segmentation of every slice with the active adapter, encoding included (fresh cache):
    (wall-clock seconds, CPU seconds of this process) per slice of the volume.

    ``precision`` "fp32" times it as on a CPU without native bf16 (the target machine of issue 10). On a
    machine shared with other jobs the CPU seconds divided by the torch threads estimate a quiet run.
    """
    from napari_sam_ft.engine.automatic import segment_volume
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor

    predictor = VolumePredictor(model, image, cache=EmbeddingCache(), precision=precision)
    started, cpu_started = time.perf_counter(), time.process_time()
    segment_volume(predictor)
    return ((time.perf_counter() - started) / image.num_slices,
            (time.process_time() - cpu_started) / image.num_slices)


def quiet_seconds(cpu_seconds: float) -> float:
    """The wall-clock seconds a run of ``cpu_seconds`` of CPU time takes on a quiet machine with this
    process's torch threads, assuming they stay busy together: a machine shared with other jobs stretches
    the wall clock, not the CPU time (a lower bound; the table also gives the measured wall clock)."""
    import torch

    return cpu_seconds / max(torch.get_num_threads(), 1)


# -- load -----------------------------------------------------------------------------------------
class CompetingLoad:
    """One CPU-bound process beside the benchmark, as another program on a laptop."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait()


# -- rows -----------------------------------------------------------------------------------------
def row_key(row: dict) -> tuple:
    return row["case"], row["load"], row["scope"], row["prompt"]


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


HEADER = ("| case | load | scope | prompt mode | automatic Dice | box Dice | steps (done/planned) | stopped | train s "
          "| train CPU s (quiet estimate s) | adapter MB | auto s/slice, whole volume, fp32 (CPU s/slice) | run |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict) -> str:
    steps = f"{row['steps']}/{row['steps_planned']}" if row.get("steps") is not None else "-"
    return (f"| {row['case']} | {row['load']} | {row['scope']} | {row['prompt']} | {fmt(row.get('automatic'))} | "
            f"{fmt(row.get('box'))} | {steps} | {row.get('stopped') or '-'} | {fmt(row.get('train_s'), 0)} | "
            f"{cpu_cell(row)} | {fmt(row.get('adapter_mb'), 2)} | {timing_cell(row)} | {row.get('run', 'earlier')} |")


def timing_cell(row: dict) -> str:
    if row.get("auto_cpu_s_per_slice") is None:
        return fmt(row.get("auto_s_per_slice"), 2)
    return f"{row['auto_s_per_slice']:.2f} ({row['auto_cpu_s_per_slice']:.2f})"


def cpu_cell(row: dict) -> str:
    if row.get("train_cpu_s") is None:
        return "-"
    return f"{row['train_cpu_s']:.0f} ({row['quiet_estimate_s']:.0f})"


def machine() -> dict:
    import torch

    from napari_sam_ft.devices import autocast_dtype, cpu_model_name, dtype_name

    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_model_name(), "torch_threads": torch.get_num_threads(),
            "encoder_precision": dtype_name(autocast_dtype(torch.device("cpu"))),
            "load_average": round(os.getloadavg()[0], 1)}


def write_tables(out: Path, rows: list[dict], about: dict) -> None:
    (out / "finetune.json").write_text(json.dumps({"machine": about, "rows": rows}, indent=1, default=str))
    lines = ["# Few-shot fine-tuning on real scans", "",
             f"Last run {about['date']}, {about['cpu']}, {about['torch_threads']} torch threads, encoder precision "
             f"{about['encoder_precision']}, load average {about.get('load_average', '-')} at the start. The *run* "
             "column gives each row's start date, torch threads, load average and (since 2026-12-04) encoder precision "
             "(\"earlier\": a row from before rows "
             "recorded it; see the history of finetune.jsonl). Wall-clock seconds are quiet-machine figures only "
             "when the load was below the number of cores; the training CPU seconds divided by the torch threads "
             "estimate a quiet run. 5 annotated slices per structure; every other labelled slice held out and "
             "scored. Command: `napari-sam-ft bench finetune -- --cases ../shared/cases`.", "", HEADER]
    lines += [table_row(row) for row in rows]
    lines += ["", "## Targets (issue 10)", "",
              "Per case and scope: automatic held-out Dice >= 0.80 and >= zero-shot box; box Dice after >= before; "
              "training <= 300 s (quiet machine); adapter <= 5 MB; with load: automatic Dice within 0.02 of quiet.", ""]
    lines += target_lines(rows)
    (out / "finetune.md").write_text("\n".join(lines) + "\n")


def target_lines(rows: list[dict]) -> list[str]:
    """One line per (case, scope) saying which targets its rows meet, from the rows there are so far."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows):
        of_case = {(row["load"], row["scope"], row["prompt"]): row for row in rows if row["case"] == case}
        zero = of_case.get(("-", "zero-shot", "-"), {})
        for scope in dict.fromkeys(row["scope"] for row in rows if row["case"] == case and row["scope"] != "zero-shot"):
            automatic = of_case.get(("quiet", scope, "none"), {})
            box = of_case.get(("quiet", scope, "box"), {})
            busy = of_case.get(("busy", scope, "none"), {})
            checks = []
            if automatic.get("automatic") is not None:
                value = automatic["automatic"]
                checks.append(f"automatic {value:.3f} {'>=' if value >= 0.80 else '<'} 0.80"
                              + per_class_text(automatic, "automatic_by_class", 0.80))
                if zero.get("box") is not None:
                    checks.append(f"{'>=' if value >= zero['box'] else '<'} zero-shot box {zero['box']:.3f}")
                if "box_refined_classes" in automatic:  # rows since training chooses the classes boxes redraw
                    names = {str(key): name for key, name in automatic.get("classes", {}).items()}
                    redrawn = [names.get(str(class_id), str(class_id)) for class_id in automatic["box_refined_classes"]]
                    checks.append(f"boxes redraw {', '.join(redrawn) or 'no class'}")
            if box.get("box") is not None and zero.get("box") is not None:
                verdict = "ok" if box["box"] >= zero["box"] else "worse"
                checks.append(f"box {zero['box']:.3f} -> {box['box']:.3f} ({verdict})"
                              + per_class_text(box, "box_by_class", None, zero.get("box_by_class")))
            trained = [row for row in (automatic, box) if row.get("train_s") is not None]
            if trained:
                estimates = [row["quiet_estimate_s"] for row in trained if row.get("quiet_estimate_s") is not None]
                quiet = f" (quiet estimate {max(estimates):.0f} s)" if estimates else ""
                checks.append(f"train {max(row['train_s'] for row in trained):.0f} s{quiet}, adapter "
                              f"{max(row['adapter_mb'] for row in trained):.2f} MB")
            if busy.get("automatic") is not None and automatic.get("automatic") is not None:
                difference = busy["automatic"] - automatic["automatic"]
                checks.append(f"with load {busy['automatic']:.3f} (diff {difference:+.3f}, {busy['train_s']:.0f} s)")
            lines.append(f"- {case}, {scope}: " + "; ".join(checks))
    return lines


def per_class_text(row: dict, key: str, target: float | None, before: dict | None = None) -> str:
    """" (amygdala 0.683 < 0.80, ...)" for a row of several classes scored per class; "" otherwise (or for rows
    from before per-class scores were kept). With ``before``, each class's zero-shot score -> this one."""
    by_class = {str(class_id): value for class_id, value in (row.get(key) or {}).items()}  # JSON keys are str
    if len(by_class) < 2:
        return ""
    names = {str(class_id): name for class_id, name in row.get("classes", {}).items()}
    before = {str(class_id): value for class_id, value in (before or {}).items()}
    parts = []
    for class_id, value in by_class.items():
        name = names.get(class_id, class_id)
        if class_id in before:
            parts.append(f"{name} {before[class_id]:.3f} -> {value:.3f}")
        elif target is not None:
            parts.append(f"{name} {value:.3f} {'>=' if value >= target else '<'} {target:.2f}")
        else:
            parts.append(f"{name} {value:.3f}")
    return " (" + ", ".join(parts) + ")"


def run_case(name, image, reference, classes, args, model, done: dict, record) -> None:
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.finetune import (TrainSettings, VolumeAnnotations, build_training_data, load_adapter,
                                        train_adapter, unload_adapter)

    class_ids = sorted(classes)
    annotated = annotated_slices(reference, class_ids, args.slices)
    labelled = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(axis=1))
    held_out = [int(z) for z in labelled if z not in annotated]
    painted = np.zeros_like(reference)
    painted[annotated] = reference[annotated]
    print(f"\n{name}: {image.shape}, classes {classes}, annotated slices {annotated}, {len(held_out)} held out",
          file=sys.stderr, flush=True)
    base = {"case": name, "classes": classes, "annotated": annotated, "held_out": len(held_out)}

    def predictor():
        return VolumePredictor(model, image, cache=EmbeddingCache())

    if ("-", "zero-shot", "-") not in done:
        started = time.perf_counter()
        scores = box_dice(predictor(), reference, held_out, class_ids)
        if not args.skip_zero_shot_automatic:
            scores.update(automatic_dice(predictor(), reference, held_out, class_ids))
        record({**base, "load": "-", "scope": "zero-shot", "prompt": "-", **scores,
                "score_s": round(time.perf_counter() - started, 1)})
    data = build_training_data([VolumeAnnotations(image, painted, name)], class_names=classes)
    for load in ("quiet", "busy") if args.with_load else ("quiet",):
        for scope in args.scopes:
            for mode in args.modes:
                if (load, scope, mode) in done:
                    continue
                settings = TrainSettings(scope=scope, prompt_mode=mode, seed=args.seed,
                                         decoder_steps=args.decoder_steps, encoder_steps=args.encoder_steps,
                                         views_per_slice=args.views)
                with tempfile.TemporaryDirectory() as folder:
                    cpu_started = time.process_time()
                    if load == "busy":
                        with CompetingLoad():
                            result = train_adapter(model, data, Path(folder) / "adapter", settings)
                    else:
                        result = train_adapter(model, data, Path(folder) / "adapter", settings)
                    train_cpu_s = time.process_time() - cpu_started
                    info = load_adapter(model, result.adapter_dir)
                    try:
                        started = time.perf_counter()
                        scores = {}
                        if mode == "none":
                            scores.update(automatic_dice(predictor(), reference, held_out, class_ids))
                            if not args.skip_timing:
                                scores["auto_s_per_slice"], scores["auto_cpu_s_per_slice"] = \
                                    whole_volume_seconds_per_slice(model, image, args.timing_precision)
                        else:
                            scores.update(box_dice(predictor(), reference, held_out, class_ids))
                    finally:
                        unload_adapter(model)
                record({**base, "load": load, "scope": scope, "prompt": mode, **scores,
                        "train_s": round(result.seconds, 1), "train_cpu_s": round(train_cpu_s, 1),
                        "quiet_estimate_s": round(quiet_seconds(train_cpu_s), 1), "adapter_mb": round(result.adapter_bytes / 2**20, 2),
                        "steps": result.steps, "steps_planned": result.steps_planned, "stopped": result.stopped,
                        "adapter_id": result.adapter_id, "val_before": result.val_dice_before,
                        "box_refined_classes": info.metadata.get("box_refined_classes", []),
                        "val_after": result.val_dice_after, "score_s": round(time.perf_counter() - started, 1)})


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=Path("../shared/cases"), help="folder with cases.json")
    parser.add_argument("--names", default="", help="only these cases (e.g. mni152,lung1,sample-ct)")
    parser.add_argument("--scopes", default="lora,decoder")
    parser.add_argument("--modes", default="none,box", help="prompt modes to train (none, box, point, mixed)")
    parser.add_argument("--slices", type=int, default=5, help="annotated slices per structure")
    parser.add_argument("--decoder-steps", type=int, default=None, help="default: planned from the data")
    parser.add_argument("--encoder-steps", type=int, default=None, help="default: planned from the data")
    parser.add_argument("--views", type=int, default=6, help="augmented views per training slice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-load", action="store_true", help="train every row again beside a CPU-bound process")
    parser.add_argument("--skip-zero-shot-automatic", action="store_true", help="skip the slowest zero-shot row")
    parser.add_argument("--skip-timing", action="store_true", help="skip the whole-volume automatic timing")
    parser.add_argument("--timing-precision", default="fp32", choices=("fp32", "auto", "bf16"),
                        help="encoder precision of the whole-volume timing (default fp32: as on a CPU without bf16)")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="folder for finetune.{jsonl,md,json}")
    args = parser.parse_args(argv)
    args.names = [value for value in args.names.split(",") if value]
    args.scopes = [value for value in args.scopes.split(",") if value]
    args.modes = [value for value in args.modes.split(",") if value]
    return args


def main(argv: list[str] | None = None) -> int:
    from napari_sam_ft.models.registry import load_model

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    journal = args.out / "finetune.jsonl"
    rows = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()] if journal.exists() else []
    about = machine()
    model = load_model()
    print(f"model {model.model_id}; {about}", flush=True)
    print(HEADER, flush=True)
    for row in rows:
        print(table_row(row), flush=True)

    def record(row: dict) -> None:
        # Rows of several runs share the table (a second run adds only the missing ones): each says its own.
        row = {**row, "run": f"{about['date']}, {about['torch_threads']} threads, load {about['load_average']}, "
                             f"encoder {about['encoder_precision']}"}
        rows.append(row)
        with journal.open("a") as handle:
            handle.write(json.dumps(row, default=str) + "\n")
        write_tables(args.out, rows, about)
        print(table_row(row), flush=True)

    for name, image, reference, classes in load_cases(args.cases, args.names):
        done = {row_key(row)[1:] for row in rows if row["case"] == name}
        try:
            run_case(name, image, reference, classes, args, model, done, record)
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others' rows
            print(f"{name}: FAILED ({type(error).__name__}: {error})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
