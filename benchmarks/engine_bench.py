"""Engine speed on the sample CT: encoder s/slice by precision, click latency, auto-segment against a naive loop.

Run with ``napari-sam-ft bench encoder`` (or ``python benchmarks/engine_bench.py``). Prints tables; asserts
nothing. Targets (2-core CPU): encoder <= 0.36 s/slice, click <= 20 ms median, auto-segment >= 3x faster
than the naive loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice

    organs = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
    rows = []
    masks_by_precision = {}
    precisions = ["fp32", "bf16"]
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
        rows.append((precision, per_slice, mean_dice))
        if precision == "bf16+compile":
            model.sam.image_encoder = model.sam.image_encoder._orig_mod
    agreement = np.mean([dice(masks_by_precision["fp32"][key][0], masks_by_precision["bf16"][key][0])
                         for key in masks_by_precision["fp32"]])
    print(f"\nImage encoder on {len(slices)} slices of the sample CT ({model.name}, {torch.get_num_threads()} threads)")
    print(f"{'precision':<30} {'s/slice':>8} {'box Dice':>9}")
    for name, seconds, mean_dice in rows:
        print(f"{name:<30} {seconds:>8.3f} {mean_dice:>9.4f}")
    print(f"bf16 vs fp32 masks: Dice {agreement:.4f} between them; box-Dice difference "
          f"{rows[1][2] - rows[0][2]:+.4f} (target encoder <= 0.36 s/slice)")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench encoder", description=__doc__)
    parser.add_argument("--slices", type=int, default=8, help="slices of the sample CT to time the encoder on")
    parser.add_argument("--repeats", type=int, default=30, help="prompts timed per click row")
    parser.add_argument("--auto-slices", type=int, default=10, help="slices for the auto-segment comparison")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (a ~100 s one-off compile)")
    parser.add_argument("--skip", nargs="*", default=(), choices=("encoder", "click", "auto"))
    args = parser.parse_args(argv)

    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.sample import load_sample

    model = load_model()
    sample = load_sample("ct")
    middle = sample.image.num_slices // 2
    if "encoder" not in args.skip:
        half = args.slices // 2
        encoder_table(model, sample, list(range(middle - half, middle - half + args.slices)), args.compile)
    if "click" not in args.skip:
        click_table(model, sample, args.repeats)
    if "auto" not in args.skip:
        half = args.auto_slices // 2
        automatic_table(model, sample, list(range(middle - half, middle - half + args.auto_slices)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
