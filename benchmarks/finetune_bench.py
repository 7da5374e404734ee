"""Few-shot fine-tuning benchmark: train on 5 annotated slices, score the held-out slices.

For each sample volume (the CT, and the MR as a second volume the recipe was not tuned on) the reference
labels of 5 evenly spaced slices (organs only) play the user's annotations; every other slice is
held out. Printed per volume:

* zero-shot automatic: the base model's automatic segmentation, each 3D instance given the reference
  class it overlaps most (oracle matching, generous to the base model);
* zero-shot box: a tight box around each organ on each held-out slice;
* after adapting with each scope (decoder, lora, full) and prompt mode (none = automatic head, box):
  the automatic head's class labels and/or box-prompted masks, with training time and adapter size.

Dice is per class over all held-out slices (automatic) or per object (box), averaged.

    python -m benchmarks.finetune_bench [--datasets ct,mr] [--scopes decoder,lora,full] [--modes none,box]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Organs both samples label (TotalSegmentator ids): spleen, right and left kidney, liver, stomach.
DEFAULT_CLASSES = (1, 2, 3, 5, 6)


def annotated_slice_indices(num_slices: int, count: int) -> list[int]:
    """``count`` slices spread evenly, a little away from the ends of the stack."""
    return sorted({int(round(value)) for value in np.linspace(2, num_slices - 3, count)})


def box_dice(predictor, reference: np.ndarray, slices: list[int], class_ids) -> float:
    """Mean Dice of the tight-box prompt of every (slice, class) object present in the reference."""
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice

    scores = []
    for z in slices:
        masks = [reference[z] == class_id for class_id in class_ids if (reference[z] == class_id).any()]
        if not masks:
            continue
        predicted, _ = predictor.predict_boxes(np.stack([box_from_mask(mask) for mask in masks]), slice_index=z)
        scores.extend(dice(prediction, mask) for prediction, mask in zip(predicted, masks))
    return float(np.mean(scores)) if scores else float("nan")


def automatic_dice(predictor, reference: np.ndarray, slices: list[int], class_ids, spacing) -> float:
    """Mean per-class Dice of automatic segmentation on ``slices`` (instances matched to classes if needed)."""
    from napari_sam_ft.engine.automatic import match_instances_to_classes, segment_volume
    from napari_sam_ft.metrics import score_labels

    labels = segment_volume(predictor, slice_indices=slices)[slices]
    held_reference = reference[slices]
    if predictor.model.class_head is None:
        labels = match_instances_to_classes(labels, held_reference)
    return float(score_labels(labels, held_reference, spacing, class_ids=class_ids, with_hd95=False)["dice"])


def run_dataset(name: str, args, model, rows: list[dict]) -> None:
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.finetune import (TrainSettings, VolumeAnnotations, build_training_data, load_adapter,
                                        train_adapter, unload_adapter)
    from napari_sam_ft.sample import load_sample

    sample = load_sample(name)
    reference = np.where(np.isin(sample.labels.array, args.classes), sample.labels.array, 0).astype(np.int32)
    num_slices = reference.shape[0]
    annotated = annotated_slice_indices(num_slices, args.slices)
    held_out = [z for z in range(num_slices) if z not in annotated]
    painted = np.zeros_like(reference)
    painted[annotated] = reference[annotated]
    class_ids = [class_id for class_id in args.classes if (reference[held_out] == class_id).any()]
    print(f"\n{name.upper()}: annotated slices {annotated}, {len(held_out)} held-out slices, classes "
          f"{', '.join(sample.class_names.get(c, str(c)) for c in class_ids)}", file=sys.stderr, flush=True)

    def score(kind: str) -> dict:
        predictor = VolumePredictor(model, sample.image, cache=EmbeddingCache())
        result = {}
        if kind in ("none", "both"):
            result["automatic"] = automatic_dice(predictor, reference, held_out, class_ids, sample.image.spacing)
        if kind in ("box", "both"):
            result["box"] = box_dice(predictor, reference, held_out, class_ids)
        return result

    started = time.perf_counter()
    zero_shot = score("both")
    rows.append({"dataset": name, "scope": "zero-shot", "prompt": "-", **zero_shot,
                 "train_s": None, "adapter_mb": None, "trainable": None, "stopped": "",
                 "score_s": round(time.perf_counter() - started, 1)})
    print_row(rows[-1])
    data = build_training_data([VolumeAnnotations(sample.image, painted, name)], class_names=sample.class_names)
    for scope in args.scopes:
        for mode in args.modes:
            with tempfile.TemporaryDirectory() as folder:
                settings = TrainSettings(scope=scope, prompt_mode=mode, time_budget_s=args.time_budget,
                                         seed=args.seed)
                result = train_adapter(model, data, Path(folder) / "adapter", settings)
                load_adapter(model, result.adapter_dir)
                try:
                    started = time.perf_counter()
                    scores = score("both" if mode == "mixed" else mode)
                finally:
                    unload_adapter(model)
            rows.append({"dataset": name, "scope": scope, "prompt": mode, **scores, "train_s": round(result.seconds, 1),
                         "adapter_mb": round(result.adapter_bytes / 2**20, 2), "trainable": result.trainable_parameters,
                         "stopped": result.stopped, "steps": result.steps,
                         "val_before": result.val_dice_before, "val_after": result.val_dice_after,
                         "score_s": round(time.perf_counter() - started, 1)})
            print_row(rows[-1])


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


HEADER = ("| volume | scope | prompt mode | automatic Dice | box Dice | train s | steps | adapter MB | trainable "
          "params | stopped |\n|---|---|---|---|---|---|---|---|---|---|")


def print_row(row: dict) -> None:
    print(f"| {row['dataset']} | {row['scope']} | {row['prompt']} | {fmt(row.get('automatic'))} | "
          f"{fmt(row.get('box'))} | {fmt(row.get('train_s'), 0)} | {fmt(row.get('steps'))} | "
          f"{fmt(row.get('adapter_mb'), 2)} | {fmt(row.get('trainable'))} | {row.get('stopped', '')} |", flush=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="ct,mr", help="sample volumes (ct, mr)")
    parser.add_argument("--scopes", default="decoder,lora,full")
    parser.add_argument("--modes", default="none,box", help="prompt modes to train (none, box, point, mixed)")
    parser.add_argument("--slices", type=int, default=5, help="annotated slices to train on")
    parser.add_argument("--classes", default=",".join(map(str, DEFAULT_CLASSES)), help="label ids to learn")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds per training run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    args.datasets = [value for value in args.datasets.split(",") if value]
    args.scopes = [value for value in args.scopes.split(",") if value]
    args.modes = [value for value in args.modes.split(",") if value]
    args.classes = [int(value) for value in args.classes.split(",") if value]
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    from napari_sam_ft.devices import autocast_dtype, dtype_name
    from napari_sam_ft.models.registry import load_model

    args = parse_args(argv)
    model = load_model()
    print(f"model {model.model_id}, device {model.device}, encoder precision "
          f"{dtype_name(autocast_dtype(model.device))}, {torch.get_num_threads()} torch threads, "
          f"time budget {args.time_budget:g} s per run", flush=True)
    print(HEADER, flush=True)
    rows: list[dict] = []
    for name in args.datasets:
        run_dataset(name, args, model, rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
