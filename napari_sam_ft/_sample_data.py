"""npe2 sample data: the bundled CT and MR scans with their reference labels (TotalSegmentator, Apache-2.0)."""

from __future__ import annotations

from ._layer_data import image_layer_data, labels_layer_data
from .sample import load_sample


def sample_layers(name: str) -> list[tuple]:
    """The sample scan as an Image layer and its reference segmentation as a Labels layer."""
    sample = load_sample(name)
    title = name.upper()
    return [
        image_layer_data(sample.image, name=f"sample {title}"),
        labels_layer_data(sample.labels, name=f"sample {title} reference", class_names=sample.class_names),
    ]


def make_ct_sample() -> list[tuple]:
    return sample_layers("ct")


def make_mr_sample() -> list[tuple]:
    return sample_layers("mr")
