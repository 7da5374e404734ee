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

Loss: Dice + cross-entropy (``losses``, MONAI's ``DiceCELoss`` definitions): binary per prompted object,
softmax over background + K classes for the automatic head (Dice without the background channel). Optimiser: AdamW, linear warm-up then cosine decay, where a phase's
progress is the larger of its step fraction and its share of the time budget, so a run cut by the
budget still ends at a low learning rate. Early stopping on validation Dice; the best weights are kept
and saved, also when the caller cancels. Seeds are fixed.
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
from ..models.registry import LoadedModel
from .adapters import adapter_size_bytes, base_network_copy, check_output_folder, save_adapter
from .augment import AugmentSettings, augment_pair, jittered_box, sampled_points
from .data import AnnotatedSlice, TrainingData
from .validation import MODE_VALIDATION, class_logits, decode_prompts, objects_on_slice, pad_points, score_slices
from .heads import ClassHead
from .losses import binary_dice_ce, multiclass_dice_ce
from .scopes import SCOPES, LoraSettings, TrainableModel, prepare_scope

PROMPT_MODES = ("box", "point", "none", "mixed")
ProgressCallback = Callable[[int, int, dict], None]
CancelCheck = Callable[[], bool]

# Learning rates tuned on the sample CT with 4 training slices (the MR was not used for tuning). The
# encoder learns slower than the decoder side: its LoRA at a third, its full weights at a tenth.
SCOPE_LEARNING_RATE = {"lora": 3e-3, "decoder": 3e-4, "full": 3e-4}
ENCODER_LR_SCALE = {"lora": 1 / 3, "full": 0.1}
MIXED_AUTOMATIC_SHARE = 0.7
# Encoder-phase validation re-encodes the validation slices: do it after at least this many steps.
MIN_STEPS_PER_ENCODER_VALIDATION = 4


@dataclass
class TrainSettings:
    """Everything that shapes a fine-tuning run (stored in the adapter's metadata)."""

    scope: str = "lora"
    prompt_mode: str = "mixed"
    epochs: int = 12  # encoder-phase passes over the training slices (lora / full)
    decoder_epochs: int = 30  # decoder-phase passes over all cached views
    time_budget_s: float | None = 240.0  # whole run, encoding included; None = epochs only
    batch_size: int = 2
    views_per_slice: int = 6
    max_objects_per_slice: int = 3
    learning_rate: float | None = None  # None: SCOPE_LEARNING_RATE[scope]
    head_learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    patience: int = 10  # validations without improvement before a phase stops
    min_improvement: float = 1e-3
    decoder_phase_share: float = 0.6  # of the time budget, for lora / full: its steps are ~10x cheaper
    seed: int = 0
    precision: str = "auto"
    lora: LoraSettings = field(default_factory=LoraSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)

    def check(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.prompt_mode!r}; choose one of {', '.join(PROMPT_MODES)}")
        if self.epochs < 0 or self.decoder_epochs < 0 or self.epochs + self.decoder_epochs == 0:
            raise ValueError("epochs and decoder_epochs must be >= 0 and not both 0")
        if self.scope == "decoder" and self.decoder_epochs == 0:
            raise ValueError("the decoder scope trains in the decoder phase only: decoder_epochs must be at least 1")
        if self.batch_size < 1 or self.views_per_slice < 1:
            raise ValueError("batch_size and views_per_slice must be at least 1")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"the time budget must be positive, got {self.time_budget_s}")

    @property
    def uses_head(self) -> bool:
        return self.prompt_mode in ("none", "mixed")

    @property
    def validation_modes(self) -> tuple[str, ...]:
        return MODE_VALIDATION[self.prompt_mode]


@dataclass
class TrainingResult:
    adapter_dir: Path | None  # None when cancelled before anything was trained
    adapter_id: str | None
    val_dice_before: dict[str, float]
    val_dice_after: dict[str, float]
    trainable_parameters: int
    seconds: float
    steps: int
    stopped: str  # "epochs", "converged", "time budget" or "cancelled"
    adapter_bytes: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.stopped == "cancelled"


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
        self.rng = np.random.default_rng(settings.seed)
        self.started = time.perf_counter()
        self.step = 0
        self.history: list[dict] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)  # LoRA's A matrices are drawn from torch's global generator
            self.trainable: TrainableModel = prepare_scope(base_network_copy(model), settings.scope, settings.lora,
                                                           copy_network=False)
        self.sam = self.trainable.sam
        self.head = (ClassHead.from_decoder(self.sam.mask_decoder, len(data.class_ids), seed=settings.seed)
                     if settings.uses_head else None)
        self.best_score = -math.inf
        self.best_scores: dict[str, float] = {}
        self.best_state: tuple[dict, dict | None] | None = None
        self.views: list[_View] = []
        self.validation_embeddings: list[torch.Tensor] = []
        self.last_validation_s = 0.0

    # -- bookkeeping ---------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def check_cancel(self) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise _Stop("cancelled")

    def report(self, total: int, metrics: dict) -> None:
        budget = self.settings.time_budget_s
        fraction = self.step / max(total, 1)
        if budget:
            fraction = max(fraction, self.elapsed / budget)
        metrics = {"elapsed_s": self.elapsed, "fraction": min(fraction, 1.0), **metrics}
        self.history.append({"step": self.step, **metrics})
        if self.progress is not None:
            self.progress(self.step, total, metrics)

    def trainable_parameters(self) -> int:
        head = sum(parameter.numel() for parameter in self.head.parameters()) if self.head is not None else 0
        return self.trainable.trainable_count() + head

    # -- encoding ------------------------------------------------------------------------------------
    def encode(self, images_01: list[np.ndarray]) -> torch.Tensor:
        """(B, 256, 64, 64) float32 embeddings from the training copy's encoder, with autograd if enabled.

        The same input preparation and autocast as ``VolumePredictor.encode_batch`` (and, without
        autograd, the cache's float16 rounding), so validation scores match what the engine will
        compute with the saved adapter.
        """
        inputs = self.preprocessing.image_to_tensor(np.stack(images_01)).to(self.device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        dtype = self.train_dtype if torch.is_grad_enabled() else self.dtype
        with autocast_context(self.device, dtype):
            embeddings = self.sam.image_encoder(inputs)
        if not torch.is_grad_enabled():
            # The engine's embedding cache keeps float16: score and train on what inference will see.
            embeddings = embeddings.half()
        return embeddings.float()

    def build_views(self, total: int) -> None:
        allow_flips = self.settings.prompt_mode in ("box", "point")
        for example in self.data.train:
            self.views.append(_View(example, example.image_01, example.labels))
            for _ in range(self.settings.views_per_slice - 1):
                image, labels = augment_pair(example.image_01, example.labels, self.rng, self.settings.augment,
                                             allow_flips=allow_flips)
                if labels.any() or not example.labels.any():  # keep views whose objects survived the transform
                    self.views.append(_View(example, image, labels))
        pending = list(self.views)
        to_encode = len(pending) + len(self.data.validation)
        encoded = 0
        batch = max(1, self.settings.batch_size)
        with torch.no_grad():
            for start in range(0, len(pending), batch):
                self.check_cancel()
                chunk = pending[start:start + batch]
                for view, embedding in zip(chunk, self.encode([view.image_01 for view in chunk])):
                    view.embedding = embedding.half()  # exact: ``encode`` rounded it to float16 already
                encoded += len(chunk)
                self.report(total, {"phase": "encoding", "encoded": encoded, "to_encode": to_encode})
            for example in self.data.validation:
                self.check_cancel()
                self.validation_embeddings.append(self.encode([example.image_01]))
                encoded += 1
                self.report(total, {"phase": "encoding", "encoded": encoded, "to_encode": to_encode})

    # -- losses ----------------------------------------------------------------------------------------
    def prompted_loss(self, embedding: torch.Tensor, labels: np.ndarray, kind: str) -> torch.Tensor | None:
        """Binary Dice+CE of up to ``max_objects_per_slice`` simulated prompts on one view."""
        objects = objects_on_slice(labels, self.data.class_ids)
        if not objects:
            return None
        if len(objects) > self.settings.max_objects_per_slice:
            picks = self.rng.choice(len(objects), self.settings.max_objects_per_slice, replace=False)
            objects = [objects[index] for index in sorted(picks)]
        masks = np.stack([mask for _, mask in objects])
        height, width = labels.shape
        if kind == "box":
            boxes = np.stack([jittered_box(mask, self.rng) for mask in masks])
            logits = decode_prompts(self.sam, self.preprocessing, embedding, height, width, boxes_xyxy=boxes)
        else:
            coords, point_labels = pad_points([sampled_points(mask, self.rng) for mask in masks])
            logits = decode_prompts(self.sam, self.preprocessing, embedding, height, width, points_xy=coords,
                                    point_labels=point_labels)
        target = torch.from_numpy(masks[:, None].astype(np.float32)).to(self.device)
        return binary_dice_ce(logits.float(), target)

    def batch_loss(self, embeddings: torch.Tensor, views: list[_View]) -> torch.Tensor:
        """Mean loss of a batch: the automatic head on all views, or simulated prompts per view.

        In ``mixed`` mode a step trains one of the two, the automatic head more often: it starts from
        scratch while prompted SAM starts out good, and a step on one costs half a step on both.
        """
        mode = self.settings.prompt_mode
        if mode == "mixed":
            mode = "none" if self.rng.random() < MIXED_AUTOMATIC_SHARE else ("box" if self.rng.random() < 2 / 3
                                                                              else "point")
        losses = []
        with autocast_context(self.device, self.train_dtype):
            if mode == "none":
                shapes = [view.labels.shape for view in views]
                for logits, view in zip(class_logits(self.head, self.sam, self.preprocessing, embeddings, shapes),
                                        views):
                    target = torch.from_numpy(self.data.class_indices(view.labels)[None, None]).to(self.device)
                    losses.append(multiclass_dice_ce(logits[None].float(), target))
            else:
                for index, view in enumerate(views):
                    loss = self.prompted_loss(embeddings[index:index + 1], view.labels, mode)
                    if loss is not None:
                        losses.append(loss)
        if not losses:
            return torch.zeros((), device=self.device, requires_grad=True)
        return torch.stack(losses).mean()

    # -- validation ------------------------------------------------------------------------------------
    def validate(self, embeddings: list[torch.Tensor] | None = None) -> dict[str, float]:
        started = time.perf_counter()
        try:
            if embeddings is None:
                with torch.no_grad():
                    embeddings = [self.encode([example.image_01]) for example in self.data.validation]
            return score_slices(self.sam, self.preprocessing, embeddings,
                                [example.labels for example in self.data.validation], self.data.class_ids,
                                self.settings.validation_modes, head=self.head)
        finally:
            self.last_validation_s = time.perf_counter() - started

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
        base_lr = settings.learning_rate or SCOPE_LEARNING_RATE[settings.scope]
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

    def run_phase(self, name: str, epochs: int, steps_per_epoch: int, phase_budget: float | None, total: int,
                  batches: Callable[[], list[list[_View]]], encoder_pass: bool) -> str:
        """Train one phase; returns why it stopped. Raises ``_Stop`` on cancel or an exhausted run budget."""
        if epochs == 0 or steps_per_epoch == 0:
            return "skipped"
        optimizer = self.optimizer(include_encoder=encoder_pass)
        phase_started = time.perf_counter()
        phase_steps = epochs * steps_per_epoch
        done = 0
        stale = 0
        improved_once = False
        losses: list[float] = []  # since the last validation
        for epoch in range(epochs):
            out_of_time = False
            for batch in batches():
                self.check_cancel()
                spent = time.perf_counter() - phase_started
                # Leave time for the validation that closes the phase, so the run keeps to its budget.
                if phase_budget is not None and spent + self.last_validation_s >= phase_budget:
                    out_of_time = True
                    break
                fraction = done / phase_steps
                if phase_budget:
                    fraction = max(fraction, spent / phase_budget)
                self.schedule(optimizer, fraction)
                if encoder_pass:
                    embeddings = self.encode([view.image_01 for view in batch])
                else:
                    embeddings = torch.stack([view.embedding for view in batch]).float()
                loss = self.batch_loss(embeddings, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                self.step += 1
                losses.append(float(loss.detach()))
                self.report(total, {"phase": name, "epoch": epoch + 1, "loss": losses[-1],
                                    "lr": optimizer.param_groups[0]["lr"]})
            last_epoch = epoch == epochs - 1 or out_of_time
            enough = not encoder_pass or len(losses) >= MIN_STEPS_PER_ENCODER_VALIDATION
            if losses and (last_epoch or enough):
                self.check_cancel()
                scores = self.validate(None if encoder_pass else self.validation_embeddings)
                if self.keep_if_best(scores):
                    improved_once, stale = True, 0
                elif improved_once:
                    # Before the first improvement a new head may still be finding its feet (its Dice sits at
                    # 0 for a while): only the epochs or the time budget end such a phase.
                    stale += 1
                self.report(total, {"phase": name, "epoch": epoch + 1, "loss": float(np.mean(losses)),
                                    "val_dice": float(np.nanmean(list(scores.values()))), "val_scores": scores,
                                    "best_val_dice": self.best_score})
                losses = []
            if out_of_time:
                return "time budget"
            if stale >= self.settings.patience:
                return "converged"
        return "epochs"

    def view_batches(self) -> list[list[_View]]:
        """Decoder phase: every cached view once, shuffled, in batches."""
        order = self.rng.permutation(len(self.views))
        size = self.settings.batch_size
        return [[self.views[index] for index in order[start:start + size]] for start in range(0, len(order), size)]

    def slice_batches(self) -> list[list[_View]]:
        """Encoder phase: one random view of every training slice, shuffled, in batches."""
        by_slice: dict[int, list[_View]] = {}
        for view in self.views:
            by_slice.setdefault(id(view.slice_ref), []).append(view)
        picks = [group[int(self.rng.integers(len(group)))] for group in by_slice.values()]
        order = self.rng.permutation(len(picks))
        size = self.settings.batch_size
        return [[picks[index] for index in order[start:start + size]] for start in range(0, len(order), size)]


def train_adapter(model: LoadedModel, data: TrainingData, output_dir: str | Path,
                  settings: TrainSettings | None = None, *, progress: ProgressCallback | None = None,
                  should_cancel: CancelCheck | None = None) -> TrainingResult:
    """Fine-tune a copy of ``model`` on ``data`` and save the best adapter to ``output_dir``.

    ``progress(step, total_steps, metrics)`` is called after every step (metrics: phase, epoch, loss,
    lr, elapsed_s, fraction in [0, 1]) and after every validation (val_dice, val_scores,
    best_val_dice). ``should_cancel()`` is checked before every step: when it returns True the run stops
    and the best adapter so far is saved (``stopped == "cancelled"``). ``model`` itself is not changed.
    """
    settings = settings or TrainSettings()
    settings.check()
    check_output_folder(output_dir)  # fail now, not after minutes of training
    trainer = _Trainer(model, data, settings, progress, should_cancel)
    encoder_phase = settings.scope in ("lora", "full") and settings.epochs > 0
    decoder_steps_per_epoch = math.ceil(
        len(data.train) * settings.views_per_slice / settings.batch_size)
    encoder_steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    total = (settings.decoder_epochs * decoder_steps_per_epoch
             + (settings.epochs * encoder_steps_per_epoch if encoder_phase else 0))
    budget = settings.time_budget_s
    stopped = "epochs"
    val_dice_before: dict[str, float] = {}
    try:
        trainer.build_views(total)
        decoder_steps_per_epoch = math.ceil(len(trainer.views) / settings.batch_size)
        val_dice_before = trainer.validate(trainer.validation_embeddings)
        trainer.keep_if_best(val_dice_before)
        trainer.report(total, {"phase": "start", "val_dice": float(np.nanmean(list(val_dice_before.values()))),
                               "val_scores": val_dice_before, "best_val_dice": trainer.best_score})

        def remaining() -> float | None:
            return None if budget is None else max(budget - trainer.elapsed, 0.0)

        decoder_budget = remaining()
        if decoder_budget is not None and encoder_phase:
            decoder_budget *= settings.decoder_phase_share
        stopped = trainer.run_phase("decoder", settings.decoder_epochs, decoder_steps_per_epoch, decoder_budget,
                                    total, trainer.view_batches, encoder_pass=False)
        if encoder_phase:
            if trainer.best_state is not None:
                trainer.restore_best()  # the encoder phase starts from the best decoder-phase weights
            stopped = trainer.run_phase("encoder", settings.epochs, encoder_steps_per_epoch, remaining(), total,
                                        trainer.slice_batches, encoder_pass=True)
    except _Stop as stop:
        stopped = stop.reason
    seconds = trainer.elapsed
    if trainer.best_state is None or not val_dice_before or trainer.step == 0:
        return TrainingResult(None, None, val_dice_before, {}, trainer.trainable_parameters(), seconds, trainer.step,
                              stopped, history=trainer.history)
    trainer.restore_best()
    info = save_adapter(output_dir, scope=settings.scope, weights=trainer.best_state[0],
                        lora_config=trainer.trainable.lora_config, class_head=trainer.head,
                        metadata=_metadata(model, data, settings, trainer, val_dice_before, seconds, stopped))
    return TrainingResult(info.adapter_dir, info.adapter_id, val_dice_before, trainer.best_scores,
                          trainer.trainable_parameters(), seconds, trainer.step, stopped,
                          adapter_size_bytes(info.adapter_dir), trainer.history)


def _metadata(model: LoadedModel, data: TrainingData, settings: TrainSettings, trainer: _Trainer,
              val_dice_before: dict, seconds: float, stopped: str) -> dict:
    from .. import __version__

    modes = {"box": ["box"], "point": ["point"], "none": ["none"], "mixed": ["box", "point", "none"]}
    return {
        "base_model_id": model.model_id, "base_model_name": model.name, "base_weights_sha256": model.weights_hash,
        "class_ids": list(data.class_ids), "class_names": {str(key): value for key, value in data.class_names.items()},
        "prompt_modes": modes[settings.prompt_mode], "trained_prompt_mode": settings.prompt_mode,
        "encoder_adapted": trainer.trainable.encoder_trainable,
        "windows": [{"name": window.name, "low": window.low, "high": window.high} for window in data.windows],
        "val_dice_before": val_dice_before, "val_dice_after": trainer.best_scores,
        "trainable_parameters": trainer.trainable_parameters(),
        "training": {"settings": asdict(settings), "seconds": round(seconds, 2), "steps": trainer.step,
                     "stopped": stopped, "precision": dtype_name(trainer.dtype),
                     "train_slices": [[s.volume_index, s.slice_index] for s in data.train],
                     "validation_slices": [[s.volume_index, s.slice_index] for s in data.validation],
                     "volumes": data.volume_names},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "napari_sam_ft_version": __version__,
    }
