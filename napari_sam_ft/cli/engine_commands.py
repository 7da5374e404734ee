"""Subcommands over the segmentation engine: info, embed, segment, auto, evaluate, sample, demo."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .common import add_model_options, add_volume_options, open_predictor, progress_bar


OUTPUT_HELP = ("output label file: .nii.gz, .nrrd, .seg.nrrd (Slicer), .mha, .mgz, .dcm (DICOM SEG over a DICOM "
               "series), .tif or .npy; it overlays IMAGE in world coordinates")


def register(subparsers) -> None:
    info = subparsers.add_parser("info", help="print the device, dtype, models and cache location")
    info.set_defaults(run=run_info)

    embed = subparsers.add_parser("embed", help="precompute and cache the embeddings of every slice of IMAGE")
    embed.add_argument("image", help="a .nii/.nii.gz/.tif/.npy volume")
    add_volume_options(embed)
    add_model_options(embed)
    embed.set_defaults(run=run_embed)

    segment = subparsers.add_parser("segment", help="segment IMAGE from a JSON prompt file",
                                    description="PROMPTS.json is a list of {\"slice\": z, \"label\": id, "
                                    "\"box\": [x_min, y_min, x_max, y_max]} and/or \"points\": [[x, y], ...] with "
                                    "\"point_labels\": [1|0, ...]; x = column, y = row, in pixels of the (Z, Y, X) "
                                    "volume. See docs/prompts.md.")
    segment.add_argument("image")
    segment.add_argument("--prompts", required=True, help="JSON prompt file")
    segment.add_argument("--propagate", action="store_true", help="grow each object through the neighbouring slices")
    segment.add_argument("--stop-iou", type=float, default=None, help="propagation stops below this predicted IoU")
    segment.add_argument("-o", "--output", required=True, help=OUTPUT_HELP)
    add_volume_options(segment)
    add_model_options(segment)
    segment.set_defaults(run=run_segment)

    auto = subparsers.add_parser("auto", help="automatically segment the whole volume")
    auto.add_argument("image")
    auto.add_argument("-o", "--output", required=True, help=OUTPUT_HELP)
    auto.add_argument("--slices", default=None, help="only slices A:B (B exclusive)")
    add_volume_options(auto)
    add_model_options(auto)
    auto.set_defaults(run=run_auto)

    evaluate = subparsers.add_parser("evaluate", help="simulate prompts from reference LABELS and score the result")
    evaluate.add_argument("image")
    evaluate.add_argument("labels", help="reference label file on the image's voxel grid, in any voxel order or "
                          "format (aligned by world geometry; a DICOM SEG over a DICOM series)")
    evaluate.add_argument("--prompt", choices=("box", "point", "point_box", "propagate", "none"), default="box",
                          help="box: one reference box per object per slice; point: one click at its interior point "
                          "(farthest from the border); point_box: both; propagate: the reference box on the slice "
                          "where the object is largest, grown through the volume; none: automatic segmentation")
    evaluate.add_argument("--slices", default=None, help="only slices A:B (B exclusive)")
    evaluate.add_argument("--classes", default=None, help="comma-separated label ids to score (default: all present)")
    evaluate.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    evaluate.add_argument("-o", "--output", default=None, help="also write the predicted labels here")
    add_volume_options(evaluate)
    add_model_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    sample = subparsers.add_parser("sample", help="write the bundled sample scan and its reference labels")
    sample.add_argument("-o", "--output-dir", default=".", help="folder to write into (default: here)")
    sample.add_argument("--name", choices=("ct", "mr"), default="ct")
    sample.set_defaults(run=run_sample)

    demo = subparsers.add_parser("demo", help="segment the sample CT's organs with the embedded model, print Dice, "
                                 "and open the result in napari when a display exists")
    demo.add_argument("-o", "--output-dir", default="napari-sam-ft-demo")
    demo.add_argument("--no-viewer", action="store_true", help="do not open napari even if a display exists")
    add_model_options(demo)
    demo.set_defaults(run=run_demo)


def run_info(args) -> int:
    import platform

    import torch

    from ..devices import autocast_dtype, cpu_has_native_bf16, dtype_name, select_device
    from ..engine.cache import default_cache_dir
    from ..engine.onnx_encoder import fp32_encoder_runtime
    from ..models.registry import DEFAULT_MODEL, MODELS, embedded_litemedsam_checkpoint

    device = select_device("auto")
    print(f"napari-sam-ft on Python {platform.python_version()}, torch {torch.__version__}")
    print(f"device:       {device} (override with --device cpu|cuda|mps)")
    print(f"encoder dtype: {dtype_name(autocast_dtype(device))}"
          f"{' (CPU has native bf16)' if device.type == 'cpu' and cpu_has_native_bf16() else ''}")
    fp32_use = "used by default here" if autocast_dtype(device) is None else "with --precision fp32"
    print(f"fp32 encoder: {DEFAULT_MODEL} on {fp32_encoder_runtime(MODELS[DEFAULT_MODEL].family, device)}; "
          f"{fp32_use}")
    print(f"torch threads: {torch.get_num_threads()}")
    cache_dir = default_cache_dir()
    size = sum(path.stat().st_size for path in cache_dir.glob("*/*.npy")) if cache_dir.exists() else 0
    print(f"cache:        {cache_dir} ({size / 2**20:.1f} MiB; set NAPARI_SAM_FT_CACHE to move it)")
    print("models:")
    for spec in MODELS.values():
        if spec.default_checkpoint is not None:
            try:
                weights = f"embedded: {embedded_litemedsam_checkpoint()}"
            except Exception as error:  # the table still prints when the weights package is missing
                weights = f"embedded weights missing: {error}"
        else:
            weights = "needs --checkpoint PATH"
        print(f"  {spec.name:<11} {spec.preprocessing.input_size:>4} px  {spec.description}  [{weights}]")
    return 0


def run_embed(args) -> int:
    volume, predictor = open_predictor(args)
    started = time.perf_counter()
    with progress_bar("encoding", volume.num_slices) as update:
        encoded = predictor.encode_volume(progress=update)
    seconds = time.perf_counter() - started
    print(f"encoded {encoded} slices ({volume.num_slices - encoded} already cached) in {seconds:.1f} s "
          f"on {predictor.model.device} ({predictor.precision_name}, {predictor.encoder_runtime}); "
          f"cache key {predictor.cache_key.digest()}")
    return 0


def run_segment(args) -> int:
    from ..engine.prompts import load_prompts
    from ..engine.propagate import DEFAULT_STOP_IOU
    from ..engine.segment import segment_prompts
    from ..volume import write_volume

    volume, predictor = open_predictor(args)
    prompts = load_prompts(args.prompts, volume.shape)
    with progress_bar("segmenting", len(prompts)) as update:
        labels = segment_prompts(predictor, prompts, propagate=args.propagate,
                                 stop_iou=args.stop_iou if args.stop_iou is not None else DEFAULT_STOP_IOU,
                                 progress=update)
    path = write_volume(args.output, labels.astype("uint16"), like=volume)
    print(f"wrote {path}: {int((labels > 0).sum())} labelled voxels on "
          f"{int(labels.any(axis=(1, 2)).sum())} slices")
    return 0


def run_auto(args) -> int:
    from ..engine.automatic import segment_volume
    from ..slices import parse_slice_range
    from ..volume import write_volume

    volume, predictor = open_predictor(args)
    first, last = parse_slice_range(args.slices, volume.num_slices)
    with progress_bar("auto-segmenting", last - first + 1) as update:
        labels = segment_volume(predictor, slice_indices=range(first, last + 1), progress=update)
    path = write_volume(args.output, labels.astype("uint16"), like=volume)
    kind = "classes" if predictor.model.class_head is not None else "objects"
    print(f"wrote {path}: {len(set(labels.ravel().tolist()) - {0})} {kind}")
    return 0


def run_evaluate(args) -> int:
    from ..slices import parse_slice_range
    from ..scan_jobs import evaluate_against
    from ..volume import write_volume

    volume, predictor = open_predictor(args)
    slice_range = parse_slice_range(args.slices, volume.num_slices)
    class_ids = [int(value) for value in args.classes.split(",")] if args.classes else None
    with progress_bar(f"evaluating ({args.prompt})", slice_range[1] - slice_range[0] + 1) as update:
        report, prediction, reference = evaluate_against(predictor, args.labels, args.prompt, args.slices, class_ids,
                                                         progress=update)
    if args.output:
        write_volume(args.output, prediction.astype("uint16"), like=volume, class_names=reference.class_names)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    return 0


def print_report(report: dict) -> None:
    print(f"{'class':<28} {'label':>5} {'dice':>7} {'hd95 mm':>8}")
    for name, entry in report["per_class"].items():
        distance = entry.get("hd95")
        print(f"{name:<28} {entry['label']:>5} {entry['dice']:>7.3f} {distance if distance is not None else '-':>8}")
    print(f"mean Dice {report['dice']:.3f} over {len(report['per_class'])} classes "
          f"(prompt {report['prompt']}, model {report['model']}, adapter {report['adapter']}, {report['seconds']} s)")


def run_sample(args) -> int:
    from ..sample import sample_paths

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for source in sample_paths(args.name):
        shutil.copyfile(source, output_dir / source.name)
        print(output_dir / source.name)
    return 0


DEMO_ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 6: "stomach"}


def run_demo(args) -> int:
    """The README's first command: box-prompt the sample CT's main organs and show the result."""
    from ..evaluate import evaluate
    from ..sample import load_sample, sample_paths
    from ..volume import write_volume

    sample = load_sample("ct")
    args.image = str(sample.image_path)
    volume, predictor = open_predictor(args, volume=sample.image)
    print(f"sample CT {volume.shape} (Z, Y, X), window {predictor.window.name}, model {predictor.model.name} "
          f"on {predictor.model.device} ({predictor.precision_name})")
    with progress_bar("encoding", volume.num_slices) as update:
        predictor.encode_volume(progress=update)
    report, prediction = evaluate(predictor, sample.labels.array, "box", class_ids=list(DEMO_ORGANS),
                                  class_names=sample.class_names)
    output_dir = Path(args.output_dir)
    mask_path = write_volume(output_dir / "sample_ct_organs.nii.gz", prediction.astype("uint16"), like=volume)
    print_report(report)
    print(f"wrote {mask_path} (overlays {sample_paths('ct')[0].name})")
    has_display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) or sys.platform in ("darwin", "win32")
    if has_display and not args.no_viewer:
        import napari

        viewer = napari.Viewer(title="napari-sam-ft demo")
        scale, translate = volume.napari_scale_translate()
        viewer.add_image(volume.array, name="sample CT", scale=scale, translate=translate,
                         contrast_limits=(predictor.window.low, predictor.window.high))
        viewer.add_labels(prediction, name="SAM organs", scale=scale, translate=translate)
        viewer.window.add_plugin_dock_widget("napari-sam-ft", "Segment")
        napari.run()
    return 0
