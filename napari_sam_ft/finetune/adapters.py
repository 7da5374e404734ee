"""Adapters on disk and on a live model: save, load, switch and unload without rebuilding the base.

An adapter is a directory::

    adapter_config.json          peft LoraConfig            (lora scope)
    adapter_model.safetensors    peft LoRA weights          (lora scope)
    tuned_weights.safetensors    full weights of the tuned modules (decoder / full scope)
    class_head.safetensors       the automatic head, if trained (prompt mode none or mixed)
    napari_sam_ft_adapter.json   our metadata: base model, classes, prompt modes, window, Dice, settings

Only JSON and safetensors are read: nothing is unpickled. Loading checks the base model's identity
(``LoadedModel.model_id``) and the files' hash, then attaches an ``AttachedAdapter`` as ``LoadedModel.adapter``,
from which the engine reads the model's identity, class head and class ids. Switches hold ``LoadedModel.lock``,
which every encoder pass holds too, so an encoding never sees the network change under it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..models.registry import LoadedModel
from .heads import ClassHead
from .scopes import SCOPES, TUNED_MODULES, strip_adapters

METADATA_FILE = "napari_sam_ft_adapter.json"
LORA_CONFIG_FILE = "adapter_config.json"
LORA_WEIGHTS_FILE = "adapter_model.safetensors"
TUNED_WEIGHTS_FILE = "tuned_weights.safetensors"
CLASS_HEAD_FILE = "class_head.safetensors"
FORMAT_NAME = "napari-sam-ft-adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter that cannot be used with this model; the message says why and what to do."""


@dataclass
class AdapterInfo:
    """An adapter's metadata, as saved beside its weights."""

    adapter_dir: Path
    adapter_id: str
    scope: str
    base_model_id: str
    base_model_name: str
    class_ids: tuple[int, ...]
    class_names: dict[int, str]
    prompt_modes: tuple[str, ...]
    encoder_adapted: bool
    has_class_head: bool
    metadata: dict = field(repr=False, default_factory=dict)

    @property
    def val_dice_before(self) -> dict[str, float]:
        return dict(self.metadata.get("val_dice_before", {}))

    @property
    def val_dice_after(self) -> dict[str, float]:
        return dict(self.metadata.get("val_dice_after", {}))

    @property
    def windows(self) -> list[dict]:
        return list(self.metadata.get("windows", []))

    @property
    def zooms_small_boxes(self) -> bool:
        """Whether it learnt the zoomed crops small boxes are decoded on (``engine.zoom``): box-mode adapters."""
        return bool(self.metadata.get("zooms_small_boxes", False))

    @property
    def windows_per_prompt(self) -> bool:
        """Whether it learnt each box in the CT window chosen for it (``engine.window_choice``): prompted modes
        on a CT left on the automatic window."""
        return bool(self.metadata.get("windows_per_prompt", False))

    def summary(self) -> str:
        names = ", ".join(self.class_names.get(class_id, str(class_id)) for class_id in self.class_ids)
        dice = ", ".join(f"{mode} {self.val_dice_before.get(mode, float('nan')):.2f} -> {value:.2f}"
                         for mode, value in self.val_dice_after.items())
        return f"adapter {self.adapter_id} ({self.scope}; {names}; validation Dice {dice})"


@dataclass
class AttachedAdapter:
    """An adapter attached to a live network; ``LoadedModel.adapter`` holds it (there is no registry elsewhere)."""

    info: AdapterInfo
    class_head: ClassHead | None = None
    tuner: object | None = None  # peft LoraModel holding the injected layers
    original_modules: dict[str, nn.Module] = field(default_factory=dict)  # decoder / full scopes
    base_model: object | None = None  # the base network without it, made when first asked (engine.box_refinement)


def adapter_name(adapter_id: str) -> str:
    return f"adapter_{adapter_id}"


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda item: item.name):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _weight_files(adapter_dir: Path) -> list[Path]:
    return [adapter_dir / name for name in (LORA_WEIGHTS_FILE, TUNED_WEIGHTS_FILE, CLASS_HEAD_FILE)
            if (adapter_dir / name).is_file()]


def adapter_size_bytes(adapter_dir: str | Path) -> int:
    adapter_dir = Path(adapter_dir)
    return sum(path.stat().st_size for path in adapter_dir.iterdir() if path.is_file())


# -- saving -------------------------------------------------------------------------------------------
def save_adapter(output_dir: str | Path, *, scope: str, weights: dict[str, torch.Tensor], lora_config=None,
                 class_head: ClassHead | None, metadata: dict) -> AdapterInfo:
    """Write an adapter directory atomically (a finished adapter or none; an older adapter there is replaced).

    ``weights``: peft LoRA state dict (lora scope) or the tuned modules' weights (decoder / full).
    ``metadata`` must hold base_model_id, base_model_name, class_ids, class_names and prompt_modes.
    """
    from safetensors.torch import save_file

    output_dir = check_output_folder(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        tensors = {key: value.detach().to("cpu").contiguous() for key, value in weights.items()}
        if scope == "lora":
            save_file(tensors, str(staging / LORA_WEIGHTS_FILE))
            lora_config.save_pretrained(str(staging))
        else:
            save_file(tensors, str(staging / TUNED_WEIGHTS_FILE))
        if class_head is not None:
            save_file({key: value.detach().to("cpu").contiguous() for key, value in class_head.state_dict().items()},
                      str(staging / CLASS_HEAD_FILE))
        adapter_id = _sha256_files(_weight_files(staging))[:12]
        record = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "adapter_id": adapter_id, "scope": scope,
                  **metadata, "has_class_head": class_head is not None,
                  "files_sha256": _sha256_files(_weight_files(staging))}
        (staging / METADATA_FILE).write_text(json.dumps(record, indent=1, default=_json_default), encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return read_adapter_info(output_dir)


def update_adapter_metadata(adapter_dir: str | Path, fields: dict) -> AdapterInfo:
    """Add ``fields`` to a saved adapter's metadata (atomically; the weights and so the adapter id stay)."""
    path = Path(adapter_dir) / METADATA_FILE
    record = {**json.loads(path.read_text(encoding="utf-8")), **fields}
    staging = path.with_name(f".{path.name}.new")
    staging.write_text(json.dumps(record, indent=1, default=_json_default), encoding="utf-8")
    os.replace(staging, path)
    return read_adapter_info(adapter_dir)


def check_output_folder(output_dir: str | Path) -> Path:
    """``output_dir`` if an adapter may be written there: new, empty, or an older adapter (replaced)."""
    output_dir = Path(output_dir).expanduser()
    if output_dir.exists() and (not output_dir.is_dir() or (any(output_dir.iterdir())
                                                            and not (output_dir / METADATA_FILE).is_file())):
        raise AdapterError(f"{output_dir} exists and is not an adapter folder; choose a new or empty folder")
    return output_dir


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in adapter metadata")


# -- reading ------------------------------------------------------------------------------------------
def read_adapter_info(adapter_dir: str | Path) -> AdapterInfo:
    """Parse and check an adapter directory's metadata (no weights are read)."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: no such adapter folder")
    path = adapter_dir / METADATA_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir}: not a napari-sam-ft adapter (no {METADATA_FILE})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterError(f"{path}: cannot read adapter metadata ({error})") from error
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise AdapterError(f"{path}: not a napari-sam-ft adapter metadata file")
    if int(record.get("format_version", 0)) > FORMAT_VERSION:
        raise AdapterError(f"{path}: adapter format version {record.get('format_version')} is newer than this "
                           f"napari-sam-ft understands ({FORMAT_VERSION}); update napari-sam-ft")
    try:
        scope = str(record["scope"])
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        names = {int(key): str(value) for key, value in record.get("class_names", {}).items()}
        return AdapterInfo(adapter_dir=adapter_dir, adapter_id=str(record["adapter_id"]), scope=scope,
                           base_model_id=str(record["base_model_id"]),
                           base_model_name=str(record.get("base_model_name", "")),
                           class_ids=tuple(int(value) for value in record["class_ids"]), class_names=names,
                           prompt_modes=tuple(str(value) for value in record["prompt_modes"]),
                           encoder_adapted=bool(record["encoder_adapted"]),
                           has_class_head=bool(record.get("has_class_head", False)), metadata=record)
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterError(f"{path}: damaged adapter metadata ({error})") from error


# Windows that differ by less than this fraction of the trained window's width are the same window.
WINDOW_TOLERANCE = 0.02


def window_record(window) -> dict:
    """A ``Window`` (or ``ChannelWindow``) as adapter metadata."""
    record = {"name": window.name, "low": float(window.low), "high": float(window.high)}
    channels = getattr(window, "channels", ())
    if channels:
        record["channels"] = [[float(channel.low), float(channel.high)] for channel in channels]
    return record


def _window_bounds(record_or_window) -> list[tuple[float, float]]:
    if isinstance(record_or_window, dict):
        if record_or_window.get("channels"):
            return [(float(low), float(high)) for low, high in record_or_window["channels"]]
        return [(float(record_or_window["low"]), float(record_or_window["high"]))]
    channels = getattr(record_or_window, "channels", ())
    return [(channel.low, channel.high) for channel in channels] or [(record_or_window.low, record_or_window.high)]


def window_for_adapter(info: AdapterInfo, window, explicit: bool):
    """The intensity window to segment with under an adapter: the images it was trained on were windowed
    one way, and the same intensities must reach it.

    ``window``: the ``Window`` the user's choice gives on this volume; ``explicit``: the user chose it (not
    "auto"). An adapter trained with one window gets that window back when the choice was "auto"; an
    explicit window that differs raises ``AdapterError``. Adapters trained on several windows (several
    volumes) and old adapters without a record keep ``window``.
    """
    from ..volume import Window, channel_window

    records = info.windows
    bounds = {tuple(_window_bounds(record)) for record in records}
    if len(bounds) != 1:
        return window
    trained = list(next(iter(bounds)))
    current = _window_bounds(window)
    same = len(trained) == len(current) and all(
        abs(low - c_low) <= WINDOW_TOLERANCE * (high - low) and abs(high - c_high) <= WINDOW_TOLERANCE * (high - low)
        for (low, high), (c_low, c_high) in zip(trained, current))
    if same:
        return window
    described = ", ".join(f"{low:g}..{high:g}" for low, high in trained)
    if explicit or len(trained) != len(current):
        raise AdapterError(
            f"adapter {info.adapter_id} was trained on images windowed to {described} ({records[0]['name']}), but "
            f"the window chosen here is {', '.join(f'{low:g}..{high:g}' for low, high in current)}: use the "
            "automatic window (the adapter's own is then applied) or train an adapter with this window")
    name = str(records[0].get("name", "adapter"))
    if len(trained) > 1:
        return channel_window([Window(low, high, name) for low, high in trained])
    return Window(trained[0][0], trained[0][1], name)


def _load_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"{path}: cannot read weights ({error})") from error


def load_class_head(info: AdapterInfo, device: torch.device) -> ClassHead:
    state = _load_safetensors(info.adapter_dir / CLASS_HEAD_FILE, device)
    head = ClassHead(len(info.class_ids), state["class_tokens"].shape[1], state["out_bias"].shape[1])
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise AdapterError(f"{info.adapter_dir / CLASS_HEAD_FILE}: does not fit its metadata ({error})") from error
    if head.num_classes != len(info.class_ids):
        raise AdapterError(f"{info.adapter_dir}: class head has {head.num_classes} classes, metadata lists "
                           f"{len(info.class_ids)}")
    # Where the training annotations lay, for the engine to find the same window again (``FieldOfView``).
    cropped = bool(info.metadata.get("cropped", False))
    head.fields_of_view = [{**view, "cropped": cropped} for view in info.metadata.get("fields_of_view", [])]
    head.cropped = cropped
    return head.to(device).eval().requires_grad_(False)


# -- live model ---------------------------------------------------------------------------------------
def active_adapter(model: LoadedModel) -> AdapterInfo | None:
    """The adapter active on ``model``, or None."""
    attached = model.adapter
    return None if attached is None else attached.info


def load_adapter(model: LoadedModel, adapter_dir: str | Path) -> AdapterInfo:
    """Activate an adapter on ``model`` in place (an adapter already active is unloaded first).

    Raises ``AdapterError`` for an adapter made for another base model, or damaged files.
    """
    info = read_adapter_info(adapter_dir)
    if info.base_model_id != model.model_id:
        raise AdapterError(
            f"adapter {info.adapter_dir} was trained for base model {info.base_model_id!r}, but the loaded model is "
            f"{model.model_id!r}: load the model it was made for (e.g. --model {info.base_model_name}) or train a "
            "new adapter for this model")
    files = _weight_files(info.adapter_dir)
    if _sha256_files(files) != info.metadata.get("files_sha256"):
        raise AdapterError(f"{info.adapter_dir}: the weight files do not match the metadata (changed or damaged); "
                           "train or copy the adapter again")
    head = load_class_head(info, model.device) if info.has_class_head else None
    with model.lock:  # waits for a running encoder pass; the next one sees the new identity
        unload_adapter(model)
        attached = _inject_lora(model, info) if info.scope == "lora" else _swap_tuned_modules(model, info)
        attached.class_head = head
        model.adapter = attached
    return info


def _inject_lora(model: LoadedModel, info: AdapterInfo) -> AttachedAdapter:
    from peft import LoraConfig, set_peft_model_state_dict
    from peft.tuners.lora import LoraModel

    config_path = info.adapter_dir / LORA_CONFIG_FILE
    if not config_path.is_file() or not (info.adapter_dir / LORA_WEIGHTS_FILE).is_file():
        raise AdapterError(f"{info.adapter_dir}: a lora adapter needs {LORA_CONFIG_FILE} and {LORA_WEIGHTS_FILE}")
    try:
        config = LoraConfig.from_pretrained(str(info.adapter_dir))
    except (ValueError, TypeError, OSError) as error:
        raise AdapterError(f"{config_path}: cannot read the LoRA configuration ({error})") from error
    weights = _load_safetensors(info.adapter_dir / LORA_WEIGHTS_FILE, model.device)
    name = adapter_name(info.adapter_id)
    try:
        tuner = LoraModel(model.sam, config, name)
    except ValueError as error:
        strip_adapters(model.sam)
        raise AdapterError(f"{info.adapter_dir}: its LoRA targets do not fit this model ({error})") from error
    result = set_peft_model_state_dict(model.sam, weights, adapter_name=name)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        strip_adapters(model.sam)
        raise AdapterError(f"{info.adapter_dir}: LoRA weights do not fit the model ({len(missing)} missing, "
                           f"{len(result.unexpected_keys)} unexpected keys)")
    model.sam.eval()
    for parameter in model.sam.parameters():
        parameter.requires_grad_(False)
    return AttachedAdapter(info, tuner=tuner)


def _swap_tuned_modules(model: LoadedModel, info: AdapterInfo) -> AttachedAdapter:
    path = info.adapter_dir / TUNED_WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{info.adapter_dir}: a {info.scope} adapter needs {TUNED_WEIGHTS_FILE}")
    weights = _load_safetensors(path, model.device)
    replacements = {}
    prefixes = tuple(f"{name}." for name in TUNED_MODULES[info.scope])
    foreign = sorted(key for key in weights if not key.startswith(prefixes))
    if foreign:
        raise AdapterError(f"{path}: holds weights outside the {info.scope} scope ({', '.join(foreign[:3])}...)")
    for module_name in TUNED_MODULES[info.scope]:
        prefix = f"{module_name}."
        tuned = copy.deepcopy(getattr(model.sam, module_name))
        # The weights a scope leaves frozen are not stored (older adapters stored them all): those keep the
        # base values of the copy.
        stored = {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)}
        try:
            result = tuned.load_state_dict(stored, strict=False)
        except RuntimeError as error:
            raise AdapterError(f"{path}: weights do not fit this model's {module_name} ({error})") from error
        if result.unexpected_keys:
            raise AdapterError(f"{path}: weights do not fit this model's {module_name} "
                               f"({len(result.unexpected_keys)} unexpected keys, e.g. {result.unexpected_keys[0]})")
        replacements[module_name] = tuned.eval().requires_grad_(False)
    originals = {name: getattr(model.sam, name) for name in replacements}
    for name, module in replacements.items():
        setattr(model.sam, name, module)
    return AttachedAdapter(info, original_modules=originals)


def unload_adapter(model: LoadedModel) -> None:
    """Remove the active adapter (if any) and restore the base network exactly; the model is not rebuilt."""
    with model.lock:
        attached, model.adapter = model.adapter, None
        if attached is not None:
            if attached.tuner is not None:
                attached.tuner.unload()  # puts every wrapped layer's original module back
                strip_adapters(model.sam)
            for name, module in attached.original_modules.items():
                setattr(model.sam, name, module)


def base_network_copy(model: LoadedModel) -> nn.Module:
    """A deep copy of ``model.sam`` without any adapter, for training while the model stays in use."""
    with model.lock:
        sam = copy.deepcopy(model.sam)
        attached = model.adapter
    if attached is not None:
        strip_adapters(sam)
        for name, module in attached.original_modules.items():
            setattr(sam, name, copy.deepcopy(module))
    return sam


def base_model_copy(model: LoadedModel) -> LoadedModel:
    """``model`` as a separate LoadedModel on a copy of its base network (``base_network_copy``), with no adapter and
    its own lock: an adapter can be attached to it, or it can run, without touching ``model``."""
    return dataclasses.replace(model, sam=base_network_copy(model), adapter=None, lock=threading.RLock())
