"""``napari-sam-ft finetune``: adapt SAM to annotated slices and save a LoRA (or decoder / full) adapter."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from ..devices import DEVICE_CHOICES


def register(subparsers) -> None:
    from ..finetune.scopes import SCOPES
    from ..finetune.train import TRAINING_PROMPT_MODES, TrainSettings
    from ..models.registry import DEFAULT_MODEL, MODELS
    from .common import add_volume_options

    defaults = TrainSettings()
    parser = subparsers.add_parser(
        "finetune", help="fine-tune on annotated slices and save an adapter",
        description="Train an adapter from IMAGE/LABELS pairs. Only annotated slices are used (every slice with a "
        "nonzero label, or --slices); one is held out for validation. Ctrl-C stops early and keeps the best "
        "adapter so far.")
    parser.add_argument("pairs", nargs="+", metavar="IMAGE LABELS", help="image file and its label file; repeat "
                        "for several volumes")
    parser.add_argument("-o", "--output", required=True, metavar="ADAPTER_DIR", help="folder to write the adapter to")
    parser.add_argument("--slices", action="append", metavar="LIST",
                        help="slices to train on, e.g. 62,70,78 or 60:80 (A:B is A..B-1); once for all volumes or "
                        "once per volume (default: every annotated slice)")
    parser.add_argument("--val-slices", action="append", metavar="LIST",
                        help="validation slices, same forms (default: 20%% of the annotated slices, at least one)")
    parser.add_argument("--classes", metavar="IDS", help="label ids to learn, e.g. 1,2,5 (default: every id found)")
    parser.add_argument("--class-names", metavar="JSON_OR_PAIRS",
                        help='class names: a JSON file {"1": "spleen"} or 1=spleen,5=liver')
    parser.add_argument("--scope", choices=SCOPES, default=defaults.scope,
                        help="lora: LoRA on encoder + decoder attention (default); decoder: the mask decoder only; "
                        "full: every weight")
    parser.add_argument("--prompt", choices=TRAINING_PROMPT_MODES, default=defaults.prompt_mode,
                        help="box/point: simulated prompts; none: an automatic per-class head; mixed: both (default)")
    parser.add_argument("--decoder-steps", type=int, default=None, metavar="N",
                        help="optimisation steps on cached embeddings (default: planned from the number of "
                        "annotated slices and classes)")
    parser.add_argument("--encoder-steps", type=int, default=None, metavar="N",
                        help="steps with the encoder tuned, lora/full only (default: planned from the data; 0: none)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="optional wall-clock limit: stops early and says so (the adapter's metadata records "
                        "stopped: time_limit). Without it a busy CPU gives the same adapter, only later")
    parser.add_argument("--rank", type=int, default=defaults.lora.rank, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=defaults.lora.alpha, help="LoRA alpha")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: by scope)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--views", type=int, default=defaults.views_per_slice,
                        help="augmented views per training slice, encoded once")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL, help="base model")
    parser.add_argument("--checkpoint", default=None, help="weights file for models without embedded weights")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    add_volume_options(parser)
    parser.set_defaults(run=run_finetune)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(value) for value in text.replace(" ", "").split(",") if value]
    except ValueError:
        raise ValueError(f"--classes must list integer label ids like 1,2,5, got {text!r}") from None


def _parse_class_names(text: str | None) -> dict[int, str]:
    if not text:
        return {}
    path = Path(text)
    try:
        if path.is_file():
            return {int(key): str(value) for key, value in json.loads(path.read_text(encoding="utf-8")).items()}
        return {int(key): value for key, value in (item.split("=", 1) for item in text.split(",") if item)}
    except (ValueError, AttributeError, json.JSONDecodeError) as error:
        raise ValueError(f"--class-names: use a JSON file {{\"1\": \"spleen\"}} or 1=spleen,5=liver ({error})") from None


def _slice_lists(values: list[str] | None, volumes, what: str):
    from ..slices import parse_slice_list

    if not values:
        return None
    if len(values) == 1:
        return [parse_slice_list(values[0], volume.num_slices) for volume in volumes]
    if len(values) != len(volumes):
        raise ValueError(f"{what}: give it once for all volumes or once per volume ({len(volumes)}), got {len(values)}")
    return [parse_slice_list(text, volume.num_slices) for text, volume in zip(values, volumes)]


def print_progress(bar, step: int, total: int, metrics: dict) -> None:
    """One progress event on a tqdm bar counting steps: the plan and its estimate once, then ETA and Dice."""
    if metrics.get("phase") == "planned":
        bar.write(f"plan: {metrics['decoder_steps']} decoder-phase + {metrics['encoder_steps']} encoder-phase steps, "
                  f"estimated {metrics['estimate_s']:.0f} s on this machine now", file=sys.stderr)
    bar.total = total
    bar.n = step
    postfix = {"phase": metrics.get("phase", ""), "ETA": f"{metrics.get('eta_s', 0):.0f} s"}
    if "loss" in metrics:
        postfix["loss"] = f"{metrics['loss']:.3f}"
    if "best_val_dice" in metrics:
        postfix["best val Dice"] = f"{metrics['best_val_dice']:.3f}"
    bar.set_postfix(postfix, refresh=True)


def run_finetune(args) -> int:
    from tqdm import tqdm

    from ..devices import select_device
    from ..finetune import TrainSettings, VolumeAnnotations, build_training_data, train_adapter
    from ..finetune.scopes import LoraSettings
    from ..models.registry import load_model
    from ..volume import read_labels, read_volume
    from .common import parse_window

    if len(args.pairs) % 2:
        raise ValueError("give IMAGE LABELS pairs: an odd number of files was given")
    window = parse_window(args.window)
    annotations, volumes = [], []
    for image_path, labels_path in zip(args.pairs[::2], args.pairs[1::2]):
        volume = read_volume(image_path, slicing_axis=args.axis, channel=args.channel)
        labels = read_labels(labels_path, like=volume)
        volumes.append(volume)
        annotations.append(VolumeAnnotations(volume, labels, name=volume.name, window=window))
    data = build_training_data(annotations, slices=_slice_lists(args.slices, volumes, "--slices"),
                               validation_slices=_slice_lists(args.val_slices, volumes, "--val-slices"),
                               classes=_parse_ids(args.classes) if args.classes else None,
                               class_names=_parse_class_names(args.class_names))
    settings = TrainSettings(scope=args.scope, prompt_mode=args.prompt, decoder_steps=args.decoder_steps,
                             encoder_steps=args.encoder_steps, time_limit_s=args.time_limit or None,
                             batch_size=args.batch_size, views_per_slice=args.views, learning_rate=args.lr,
                             seed=args.seed, precision=args.precision,
                             lora=LoraSettings(rank=args.rank, alpha=args.alpha))
    model = load_model(args.model, args.checkpoint, device=select_device(args.device))
    print(f"fine-tuning {model.name} ({settings.scope}, prompt {settings.prompt_mode}) on {data.describe()}",
          file=sys.stderr)

    interrupted = []
    previous_handler = signal.getsignal(signal.SIGINT)

    def on_interrupt(signum, frame):
        if interrupted:  # a second Ctrl-C aborts at once
            signal.signal(signal.SIGINT, previous_handler)
            raise KeyboardInterrupt
        interrupted.append(True)
        print("\nstopping after this step; the best adapter so far is kept (Ctrl-C again to abort)", file=sys.stderr)

    with tqdm(total=sum(settings.planned_steps(data)), desc="fine-tuning",
              unit="step", file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps {postfix}") as bar:
        def progress(step: int, total: int, metrics: dict) -> None:
            print_progress(bar, step, total, metrics)

        signal.signal(signal.SIGINT, on_interrupt)
        try:
            result = train_adapter(model, data, args.output, settings, progress=progress,
                                   should_cancel=lambda: bool(interrupted))
        finally:
            signal.signal(signal.SIGINT, previous_handler)
    if result.warning:
        print(f"WARNING: {result.warning}", file=sys.stderr)
    if result.adapter_dir is None:
        print("stopped before any training step: no adapter was written", file=sys.stderr)
        return 1
    print(f"adapter {result.adapter_id} written to {result.adapter_dir} ({result.adapter_bytes / 2**20:.2f} MB, "
          f"{result.trainable_parameters:,} trainable parameters, {result.steps} steps in {result.seconds:.0f} s, "
          f"of {result.steps_planned} planned, stopped: {result.stopped})")
    for mode, after in result.val_dice_after.items():
        before = result.val_dice_before.get(mode, float("nan"))
        label = "automatic" if mode == "none" else mode
        print(f"validation Dice ({label}): {before:.3f} -> {after:.3f}")
    return 0
