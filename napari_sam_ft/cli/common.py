"""Options and helpers shared by the subcommands."""

from __future__ import annotations

import contextlib
import sys

from ..devices import DEVICE_CHOICES
from ..volume import WINDOW_CHOICES


def add_volume_options(parser) -> None:
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), default=None,
                        help="file voxel axis to slice along (default 2, the third, for NIfTI/NRRD/MHA/MGZ/DICOM; "
                        "0 for TIFF/npy)")
    parser.add_argument("--series", default=None, metavar="UID",
                        help="SeriesInstanceUID to read from a DICOM folder holding several series (default: the "
                        "largest CT/MR series; the choice is printed)")
    parser.add_argument("--channel", type=int, default=None, help="channel or time point of a 4D file")
    parser.add_argument("--channels", default=None,
                        help="up to three channels of a 4D file fed to SAM's red, green and blue inputs, e.g. 0,1,2 "
                        "(T1/T2/FLAIR); or extra co-registered files with --with-sequences")
    parser.add_argument("--with-sequences", nargs="+", default=None, metavar="FILE",
                        help="co-registered volumes stacked with IMAGE as channels (e.g. T2.nii.gz FLAIR.nii.gz)")
    parser.add_argument("--window", default="auto",
                        help=f"intensity window: {', '.join(WINDOW_CHOICES)} or LEVEL,WIDTH (default auto: a CT "
                        "soft-tissue window for Hounsfield data, 0.5-99.5 %% percentiles otherwise)")


def add_model_options(parser) -> None:
    from ..models.registry import DEFAULT_MODEL, MODELS

    parser.add_argument("--model", choices=tuple(MODELS), default=DEFAULT_MODEL,
                        help="registry model (default: the embedded LiteMedSAM)")
    parser.add_argument("--checkpoint", default=None, help="weights file for models without embedded weights")
    parser.add_argument("--adapter", default=None, help="a fine-tuned adapter folder to apply")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="image-encoder precision (auto: bf16 where the hardware has it)")
    parser.add_argument("--no-disk-cache", action="store_true", help="keep embeddings in memory only")


def parse_window(text: str):
    if "," in text:
        level, width = (float(value) for value in text.split(","))
        return (level, width)
    return text


def read_input_volume(args):
    """IMAGE as one volume: a single channel, or several sequences as SAM's colour channels."""
    from ..volume import read_channels, read_volume

    channels = getattr(args, "channels", None)
    sequences = getattr(args, "with_sequences", None)
    if sequences:
        chosen = [int(value) for value in channels.split(",")] if channels else None
        return read_channels([args.image, *sequences], chosen, slicing_axis=args.axis)
    if channels:
        try:
            chosen = [int(value) for value in channels.split(",")]
        except ValueError:
            raise ValueError(f"--channels must be N or N,N,N; got {channels!r}") from None
        return read_channels(args.image, chosen, slicing_axis=args.axis)
    volume = read_volume(args.image, slicing_axis=getattr(args, "axis", None), channel=getattr(args, "channel", None),
                         series_uid=getattr(args, "series", None))
    chosen = getattr(volume.header, "chosen_message", None)  # which DICOM series of a folder was read, and why
    if chosen:
        print(chosen, file=sys.stderr)
    return volume


def open_predictor(args, volume=None):
    """The volume and a ``VolumePredictor`` for it, configured from the common options."""
    from ..devices import select_device
    from ..engine.cache import EmbeddingCache, default_cache_dir
    from ..models.registry import load_model
    from ..scan_jobs import predictor_for

    if volume is None:
        volume = read_input_volume(args)
    device = select_device(args.device)
    model = load_model(args.model, args.checkpoint, device=device)
    if getattr(args, "adapter", None):
        from ..finetune.adapters import load_adapter

        load_adapter(model, args.adapter)
    cache = EmbeddingCache(disk_dir=None if args.no_disk_cache else default_cache_dir())
    # Under an adapter, "auto" is the adapter's training window and a different explicit window is refused.
    predictor = predictor_for(model, volume, parse_window(getattr(args, "window", "auto")), cache, args.precision)
    return volume, predictor


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "slice"):
    """A tqdm bar on stderr driven by the engine's ``progress(done, total)`` callbacks."""
    from tqdm import tqdm

    with tqdm(total=total, desc=description, unit=unit, file=sys.stderr, leave=False,
              disable=not sys.stderr.isatty()) as bar:
        def update(done: int, new_total: int, *_) -> None:
            if bar.total != new_total:
                bar.total = new_total
                bar.refresh()
            bar.n = done
            bar.refresh()

        yield update
