"""The fp32 image encoder through ONNX Runtime, for CPUs without native bf16.

On such a CPU the encoder runs in fp32, and torch's eager TinyViT spends much of a slice in window-partition
copies, unfused GELUs and per-op dispatch; ONNX Runtime runs the same graph (exported once, with the same
weights) about three times faster, and its embeddings equal eager's to ~3e-6 relative, far below the float16
rounding of the embedding cache. So the two runtimes share the cache key's ``fp32`` precision.

It is used only where that equality holds: a TinyViT base encoder (no encoder adapter: LoRA or a swapped
encoder changes the weights), in eval mode, on the CPU, and only when the precision resolves to fp32 (the
caller checks that). The export is kept in the user cache directory, named by the weights, the encoder code
version and the torch version, so a later session only loads it. Anything that goes wrong (onnxruntime
missing, an export or check failure) logs one warning and leaves that model on torch's eager encoder.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import atomic_write
from ..models.registry import LoadedModel
from .cache import EMBEDDING_CODE_VERSION, default_cache_dir

LOGGER = logging.getLogger(__name__)
# Bump with any change to how the encoder is exported (opset, input layout, session settings that change results).
ONNX_EXPORT_VERSION = 1
# Opset 20 has a native Gelu, which ONNX Runtime runs as one kernel (opset 18 leaves Erf/Mul/Div/Add: ~25 % slower).
ONNX_OPSET = 20
# The exported graph's largest allowed relative difference from the eager encoder on the check input.
MAX_RELATIVE_DIFFERENCE = 1e-3
SUPPORTED_FAMILIES = ("tiny_vit",)


def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, or None when it cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def enabled_by_environment() -> bool:
    """False where ``NAPARI_SAM_FT_ONNX_ENCODER=0`` keeps torch's eager encoder (its embeddings differ from ONNX
    Runtime's by ~3e-6)."""
    return os.environ.get("NAPARI_SAM_FT_ONNX_ENCODER", "1") != "0"


def fp32_encoder_runtime(model_family: str, device: torch.device) -> str:
    """Which runtime encodes fp32 slices of a base model of ``model_family`` on ``device`` (for ``info``)."""
    version = onnxruntime_version()
    if device.type != "cpu":
        return f"torch eager (ONNX Runtime serves the CPU only, not {device.type})"
    if model_family not in SUPPORTED_FAMILIES:
        return f"torch eager (ONNX Runtime serves {', '.join(SUPPORTED_FAMILIES)} encoders only)"
    if version is None:
        return "torch eager (onnxruntime is not installed)"
    return f"ONNX Runtime {version} (torch eager with an encoder adapter)"


def export_path(model: LoadedModel, cache_dir: Path | None = None) -> Path:
    """Where ``model``'s exported encoder is kept: named by its weights, the code versions and torch."""
    torch_version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    name = (f"{model.model_id}-code{EMBEDDING_CODE_VERSION}-onnx{ONNX_EXPORT_VERSION}"
            f"-torch{torch_version}-{model.preprocessing.input_size}px.onnx")
    return (cache_dir or default_cache_dir()) / "onnx_encoders" / name


def _encoder_fingerprint(encoder: torch.nn.Module) -> tuple:
    """The encoder's float tensors and their in-place version counters: a LoRA layer, a swapped module or a
    weight changed in place all change it (cheap: ~300 tensors, no data read). BatchNorm's integer step counter
    is left out: eval never reads it, and peft touches it when an adapter is attached."""
    return tuple((id(tensor), tensor._version) for tensor in (*encoder.parameters(), *encoder.buffers())
                 if tensor.is_floating_point())


@dataclass(eq=False)
class OnnxEncoder:
    """An ONNX Runtime session running one encoder module's export; ``fingerprint`` is that module's at export."""

    session: object = field(repr=False)  # onnxruntime.InferenceSession
    fingerprint: tuple = field(repr=False)
    path: Path | None

    def matches(self, encoder: torch.nn.Module) -> bool:
        return _encoder_fingerprint(encoder) == self.fingerprint

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 model inputs -> (B, 256, h, w) float32 embeddings, one image per run (the export
        has a static batch of one; on a CPU larger batches are no faster)."""
        input_name = self.session.get_inputs()[0].name
        outputs = [self.session.run(None, {input_name: np.ascontiguousarray(image[None].numpy(), np.float32)})[0]
                   for image in inputs.float().cpu()]
        return torch.from_numpy(np.concatenate(outputs))


# One entry per live encoder module: its OnnxEncoder, or None after a failure (so it is tried and warned once).
_RUNTIMES: "weakref.WeakKeyDictionary[torch.nn.Module, OnnxEncoder | None]" = weakref.WeakKeyDictionary()
_RUNTIMES_LOCK = threading.Lock()


def onnx_encoder_for(model: LoadedModel) -> OnnxEncoder | None:
    """The ONNX Runtime encoder for ``model`` as it is now, or None where torch's eager encoder must run.

    None for another device or model family, an encoder adapter, an encoder in training mode or changed since
    its export, and after a failed export (logged once). The first call per weights exports (seconds) and keeps
    the file; later sessions load it.
    """
    encoder = model.sam.image_encoder
    if (model.device.type != "cpu" or model.spec.family not in SUPPORTED_FAMILIES or encoder.training
            or model.identity.encoder_adapter_id != "none"):
        return None
    with _RUNTIMES_LOCK:
        if encoder in _RUNTIMES:
            runtime = _RUNTIMES[encoder]
            return runtime if runtime is not None and runtime.matches(encoder) else None
        try:
            runtime = _load_or_export(model, encoder)
        except Exception as error:  # any failure leaves the eager encoder, which always works
            LOGGER.warning("fp32 encoder: ONNX Runtime is not used for %s (%s: %s); torch eager encodes instead",
                           model.model_id, type(error).__name__, error)
            runtime = None
        _RUNTIMES[encoder] = runtime
        return runtime


def _session(model_source: str | bytes):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    # Idle worker threads sleep instead of spinning: between slices the CPU belongs to the decoder and the GUI.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_source, options, providers=["CPUExecutionProvider"])


def _load_or_export(model: LoadedModel, encoder: torch.nn.Module) -> OnnxEncoder:
    import onnxruntime  # noqa: F401  (fail here, before a pointless export, when it is missing)

    fingerprint = _encoder_fingerprint(encoder)
    path = export_path(model)
    if path.is_file():
        try:
            return OnnxEncoder(_session(str(path)), fingerprint, path)
        except Exception as error:  # a damaged file: export again over it
            LOGGER.info("fp32 encoder: re-exporting %s (%s)", path, error)
    size = model.preprocessing.input_size
    check_input = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as scratch:
        exported = Path(scratch) / "encoder.onnx"
        _export(encoder, check_input, exported)
        model_bytes = exported.read_bytes()
    runtime = OnnxEncoder(_session(model_bytes), fingerprint, None)
    _check_against_eager(runtime, encoder, check_input)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(model_bytes))
        runtime.path = path
    except OSError as error:  # a read-only cache: the export still serves this session
        LOGGER.info("fp32 encoder: cannot keep the export at %s (%s)", path, error)
    return runtime


def _export(encoder: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx (dynamo) export of ``encoder`` for inputs shaped like ``example``, as one self-contained file."""
    # The exporter prints its progress and warns about tracing details; the CLI's and the widget's output stays ours.
    with (torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["embedding"], external_data=False, verbose=False)


def _check_against_eager(runtime: OnnxEncoder, encoder: torch.nn.Module, check_input: torch.Tensor) -> None:
    """Raise if the export's embedding of ``check_input`` is not the eager encoder's (a wrong export never runs)."""
    with torch.inference_mode():
        expected = encoder(check_input).float()
    difference = float((runtime(check_input) - expected).norm() / expected.norm().clamp_min(1e-12))
    if not difference <= MAX_RELATIVE_DIFFERENCE:
        raise RuntimeError(f"the exported encoder differs from torch's by {difference:.2e} (relative)")
