"""What a cohort run does to every scan: the job, the model and adapter, and the per-scan options."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..models.registry import DEFAULT_MODEL

MODES = ("auto", "segment", "evaluate")
# The simulated prompts a cohort evaluation offers (a subset of evaluate.EVALUATION_PROMPTS).
COHORT_PROMPTS = ("box", "point", "none")
MASK_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mgz", ".tif", ".npy")


@dataclass(frozen=True)
class ModelChoice:
    """The model a worker loads once and keeps: registry name, weights, adapter, device and precision."""

    model_name: str = DEFAULT_MODEL
    checkpoint: str | None = None
    adapter_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"


@dataclass(frozen=True)
class CohortSettings:
    """The job applied to every scan, with the options of the single-scan commands of the same name.

    ``mode``: ``auto`` (automatic segmentation; an adapter's class head labels its classes), ``segment``
    (from each scan's prompt file, or ``prompts`` for all), ``evaluate`` (simulated ``prompt`` prompts from
    each scan's reference labels, scored per class). ``window`` is a preset name or (level, width);
    ``slices`` (``A:B``) applies to scans without their own range. Masks are written as ``mask_suffix``
    files with the input's geometry.
    """

    mode: str = "auto"
    model: ModelChoice = ModelChoice()
    window: str | tuple[float, float] = "auto"
    prompt: str = "box"
    slices: str | None = None
    classes: tuple[int, ...] | None = None
    prompts: str | None = None
    propagate: bool = False
    stop_iou: float | None = None
    axis: int | None = None
    channel: int | None = None
    mask_suffix: str = ".nii.gz"

    def check(self) -> None:
        """Raise ``ValueError`` for settings no scan could run with (before any work is sent out)."""
        if self.mode not in MODES:
            raise ValueError(f"unknown cohort job {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.prompt not in COHORT_PROMPTS:
            raise ValueError(f"unknown prompt mode {self.prompt!r}; choose one of {', '.join(COHORT_PROMPTS)}")
        if self.mask_suffix not in MASK_SUFFIXES:
            raise ValueError(f"masks can be written as {', '.join(MASK_SUFFIXES)}, not {self.mask_suffix!r}")
        if self.axis not in (None, 0, 1, 2):
            raise ValueError(f"the slicing axis must be 0, 1 or 2, not {self.axis}")

    def task_key(self, scan, model_identity: dict) -> str:
        """Names everything a scan's result depends on: a done marker with another key is redone."""
        record = {"settings": asdict(self), "scan": {key: value for key, value in asdict(scan).items()},
                  "model_id": model_identity.get("model_id"), "adapter_id": model_identity.get("adapter_id")}
        record["settings"]["model"].pop("device")  # the same weights give the same masks on another worker
        text = json.dumps(record, sort_keys=True, default=str)
        return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()
