"""Engine speed on the sample CT: encoder s/slice by precision, click latency, auto-segment against a naive loop.

Run with ``napari-sam-ft bench encoder`` (or ``python benchmarks/engine_bench.py``). Prints tables; asserts
nothing. Targets (2-core CPU): encoder <= 0.36 s/slice, click <= 20 ms median, auto-segment >= 3x faster
than the naive loop; on a CPU without bf16, the fast fp32 encoder (ONNX Runtime) <= 0.4 s/slice with masks
Dice >= 0.99 against fp32 eager (the ``fp32`` table: lung1 from ../shared/cases and the sample CT).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _median_ms(function, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def encoder_table(model, sample, slices: list[int], compile_encoder: bool) -> None:
    from napari_sam_ft.devices import cpu_has_native_bf16
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice

    organs = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    rows = []
    masks_by_precision = {}
    # Without native bf16 the engine encodes in fp32 (bf16 autocast is emulated there, ~8x slower than fp32).
    precisions = ["fp32", "bf16"] if cpu_has_native_bf16() else ["fp32"]
    for precision in precisions + (["bf16+compile"] if compile_encoder else []):
        predictor = VolumePredictor(model, sample.image, cache=EmbeddingCache(),
                                    precision="bf16" if precision.startswith("bf16") else precision, batch_size=1)
        if precision == "bf16+compile":
            model.sam.image_encoder = torch.compile(model.sam.image_encoder)
            started = time.perf_counter()
            predictor.encode_batch(predictor.slice_image(slices[0])[None])
            rows.append(("bf16+compile: one-off compile", time.perf_counter() - started, float("nan")))
        predictor.encode_batch(predictor.slice_image(slices[0])[None])  # warm-up
        started = time.perf_counter()
        predictor.encode_slices(slices, skip_cached=False)
        per_slice = (time.perf_counter() - started) / len(slices)
        masks = {}
        for index in slices:
            for class_id in organs:
                reference = sample.labels.array[index] == class_id
                if reference.sum() >= 10:
                    masks[(index, class_id)] = (predictor.predict(box=box_from_mask(reference), slice_index=index).mask,
                                                reference)
        masks_by_precision[precision] = masks
        mean_dice = float(np.mean([dice(prediction, reference) for prediction, reference in masks.values()]))
        runtime = " (ONNX Runtime)" if precision == "fp32" and predictor.onnx_encoder() is not None else ""
        rows.append((precision + runtime, per_slice, mean_dice))
        if precision == "bf16+compile":
            model.sam.image_encoder = model.sam.image_encoder._orig_mod
    print(f"\nImage encoder on {len(slices)} slices of the sample CT ({model.name}, {torch.get_num_threads()} threads)")
    print(f"{'precision':<30} {'s/slice':>8} {'box Dice':>9}")
    for name, seconds, mean_dice in rows:
        print(f"{name:<30} {seconds:>8.3f} {mean_dice:>9.4f}")
    if "bf16" not in masks_by_precision:
        print("no native bf16 on this CPU: the engine encodes in fp32 (bf16 not timed)")
        return
    agreement = np.mean([dice(masks_by_precision["fp32"][key][0], masks_by_precision["bf16"][key][0])
                         for key in masks_by_precision["fp32"]])
    print(f"bf16 vs fp32 masks: Dice {agreement:.4f} between them; box-Dice difference "
          f"{rows[1][2] - rows[0][2]:+.4f} (target encoder <= 0.36 s/slice)")


def compute_floor_table(model, onnx_seconds_per_slice: float | None = None) -> None:
    """What one slice's encoding costs in arithmetic, against the fastest this CPU multiplies fp32 matrices.

    The floating-point operations are counted by torch's FlopCounterMode on one forward pass; the GEMM rate is
    the best of a few large (2048^3) torch matmuls on the torch threads. Their ratio is a lower bound on the
    fp32 seconds per slice that no runtime can beat on this machine, whatever it fuses.
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = model.preprocessing.input_size
    example = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.sam.image_encoder(example.to(model.device))
    by_operator = {str(name).split(".")[-1]: flops for name, flops in counter.get_flop_counts()["Global"].items()}
    total = counter.get_total_flops()
    left, right = torch.rand(2048, 2048), torch.rand(2048, 2048)
    left @ right
    best = min(_seconds(lambda: left @ right) for _ in range(5))
    rate = 2 * 2048 ** 3 / best
    print(f"\nfp32 compute floor of the {model.name} image encoder ({size} px input, "
          f"{torch.get_num_threads()} threads)")
    parts = ", ".join(f"{name} {flops / 1e9:.1f}" for name, flops in sorted(by_operator.items(), key=lambda x: -x[1]))
    print(f"one slice: {total / 1e9:.1f} GFLOP ({parts})")
    print(f"fastest fp32 GEMM here (2048^3 torch matmul, best of 5): {rate / 1e9:.0f} GFLOP/s")
    floor = total / rate
    print(f"lower bound at that rate: {floor:.3f} s/slice", end="")
    if onnx_seconds_per_slice is not None:
        print(f"; the fast fp32 encoder runs at {total / onnx_seconds_per_slice / 1e9:.0f} GFLOP/s "
              f"({onnx_seconds_per_slice:.3f} s/slice)", end="")
    print()


def _seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def click_table(model, sample, repeats: int) -> None:
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.engine.prompts import box_from_mask, interior_point

    print(f"\nClick to mask with a cached embedding (median / p90 of {repeats} prompts, slice 15, liver)")
    print(f"{'prompt':<48} {'median ms':>10} {'p90 ms':>8}")
    reference = sample.labels.array[15] == 5
    box, point = box_from_mask(reference), interior_point(reference)
    for precision, decoder in (("fp32", "fast"), ("auto", "fast"), ("auto", "stock")):
        predictor = VolumePredictor(model, sample.image, cache=EmbeddingCache(), precision=precision)
        if decoder == "stock":  # segment-anything's modules under autocast, for comparison
            predictor.fast_decoder = None
        elif predictor.fast_decoder is None:
            continue  # not a CPU: the stock decoder is the only one
        predictor.set_slice(15)
        encoder_calls = predictor.encoder_calls
        for name, kwargs in (("box", {"box": box}),
                             ("click (3 masks, best kept)", {"point_coords": point[None], "point_labels": [1],
                                                                  "multimask_output": True}),
                             ("box + click", {"box": box, "point_coords": point[None], "point_labels": [1]})):
            predictor.predict(**kwargs)
            median, p90 = _median_ms(lambda: predictor.predict(**kwargs), repeats)
            label = f"{name} ({predictor.precision_name}, {decoder} decoder)"
            print(f"{label:<48} {median:>10.1f} {p90:>8.1f}")
        assert predictor.encoder_calls == encoder_calls, "a click re-encoded the slice"
    print("target: <= 20 ms median")


def naive_automatic(model, sample, slices, settings) -> float:
    """What a loop without cache or batching costs: fp32 encode, then one decoder pass per grid prompt."""
    from napari_sam_ft.engine.automatic import body_mask, grid_boxes, grid_points

    preprocessing = model.preprocessing
    from napari_sam_ft.volume import choose_window

    window = choose_window(sample.image.array, "auto")
    started = time.perf_counter()
    with torch.inference_mode():
        for index in slices:
            image = window.apply(sample.image.array[index])
            embedding = model.sam.image_encoder(preprocessing.image_to_tensor(image))
            body = body_mask(image, settings.foreground_threshold)
            if model.spec.automatic_prompt == "box":
                prompts = [{"boxes": torch.from_numpy(preprocessing.coords_to_model(box.reshape(2, 2), *image.shape)
                                                      .reshape(1, 4))} for box in grid_boxes(body, settings.box_scales)]
            else:
                prompts = [{"points": (torch.from_numpy(preprocessing.coords_to_model(point[None, None], *image.shape)),
                                       torch.ones(1, 1, dtype=torch.int64))}
                           for point in grid_points(body, settings.points_per_side)]
            for prompt in prompts:
                sparse, dense = model.sam.prompt_encoder(points=prompt.get("points"), boxes=prompt.get("boxes"),
                                                         masks=None)
                low_res, _ = model.sam.mask_decoder(image_embeddings=embedding,
                                                    image_pe=model.sam.prompt_encoder.get_dense_pe(),
                                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                                    multimask_output=model.spec.automatic_prompt != "box")
                preprocessing.logits_to_slice(low_res, *image.shape)
    return time.perf_counter() - started


def automatic_table(model, sample, slices: list[int]) -> None:
    from napari_sam_ft.engine.automatic import AutomaticSettings, segment_volume
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor

    settings = AutomaticSettings()
    predictor = VolumePredictor(model, sample.image, cache=EmbeddingCache())
    started = time.perf_counter()
    labels = segment_volume(predictor, slice_indices=slices, settings=settings)
    ours = time.perf_counter() - started
    naive = naive_automatic(model, sample, slices, settings)
    print(f"\nAutomatic segmentation of {len(slices)} slices (from cold: encoding included)")
    print(f"{'method':<58} {'seconds':>8}")
    print(f"{'naive loop (fp32, no cache, one decoder pass per prompt)':<58} {naive:>8.1f}")
    print(f"{'napari-sam-ft segment_volume (batched, bf16, skips air)':<58} {ours:>8.1f}")
    print(f"speed-up {naive / ours:.1f}x (target >= 3x); {len(np.unique(labels)) - 1} objects found")


def _varied_boxes(labels_slice: np.ndarray | None, body: np.ndarray, rng: np.random.Generator,
                  count: int) -> list[np.ndarray]:
    """Box prompts on one slice: each labelled object's box, then random boxes (20-160 px) centred in the body
    up to ``count`` in all."""
    from napari_sam_ft.engine.prompts import box_from_mask

    boxes = []
    if labels_slice is not None:
        boxes += [box_from_mask(labels_slice == value).astype(np.float32)
                  for value in np.unique(labels_slice) if value and (labels_slice == value).sum() >= 10]
    rows, cols = np.nonzero(body)
    height, width = body.shape
    while len(boxes) < count and len(rows):
        pick = rng.integers(len(rows))
        half = rng.uniform(10, 80, size=2)
        centre = np.array([cols[pick], rows[pick]], np.float32)
        low, high = np.maximum(centre - half, 0), np.minimum(centre + half, [width - 1, height - 1])
        boxes.append(np.concatenate([low, high]).astype(np.float32))
    return boxes


def fp32_runtime_table(model, volumes: dict, slices_per_volume: int, repeats: int,
                       boxes_per_slice: int) -> float | None:
    """fp32 eager against the fast fp32 encoder (ONNX Runtime), interleaved in one process.

    Each slice is encoded ``repeats`` times by each runtime, alternating which goes first, so a load that comes
    and goes hits both alike; the ratio reported is the median of the per-pair ratios. Then varied boxes are
    decoded on both embeddings and the masks compared.
    """
    from napari_sam_ft.engine.automatic import body_mask
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.metrics import dice

    print(f"\nfp32 image encoder: torch eager vs ONNX Runtime ({model.name}, {torch.get_num_threads()} threads; "
          f"interleaved, {repeats} pairs per slice)")
    print(f"{'volume':<28} {'slices':>6} {'eager s/slice':>14} {'fast s/slice':>13} {'ratio':>7} "
          f"{'prompts':>8} {'mask Dice mean':>15} {'min':>7}")
    rng = np.random.default_rng(0)
    all_fast_times = []
    for name, (volume, labels) in volumes.items():
        eager = VolumePredictor(model, volume, cache=EmbeddingCache(), precision="fp32", batch_size=1)
        eager.use_onnx_encoder = False
        fast = VolumePredictor(model, volume, cache=EmbeddingCache(), precision="fp32", batch_size=1)
        started = time.perf_counter()
        if fast.onnx_encoder() is None:
            print(f"{name:<28} the fast fp32 encoder is not available here (see the warning above)")
            continue
        setup = time.perf_counter() - started
        body_share = [body_mask(eager.slice_intensity(index), 0.05).mean() for index in range(volume.num_slices)]
        candidates = [index for index, share in enumerate(body_share) if share > 0.05] or list(range(volume.num_slices))
        indices = [candidates[int(i)] for i in np.linspace(0, len(candidates) - 1, min(slices_per_volume,
                                                                                          len(candidates)))]
        for predictor in (eager, fast):  # warm-up
            predictor.encode_slices(indices[:1], skip_cached=False)
        eager_times, fast_times, ratios = [], [], []
        for index in indices:
            for repeat in range(repeats):
                timed = {}
                for predictor in ((eager, fast) if repeat % 2 == 0 else (fast, eager)):
                    started = time.perf_counter()
                    predictor.encode_slices([index], skip_cached=False)
                    timed[predictor is fast] = time.perf_counter() - started
                eager_times.append(timed[False])
                fast_times.append(timed[True])
                all_fast_times.append(timed[True])
                ratios.append(timed[True] / timed[False])
        scores = []
        for index in indices:
            body = body_mask(eager.slice_intensity(index), 0.05)
            labels_slice = None if labels is None else labels[index]
            boxes = _varied_boxes(labels_slice, body, rng, boxes_per_slice)
            if boxes:
                scores += [dice(a, b) for a, b in zip(fast.predict_boxes(np.stack(boxes), slice_index=index)[0],
                                                      eager.predict_boxes(np.stack(boxes), slice_index=index)[0])]
        label = f"{name} {volume.shape[1]}x{volume.shape[2]}"
        print(f"{label:<28} {len(indices):>6} {statistics.median(eager_times):>14.3f} "
              f"{statistics.median(fast_times):>13.3f} {statistics.median(ratios):>7.3f} {len(scores):>8} "
              f"{np.mean(scores):>15.4f} {np.min(scores):>7.4f}")
        print(f"{'':<28} (ONNX export or load, once: {setup:.1f} s)")
    print("ratio: median of fast/eager per interleaved pair; target fast <= 0.4 s/slice, mask Dice >= 0.99")
    return statistics.median(all_fast_times) if all_fast_times else None


def _fp32_volumes(sample, cases_dir: Path) -> dict:
    """lung1 (512 x 512, a real chest CT) from ``cases_dir`` when it is there, and the bundled sample CT."""
    from napari_sam_ft.volume import read_labels, read_volume

    volumes = {}
    image_path, labels_path = cases_dir / "pyradiomics_lung1_ct.nrrd", cases_dir / "pyradiomics_lung1_label.nrrd"
    if image_path.exists():
        image = read_volume(image_path)
        volumes["lung1"] = (image, read_labels(labels_path, like=image).array)
    else:
        print(f"(lung1 is not in {cases_dir}: the fp32 table covers the sample CT only)")
    volumes["sample CT"] = (sample.image, sample.labels.array)
    return volumes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench encoder", description=__doc__)
    parser.add_argument("--slices", type=int, default=8, help="slices of the sample CT to time the encoder on")
    parser.add_argument("--repeats", type=int, default=30, help="prompts timed per click row")
    parser.add_argument("--auto-slices", type=int, default=10, help="slices for the auto-segment comparison")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (a ~100 s one-off compile)")
    parser.add_argument("--fp32-slices", type=int, default=12, help="slices per volume for the fp32 runtime table")
    parser.add_argument("--fp32-repeats", type=int, default=3, help="interleaved eager/fast pairs per slice")
    parser.add_argument("--fp32-boxes", type=int, default=8, help="box prompts per slice for the fp32 mask Dice")
    parser.add_argument("--cases", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "cases",
                        help="folder holding lung1 (default ../shared/cases beside the checkout)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("encoder", "fp32", "floor", "click", "auto"))
    args = parser.parse_args(argv)

    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.sample import load_sample

    model = load_model()
    sample = load_sample("ct")
    middle = sample.image.num_slices // 2
    if "encoder" not in args.skip:
        half = args.slices // 2
        encoder_table(model, sample, list(range(middle - half, middle - half + args.slices)), args.compile)
    fast_seconds = None
    if "fp32" not in args.skip:
        fast_seconds = fp32_runtime_table(model, _fp32_volumes(sample, args.cases), args.fp32_slices,
                                          args.fp32_repeats, args.fp32_boxes)
    if "floor" not in args.skip:
        compute_floor_table(model, fast_seconds)
    if "click" not in args.skip:
        click_table(model, sample, args.repeats)
    if "auto" not in args.skip:
        half = args.auto_slices // 2
        automatic_table(model, sample, list(range(middle - half, middle - half + args.auto_slices)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
