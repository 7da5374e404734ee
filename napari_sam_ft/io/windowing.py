"""Intensity windows: map a scan's raw values (Hounsfield units, MR signal) to [0, 1] for the model.

CT gets a preset window in Hounsfield units; MR gets percentile clipping. Statistics read a bounded sample so a
memory-mapped volume stays lazy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Window presets for CT, as (level, width) in Hounsfield units.
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
WINDOW_CHOICES = ("auto", *CT_WINDOW_PRESETS, "percentile", "minmax")
MRI_PERCENTILES = (0.5, 99.5)

# Window statistics read at most this many voxels (4 MiB as float32), whatever the volume's size.
MAX_SAMPLE_VOXELS = 1 << 20


def intensity_sample(array: np.ndarray, slices: int) -> np.ndarray:
    """About ``slices`` evenly spaced slices of ``array``, thinned in-plane to ``MAX_SAMPLE_VOXELS`` voxels.

    Reading only these keeps a memory-mapped volume lazy; small volumes are sampled exactly as before.
    """
    sample = array[:: max(1, array.shape[0] // slices)]
    stride = 1
    while sample.shape[0] * -(-sample.shape[1] // stride) * -(-sample.shape[2] // stride) > MAX_SAMPLE_VOXELS:
        stride += 1
    return np.asarray(sample[:, ::stride, ::stride])


def looks_like_ct(array: np.ndarray) -> bool:
    """CT in Hounsfield units: air near -1000 and values mostly within [-1024, 3071]."""
    sample = intensity_sample(array, 16).astype(np.float32, copy=False)
    low, high = (float(value) for value in np.percentile(sample, (0.5, 99.5)))
    return low < -500.0 and low >= -3100.0 and high <= 4000.0


@dataclass(frozen=True)
class Window:
    """An intensity window mapping raw values linearly to [0, 1], clipped."""

    low: float
    high: float
    name: str = "custom"

    def apply(self, values: np.ndarray) -> np.ndarray:
        scaled = (np.asarray(values, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-6)
        return np.clip(scaled, 0.0, 1.0)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.low:.6g}:{self.high:.6g}"


@dataclass(frozen=True)
class ChannelWindow(Window):
    """One window per channel of a (..., C) multi-channel image; ``low``/``high`` span all of them."""

    channels: tuple[Window, ...] = ()

    def apply(self, values: np.ndarray) -> np.ndarray:
        lows = np.array([window.low for window in self.channels], np.float32)
        widths = np.array([max(window.high - window.low, 1e-6) for window in self.channels], np.float32)
        return np.clip((np.asarray(values, dtype=np.float32) - lows) / widths, 0.0, 1.0)

    @property
    def key(self) -> str:
        return "channels[" + ";".join(window.key for window in self.channels) + "]"


def channel_window(windows: list[Window]) -> ChannelWindow:
    return ChannelWindow(min(window.low for window in windows), max(window.high for window in windows),
                         "+".join(window.name for window in windows), tuple(windows))


def choose_window(array: np.ndarray, window: str | tuple[float, float] = "auto") -> Window:
    """Pick an intensity window: a CT preset, MRI percentile clipping, min-max, or (level, width).

    A (Z, Y, X, C) array gets a ``ChannelWindow``: each channel windowed on its own, with the same choice
    for all, or with one choice per channel when ``window`` is a list of them (e.g. ["soft_tissue", "percentile"]).
    """
    if array.ndim == 4:
        count = array.shape[-1]
        per_channel = isinstance(window, list) and all(isinstance(item, (str, tuple, list)) for item in window)
        if per_channel and len(window) != count:
            raise ValueError(f"{len(window)} windows given for {count} channels")
        choices = window if per_channel else [window] * count
        return channel_window([choose_window(array[..., channel], choice) for channel, choice in enumerate(choices)])
    if isinstance(window, (tuple, list)):
        level, width = float(window[0]), float(window[1])
        return Window(level - width / 2, level + width / 2, "custom")
    if window == "auto":
        window = "soft_tissue" if looks_like_ct(array) else "percentile"
    if window in CT_WINDOW_PRESETS:
        level, width = CT_WINDOW_PRESETS[window]
        return Window(level - width / 2, level + width / 2, window)
    sample = intensity_sample(array, 32).astype(np.float32)
    if window == "percentile":
        low, high = np.percentile(sample, MRI_PERCENTILES)
        if high <= low:
            low, high = float(sample.min()), float(sample.max())
        return Window(float(low), float(high), "percentile")
    if window == "minmax":
        return Window(float(np.min(array)), float(np.max(array)), "minmax")
    raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOW_CHOICES)} or give (level, width)")
