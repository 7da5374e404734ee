"""Steps of the single-scan jobs that the CLI commands and the cohort workers share.

``napari-sam-ft evaluate`` and ``napari-sam-ft batch evaluate`` (one scan per dask task) go through the
same two functions here, so a scan scores the same in both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .engine.cache import EmbeddingCache
from .engine.predictor import ProgressCallback, VolumePredictor
from .models.registry import LoadedModel
from .volume import Volume


def predictor_for(model: LoadedModel, volume: Volume, window="auto", cache: EmbeddingCache | None = None,
                  precision: str = "auto") -> VolumePredictor:
    """A predictor for ``volume`` on ``model`` (with its adapter, if one is active).

    ``window`` is a preset name or (level, width). An active adapter saw images windowed one way: "auto"
    then applies that window, and an explicit window that differs raises ``AdapterError``.
    """
    from .volume import choose_window

    chosen = choose_window(volume.array, window)
    if model.adapter_id != "none":
        from .finetune.adapters import active_adapter, window_for_adapter

        chosen = window_for_adapter(active_adapter(model), chosen, explicit=window != "auto")
    predictor = VolumePredictor(model, volume, window=chosen, cache=cache, precision=precision)
    predictor.window_is_automatic = window == "auto"  # engine.window_choice may pick a window per prompt
    return predictor


def evaluate_against(predictor: VolumePredictor, labels_path: str | Path, prompt_mode: str = "box",
                     slices: str | None = None, class_ids=None, progress: ProgressCallback | None = None
                     ) -> tuple[dict, np.ndarray, Volume]:
    """Score ``predictor``'s volume against the reference label file: (report, predicted labels, reference).

    ``slices`` is ``A:B`` (B exclusive; None: every slice). Classes are named by the label file (a Slicer
    .seg.nrrd), or for the bundled samples by their class table, or else by label id.
    """
    from .evaluate import evaluate
    from .slices import parse_slice_range
    from .sample import class_names_for
    from .volume import read_labels

    reference = read_labels(labels_path, like=predictor.volume)
    slice_range = parse_slice_range(slices, predictor.volume.num_slices)
    report, prediction = evaluate(predictor, reference.array, prompt_mode, slice_range, class_ids,
                                  class_names=reference.class_names or class_names_for(labels_path),
                                  progress=progress)
    return report, prediction, reference
