"""SamPredictor for volumes: pay the encoder once per slice, then predict per prompt.

All prompt coordinates are in volume pixel units of the current slice, SAM-style: points are (x, y) =
(column, row) and boxes are (x_min, y_min, x_max, y_max). napari's (row, col) are converted by
``engine.prompts``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..devices import autocast_context, autocast_dtype, dtype_name
from ..models.registry import LoadedModel, ModelIdentity
from ..volume import Volume, Window, choose_window
from .cache import CacheKey, EmbeddingCache, volume_content_hash
from .fast_decoder import FastMaskDecoder, supports
from .onnx_encoder import enabled_by_environment as onnx_encoder_enabled, onnx_encoder_for

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


class Cancelled(Exception):
    """Raised inside long work when the caller's cancel check says stop."""


class ModelChanged(Cancelled):
    """The model's encoder changed (an adapter switch) while slices were being encoded for the old one.

    The embeddings of the old network are dropped, never filed under the new identity; the caller may encode again.
    """


CPU_BATCH_SIZE = 2  # slices per encoder pass on a CPU: larger batches are no faster there, only bigger
MAX_BATCH_SIZE = 32
# Rough peak activation memory of one image through each encoder under fp16/bf16 autocast, from the
# attention sizes (SAM's ViTs materialise the 4096x4096 global attention of a 1024 px input per head; TinyViT
# uses windowed attention and grows with the pixel count). Estimates, deliberately on the high side: a batch
# size is then sized to half of the free memory, so the encoder never runs out of memory on a shared GPU.
ENCODER_BYTES_PER_IMAGE = {"tiny_vit": 96 << 20, "vit_b": 1536 << 20, "vit_l": 2048 << 20, "vit_h": 2560 << 20}
TINY_VIT_REFERENCE_INPUT = 256


def batch_size_for_memory(free_bytes: int, bytes_per_image: int, headroom: float = 0.5,
                          maximum: int = MAX_BATCH_SIZE) -> int:
    """How many slices to encode at once: ``headroom`` of the free accelerator memory, at least 1."""
    if bytes_per_image <= 0:
        raise ValueError(f"bytes_per_image must be positive, got {bytes_per_image}")
    return int(max(1, min(maximum, (free_bytes * headroom) // bytes_per_image)))


def encoder_bytes_per_image(family: str, input_size: int) -> int:
    """The estimated peak encoder memory of one image (see ``ENCODER_BYTES_PER_IMAGE``)."""
    per_image = ENCODER_BYTES_PER_IMAGE.get(family, ENCODER_BYTES_PER_IMAGE["vit_h"])
    if family == "tiny_vit":
        per_image = per_image * (input_size / TINY_VIT_REFERENCE_INPUT) ** 2
    return int(per_image)


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA or MPS device now (None on the CPU, or when the backend cannot say)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "mps":
            # MPS shares system memory: what Metal recommends for this process, minus what it holds already.
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    except (AttributeError, RuntimeError):
        return None
    return None


def default_batch_size(model: LoadedModel) -> int:
    """Encoder batch size for ``model`` on its device: sized to free memory on a GPU, small on a CPU."""
    free = free_device_memory(model.device)
    if free is None:
        return CPU_BATCH_SIZE if model.device.type == "cpu" else 1
    return batch_size_for_memory(free, encoder_bytes_per_image(model.spec.family, model.preprocessing.input_size))


@dataclass
class Prediction:
    """One predicted object on one slice."""

    mask: np.ndarray  # (H, W) bool
    score: float  # the decoder's predicted IoU
    low_res_logits: torch.Tensor  # (1, h, w) float32: feed back as ``mask_input`` to refine


class VolumePredictor:
    """Encodes slices of one volume on demand (through an ``EmbeddingCache``) and decodes prompts.

    ``encoder_calls`` counts image-encoder forward passes, so tests can prove a click never re-encodes.
    """

    def __init__(self, model: LoadedModel, volume: Volume, window: str | tuple[float, float] | Window = "auto",
                 cache: EmbeddingCache | None = None, precision: str = "auto", batch_size: int | None = None):
        self.model = model
        self.volume = volume
        self.window = window if isinstance(window, Window) else choose_window(volume.array, window)
        # "auto" lets engine.window_choice pick a window per prompt (e.g. a lung window for a lesion in air).
        self.window_is_automatic = isinstance(window, str) and window == "auto"
        self.cache = cache if cache is not None else EmbeddingCache()
        self.encoder_dtype = autocast_dtype(model.device, precision)
        # fp32 on a CPU runs the base encoder through ONNX Runtime (engine.onnx_encoder); False: torch eager.
        self.use_onnx_encoder = onnx_encoder_enabled()
        self.batch_size = batch_size or default_batch_size(model)
        self.volume_hash = volume_content_hash(volume.array)
        self.encoder_calls = 0
        self.encoded_slices = 0
        self.last_decode_ms = float("nan")
        self._current_slice: int | None = None
        # On a CPU the mask decoder's arithmetic, laid out for clicks, is ~4x faster than the stock module
        # (engine.fast_decoder); accelerators run the stock decoder under autocast. None: stock decoder.
        self.fast_decoder = (FastMaskDecoder(self.encoder_dtype or torch.float32)
                             if model.device.type == "cpu" and supports(model.sam.mask_decoder) else None)

    # -- geometry and keys -----------------------------------------------------------------------
    @property
    def slice_shape(self) -> tuple[int, int]:
        return int(self.volume.shape[1]), int(self.volume.shape[2])

    @property
    def cache_key(self) -> CacheKey:
        """The key of this volume's embeddings for the model as it is now."""
        return self.key_for(self.model.identity)

    def key_for(self, identity: ModelIdentity) -> CacheKey:
        """The key of this volume's embeddings computed by the network ``identity`` names."""
        return CacheKey(self.volume_hash, identity.base_model_id, identity.encoder_adapter_id, self.window.key,
                        self.volume.file_axes[0], self.precision_name)

    @property
    def precision_name(self) -> str:
        return dtype_name(self.encoder_dtype)

    def slice_image(self, slice_index: int) -> np.ndarray:
        """The windowed slice in [0, 1] float32: (H, W), or (H, W, 3) for a multi-channel volume.

        Only this slice is read from the volume and converted to float (memory-mapped files stay lazy).
        A two-channel volume's third model channel is the mean of the two.
        """
        self._check_slice(slice_index)
        image = self.window.apply(self.volume.array[slice_index])
        if image.ndim == 3 and image.shape[-1] == 2:
            image = np.concatenate([image, image.mean(axis=-1, keepdims=True)], axis=-1)
        return image

    def slice_intensity(self, slice_index: int) -> np.ndarray:
        """(H, W) float32 in [0, 1]: the windowed slice, or its brightest channel (where the body is)."""
        image = self.slice_image(slice_index)
        return image.max(axis=-1) if image.ndim == 3 else image

    def _check_slice(self, slice_index: int) -> None:
        if not 0 <= int(slice_index) < self.volume.num_slices:
            raise IndexError(f"slice index {slice_index} is out of range 0..{self.volume.num_slices - 1}")

    # -- encoding --------------------------------------------------------------------------------
    def is_encoded(self, slice_index: int) -> bool:
        return self.cache.contains(self.cache_key, slice_index)

    def embedding(self, slice_index: int) -> torch.Tensor:
        """The (1, C, h, w) float32 image embedding of a slice, encoding it only if it is not cached."""
        self._check_slice(slice_index)
        identity = self.model.identity
        cached = self.cache.get(self.key_for(identity), slice_index)
        if cached is None:
            # Rounded as the cache stores it, so a slice decodes the same before and after a cache hit.
            cached = self._encode_batch_as([int(slice_index)], identity)[0].to(torch.float16)
        return cached.to(self.model.device, torch.float32).unsqueeze(0)

    @torch.inference_mode()
    def encode_batch(self, images_01: np.ndarray) -> torch.Tensor:
        """Run the image encoder on (B, H, W) windowed slices; returns (B, C, h, w) float32 embeddings."""
        inputs = self.model.preprocessing.image_to_tensor(images_01).to(self.model.device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        runtime = self.onnx_encoder()
        if runtime is not None:
            embeddings = runtime(inputs)
        else:
            with autocast_context(self.model.device, self.encoder_dtype):
                embeddings = self.model.sam.image_encoder(inputs)
        self.encoder_calls += 1
        return embeddings.float()

    def onnx_encoder(self):
        """The ONNX Runtime encoder where it applies now (fp32 on a CPU, base encoder), else None: torch eager."""
        return onnx_encoder_for(self.model) if self.encoder_dtype is None and self.use_onnx_encoder else None

    @property
    def encoder_runtime(self) -> str:
        """What runs the image encoder now: "onnxruntime" or "torch"."""
        return "onnxruntime" if self.onnx_encoder() is not None else "torch"

    def encode_slices(self, slice_indices, progress: ProgressCallback | None = None,
                      should_cancel: CancelCheck | None = None, skip_cached: bool = True) -> int:
        """Encode and cache the given slices in batches; returns how many were encoded.

        ``progress(done, total)`` is called after each batch; ``should_cancel()`` is checked between
        batches and raises ``Cancelled`` (slices finished so far stay cached). The model's identity is taken
        now: if an adapter switch changes the encoder before a later batch, ``ModelChanged`` is raised and
        nothing more is stored.
        """
        identity = self.model.identity
        key = self.key_for(identity)
        indices = [int(index) for index in slice_indices]
        for index in indices:
            self._check_slice(index)
        if skip_cached:
            indices = [index for index in indices if not self.cache.contains(key, index)]
        total = len(indices)
        done = 0
        if progress:
            progress(0, total)
        for start in range(0, total, self.batch_size):
            if should_cancel is not None and should_cancel():
                raise Cancelled(f"encoding cancelled after {done} of {total} slices")
            batch = indices[start:start + self.batch_size]
            if skip_cached:
                batch = [index for index in batch if not self.cache.contains(key, index)]
            if batch:
                self._encode_batch_as(batch, identity)
            done = min(start + self.batch_size, total)
            if progress:
                progress(done, total)
        return total

    def _encode_batch_as(self, slice_indices: list[int], identity: ModelIdentity) -> list[torch.Tensor]:
        """Encode slices with the network ``identity`` names and cache them under its key; (C, h, w) each.

        The model's lock is held for the pass (one encoder pass at a time: each already uses every core), and an
        adapter switch takes the same lock, so the identity checked here is the network that runs.
        """
        images = np.stack([self.slice_image(index) for index in slice_indices])
        key = self.key_for(identity)
        with self.model.lock:
            if self.model.identity.encoder_key() != identity.encoder_key():
                raise ModelChanged(f"the model changed to {self.model.identity} while encoding for {identity}")
            embeddings = self.encode_batch(images)
            for index, embedding in zip(slice_indices, embeddings):
                self.cache.put(key, index, embedding)
        self.encoded_slices += len(slice_indices)
        return list(embeddings)

    def encode_volume(self, progress: ProgressCallback | None = None, should_cancel: CancelCheck | None = None,
                      slice_indices=None) -> int:
        """Precompute embeddings for the whole volume (or the given slices)."""
        indices = range(self.volume.num_slices) if slice_indices is None else slice_indices
        return self.encode_slices(indices, progress=progress, should_cancel=should_cancel)

    # -- prompting -------------------------------------------------------------------------------
    def set_slice(self, slice_index: int) -> None:
        """Make ``slice_index`` the current slice, encoding it if needed (SamPredictor.set_image)."""
        self.embedding(slice_index)
        self._current_slice = int(slice_index)

    @property
    def current_slice(self) -> int | None:
        return self._current_slice

    def predict(self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                box: np.ndarray | None = None, mask_input: torch.Tensor | None = None, multimask_output: bool = False,
                slice_index: int | None = None) -> Prediction:
        """Predict one object on the current slice (or ``slice_index``) from points and/or a box.

        ``point_coords`` (N, 2) as (x, y) pixels with ``point_labels`` (N,) 1 = positive, 0 = negative;
        ``box`` (4,) as (x_min, y_min, x_max, y_max); ``mask_input`` (1, h, w) low-res logits from a
        previous prediction. With ``multimask_output`` the best of SAM's three masks is returned.
        """
        slice_index = self._resolve_slice(slice_index)
        points = None if point_coords is None else np.asarray(point_coords, dtype=np.float32).reshape(1, -1, 2)
        labels = None if point_labels is None else np.asarray(point_labels, dtype=np.float32).reshape(1, -1)
        boxes = None if box is None else np.asarray(box, dtype=np.float32).reshape(1, 4)
        masks = None if mask_input is None else mask_input.reshape(1, 1, *mask_input.shape[-2:])
        logits, scores, low_res = self.decode(slice_index, points, labels, boxes, masks, multimask_output)
        best = int(torch.argmax(scores[0]))
        return Prediction((logits[0, best] > 0).cpu().numpy(), float(scores[0, best]), low_res[0, best:best + 1])

    def predict_boxes(self, boxes: np.ndarray, slice_index: int | None = None,
                      mask_inputs: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Several objects on one slice in one decoder pass: (N, 4) xyxy boxes -> (N, H, W) bool, (N,) IoU."""
        slice_index = self._resolve_slice(slice_index)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, *self.slice_shape), bool), np.zeros(0, np.float32)
        logits, scores, _ = self.decode(slice_index, None, None, boxes, mask_inputs, False)
        return (logits[:, 0] > 0).cpu().numpy(), scores[:, 0].cpu().numpy()

    def _resolve_slice(self, slice_index: int | None) -> int:
        if slice_index is None:
            if self._current_slice is None:
                raise RuntimeError("no slice is set: call set_slice(index) or pass slice_index")
            return self._current_slice
        self._check_slice(slice_index)
        return int(slice_index)

    @torch.inference_mode()
    def decode(self, slice_index: int, points_xy: np.ndarray | None, point_labels: np.ndarray | None,
               boxes_xyxy: np.ndarray | None, mask_inputs: torch.Tensor | None, multimask_output: bool,
               output_shape: tuple[int, int] | None = None,
               min_score: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prompt encoder + mask decoder on one slice.

        ``points_xy`` (B, N, 2), ``point_labels`` (B, N), ``boxes_xyxy`` (B, 4), ``mask_inputs`` (B, 1, h, w).
        Returns slice-grid logits (B, K, H, W) (or on ``output_shape``), predicted IoU (B, K) and low-res
        logits (B, K, h, w). With ``min_score`` the masks of prompts whose predicted IoUs are all below it
        may be left uncomputed (background), which automatic segmentation, filtering on the IoU, allows.
        """
        started = time.perf_counter()
        sam = self.model.sam
        device = self.model.device
        height, width = self.slice_shape
        preprocessing = self.model.preprocessing
        embedding = self.embedding(slice_index)
        point_prompt, box_prompt = preprocessing.prompt_tensors(height, width, device, points_xy, point_labels,
                                                                boxes_xyxy)
        if mask_inputs is not None:
            mask_inputs = mask_inputs.to(device, torch.float32)
        if self.fast_decoder is not None and not sam.mask_decoder.training:
            sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=mask_inputs)
            low_res, iou = self.fast_decoder(sam, embedding, sparse, dense if mask_inputs is not None else None,
                                             multimask_output, image_key=(self.cache_key, slice_index),
                                             min_score=min_score)
        else:
            low_res, iou = self._stock_decode(embedding, point_prompt, box_prompt, mask_inputs, multimask_output)
        logits = preprocessing.logits_to_slice(low_res, height, width, output_shape)
        self.last_decode_ms = (time.perf_counter() - started) * 1000.0
        return logits, iou, low_res

    def _stock_decode(self, embedding: torch.Tensor, point_prompt, box_prompt, mask_inputs, multimask_output: bool):
        """segment-anything's prompt encoder and mask decoder modules, as they are."""
        sam = self.model.sam
        device = self.model.device
        # The decoder runs under the same reduced precision as the encoder: on CPUs with native bf16 this
        # cuts a click by about a quarter and leaves >99.9 % of mask pixels unchanged (see the benchmark).
        with autocast_context(device, self.encoder_dtype):
            sparse, dense = sam.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=mask_inputs)
            low_res, iou = sam.mask_decoder(image_embeddings=embedding, image_pe=self._dense_positional_encoding(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=multimask_output)
        return low_res.float(), iou.float()

    def _dense_positional_encoding(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid: the same for every click."""
        encoder = self.model.sam.prompt_encoder
        cached = getattr(self, "_positional_encoding", None)
        if cached is None or cached[0] is not encoder or cached[1].device != self.model.device or encoder.training:
            cached = (encoder, encoder.get_dense_pe())
            self._positional_encoding = cached
        return cached[1]

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict:
        """What the widget's status line shows."""
        cached = len(self.cache.cached_slices(self.cache_key, self.volume.num_slices))
        return {"device": str(self.model.device), "dtype": self.precision_name, "cached_slices": cached,
                "num_slices": self.volume.num_slices, "cache_mb": self.cache.memory_bytes / 2**20,
                "last_ms": self.last_decode_ms}
