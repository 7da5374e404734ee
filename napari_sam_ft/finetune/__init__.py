"""Few-shot fine-tuning of SAM on the user's annotations: LoRA / decoder / full scopes, adapters on disk.

``data`` turns annotated slices into training data, ``train`` runs ``train_adapter`` (shared by the CLI
and the napari panel), ``adapters`` saves, loads, switches and unloads adapters on a live model.
"""

from .adapters import AdapterError, AdapterInfo, active_adapter, load_adapter, read_adapter_info, unload_adapter
from .data import FinetuneDataError, TrainingData, VolumeAnnotations, annotated_slices, build_training_data
from .scopes import SCOPES, LoraSettings
from .train import TRAINING_PROMPT_MODES, TrainingResult, TrainSettings, train_adapter

__all__ = [
    "AdapterError", "AdapterInfo", "FinetuneDataError", "LoraSettings", "SCOPES", "TRAINING_PROMPT_MODES",
    "TrainSettings", "TrainingData", "TrainingResult", "VolumeAnnotations", "active_adapter", "annotated_slices",
    "build_training_data", "load_adapter", "read_adapter_info", "train_adapter",
    "unload_adapter",
]
