"""A laptop-sized real scan: a generated 512x512x600 int16 CT, opened, segmented, reopened and saved.

Writes a synthetic CT (body ellipse with fat, muscle, lungs, heart, liver, spleen, kidneys, aorta, spine
and pelvis at realistic Hounsfield units, plus noise) into a temporary folder, slice by slice, as an
uncompressed .nii and as the .nii.gz most users have, with its organ labels. The anatomy is right in world
space (RAS affine; the liver on the patient's right), and the prompts are taken from the radiological view
the reader displays, so a mirrored display would show as a low Dice and a liver on the wrong side.

The .nii, in this process, with the embedded LiteMedSAM:

* open: ``read_volume`` (memory-mapped) with its NaN/constant check;
* predictor: content hash (the embedding-cache key) and the automatic CT window;
* time to first mask: open + predictor + encoding one slice + one box prompt on the liver (Dice against
  the phantom's own liver mask);
* auto-segment: ``segment_volume`` over ``--slices N`` slices through the abdomen (default 8 on a laptop
  CPU; the whole volume is N = 600);
* reopen: the same file with a fresh embedding cache over the same disk folder: zero encoder passes;
* session save and one autosave of the full-size labels;
* peak resident memory of this process (``resource.getrusage``), which must stay under 8 GiB.

The .nii.gz, each run a fresh process (its own peak RSS, wall time from start to exit,
model load and Python start-up included):

* first mask: ``evaluate CT.nii.gz LABELS.nii.gz --prompt box --slices L:L+1 --classes 5`` with an empty cache:
  the one-off decompression to the memory-mapped cache, the content hash, one encoder pass, one box;
  must take at most 60 s and 4 GiB;
* evaluate ``--slices A:B`` (``--slices N`` of them, every organ, Dice and HD95), the decompressed copy reused:
  at most 4 GiB;
* the Segment widget in a real napari viewer (needs a display, e.g. xvfb-run): napari's reader opens the file,
  a box drawn on the liver gives the preview mask; the same 4 GiB.

    napari-sam-ft bench large [-- --slices 8 --shape 600,512,512 --keep DIR --skip-nii]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LIVER = 5  # TotalSegmentator's id, as in the sample labels
PEAK_RSS_LIMIT_GIB = 8.0
# The .nii.gz acceptance: through ``evaluate``, the first box mask within this memory and time.
COMPRESSED_PEAK_RSS_LIMIT_GIB = 4.0
COMPRESSED_FIRST_MASK_LIMIT_S = 60.0
# (label id, HU) of the phantom's tissues
AIR, FAT, MUSCLE, LUNG, HEART, LIVER_HU, SPLEEN, KIDNEY, AORTA, BONE, MARROW, BLADDER, GAS = (
    -1000, -100, 45, -850, 40, 60, 50, 30, 180, 750, 250, 10, -900)


def _ellipse(shape, cx: float, cy: float, ax: float, by: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The bounding-box slices and the boolean ellipse inside it (only the box is computed)."""
    height, width = shape
    y0, y1 = max(int(cy - by) - 1, 0), min(int(cy + by) + 2, height)
    x0, x1 = max(int(cx - ax) - 1, 0), min(int(cx + ax) + 2, width)
    ys, xs = np.ogrid[y0:y1, x0:x1]
    inside = ((xs - cx) / max(ax, 1e-3)) ** 2 + ((ys - cy) / max(by, 1e-3)) ** 2 <= 1.0
    return (slice(y0, y1), slice(x0, x1)), inside


def _paint(image, labels, value, label_id, cx, cy, ax, by) -> None:
    if ax <= 0 or by <= 0:
        return
    region, inside = _ellipse(image.shape, cx, cy, ax, by)
    image[region][inside] = value
    if labels is not None:
        labels[region][inside] = label_id


def _profile(t: float, start: float, end: float) -> float:
    """0 outside [start, end], rising to 1 in the middle: how large an organ is at height t."""
    if not start < t < end:
        return 0.0
    return float(np.sin(np.pi * (t - start) / (end - start)) ** 0.5)


def phantom_slice(z: int, num_slices: int, height: int, width: int, noise: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One axial slice (int16 HU) and its organ labels; t = z / num_slices runs from pelvis (0) to neck (1).

    Drawn in the radiological view: rows run from anterior to posterior, columns from the patient's right to
    left (the liver is on the image's left). ``write_phantom_ct`` stores it in RAS voxel order.
    """
    t = z / max(num_slices - 1, 1)
    scale = min(height, width) / 512.0
    cx, cy = width / 2, height / 2 + 14 * scale
    image = np.full((height, width), AIR, np.int16)
    labels = np.zeros((height, width), np.uint8)
    body_a, body_b = (190 - 40 * abs(t - 0.5)) * scale, (135 - 20 * abs(t - 0.5)) * scale
    _paint(image, None, FAT, 0, cx, cy, body_a, body_b)
    _paint(image, None, MUSCLE, 0, cx, cy, body_a - 14 * scale, body_b - 14 * scale)
    lung = _profile(t, 0.6, 0.98)
    for side in (-1, 1):
        _paint(image, None, LUNG, 0, cx + side * 80 * scale, cy - 10 * scale, 62 * scale * lung, 85 * scale * lung)
    heart = _profile(t, 0.64, 0.86)
    _paint(image, None, HEART, 0, cx + 15 * scale, cy - 25 * scale, 58 * scale * heart, 52 * scale * heart)
    liver = _profile(t, 0.42, 0.68)
    _paint(image, labels, LIVER_HU, LIVER, cx - 70 * scale, cy - 5 * scale, 90 * scale * liver, 78 * scale * liver)
    spleen = _profile(t, 0.48, 0.64)
    _paint(image, labels, SPLEEN, 1, cx + 92 * scale, cy + 15 * scale, 32 * scale * spleen, 45 * scale * spleen)
    kidney = _profile(t, 0.36, 0.52)
    for side, label_id in ((-1, 2), (1, 3)):
        _paint(image, labels, KIDNEY, label_id, cx + side * 78 * scale, cy + 55 * scale, 26 * scale * kidney,
               38 * scale * kidney)
    bladder = _profile(t, 0.03, 0.18)
    _paint(image, None, BLADDER, 0, cx, cy - 10 * scale, 48 * scale * bladder, 40 * scale * bladder)
    for index, (dx, dy) in enumerate(((-40, -40), (30, -55), (10, 10))):  # bowel gas
        _paint(image, None, GAS, 0, cx + dx * scale, cy + dy * scale, 9 * scale * _profile(t, 0.2 + 0.05 * index, 0.42),
               7 * scale * _profile(t, 0.2 + 0.05 * index, 0.42))
    if 0.15 < t < 0.92:
        _paint(image, None, AORTA, 0, cx + 18 * scale, cy + 62 * scale, 12 * scale, 12 * scale)
    _paint(image, None, BONE, 0, cx, cy + 92 * scale, 24 * scale, 22 * scale)  # vertebral body
    _paint(image, None, MARROW, 0, cx, cy + 92 * scale, 19 * scale, 17 * scale)
    pelvis = _profile(t, -0.05, 0.22)
    for side in (-1, 1):
        _paint(image, None, BONE, 0, cx + side * 112 * scale, cy + 20 * scale, 30 * scale * pelvis, 60 * scale * pelvis)
        _paint(image, None, MARROW, 0, cx + side * 112 * scale, cy + 20 * scale, 24 * scale * pelvis,
               53 * scale * pelvis)
    if noise is not None:
        body = image > -950
        image[body] += noise[body]
    return image, labels


def phantom_affine(shape, spacing=(1.0, 0.8, 0.8)) -> np.ndarray:
    """RAS+ voxel (i, j, k) -> world mm: i toward the patient's right, j anterior, k superior; centred on 0."""
    num_slices, height, width = shape
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
    affine[:3, 3] = [-spacing[2] * (width - 1) / 2, -spacing[1] * (height - 1) / 2, -spacing[0] * (num_slices - 1) / 2]
    return affine


def _nifti_header(shape, dtype, affine) -> "object":
    import nibabel as nib

    num_slices, height, width = shape
    header = nib.Nifti1Header()
    header.set_data_shape((width, height, num_slices))
    header.set_data_dtype(dtype)
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_slope_inter(1.0, 0.0)
    header["vox_offset"] = 352
    return header


def write_phantom_ct(path: Path, shape=(600, 512, 512), spacing=(1.0, 0.8, 0.8), seed: int = 0, *,
                     compressed_path: Path | None = None, labels_path: Path | None = None) -> Path:
    """Write the phantom as an int16 NIfTI, one slice at a time (never the whole volume in memory).

    ``compressed_path`` also writes the same bytes as a .nii.gz, ``labels_path`` the organ labels (uint8,
    gzip-compressed when its name ends in .gz). Each radiological-view slice is stored in RAS voxel order:
    flipped left-right (i runs toward the patient's right) and top-bottom (j runs anterior).
    """
    num_slices, height, width = shape
    affine = phantom_affine(shape, spacing)
    rng = np.random.default_rng(seed)
    noise_bank = rng.normal(0.0, 12.0, size=(4, height, width)).astype(np.int16)
    outputs = [open(path, "wb")]
    if compressed_path is not None:
        outputs.append(gzip.open(compressed_path, "wb", compresslevel=1))
    labels_output = None
    if labels_path is not None:
        labels_output = (gzip.open(labels_path, "wb", compresslevel=1) if labels_path.name.endswith(".gz")
                         else open(labels_path, "wb"))
    try:
        for handle, dtype in [(output, np.int16) for output in outputs] + (
                [(labels_output, np.uint8)] if labels_output is not None else []):
            header = _nifti_header(shape, dtype, affine).binaryblock
            handle.write(header + b"\0" * (352 - len(header)))
        for z in range(num_slices):
            image, labels = phantom_slice(z, num_slices, height, width, np.roll(noise_bank[z % 4], z * 7, axis=1))
            # (j, i) C order = NIfTI's i-fastest order; flipped from the radiological view into RAS voxel order.
            voxels = np.ascontiguousarray(image[::-1, ::-1]).tobytes()
            for output in outputs:
                output.write(voxels)
            if labels_output is not None:
                labels_output.write(np.ascontiguousarray(labels[::-1, ::-1]).tobytes())
    finally:
        for output in outputs + ([labels_output] if labels_output is not None else []):
            output.close()
    return path


def world_x_of(slice_index: int, mask_yx: np.ndarray, world_affine: np.ndarray) -> float:
    """RAS x (mm) of a displayed slice mask's centroid: positive on the patient's right (the liver's side)."""
    row, column = np.argwhere(mask_yx).mean(axis=0)
    return float((world_affine @ np.array([slice_index, row, column, 1.0]))[0])


def file_liver_x(labels_path: Path, liver_slice_k: int) -> float:
    """RAS x (mm) of the liver's centroid on file slice k, from the file with nibabel alone (not our reader)."""
    import nibabel as nib

    image = nib.load(str(labels_path))
    liver = np.asarray(image.dataobj[:, :, liver_slice_k]) == LIVER
    i, j = np.argwhere(liver).mean(axis=0)
    return float((image.affine @ np.array([i, j, liver_slice_k, 1.0]))[0])


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def run(args, folder: Path, rows: list) -> None:
    """The uncompressed .nii, in this process: open, first mask, auto-segment, reopen, save."""
    from napari_sam_ft.engine.automatic import segment_volume
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.session import SessionState, save_session, write_autosave
    from napari_sam_ft.volume import read_volume

    def row(step: str, seconds: float, note: str = "") -> None:
        rows.append((step, f"{seconds:.2f}", _gib(current_rss_bytes()), note))
        print(f"  {step}: {seconds:.2f} s, RSS {_gib(current_rss_bytes())} GiB {note}", file=sys.stderr)

    shape = tuple(args.shape)
    path = folder / "phantom_ct.nii"

    started = time.perf_counter()
    model = load_model("litemedsam", device=args.device)
    row("load model", time.perf_counter() - started, f"{model.name} on {model.device}")

    cache_dir = folder / "embeddings"
    opened = time.perf_counter()
    volume = read_volume(path)
    row("open (memory-mapped, checked)", time.perf_counter() - opened, f"{type(volume.array).__name__}")
    started = time.perf_counter()
    predictor = VolumePredictor(model, volume, cache=EmbeddingCache(disk_dir=cache_dir))
    row("content hash + window", time.perf_counter() - started, f"window {predictor.window.name}")

    num_slices, height, width = shape
    liver_slice = int(0.55 * (num_slices - 1))
    _, reference = phantom_slice(liver_slice, num_slices, height, width)  # the radiological view napari shows
    liver = reference == LIVER
    if volume.file_axes[0] != 2 or volume.flips[0]:
        raise RuntimeError(f"the phantom should display its axial slices in file order, got axes {volume.file_axes} "
                           f"and flips {volume.flips}")
    started = time.perf_counter()
    predictor.set_slice(liver_slice)
    row("encode 1 slice", time.perf_counter() - started, f"slice {liver_slice}")
    started = time.perf_counter()
    prediction = predictor.predict(box=box_from_mask(liver, margin=3))
    mask_done = time.perf_counter()
    seconds = mask_done - started
    mask_x = world_x_of(liver_slice, prediction.mask, volume.world_affine)
    file_x = file_liver_x(folder / "phantom_labels.nii.gz", liver_slice)
    row("box prompt -> mask", seconds,
        f"liver Dice {dice(prediction.mask, liver):.3f}, at RAS x {mask_x:+.0f} mm (nibabel: {file_x:+.0f} mm)")
    if not (mask_x > 0 and file_x > 0 and abs(mask_x - file_x) < 10):
        raise RuntimeError(f"the liver mask lies at RAS x {mask_x:+.1f} mm, the file's liver at {file_x:+.1f} mm: "
                           "it should be on the patient's right (x > 0) in both: a mirrored display or phantom")
    first_mask = mask_done - opened
    row("TIME TO FIRST MASK (open..mask)", first_mask, "excludes the one-off model load")

    first = max(0, liver_slice - args.slices // 2)
    auto_slices = range(first, min(num_slices, first + args.slices))
    started = time.perf_counter()
    labels = segment_volume(predictor, slice_indices=auto_slices)
    seconds = time.perf_counter() - started
    row(f"AUTO-SEGMENT {len(auto_slices)} slices", seconds,
        f"{seconds / len(auto_slices):.2f} s/slice -> {seconds / len(auto_slices) * num_slices / 60:.1f} min for all "
        f"{num_slices}; {int(labels.max())} objects; {predictor.encoder_calls} encoder passes")

    started = time.perf_counter()
    reopened = read_volume(path)
    second = VolumePredictor(model, reopened, cache=EmbeddingCache(disk_dir=cache_dir))
    second.predict(box=box_from_mask(liver, margin=3), slice_index=liver_slice)
    row("reopen + first mask (disk cache)", time.perf_counter() - started,
        f"{second.encoder_calls} encoder passes (must be 0)")
    if second.encoder_calls != 0:
        raise RuntimeError("reopening the volume ran the encoder: the disk cache did not serve it")

    labels[liver_slice][prediction.mask & (labels[liver_slice] == 0)] = 100
    state = SessionState(str(path), predictor.volume_hash, volume.shape, reviewed_slices=[liver_slice])
    started = time.perf_counter()
    session_path = save_session(folder / "phantom.session.json", state, labels, like=volume)
    labels_file = session_path.parent / state.labels_file
    row("save session (labels .nii.gz)", time.perf_counter() - started, f"{labels_file.stat().st_size / 2**20:.1f} MiB")
    os.environ.setdefault("NAPARI_SAM_FT_AUTOSAVE", str(folder / "autosave"))
    started = time.perf_counter()
    autosave = write_autosave(path, labels, edits=1)
    row("one autosave (.npz, zlib 1)", time.perf_counter() - started, f"{autosave.stat().st_size / 2**20:.1f} MiB")


# The child reports its own peak: Linux's VmHWM starts afresh at exec (ru_maxrss would start at the parent's RSS).
EVALUATE_WITH_PEAK = """
import resource, sys
from napari_sam_ft.cli import main
code = main(sys.argv[1:])
try:
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
print("PEAK_RSS_KIB", peak, file=sys.stderr)
sys.exit(code)
"""


def evaluate_in_fresh_process(arguments: list[str], cache_dir: Path) -> tuple[dict, float, int]:
    """(report, wall seconds, peak RSS bytes) of one ``napari-sam-ft evaluate`` run in its own process."""
    environment = dict(os.environ, NAPARI_SAM_FT_CACHE=str(cache_dir))
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-c", EVALUATE_WITH_PEAK, "evaluate", *arguments, "--json"],
                              capture_output=True, text=True, env=environment,
                              cwd=str(Path(__file__).resolve().parents[1]))
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"evaluate failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
    peak_kib = next(int(line.split()[1]) for line in finished.stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return json.loads(finished.stdout.strip().splitlines()[-1]), seconds, peak_kib * 1024


# The Segment widget in a real viewer, in a fresh process: napari's reader opens the .nii.gz, a box drawn on the
# liver gives the preview mask, which is saved for the parent to score; the child reports its own peak.
WIDGET_FIRST_MASK = """
import json, sys, time
import numpy as np
started = time.perf_counter()
import napari
from qtpy.QtWidgets import QApplication
from napari_sam_ft._widgets._session import SegmentSession
from napari_sam_ft._widgets.segment import SegmentWidget
path, slice_index, corners, output = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
viewer = napari.Viewer(show=True)
viewer.open(path, plugin="napari-sam-ft")
viewer.dims.set_current_step(0, slice_index)
app = QApplication.instance()
widget = SegmentWidget(viewer, session=SegmentSession())
viewer.window.add_dock_widget(widget, name="Segment")
_, boxes, preview = widget.prompt_layers()
boxes.add_rectangles(np.array(corners))
deadline = time.perf_counter() + 600
while not (widget.idle and np.asarray(preview.data[slice_index]).any()):
    app.processEvents()
    time.sleep(0.005)
    if time.perf_counter() > deadline:
        raise TimeoutError("no preview mask within 600 s")
seconds = time.perf_counter() - started
np.save(output, np.asarray(preview.data[slice_index]) > 0)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_kib": peak}))
viewer.close()
"""


def run_widget(args, folder: Path, rows: list) -> dict:
    """The .nii.gz opened by napari's reader into the Segment widget; a box on the liver -> preview mask."""
    from napari_sam_ft.engine.prompts import box_from_mask, box_to_rectangle_zyx
    from napari_sam_ft.metrics import dice

    if sys.platform != "linux" or not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        rows.append((".nii.gz in the Segment widget", "-", "-", "skipped: needs Linux and a display (xvfb-run)"))
        return {}
    num_slices, height, width = args.shape
    liver_slice = int(0.55 * (num_slices - 1))
    liver = phantom_slice(liver_slice, num_slices, height, width)[1] == LIVER
    corners = box_to_rectangle_zyx(liver_slice, box_from_mask(liver)).tolist()  # napari (z, y, x) corners
    output = folder / "widget_preview.npy"
    environment = dict(os.environ, NAPARI_SAM_FT_CACHE=str(folder / "widget-cache"))  # decompresses anew
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-c", WIDGET_FIRST_MASK, str(folder / "phantom_ct.nii.gz"),
                               str(liver_slice), json.dumps(corners), str(output)], capture_output=True, text=True,
                              env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"the widget run failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    peak = result["peak_kib"] * 1024
    rows.append((".nii.gz in the Segment widget (1 box)", f"{result['seconds']:.2f}", _gib(peak),
                 f"liver Dice {dice(np.load(output), liver):.3f}; process {time.perf_counter() - started:.1f} s; "
                 "viewer + reader + decompress + model + encode + box"))
    return {"widget_peak": peak}


def run_compressed(args, folder: Path, rows: list) -> dict:
    """The .nii.gz through ``evaluate`` in fresh processes: the first box mask, then a slice range."""
    num_slices = args.shape[0]
    liver_slice = int(0.55 * (num_slices - 1))
    image, labels = folder / "phantom_ct.nii.gz", folder / "phantom_labels.nii.gz"
    cache_dir = folder / "cache"  # empty: the first run decompresses
    common = [str(image), str(labels), "--prompt", "box", "--device", args.device]
    report, seconds, peak = evaluate_in_fresh_process(
        [*common, "--slices", f"{liver_slice}:{liver_slice + 1}", "--classes", str(LIVER)], cache_dir)
    liver = report["per_class"][str(LIVER)]
    rows.append((".nii.gz FIRST MASK (evaluate, fresh process)", f"{seconds:.2f}", _gib(peak),
                 f"liver Dice {liver['dice']:.3f} on slice {liver_slice}; decompress + hash + 1 encoder pass + "
                 "model load + start-up"))
    first = max(0, liver_slice - args.slices // 2)
    last = min(num_slices, first + args.slices)
    range_report, range_seconds, range_peak = evaluate_in_fresh_process([*common, "--slices", f"{first}:{last}"],
                                                                        cache_dir)
    dices = ", ".join(f"{name} {entry['dice']:.3f}" for name, entry in range_report["per_class"].items())
    rows.append((f".nii.gz evaluate --slices {first}:{last}", f"{range_seconds:.2f}", _gib(range_peak),
                 f"Dice {dices}; HD95 {range_report['hd95']} mm; cached copy reused"))
    return {"first_mask_seconds": seconds, "peak": max(peak, range_peak)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-sam-ft bench large", description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=8, help="slices to auto-segment (default 8; 600 = all)")
    parser.add_argument("--shape", type=lambda text: [int(value) for value in text.split(",")], default=[600, 512, 512],
                        help="Z,Y,X of the generated CT (default 600,512,512)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    parser.add_argument("--keep", default=None, help="write into this folder and keep the files")
    parser.add_argument("--skip-nii", action="store_true", help="only the .nii.gz case (through evaluate)")
    parser.add_argument("--skip-gz", action="store_true", help="only the uncompressed .nii case (in this process)")
    args = parser.parse_args(argv)
    if len(args.shape) != 3 or min(args.shape) < 8:
        parser.error("--shape needs three sizes of at least 8, e.g. 600,512,512")
    args.slices = max(1, min(args.slices, args.shape[0]))

    import torch

    rows: list[tuple[str, str, str, str]] = []
    compressed: dict = {}

    def run_all(folder: Path) -> None:
        shape = tuple(args.shape)
        started = time.perf_counter()
        write_phantom_ct(folder / "phantom_ct.nii", shape, compressed_path=folder / "phantom_ct.nii.gz",
                         labels_path=folder / "phantom_labels.nii.gz")
        rows.append(("generate + write .nii, .nii.gz, labels", f"{time.perf_counter() - started:.2f}", "-",
                     f"{(folder / 'phantom_ct.nii').stat().st_size / 2**20:.0f} MiB int16 {shape[2]}x{shape[1]}x"
                     f"{shape[0]}; .nii.gz {(folder / 'phantom_ct.nii.gz').stat().st_size / 2**20:.0f} MiB"))
        if not args.skip_gz:
            compressed.update(run_compressed(args, folder, rows))
            compressed.update(run_widget(args, folder, rows))
        if not args.skip_nii:
            run(args, folder, rows)

    if args.keep:
        folder = Path(args.keep)
        folder.mkdir(parents=True, exist_ok=True)
        run_all(folder)
    else:
        with tempfile.TemporaryDirectory(prefix="napari-sam-ft-large-") as temporary:
            run_all(Path(temporary))
    peak = peak_rss_bytes()
    print(f"\nLarge volume: {args.shape[2]}x{args.shape[1]}x{args.shape[0]} int16 CT, LiteMedSAM on {args.device}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    print(f"{'step':<44} {'seconds':>8} {'RSS GiB':>8}  note")
    for step, seconds, rss, note in rows:
        print(f"{step:<44} {seconds:>8} {rss:>8}  {note}")
    within = True
    if not args.skip_nii:
        verdict = "within" if peak <= PEAK_RSS_LIMIT_GIB * 2**30 else "OVER"
        within &= verdict == "within"
        print(f"{'PEAK RSS (.nii, this process)':<44} {'':>8} {_gib(peak):>8}  {verdict} the "
              f"{PEAK_RSS_LIMIT_GIB:g} GiB budget")
    if compressed:
        compressed_peak = max(compressed["peak"], compressed.get("widget_peak", 0))
        memory = "within" if compressed_peak <= COMPRESSED_PEAK_RSS_LIMIT_GIB * 2**30 else "OVER"
        speed = "within" if compressed["first_mask_seconds"] <= COMPRESSED_FIRST_MASK_LIMIT_S else "OVER"
        within &= memory == speed == "within"
        where = "evaluate and widget" if "widget_peak" in compressed else "evaluate"
        print(f"{'PEAK RSS (.nii.gz, ' + where + ')':<44} {'':>8} {_gib(compressed_peak):>8}  {memory} the "
              f"{COMPRESSED_PEAK_RSS_LIMIT_GIB:g} GiB budget; first mask {compressed['first_mask_seconds']:.1f} s, "
              f"{speed} the {COMPRESSED_FIRST_MASK_LIMIT_S:g} s budget")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
