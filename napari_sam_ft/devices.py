"""Pick the compute device and the reduced precision that keeps masks equal on it."""

from __future__ import annotations

import contextlib
from functools import lru_cache

import torch

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def select_device(preference: str | None = "auto") -> torch.device:
    """CUDA, then Apple MPS, then CPU; an explicit choice that is not available is an error."""
    preference = (preference or "auto").lower()
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but no CUDA GPU is available; use --device auto or cpu")
    if preference == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was requested but Apple MPS is not available; use --device auto or cpu")
    if preference not in DEVICE_CHOICES and not preference.startswith("cuda:"):
        raise RuntimeError(f"unknown device {preference!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    return torch.device(preference)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@lru_cache(maxsize=1)
def cpu_model_name() -> str:
    """The CPU's marketing name (e.g. "AMD EPYC 9654"), for benchmark records; the platform's word elsewhere."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for the image encoder, or None for plain fp32.

    ``auto`` uses bf16 on CPUs with native bf16 and on CUDA GPUs that support it (fp16 otherwise), and
    fp16 on MPS: the embedding differs by a few percent and the masks stay equal (see the benchmark).
    """
    if precision in ("fp32", "float32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16"):
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return None


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """A context manager running the enclosed forward pass under autocast (or nothing for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
