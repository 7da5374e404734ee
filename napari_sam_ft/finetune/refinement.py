"""Which classes of a new adapter the base model's boxes segment better (``engine.box_refinement``).

Checked on the run's validation slices through the engine itself, as inference will segment them: the saved
adapter on a copy of the base network, its head's labels, then each class's pieces boxed by the base model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.automatic import class_head_labels
from ..engine.box_refinement import MIN_GAIN, base_predictor, refine_with_boxes
from ..engine.cache import EmbeddingCache
from ..engine.predictor import VolumePredictor
from ..io.volume import Volume
from ..models.registry import LoadedModel
from .adapters import base_model_copy, load_adapter
from .data import TrainingData
from .validation import ClassDice


def choose_refined_classes(model: LoadedModel, data: TrainingData, adapter_dir: str | Path) -> tuple[dict, float]:
    """({"box_refined_classes": [class ids], "box_refinement_validation": {class id: [head Dice, boxed Dice]}},
    the automatic validation Dice with those classes boxed) from the validation slices of ``data`` (which must
    carry its ``images``); ``model`` is not changed."""
    adapted = base_model_copy(model)
    load_adapter(adapted, adapter_dir)
    head_scores, boxed_scores = ClassDice(data.class_ids), ClassDice(data.class_ids)
    cache = EmbeddingCache()
    for volume_index, image in enumerate(data.images):
        examples = [example for example in data.validation if example.volume_index == volume_index]
        if not examples:
            continue
        volume = image if isinstance(image, Volume) else Volume(np.asarray(image))
        predictor = VolumePredictor(adapted, volume, window=data.windows[volume_index], cache=cache)
        slices = [example.slice_index for example in examples]
        head_labels = class_head_labels(predictor, slices)
        boxed_labels = refine_with_boxes(base_predictor(predictor), head_labels, data.class_ids)
        view = data.fields_of_view[volume_index] if data.cropped else None
        for example in examples:  # the reference: cut to the window the head trained on, when it was
            for scores, labels in ((head_scores, head_labels), (boxed_scores, boxed_labels)):
                predicted = labels[example.slice_index]
                scores.add(view.crop(predicted) if view is not None else predicted, example.labels)
    head, boxed = head_scores.per_class(), boxed_scores.per_class()
    chosen = [class_id for class_id in head if boxed[class_id] >= head[class_id] + MIN_GAIN]
    automatic = float(np.mean([boxed[class_id] if class_id in chosen else head[class_id] for class_id in head]))
    return ({"box_refined_classes": chosen,
             "box_refinement_validation": {str(class_id): [round(head[class_id], 4), round(boxed[class_id], 4)]
                                           for class_id in head}}, automatic)
