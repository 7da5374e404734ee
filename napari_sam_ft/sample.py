"""The bundled sample scans (TotalSegmentator's test CT and MRI, Apache-2.0) and their reference labels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .volume import Volume, read_labels, read_volume

SAMPLES = {
    "ct": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
    "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz"),
}


@dataclass
class Sample:
    image: Volume
    labels: Volume
    class_names: dict[int, str]
    image_path: Path
    labels_path: Path


def data_dir() -> Path:
    return Path(str(files("napari_sam_ft") / "data"))


def sample_paths(name: str = "ct") -> tuple[Path, Path]:
    """Paths of the sample image and its reference label file."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")
    image_file, labels_file = SAMPLES[name]
    return data_dir() / image_file, data_dir() / labels_file


def class_names(name: str = "ct") -> dict[int, str]:
    table = json.loads((data_dir() / "class_names.json").read_text())
    return {int(label): class_name for label, class_name in table[SAMPLES[name][1]].items()}


def class_names_for(labels_path) -> dict[int, str] | None:
    """Class names for the bundled sample's label files (other files are scored by label id)."""
    for name, (_, labels_file) in SAMPLES.items():
        if Path(labels_path).name == labels_file:
            return class_names(name)
    return None


def load_sample(name: str = "ct") -> Sample:
    image_path, labels_path = sample_paths(name)
    image = read_volume(image_path)
    labels = read_labels(labels_path, like=image)
    return Sample(image, labels, class_names(name), image_path, labels_path)
