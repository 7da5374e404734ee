"""The model, predictor and adapter behind one segment widget: built in a worker, rebuilt when a choice changes.

Each widget owns one ``SegmentSession`` (no module-level state). The GUI thread only reads
``ready_predictor(choices)``; ``build(choices, volume)`` loads weights, hashes the volume and applies an
adapter, so it runs in a background task.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..devices import select_device
from ..engine.cache import EmbeddingCache, default_cache_dir
from ..engine.predictor import VolumePredictor
from ..scan_jobs import predictor_for
from ..finetune.adapters import AdapterError, load_adapter, unload_adapter
from ..models.registry import LoadedModel, load_model
from ..volume import Volume

NO_ADAPTER = "none"


@dataclass(frozen=True)
class SessionChoices:
    """What the user picked in the widget; a predictor is reused only for the same choices."""

    model_name: str
    checkpoint: str  # "" = the model's embedded weights
    device: str
    window: str
    adapter_dir: str = NO_ADAPTER

    @property
    def model_key(self) -> tuple[str, str, str]:
        return self.model_name, self.checkpoint, self.device


class SegmentSession:
    """Loaded model + volume predictor for the current choices, with one embedding cache for all of them."""

    def __init__(self, cache: EmbeddingCache | None = None):
        # Disk tier under the user cache dir: reopening the same scan with the same model encodes nothing.
        self.cache = cache if cache is not None else EmbeddingCache(disk_dir=default_cache_dir())
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None
        self._model_key: tuple[str, str, str] | None = None
        self._applied_adapter = NO_ADAPTER
        self._predictor: VolumePredictor | None = None
        self._built: SessionChoices | None = None

    def ready_predictor(self, choices: SessionChoices, volume: Volume) -> VolumePredictor | None:
        """The predictor for ``choices`` and ``volume`` if it is already built, else None (never blocks)."""
        predictor = self._predictor
        if self._built == choices and predictor is not None and predictor.volume is volume:
            return predictor
        return None

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def build(self, choices: SessionChoices, volume: Volume) -> VolumePredictor:
        """Load the model (if its name, checkpoint or device changed), apply the adapter, make the predictor.

        Slow (seconds): call it from a worker. Raises ``CheckpointError``, ``RuntimeError`` (device) or
        ``AdapterError`` with a message for the user.
        """
        with self._lock:
            if self._built == choices and self._predictor is not None and self._predictor.volume is volume:
                return self._predictor
            if self._model is None or self._model_key != choices.model_key:
                self._model, self._predictor, self._built = None, None, None
                device = select_device(choices.device)
                self._model = load_model(choices.model_name, choices.checkpoint or None, device)
                self._model_key = choices.model_key
                self._applied_adapter = NO_ADAPTER
            if self._applied_adapter != choices.adapter_dir:
                self._apply_adapter(choices.adapter_dir)
            predictor = self._predictor
            built = self._built
            if (predictor is None or built is None or built.window != choices.window or predictor.volume is not volume
                    or built.adapter_dir != choices.adapter_dir or predictor.model is not self._model):
                # The same predictor_for as the CLI and batch: an adapter's training window is applied under
                # "auto", and an explicit window that differs is refused with AdapterError.
                predictor = predictor_for(self._model, volume, choices.window, self.cache)
            self._predictor, self._built = predictor, choices
            return predictor

    def _apply_adapter(self, adapter_dir: str) -> None:
        if self._applied_adapter != NO_ADAPTER:
            unload_adapter(self._model)
            self._applied_adapter = NO_ADAPTER
        if adapter_dir != NO_ADAPTER:
            try:
                load_adapter(self._model, adapter_dir)
            except Exception as error:
                raise AdapterError(f"cannot use the adapter in {adapter_dir} ({error}); "
                                   "segmenting with the base model") from error
            self._applied_adapter = adapter_dir
