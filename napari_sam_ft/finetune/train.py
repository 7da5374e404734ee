"""Few-shot fine-tuning: one function, ``train_adapter``, shared by the CLI and the napari panel.

The recipe, chosen to finish a 5-slice adapt in minutes on a laptop CPU:

1. **Views.** Every training slice gets ``views_per_slice`` views (the slice itself plus random flips,
   small rotations and scalings and intensity jitter); each view is encoded once with the frozen
   encoder (bf16 autocast where the CPU has native bf16).
2. **Decoder phase.** The decoder side (LoRA on the decoder transformer, the whole decoder, and the
   automatic head) trains on those cached embeddings: no encoder pass per step, so hundreds of steps
   are cheap. This is all of the ``decoder`` scope.
3. **Encoder phase** (``lora`` and ``full``). The encoder's LoRA (or all its weights) joins in: each step
   runs the encoder with gradients on a small batch of views, under bf16 autocast.

The budget is a number of optimisation **steps**, planned from the data (``plan_steps``: more slices and
classes, more steps), never a duration: the same seed and the same steps give the same adapter on a quiet
or a busy CPU, only later. Every random choice is drawn from a generator seeded by (seed, phase, step)
or (seed, phase, epoch), validation runs every ``validate_every`` steps, and early stopping counts
validations, so nothing depends on the clock. An optional wall-clock ``time_limit_s`` may stop a run
early; the result, the progress callback and the adapter's metadata then say so (``stopped:
time_limit``, steps done of planned).

Loss: Dice + cross-entropy (``losses``, MONAI's ``DiceCELoss`` definitions): binary per prompted object;
for the automatic head, softmax over background + K classes with one Dice ratio per class over the whole
batch, for the classes present in it (``batch_dice_ce``).
Optimiser: AdamW, linear warm-up then cosine decay over the phase's planned steps. The best weights (by
validation Dice) are kept and saved, also when the caller cancels.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..devices import autocast_context, autocast_dtype, dtype_name
from ..engine.automatic import channels_outside, class_slice_ranges
from ..engine.onnx_encoder import enabled_by_environment as onnx_encoder_enabled, onnx_encoder_for
from ..engine.prompts import objects_on_slice
from ..models.registry import LoadedModel
from .adapters import (adapter_size_bytes, base_network_copy, check_output_folder, save_adapter,
                       update_adapter_metadata, window_record)
from .augment import AugmentSettings, augment_pair, jittered_box, sampled_points
from .data import AnnotatedSlice, TrainingData, spread_evenly, windowed_per_prompt, zoomed_box_examples
from .heads import ClassHead
from .losses import batch_dice_ce, binary_dice_ce
from .refinement import choose_refined_classes
from .scopes import SCOPES, LoraSettings, TrainableModel, prepare_scope
from .validation import MODE_VALIDATION, PROMPTED_MODES, class_logits, decode_prompts, pad_points, score_slices

# Which prompts an adapter is trained for (``finetune --prompt``); "mixed" = boxes and the no-prompt head.
TRAINING_PROMPT_MODES = ("box", "point", "none", "mixed")
ProgressCallback = Callable[[int, int, dict], None]
CancelCheck = Callable[[], bool]

# Learning rates: LoRA's tuned on the sample CT with 4 training slices; the decoder's and the automatic head's
# on mni152 (three small structures, 11 training slices, 300 decoder steps, held-out automatic Dice):
# decoder 3e-4 / head 5e-3 0.684, 1e-3 / 1e-2 0.746, 2e-3 / 2e-2 0.529 (the head collapses to background
# for ~125 steps). The encoder learns slower than the decoder side: its LoRA at a third, its full weights at
# a tenth.
SCOPE_LEARNING_RATE = {"lora": 3e-3, "decoder": 1e-3, "full": 3e-4}
# Prompted modes start from a decoder that already segments boxes well (on the zoomed crops, mni152's held-out box
# Dice is 0.78 zero-shot): at the automatic head's rate the decoder forgets (box mode, 100 steps: 0.74); at a
# tenth of it, it learns (0.82). LoRA's B matrices start at zero and keep their rate.
PROMPTED_LR_SCALE = {"lora": 1.0, "decoder": 0.1, "full": 0.1}
ENCODER_LR_SCALE = {"lora": 1 / 3, "full": 0.1}
MIXED_AUTOMATIC_SHARE = 0.7
# Separate streams of random numbers, so that changing one phase's length never shifts another's draws.
_STREAM_VIEWS, _STREAM_DECODER, _STREAM_ENCODER, _STREAM_PROBE, _STREAM_ZOOM_VIEWS, _STREAM_WINDOW_VIEWS = 1, 2, 3, 4, 5, 6
STOP_REASONS = ("steps", "converged", "time_limit", "cancelled")


def plan_steps(num_train_slices: int, num_classes: int, scope: str) -> tuple[int, int]:
    """(decoder-phase steps, encoder-phase steps) for a run, from the size of the task.

    The decoder phase learns the head and the decoder side: it needs more steps for more slices (more to
    see) and more classes (more to tell apart), within [300, 400]: a new automatic head finds a small
    structure late (on brain2's lesion, one training slice, the validation Dice stays ~0 for 75 steps; held-out
    Dice 0.32 after 150 steps on the lesion's tip, 0.68 after 300 on its larger slice). The encoder phase
    (lora / full only)
    costs ~10x more per step and refines: a few passes over the training slices, within [12, 30]. The caps
    keep a many-slice lora run near 5 minutes on a quiet 2-core CPU (~0.45 s a decoder step, ~4 s an
    encoder step).
    """
    decoder = int(np.clip(round(30 * num_train_slices * math.sqrt(max(num_classes, 1)), -1), 300, 400))
    encoder = int(np.clip(3 * num_train_slices, 12, 30)) if scope in ("lora", "full") else 0
    return decoder, encoder


@dataclass
class TrainSettings:
    """Everything that shapes a fine-tuning run (stored in the adapter's metadata)."""

    scope: str = "lora"
    prompt_mode: str = "mixed"
    decoder_steps: int | None = None  # None: planned from the data (``plan_steps``)
    encoder_steps: int | None = None  # lora / full; None: planned from the data; 0: no encoder phase
    time_limit_s: float | None = None  # optional wall-clock limit; a run it stops says so everywhere
    validate_every: int = 25  # decoder-phase steps between validations
    encoder_validate_every: int = 6  # encoder-phase steps between validations (each re-encodes)
    batch_size: int = 2
    views_per_slice: int = 6
    max_objects_per_slice: int = 3
    learning_rate: float | None = None  # None: SCOPE_LEARNING_RATE[scope]
    head_learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    patience: int = 4  # validations without improvement before a phase stops
    min_improvement: float = 1e-3
    # Automatic mode: train (and later infer) on the window around the annotations (``FieldOfView``),
    # magnified to the model's input, instead of the whole slice: small structures get several times the pixels.
    crop_to_annotations: bool = True
    # Box mode: train on the slices as an adapter that zooms decodes them (``finetune.data.zoomed_box_examples``:
    # each small object on the zoomed crop a box around it is decoded on, ``zoom_views_per_object`` views of each),
    # so that with the adapter small boxes are zoomed as with the base model.
    zoom_small_boxes: bool = True
    zoom_views_per_object: int = 2
    zoom_crops_per_slice: int = 6  # at most this many small objects per slice are learnt (and validated) zoomed
    seed: int = 0
    precision: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def check(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.prompt_mode not in TRAINING_PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.prompt_mode!r}; "
                             f"choose one of {', '.join(TRAINING_PROMPT_MODES)}")
        for name in ("decoder_steps", "encoder_steps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.decoder_steps == 0 and (self.scope == "decoder" or self.encoder_steps == 0):
            raise ValueError("nothing to train: decoder_steps is 0 and there is no encoder phase")
        if min(self.batch_size, self.views_per_slice, self.validate_every, self.encoder_validate_every,
               self.zoom_views_per_object, self.zoom_crops_per_slice) < 1:
            raise ValueError("batch_size, views_per_slice, zoom_views_per_object, zoom_crops_per_slice and the "
                             "validation intervals must be at least 1")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"the time limit must be positive, got {self.time_limit_s}")

    @property
    def uses_head(self) -> bool:
        return self.prompt_mode in ("none", "mixed")

    @property
    def validation_modes(self) -> tuple[str, ...]:
        return MODE_VALIDATION[self.prompt_mode]

    @property
    def crops(self) -> bool:
        """Only the automatic head trains on the window: prompts are given on whole slices at inference."""
        return self.crop_to_annotations and self.prompt_mode == "none"

    @property
    def zooms(self) -> bool:
        """Only box mode learns the zoomed crops: clicks and the automatic head are not decoded zoomed."""
        return self.zoom_small_boxes and self.prompt_mode == "box"

    def planned_steps(self, data: TrainingData) -> tuple[int, int]:
        """(decoder, encoder) steps this run will take when nothing stops it early."""
        decoder, encoder = plan_steps(len(data.train), len(data.class_ids), self.scope)
        if self.decoder_steps is not None:
            decoder = self.decoder_steps
        if self.scope == "decoder":
            encoder = 0
        elif self.encoder_steps is not None:
            encoder = self.encoder_steps
        return decoder, encoder


@dataclass
class TrainingResult:
    adapter_dir: Path | None  # None when cancelled before anything was trained
    adapter_id: str | None
    val_dice_before: dict[str, float]
    val_dice_after: dict[str, float]
    trainable_parameters: int
    seconds: float
    steps: int
    stopped: str  # one of STOP_REASONS
    adapter_bytes: int = 0
    history: list[dict] = field(default_factory=list)
    steps_planned: int = 0
    step_seconds: float = 0.0  # measured mean seconds per remaining step, for "N more steps would take ..."

    @property
    def cancelled(self) -> bool:
        return self.stopped == "cancelled"

    @property
    def warning(self) -> str:
        """A loud sentence when the run stopped before its plan for a reason other than convergence."""
        if self.stopped not in ("time_limit", "cancelled"):
            return ""
        missing = max(self.steps_planned - self.steps, 0)
        why = "time limit" if self.stopped == "time_limit" else "cancelled"
        return (f"STOPPED EARLY ({why}) after {self.steps} of {self.steps_planned} planned steps: the validation "
                f"Dice is that of an unfinished run; {missing} more steps (about {missing * self.step_seconds:.0f} s "
                "at this speed) would finish the plan (raise or remove the time limit and train again)")


@dataclass
class _View:
    """One (possibly augmented) training view with its cached encoder input and frozen embedding."""

    slice_ref: AnnotatedSlice
    image_01: np.ndarray
    labels: np.ndarray
    embedding: torch.Tensor | None = None  # (256, 64, 64) float16 (as the engine caches it), frozen encoder


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


_PER_STEP, _PER_EPOCH = 0, 1


def _same_shape_batches(views: list[_View], size: int) -> list[list[_View]]:
    """``views`` in order, cut into batches of at most ``size`` views of one image shape (a batch is one tensor)."""
    batches: list[list[_View]] = []
    for view in views:
        if batches and len(batches[-1]) < size and batches[-1][0].image_01.shape == view.image_01.shape:
            batches[-1].append(view)
        else:
            batches.append([view])
    return batches


def _generator(seed: int, stream: int, index: int, per: int = _PER_STEP) -> np.random.Generator:
    """The random numbers of one step (or epoch) of a stream: a function of the seed and the index only."""
    return np.random.default_rng([seed, stream, per, index])


class _Trainer:
    """State of one run; ``train_adapter`` is its only user."""

    def __init__(self, model: LoadedModel, data: TrainingData, settings: TrainSettings,
                 progress: ProgressCallback | None, should_cancel: CancelCheck | None):
        self.model = model
        self.data = data
        self.settings = settings
        self.progress = progress
        self.should_cancel = should_cancel
        self.device = model.device
        self.preprocessing = model.preprocessing
        self.dtype = autocast_dtype(self.device, settings.precision)  # encoding, as the engine does
        # Gradients in fp16 need loss scaling; train in fp32 there and use bf16 where the hardware has it.
        self.train_dtype = None if self.dtype == torch.float16 else self.dtype
        self.started = time.perf_counter()
        self.step = 0
        self.planned = settings.planned_steps(data)  # (decoder, encoder)
        self.history: list[dict] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn from torch's global generator
            self.trainable: TrainableModel = prepare_scope(base_network_copy(model), settings.scope, settings.lora,
                                                           copy_network=False)
        self.sam = self.trainable.sam
        # A run that never changes the encoder (decoder scope) encodes as the engine does in fp32 on a CPU: through
        # the base model's ONNX Runtime export (equal to eager to ~3e-6, ~1.4x faster on a 2-core CPU without bf16),
        # so training sees the embeddings inference will use.
        self.frozen_encoder = (onnx_encoder_for(model) if self.dtype is None and onnx_encoder_enabled()
                               and not any(p.requires_grad for p in self.sam.image_encoder.parameters()) else None)
        self.head = (ClassHead.from_decoder(self.sam.mask_decoder, len(data.class_ids), seed=settings.seed)
                     if settings.uses_head else None)
        self.best_score = -math.inf
        self.best_scores: dict[str, float] = {}
        self.best_state: tuple[dict, dict | None] | None = None
        self.views: list[_View] = []
        # Validation scores what inference will decode: with zoom, each small object on its crop.
        # Prompted modes on a CT left on the automatic window learn each object in the window the engine will
        # choose for its box (``finetune.data.windowed_per_prompt``), and the adapter then keeps that choice.
        self.windows_per_prompt = settings.prompt_mode in PROMPTED_MODES and any(
            example.raw is not None for example in (*data.train, *data.validation))
        self.validation_examples: list[AnnotatedSlice] = [
            piece for example in data.validation for piece in self.decoded_pieces(example) if piece.labels.any()
        ] if settings.zooms or self.windows_per_prompt else list(data.validation)
        self.validation_embeddings: list[torch.Tensor] = []
        # The classes the automatic head may not give on each validation slice, as inference will exclude them
        # there: those whose slice range in the saved field of view does not hold the slice.
        self.validation_outside_channels = [
            channels_outside(class_slice_ranges(data.fields_of_view[example.volume_index].to_json(), data.class_ids),
                             example.slice_index) if data.fields_of_view else []
            for example in self.validation_examples]
        # Measured seconds (for the estimate and the ETA only: they never steer training).
        self.seconds_per_step = {"decoder": None, "encoder": None}
        self.seconds_per_validation = {"decoder": 0.0, "encoder": 0.0}
        self.done = {"decoder": 0, "encoder": 0}

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def total_planned(self) -> int:
        return sum(self.planned)

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise _Stop("cancelled")

    def check_time_limit(self) -> None:
        limit = self.settings.time_limit_s
        if limit is not None and self.elapsed >= limit:
            raise _Stop("time_limit")

    def remaining_seconds(self) -> float:
        """Estimated seconds to finish the plan from here (steps left x measured step time + validations)."""
        total = 0.0
        intervals = {"decoder": self.settings.validate_every, "encoder": self.settings.encoder_validate_every}
        for phase, planned in zip(("decoder", "encoder"), self.planned):
            left = max(planned - self.done[phase], 0)
            per_step = self.seconds_per_step[phase] or 0.0
            total += left * per_step + math.ceil(left / intervals[phase]) * self.seconds_per_validation[phase]
        return total

    def mean_step_seconds(self) -> float:
        decoder, encoder = self.planned
        left = {"decoder": max(decoder - self.done["decoder"], 0), "encoder": max(encoder - self.done["encoder"], 0)}
        if not sum(left.values()):
            return self.seconds_per_step["decoder"] or 0.0
        return self.remaining_seconds() / sum(left.values())

    def report(self, metrics: dict) -> None:
        total = self.total_planned
        metrics = {"elapsed_s": self.elapsed, "fraction": min(self.step / max(total, 1), 1.0),
                   "steps_planned": total, "eta_s": self.remaining_seconds(), **metrics}
        self.history.append({"step": self.step, **metrics})
        if self.progress is not None:
            self.progress(self.step, total, metrics)

    def trainable_parameters(self) -> int:
        head = sum(parameter.numel() for parameter in self.head.parameters()) if self.head is not None else 0
        return self.trainable.trainable_count() + head

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, images_01: list[np.ndarray]) -> torch.Tensor:
        """(B, 256, 64, 64) float32 embeddings from the training copy's encoder, with autograd if enabled (or from
        its ONNX Runtime export, ``frozen_encoder``, where the run never changes it).

        The same input preparation, runtime and autocast as ``VolumePredictor.encode_batch`` (and, without
        autograd, the cache's float16 rounding), so validation scores match what the engine will
        compute with the saved adapter.
        """
        inputs = self.preprocessing.image_to_tensor(np.stack(images_01)).to(self.device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        dtype = self.train_dtype if torch.is_grad_enabled() else self.dtype
        if self.frozen_encoder is not None:
            embeddings = self.frozen_encoder(inputs)
        else:
            with autocast_context(self.device, dtype):
                embeddings = self.sam.image_encoder(inputs)
        if not torch.is_grad_enabled():
            # The engine's embedding cache keeps float16: score and train on what inference will see.
            embeddings = embeddings.half()
        return embeddings.float()

    def as_decoded(self, example: AnnotatedSlice) -> tuple[list[AnnotatedSlice], list[AnnotatedSlice]]:
        """The slice as inference decodes it -> (wholes, crops): one whole slice per window its prompts are
        decoded in (one, unless windows are chosen per prompt) and, zooming, each small object on its crop (at
        most ``zoom_crops_per_slice`` of them, spread over the slice's)."""
        windowed = windowed_per_prompt(example, self.data.class_ids) if self.windows_per_prompt else [example]
        if not self.settings.zooms:
            return windowed, []
        wholes, crops = [], []
        for piece in windowed:
            whole, piece_crops = zoomed_box_examples(piece, self.data.class_ids)
            wholes.append(whole)
            crops += piece_crops
        return wholes, spread_evenly(crops, self.settings.zoom_crops_per_slice)

    def decoded_pieces(self, example: AnnotatedSlice) -> list[AnnotatedSlice]:
        """``as_decoded`` as one list: the whole slices, then the crops."""
        wholes, crops = self.as_decoded(example)
        return [*wholes, *crops]

    def build_views(self) -> None:
        allow_flips = self.settings.prompt_mode in PROMPTED_MODES
        seed = self.settings.seed
        for slice_position, example in enumerate(self.data.train):
            wholes, crops = self.as_decoded(example)
            # Each piece draws from its own stream, so that zooming or windows never shift the whole slice's draws.
            pieces = [(whole, _generator(seed, _STREAM_VIEWS, slice_position) if number == 0 else
                       np.random.default_rng([seed, _STREAM_WINDOW_VIEWS, slice_position, number]),
                       self.settings.views_per_slice) for number, whole in enumerate(wholes)]
            pieces += [(crop, np.random.default_rng([seed, _STREAM_ZOOM_VIEWS, slice_position, crop_number]),
                        self.settings.zoom_views_per_object) for crop_number, crop in enumerate(crops, start=1)]
            for piece, rng, views in pieces:
                if (self.settings.zooms or self.windows_per_prompt) and not piece.labels.any():
                    continue  # a whole slice whose objects are all zoomed: nothing to prompt on it
                self.views.append(_View(example, piece.image_01, piece.labels))
                for _ in range(views - 1):
                    image, labels = augment_pair(piece.image_01, piece.labels, rng, self.settings.augment,
                                                 allow_flips=allow_flips)
                    if labels.any() or not piece.labels.any():  # keep views whose objects survived the transform
                        self.views.append(_View(example, image, labels))
        pending = list(self.views)
        to_encode = len(pending) + len(self.validation_examples)
        encoded = 0
        encoding_started = time.perf_counter()
        with torch.no_grad():
            for chunk in _same_shape_batches(pending, max(1, self.settings.batch_size)):
                self.check_cancel()
                for view, embedding in zip(chunk, self.encode([view.image_01 for view in chunk])):
                    view.embedding = embedding.half()  # exact: ``encode`` rounded it to float16 already
                encoded += len(chunk)
                self.report({"phase": "encoding", "encoded": encoded, "to_encode": to_encode})
            for example in self.validation_examples:
                self.check_cancel()
                self.validation_embeddings.append(self.encode([example.image_01]))
                encoded += 1
                self.report({"phase": "encoding", "encoded": encoded, "to_encode": to_encode})
        self.seconds_per_image = (time.perf_counter() - encoding_started) / max(encoded, 1)

    # -- losses ----------------------------------------------------------------------------------------
    def prompted_loss(self, embedding: torch.Tensor, labels: np.ndarray, kind: str,
                      rng: np.random.Generator) -> torch.Tensor | None:
        """Binary Dice+CE of up to ``max_objects_per_slice`` simulated prompts on one view."""
        objects = objects_on_slice(labels, self.data.class_ids)
        if not objects:
            return None
        if len(objects) > self.settings.max_objects_per_slice:
            picks = rng.choice(len(objects), self.settings.max_objects_per_slice, replace=False)
            objects = [objects[index] for index in sorted(picks)]
        masks = np.stack([mask for _, mask in objects])
        height, width = labels.shape
        if kind == "box":
            boxes = np.stack([jittered_box(mask, rng) for mask in masks])
            logits = decode_prompts(self.sam, self.preprocessing, embedding, height, width, boxes_xyxy=boxes)
        else:
            coords, point_labels = pad_points([sampled_points(mask, rng) for mask in masks])
            logits = decode_prompts(self.sam, self.preprocessing, embedding, height, width, points_xy=coords,
                                    point_labels=point_labels)
        target = torch.from_numpy(masks[:, None].astype(np.float32)).to(self.device)
        return binary_dice_ce(logits.float(), target)

    def batch_loss(self, embeddings: torch.Tensor, views: list[_View], rng: np.random.Generator) -> torch.Tensor:
        """Mean loss of a batch: the automatic head on all views, or simulated prompts per view.

        In ``mixed`` mode a step trains one of the two, the automatic head more often: it starts from
        scratch while prompted SAM starts out good, and a step on one costs half a step on both.
        """
        mode = self.settings.prompt_mode
        if mode == "mixed":
            mode = "none" if rng.random() < MIXED_AUTOMATIC_SHARE else ("box" if rng.random() < 2 / 3 else "point")
        losses = []
        with autocast_context(self.device, self.train_dtype):
            if mode == "none":
                shapes = [view.labels.shape for view in views]
                logits = class_logits(self.head, self.sam, self.preprocessing, embeddings, shapes)
                targets = [torch.from_numpy(self.data.class_indices(view.labels)).to(self.device) for view in views]
                losses.append(batch_dice_ce([item.float() for item in logits], targets))
            else:
                for index, view in enumerate(views):
                    loss = self.prompted_loss(embeddings[index:index + 1], view.labels, mode, rng)
                    if loss is not None:
                        losses.append(loss)
        if not losses:
            return torch.zeros((), device=self.device, requires_grad=True)
        return torch.stack(losses).mean()

    # -- validation ------------------------------------------------------------------------------------
    def validate(self, embeddings: list[torch.Tensor] | None = None) -> dict[str, float]:
        if embeddings is None:
            with torch.no_grad():
                embeddings = [self.encode([example.image_01]) for example in self.validation_examples]
        return score_slices(self.sam, self.preprocessing, embeddings,
                            [example.labels for example in self.validation_examples], self.data.class_ids,
                            self.settings.validation_modes, head=self.head,
                            outside_channels=self.validation_outside_channels)

    def keep_if_best(self, scores: dict[str, float]) -> bool:
        score = float(np.nanmean(list(scores.values())))
        if self.best_state is None or score > self.best_score + self.settings.min_improvement:
            self.best_score = score
            self.best_scores = dict(scores)
            head_state = ({key: value.detach().clone() for key, value in self.head.state_dict().items()}
                          if self.head is not None else None)
            self.best_state = (self.trainable.adapter_state(), head_state)
            return True
        return False

    def restore_best(self) -> None:
        weights, head_state = self.best_state
        self.trainable.load_adapter_state(weights)
        if self.head is not None:
            self.head.load_state_dict(head_state)

    # -- optimisation ----------------------------------------------------------------------------------
    def optimizer(self, include_encoder: bool) -> torch.optim.Optimizer:
        settings = self.settings
        base_lr = settings.learning_rate or SCOPE_LEARNING_RATE[settings.scope] * (
            PROMPTED_LR_SCALE[settings.scope] if settings.prompt_mode in PROMPTED_MODES else 1.0)
        encoder, other = [], []
        for name, parameter in self.trainable.named_trainable():
            (encoder if name.startswith("image_encoder.") else other).append(parameter)
        groups = [{"params": other, "lr": base_lr}]
        if include_encoder and encoder:
            groups.append({"params": encoder, "lr": base_lr * ENCODER_LR_SCALE[settings.scope]})
        if self.head is not None:
            groups.append({"params": list(self.head.parameters()), "lr": settings.head_learning_rate})
        for group in groups:
            group["initial_lr"] = group["lr"]
        return torch.optim.AdamW([group for group in groups if group["params"]], weight_decay=settings.weight_decay)

    def schedule(self, optimizer: torch.optim.Optimizer, fraction: float) -> float:
        warmup = self.settings.warmup_fraction
        factor = fraction / warmup if fraction < warmup else 0.5 * (1 + math.cos(math.pi * min(
            (fraction - warmup) / max(1 - warmup, 1e-9), 1.0)))
        factor = max(factor, 0.02)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor

    def batches(self, phase: str, epoch: int) -> list[list[_View]]:
        """One epoch of batches: every cached view (decoder phase) or one view per training slice (encoder
        phase), in an order drawn from (seed, phase, epoch)."""
        rng = _generator(self.settings.seed, _STREAM_DECODER if phase == "decoder" else _STREAM_ENCODER, epoch,
                         _PER_EPOCH)
        if phase == "decoder":
            pool = self.views
        else:
            by_slice: dict[int, list[_View]] = {}
            for view in self.views:
                by_slice.setdefault(id(view.slice_ref), []).append(view)
            pool = [group[int(rng.integers(len(group)))] for group in by_slice.values()]
        order = rng.permutation(len(pool))
        size = self.settings.batch_size
        return [[pool[index] for index in order[start:start + size]] for start in range(0, len(order), size)]

    def step_batches(self, phase: str):
        """An endless stream of batches, epoch after epoch."""
        epoch = 0
        while True:
            yield from self.batches(phase, epoch)
            epoch += 1

    def train_step(self, phase: str, optimizer, batch: list[_View], phase_step: int, phase_steps: int) -> float:
        self.schedule(optimizer, phase_step / max(phase_steps, 1))
        rng = _generator(self.settings.seed, _STREAM_DECODER if phase == "decoder" else _STREAM_ENCODER, phase_step)
        loss = self.batch_loss(self.batch_embeddings(phase, batch), batch, rng)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def batch_embeddings(self, phase: str, batch: list[_View]) -> torch.Tensor:
        if phase == "encoder":  # zoomed crops and whole slices may share a batch: one tensor per image shape
            embeddings = {}
            for chunk in _same_shape_batches(batch, len(batch)):
                embeddings.update(zip(map(id, chunk), self.encode([view.image_01 for view in chunk])))
            return torch.stack([embeddings[id(view)] for view in batch])
        return torch.stack([view.embedding for view in batch]).float()

    def estimate(self) -> float:
        """Seconds the whole plan should take: one timed forward/backward per phase (no weights change)."""
        for phase, planned in zip(("decoder", "encoder"), self.planned):
            if not planned:
                continue
            batch = self.batches(phase, 0)[0]
            started = time.perf_counter()
            loss = self.batch_loss(self.batch_embeddings(phase, batch), batch,
                                   _generator(self.settings.seed, _STREAM_PROBE, 0))
            loss.backward()
            self.seconds_per_step[phase] = time.perf_counter() - started
            for parameter in [*self.trainable.sam.parameters(), *(self.head.parameters() if self.head else [])]:
                parameter.grad = None
            decodes = max(len(self.validation_examples), 1)
            # A validation decodes every validation slice (and re-encodes them in the encoder phase).
            self.seconds_per_validation[phase] = decodes * ((self.seconds_per_step["decoder"] or 0.0) / 2 + (
                self.seconds_per_image if phase == "encoder" else 0.0))
        return self.remaining_seconds()

    def run_phase(self, phase: str, phase_steps: int) -> str:
        """Train one phase for its planned steps; returns why it stopped ("steps" or "converged").

        Raises ``_Stop`` on cancel or the time limit.
        """
        if phase_steps == 0:
            return "steps"
        optimizer = self.optimizer(include_encoder=phase == "encoder")
        every = self.settings.validate_every if phase == "decoder" else self.settings.encoder_validate_every
        stale = 0
        improved_once = False
        losses: list[float] = []  # since the last validation
        batches = self.step_batches(phase)
        step_time = 0.0
        for phase_step in range(phase_steps):
            self.check_cancel()
            self.check_time_limit()
            started = time.perf_counter()
            losses.append(self.train_step(phase, optimizer, next(batches), phase_step, phase_steps))
            step_time += time.perf_counter() - started
            self.step += 1
            self.done[phase] = phase_step + 1
            self.seconds_per_step[phase] = step_time / (phase_step + 1)
            self.report({"phase": phase, "loss": losses[-1], "lr": optimizer.param_groups[0]["lr"]})
            if (phase_step + 1) % every and phase_step + 1 < phase_steps:
                continue
            self.check_cancel()
            started = time.perf_counter()
            scores = self.validate(None if phase == "encoder" else self.validation_embeddings)
            self.seconds_per_validation[phase] = time.perf_counter() - started
            if self.keep_if_best(scores):
                improved_once, stale = True, 0
            elif improved_once:
                # Before the first improvement a new head may still be finding its feet (its Dice sits at
                # 0 for a while): only the planned steps end such a phase.
                stale += 1
            self.report({"phase": phase, "loss": float(np.mean(losses)),
                         "val_dice": float(np.nanmean(list(scores.values()))), "val_scores": scores,
                         "best_val_dice": self.best_score})
            losses = []
            # Only the encoder phase stops early. A young head of small structures creeps up for a long while
            # and a one-slice validation is a noisy guide (brain2's lesion, lora, validated on the lesion's
            # 41-pixel tip: stopped at 125 of 300 decoder steps, held-out Dice 0.09; again at 150: 0.09), and
            # decoder steps are cheap; the best weights are kept either way.
            if phase == "encoder" and stale >= self.settings.patience:
                self.planned = ((self.done["decoder"], self.planned[1]) if phase == "decoder"
                                else (self.planned[0], self.done["encoder"]))
                return "converged"
        return "steps"


def train_adapter(model: LoadedModel, data: TrainingData, output_dir: str | Path,
                  settings: TrainSettings | None = None, *, progress: ProgressCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> TrainingResult:
    """Fine-tune a copy of ``model`` on ``data`` and save the best adapter to ``output_dir``.

    ``progress(step, steps_planned, metrics)`` is called while encoding (phase "encoding"), once with the
    plan and its time estimate (phase "planned": estimate_s), after every step (phase, loss, lr) and
    after every validation (val_dice, val_scores, best_val_dice); every call carries elapsed_s, eta_s,
    steps_planned and fraction in [0, 1]. ``should_cancel()`` is checked before every step: when it
    returns True the run stops and the best adapter so far is saved (``stopped == "cancelled"``).
    ``model`` itself is not changed.
    """
    settings = settings or TrainSettings()
    settings.check()
    check_output_folder(output_dir)  # fail now, not after minutes of training
    if settings.crops:
        data = data.cropped_to_fields_of_view()
    trainer = _Trainer(model, data, settings, progress, should_cancel)
    planned_at_start = trainer.total_planned
    stopped = "steps"
    val_dice_before: dict[str, float] = {}
    try:
        trainer.build_views()
        val_dice_before = trainer.validate(trainer.validation_embeddings)
        trainer.keep_if_best(val_dice_before)
        trainer.report({"phase": "start", "val_dice": float(np.nanmean(list(val_dice_before.values()))),
                        "val_scores": val_dice_before, "best_val_dice": trainer.best_score})
        trainer.check_cancel()
        estimate = trainer.estimate()
        trainer.report({"phase": "planned", "estimate_s": estimate, "decoder_steps": trainer.planned[0],
                        "encoder_steps": trainer.planned[1]})
        stopped = trainer.run_phase("decoder", trainer.planned[0])
        if trainer.planned[1]:
            if trainer.best_state is not None:
                trainer.restore_best()  # the encoder phase starts from the best decoder-phase weights
            stopped = trainer.run_phase("encoder", trainer.planned[1])
    except _Stop as stop:
        stopped = stop.reason
    seconds = trainer.elapsed
    steps_planned = planned_at_start if stopped in ("time_limit", "cancelled") else trainer.total_planned
    common = dict(steps_planned=steps_planned, step_seconds=trainer.mean_step_seconds(), history=trainer.history)
    if trainer.best_state is None or not val_dice_before or trainer.step == 0:
        return TrainingResult(None, None, val_dice_before, {}, trainer.trainable_parameters(), seconds, trainer.step,
                              stopped, **common)
    trainer.restore_best()
    if settings.scope != "lora":  # its weights are stored rounded to fp16: record the Dice of what the file holds
        trainer.best_scores = trainer.validate(None if trainer.trainable.encoder_trainable
                                               else trainer.validation_embeddings)
    metadata = _metadata(model, data, settings, trainer, val_dice_before, seconds, stopped, steps_planned)
    info = save_adapter(output_dir, scope=settings.scope, weights=trainer.best_state[0],
                        lora_config=trainer.trainable.lora_config, class_head=trainer.head, metadata=metadata)
    if trainer.head is not None and data.images and data.validation and model.spec.automatic_prompt == "box":
        # A box-trained base model may draw a class better from a box around each piece the head finds.
        trainer.report({"phase": "checking boxes"})
        choice, automatic = choose_refined_classes(model, data, info.adapter_dir)
        if choice["box_refined_classes"]:  # the stored score is what inference reaches: with the boxes
            trainer.best_scores = {**trainer.best_scores, "none": automatic}
        seconds = trainer.elapsed  # the check is part of the run
        info = update_adapter_metadata(info.adapter_dir, {**choice, "val_dice_after": trainer.best_scores,
                                                          "training": {**metadata["training"],
                                                                       "seconds": round(seconds, 2)}})
    return TrainingResult(info.adapter_dir, info.adapter_id, val_dice_before, trainer.best_scores,
                          trainer.trainable_parameters(), seconds, trainer.step, stopped,
                          adapter_size_bytes(info.adapter_dir), **common)


def _metadata(model: LoadedModel, data: TrainingData, settings: TrainSettings, trainer: _Trainer,
              val_dice_before: dict, seconds: float, stopped: str, steps_planned: int) -> dict:
    from .. import __version__

    modes = {"box": ["box"], "point": ["point"], "none": ["none"], "mixed": ["box", "point", "none"]}
    training = {"settings": asdict(settings), "seconds": round(seconds, 2), "steps": trainer.step,
                "steps_done": trainer.step, "steps_planned": steps_planned, "stopped": stopped,
                "precision": dtype_name(trainer.dtype),
                "train_slices": [[s.volume_index, s.slice_index] for s in data.train],
                "validation_slices": [[s.volume_index, s.slice_index] for s in data.validation],
                "volumes": data.volume_names}
    if stopped in ("time_limit", "cancelled"):
        training["more_steps_needed"] = max(steps_planned - trainer.step, 0)
    return {
        "base_model_id": model.model_id, "base_model_name": model.name, "base_weights_sha256": model.weights_hash,
        "class_ids": list(data.class_ids), "class_names": {str(key): value for key, value in data.class_names.items()},
        "prompt_modes": modes[settings.prompt_mode], "trained_prompt_mode": settings.prompt_mode,
        "encoder_adapted": trainer.trainable.encoder_trainable,
        "windows": [window_record(window) for window in data.windows],
        # Where the annotated structures lie (per volume); with "cropped" the head saw only that window.
        "fields_of_view": [view.to_json() for view in data.fields_of_view], "cropped": data.cropped,
        # Box mode: trained on the zoomed crops, so inference decodes every small box zoomed (``engine.zoom``).
        "zooms_small_boxes": settings.zooms,
        # Trained on each box in the window the engine chooses for it on a CT: inference keeps choosing so.
        "windows_per_prompt": trainer.windows_per_prompt,
        "val_dice_before": val_dice_before, "val_dice_after": trainer.best_scores,
        "trainable_parameters": trainer.trainable_parameters(),
        "training": training,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "napari_sam_ft_version": __version__,
    }
