"""``napari-sam-ft session save|open|info|recover``: sessions and autosaves as files, without napari."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..slices import parse_slice_list
from .common import parse_window


def register(subparsers) -> None:
    session = subparsers.add_parser("session", help="save, open and inspect sessions; recover autosaved labels")
    commands = session.add_subparsers(dest="session_command", metavar="ACTION", required=True)

    save = commands.add_parser("save", help="write a session file for IMAGE (and its labels, prompts, choices)")
    save.add_argument("session", help="session file to write (NAME.session.json; labels go to NAME.labels.nii.gz)")
    save.add_argument("--image", required=True, help="the scan (.nii/.nii.gz/.tif/.npy)")
    save.add_argument("--labels", default=None, help="a label file with the image's geometry")
    save.add_argument("--prompts", default=None, help="a JSON prompt file (see `napari-sam-ft segment --help`)")
    save.add_argument("--model", default="litemedsam")
    save.add_argument("--checkpoint", default=None)
    save.add_argument("--adapter", default=None, help="fine-tuned adapter folder")
    save.add_argument("--window", default="auto", help="intensity window name or LEVEL,WIDTH")
    save.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="file voxel axis to slice along")
    save.add_argument("--channels", default=None, help="channel(s) of a 4D file, e.g. 0 or 0,1,2")
    save.add_argument("--reviewed", default="", help="slices marked reviewed, e.g. 3,5,10-14")
    save.set_defaults(run=run_save)

    open_ = commands.add_parser("open", help="check a session against its image and export its labels/prompts")
    open_.add_argument("session")
    open_.add_argument("--labels-out", default=None, help="write the session's labels here (.nii.gz/.tif/.npy)")
    open_.add_argument("--prompts-out", default=None, help="write the session's prompts here (JSON)")
    open_.set_defaults(run=run_open)

    info = commands.add_parser("info", help="describe a session file, or an image's recoverable autosave")
    info.add_argument("path", help="a NAME.session.json, or an image to look for autosaved labels of")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(run=run_info)

    recover = commands.add_parser("recover", help="write the labels autosaved for IMAGE before a crash")
    recover.add_argument("image")
    recover.add_argument("-o", "--output", required=True, help="label file to write")
    recover.add_argument("--discard", action="store_true", help="remove the autosave after writing it out")
    recover.set_defaults(run=run_recover)


def _channels(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(value) for value in text.split(",")]
    except ValueError:
        raise ValueError(f"--channels must be N or N,N,N; got {text!r}") from None


def run_save(args) -> int:
    from ..engine.prompts import load_prompts
    from ..session import read_session_volume, save_session, session_from_volume
    from ..volume import read_labels

    channels = _channels(args.channels)
    volume = read_session_volume(args.image, args.axis, channels)
    window = parse_window(args.window)
    state = session_from_volume(
        volume, model_name=args.model, checkpoint=_absolute(args.checkpoint), adapter_dir=_absolute(args.adapter),
        window=list(window) if isinstance(window, tuple) else window, axis=args.axis, channels=channels,
        reviewed_slices=parse_slice_list(args.reviewed, volume.num_slices),
        prompts=load_prompts(args.prompts, volume.shape) if args.prompts else [])
    labels = read_labels(args.labels, like=volume).array if args.labels else None
    path = save_session(args.session, state, labels, like=volume)
    print(f"wrote {path}" + (f" and {Path(path).parent / state.labels_file}" if state.labels_file else ""))
    return 0


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def run_open(args) -> int:
    from ..engine.prompts import save_prompts
    from ..session import open_session
    from ..volume import write_volume

    opened = open_session(args.session)
    for warning in opened.warnings:
        print(f"warning: {warning}")
    _print_state(opened.state, opened.labels)
    if args.labels_out:
        if opened.labels is None:
            raise ValueError(f"{args.session}: the session holds no labels to write")
        print(f"wrote {write_volume(args.labels_out, opened.labels, like=opened.volume)}")
    if args.prompts_out:
        if not opened.state.prompts:
            raise ValueError(f"{args.session}: the session holds no prompts to write")
        save_prompts(args.prompts_out, opened.state.prompts)
        print(f"wrote {args.prompts_out}")
    return 0


def _print_state(state, labels=None) -> None:
    print(f"image:     {state.image_path} {tuple(state.shape)} (Z, Y, X), hash {state.image_hash[:12]}")
    print(f"model:     {state.model_name}" + (f" checkpoint {state.checkpoint}" if state.checkpoint else "")
          + (f", adapter {state.adapter_dir}" if state.adapter_dir else ""))
    print(f"window:    {state.window}, axis {state.axis if state.axis is not None else 'default'}"
          + (f", channels {state.channels}" if state.channels else ""))
    print(f"prompts:   {len(state.prompts)} on {len({prompt.slice_index for prompt in state.prompts})} slices")
    print(f"reviewed:  {len(state.reviewed_slices)} slices {state.reviewed_slices[:20]}"
          + (" ..." if len(state.reviewed_slices) > 20 else ""))
    if labels is not None:
        ids = [int(value) for value in np.unique(labels) if value][:20]
        print(f"labels:    {int(np.count_nonzero(labels))} labelled voxels, ids {ids}")
    elif state.labels_file:
        print(f"labels:    {state.labels_file}")
    print(f"saved at:  {state.saved_at}")


def run_info(args) -> int:
    from ..session import SESSION_SUFFIX, read_session_file, scan_autosaves

    path = Path(args.path)
    if path.name.endswith(SESSION_SUFFIX) or path.suffix == ".json":
        state = read_session_file(path)
        if args.json:
            print(json.dumps(state.to_json()))
        else:
            _print_state(state)
        return 0
    if not path.exists():
        raise ValueError(f"{path}: file not found")
    scan = scan_autosaves(path)
    info = scan.recoverable[0] if scan.recoverable else None
    for damaged in scan.damaged:
        print(f"warning: a damaged autosave of {path} was moved aside to {damaged}", file=sys.stderr)
    if args.json:
        print(json.dumps(None if info is None else {"autosave": str(info.path), "saved_at": info.saved_at,
                                                    "edits": info.edits, "shape": list(info.shape),
                                                    "image_changed": info.image_changed}))
    elif info is None:
        print(f"{path}: no autosaved labels to recover")
    else:
        print(f"{path}: labels autosaved {info.saved_at_text} after {info.edits} edits, shape {info.shape}"
              + (" (the image changed since)" if info.image_changed else "")
              + f"\n  recover with: napari-sam-ft session recover {path} -o LABELS.nii.gz")
    return 0


def run_recover(args) -> int:
    from ..session import discard_autosave, find_recoverable_autosave, restore_autosave
    from ..volume import read_volume, write_volume

    info = find_recoverable_autosave(args.image)
    if info is None:
        raise ValueError(f"{args.image}: no autosaved labels to recover")
    volume = read_volume(args.image, check_values=False)
    labels = restore_autosave(info, like=volume)
    path = write_volume(args.output, labels, like=volume)
    print(f"wrote {path} (autosaved {info.saved_at_text}, {info.edits} edits)")
    if args.discard:
        discard_autosave(info)
    return 0
