"""What runs on a dask worker: the model loaded once per worker process, and one scan per task.

A scan goes the way of the single-scan commands (``napari-sam-ft auto|segment|evaluate``): ``read_volume``,
a ``VolumePredictor`` over the worker's model, the same engine function, ``write_volume`` with the
input's geometry. A bad scan becomes an ``error`` row; it never raises into dask, which would retry it.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from ..devices import select_device
from ..models.registry import LoadedModel, load_model
from .output import CohortOutput
from .scans import Scan
from .settings import CohortSettings, ModelChoice

# One model per worker process, kept between tasks; a task with another ModelChoice replaces it.
_LOADED: dict = {}
_LOAD_LOCK = threading.Lock()


def current_worker():
    """The dask worker running this task, or None outside one (a plain function call)."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def worker_device(preference: str) -> torch.device:
    """The device for this worker: ``select_device``, with the GPUs of a machine shared out among its workers.

    A worker that sees several GPUs and has a number as its name (a ``LocalCluster`` names its workers 0, 1, ...)
    takes GPU ``name % count``; a worker started with ``CUDA_VISIBLE_DEVICES=i`` sees one GPU and uses it.
    """
    device = select_device(preference)
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        return device
    worker = current_worker()
    name = str(getattr(worker, "name", ""))
    return torch.device("cuda", int(name) % torch.cuda.device_count()) if name.isdigit() else device


def worker_model(choice: ModelChoice) -> tuple[LoadedModel, float]:
    """The worker's model for ``choice`` (with its adapter applied), and the seconds this call spent loading it.

    Loaded on the worker's first task and kept for the next ones: 0.0 seconds means it was already loaded.
    """
    with _LOAD_LOCK:
        if _LOADED.get("choice") == choice:
            return _LOADED["model"], 0.0
        _LOADED.clear()  # release the previous model before loading another
        started = time.perf_counter()
        model = load_model(choice.model_name, choice.checkpoint, device=worker_device(choice.device))
        if choice.adapter_dir:
            from ..finetune.adapters import load_adapter

            load_adapter(model, choice.adapter_dir)
        _LOADED.update(choice=choice, model=model)
        return model, time.perf_counter() - started


def describe_model(choice: ModelChoice) -> dict:
    """Load the model on a worker (so a bad checkpoint or adapter stops the run at once) and name it."""
    model, seconds = worker_model(choice)
    worker = current_worker()
    return {"model": model.name, "model_id": model.model_id, "adapter_id": model.adapter_id,
            "device": str(model.device), "load_seconds": round(seconds, 2),
            "worker": getattr(worker, "address", None)}


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def torch_threads_for_task(threads_by_host: dict[str, int]) -> int:
    """This machine's cores shared among the dask threads running on it (all its workers together)."""
    worker = current_worker()
    if worker is None:
        return torch.get_num_threads()
    host = urlparse(worker.address).hostname or ""
    sharing = threads_by_host.get(host) or worker.state.nthreads
    return max(1, usable_cpus() // max(1, sharing))


@dataclass(frozen=True)
class WorkerOptions:
    """How a task uses the worker it lands on: torch threads, and where embeddings are cached.

    ``threads_by_host``: dask threads per machine, which share its cores. ``cache_dir``: a folder for the
    embedding cache (None: the worker's local scratch folder); ``disk_cache`` False keeps embeddings in memory.
    """

    threads_by_host: dict = field(default_factory=dict)
    cache_dir: str | None = None
    disk_cache: bool = True


def process_scan(scan: Scan, settings: CohortSettings, output_root: str, task_key: str,
                 options: WorkerOptions = WorkerOptions()) -> dict:
    """Run the cohort's job on one scan: mask written, done marker written after it; returns the row."""
    started = time.perf_counter()
    output = CohortOutput(output_root, settings.mask_suffix)
    worker = current_worker()
    row = output.base_row(scan, settings, task_key)
    row["worker"] = getattr(worker, "address", None)
    try:
        torch.set_num_threads(torch_threads_for_task(options.threads_by_host))  # per thread: this task's thread
        model, load_seconds = worker_model(settings.model)
        row.update(model=model.model_id, adapter=model.adapter_id, device=str(model.device),
                   model_load_s=round(load_seconds, 2))
        labels, volume, class_names, results = run_job(scan, settings, model, embedding_cache_dir(options, worker))
        row.update(results)
        row["mask"] = str(output.write_mask(scan.scan_id, labels, like=volume, class_names=class_names))
        row["status"] = "ok"
    except Exception as error:  # one bad scan is its own error row; the others go on
        row.update(status="error", error=error_message(error))
    row["seconds"] = round(time.perf_counter() - started, 2)
    output.record(row)
    return row


def embedding_cache_dir(options: WorkerOptions, worker) -> Path | None:
    """The given folder, or one on the worker's local disk (its scratch space, removed with the worker)."""
    if not options.disk_cache:
        return None
    if options.cache_dir:
        return Path(options.cache_dir)
    if worker is not None:
        return Path(worker.local_directory) / "napari-sam-ft-embeddings"
    return None


def run_job(scan: Scan, settings: CohortSettings, model: LoadedModel, cache_dir: Path | None):
    """(labels, volume, class names, row fields) of the cohort's job on ``scan``: the single-scan commands' steps."""
    from ..engine.cache import EmbeddingCache
    from ..slices import parse_slice_range
    from ..scan_jobs import predictor_for
    from ..volume import read_volume

    volume = read_volume(scan.image, slicing_axis=settings.axis, channel=settings.channel)
    # A cache per task: its memory tier holds this scan only; the disk tier outlives the task on this worker.
    predictor = predictor_for(model, volume, settings.window, EmbeddingCache(disk_dir=cache_dir),
                              settings.model.precision)
    first, last = parse_slice_range(scan.slices or settings.slices, volume.num_slices)
    fields: dict = {"slices": f"{first}:{last + 1}", "window": predictor.window.key,
                    "series": getattr(volume.header, "chosen_message", None)}  # which series of a DICOM folder
    class_names = None
    if settings.mode == "evaluate":
        labels, class_names, scores = evaluate_scan(scan, settings, predictor, f"{first}:{last + 1}")
        fields.update(scores)
    elif settings.mode == "auto":
        from ..engine.automatic import segment_volume

        labels = segment_volume(predictor, slice_indices=range(first, last + 1))
    else:
        labels = segment_scan(scan, settings, predictor)
        fields["slices"] = None
    fields.update(objects=int(len(np.unique(labels[labels > 0]))), labelled_voxels=int((labels > 0).sum()),
                  encoder_passes=predictor.encoder_calls)
    return labels, volume, class_names, fields


def evaluate_scan(scan: Scan, settings: CohortSettings, predictor, slices: str):
    """``napari-sam-ft evaluate`` on one scan: (predicted labels, class names, Dice and HD95 fields)."""
    from ..scan_jobs import evaluate_against

    if not scan.labels:
        raise ValueError("no reference labels for this scan: evaluate needs a 'labels' column in the manifest")
    class_ids = list(settings.classes) if settings.classes else None
    report, prediction, reference = evaluate_against(predictor, scan.labels, settings.prompt, slices, class_ids)
    fields = {"dice": report["dice"], "hd95": report["hd95"]}
    for name, entry in report["per_class"].items():
        fields[f"dice_{column_name(name)}"] = entry["dice"]
    return prediction, reference.class_names or None, fields


def segment_scan(scan: Scan, settings: CohortSettings, predictor):
    """``napari-sam-ft segment`` on one scan, from its own prompt file or the run's."""
    from ..engine.prompts import load_prompts
    from ..engine.propagate import DEFAULT_STOP_IOU
    from ..engine.segment import segment_prompts

    prompts_path = scan.prompts or settings.prompts
    if not prompts_path:
        raise ValueError("no prompt file for this scan: segment needs a 'prompts' column in the manifest or --prompts")
    prompts = load_prompts(prompts_path, predictor.volume.shape)
    return segment_prompts(predictor, prompts, propagate=settings.propagate,
                           stop_iou=settings.stop_iou if settings.stop_iou is not None else DEFAULT_STOP_IOU)


def column_name(class_name: str) -> str:
    return "_".join(str(class_name).split())


def error_message(error: BaseException) -> str:
    """One line: our readers' and the engine's errors say what is wrong; anything else also says where."""
    from ..engine.prompts import PromptError
    from ..models.checkpoints import CheckpointError
    from ..volume import VolumeError

    if isinstance(error, (VolumeError, CheckpointError, PromptError, ValueError)):
        return str(error)
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {error}{place}"
