"""How the segment widget feels: click-to-preview latency, and GUI responsiveness while a volume encodes.

Run under a display (or Xvfb):

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/gui_latency.py

1. Click-to-preview: on a slice whose embedding is cached, ``--clicks`` positive points are added to the
   widget's points layer (the same data event a mouse click makes). We report the widget's own
   measurement (points-layer data change -> preview layer refreshed), the time until the event loop has
   repainted the viewer, and the decoder alone (``predictor.last_decode_ms``) -- with the viewer idle and
   while the widget's worker encodes the rest of the volume, for 1 and for 2 decoder threads.
2. Responsiveness: a QTimer ticks every 20 ms on the GUI thread while the worker encodes the whole
   volume; the largest gap between ticks is the longest the viewer froze.
3. Responsiveness on a large scan (``--large-shape``, default 300x512x512, a generated phantom CT opened
   with the plugin's reader, int32 labels): the longest event-loop gap (a 10 ms QTimer) while the Segment
   widget encodes ``--encode-slices`` slices, while the Session panel autosaves the labels, and while it
   saves a session. Target: <= 100 ms each (nothing over 50 ms of work runs on the GUI thread).
Prints tables; writes only into a temporary folder (embeddings stay in memory).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

SLICE, LIVER = 15, 5


def _wait(app, condition, timeout_s: float = 900.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        app.processEvents()
        time.sleep(0.002)
        if time.perf_counter() > deadline:
            raise TimeoutError("the widget did not finish in time")


def _click_positions(viewer, clicks: int) -> np.ndarray:
    reference = np.asarray(viewer.layers["sample CT reference"].data[SLICE]) == LIVER
    rows, cols = np.nonzero(reference)
    chosen = np.random.default_rng(0).choice(len(rows), size=clicks, replace=False)
    return np.stack([np.full(clicks, SLICE), rows[chosen], cols[chosen]], axis=1).astype(float)


def clicks(widget, app, positions, between_s: float = 0.0) -> dict[str, list[float]]:
    """Add one point per position; returns per-click times in ms."""
    points = widget.prompt_layers()[0]
    measured: dict[str, list[float]] = {"widget": [], "repainted": [], "decoder": []}
    for position in positions:
        points.data = np.empty((0, 3))  # one point at a time: every click is the same amount of work
        started = time.perf_counter()
        points.add([position])
        app.processEvents()
        while widget.segmenting_in_background:  # a click without a box on a box-trained model is searched in a worker
            app.processEvents()
            time.sleep(0.001)
        app.processEvents()
        measured["repainted"].append((time.perf_counter() - started) * 1000.0)
        measured["widget"].append(widget.last_click_to_preview_ms)
        measured["decoder"].append(widget.predictor.last_decode_ms)
        pause_until = time.perf_counter() + between_s
        while time.perf_counter() < pause_until:
            app.processEvents()
            time.sleep(0.005)
    return measured


def start_encoding(widget, session, app) -> None:
    """Empty the memory-only cache except the clicked slice, then encode the volume in the worker."""
    session.cache.clear_memory()
    widget.predictor.encode_slices([SLICE])
    widget.encode_volume()
    _wait(app, lambda: widget.controls.progress_bar.maximum() > 1)  # the worker is encoding


def timer_gaps(widget, session, app) -> dict[str, float]:
    """Gaps between 20 ms GUI timer ticks while the whole volume encodes in the worker."""
    from qtpy.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(20)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    start_encoding(widget, session, app)
    _wait(app, lambda: widget.idle)
    timer.stop()
    outcome = widget.tasks.last_outcome
    gaps = np.diff(ticks) * 1000.0
    encoded = widget.predictor.volume.num_slices - 1
    return {"per_slice_s": outcome.seconds / encoded, "median": float(np.median(gaps)),
            "p99": float(np.percentile(gaps, 99)), "max": float(gaps.max())}


class GapMeter:
    """The longest pause of the Qt event loop while ``measure`` waits for something (a 10 ms QTimer)."""

    def __init__(self, app):
        from qtpy.QtCore import QTimer

        self.app = app
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def measure(self, start, finished, timeout_s: float = 1800.0) -> tuple[float, float]:
        """Run ``start()``, spin the event loop until ``finished()``; (longest gap ms, seconds taken)."""
        self.ticks = [time.perf_counter()]
        self.timer.start()
        started = time.perf_counter()
        start()
        while not finished():
            self.app.processEvents()  # as the running event loop would; ticks stop while the GUI thread is busy
            time.sleep(0.001)
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError("the task did not finish in time")
        seconds = time.perf_counter() - started
        self.app.processEvents()
        self.timer.stop()
        self.ticks.append(time.perf_counter())
        return float(np.diff(self.ticks).max() * 1000.0), seconds


def large_volume_gaps(args, folder) -> list[tuple[str, float, float]]:
    """Event-loop gaps on a generated large CT while encoding, autosaving and saving a session."""
    import importlib.util
    from pathlib import Path

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam_ft._widgets._layers import new_labels_layer
    from napari_sam_ft._widgets.session_panel import SessionPanel
    from napari_sam_ft._widgets.segment import SegmentWidget

    spec = importlib.util.spec_from_file_location("large_volume_bench", Path(__file__).with_name("large_volume.py"))
    phantom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phantom)
    image_path, labels_path = folder / "large_ct.nii", folder / "large_labels.nii.gz"
    phantom.write_phantom_ct(image_path, shape=tuple(args.large_shape), labels_path=labels_path)

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    image = viewer.open(str(image_path), plugin="napari-sam-ft")[0]
    organs = viewer.open(str(labels_path), plugin="napari-sam-ft")[0]
    labels = new_labels_layer(viewer, image, "large labels", np.asarray(organs.data, dtype=np.int32))
    viewer.layers.remove(organs)
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment, name="Segment")
    panel = SessionPanel(viewer)
    viewer.window.add_dock_widget(panel, name="Session")
    panel.labels_combo.select_layer(labels)
    segment.controls.image_combo.select_layer(image)
    # The widget makes its prompt and preview layers once an image is chosen (napari's own layer setup): settle first.
    _wait(app, lambda: segment.prompt_layers(notify=False) is not None)
    settle_until = time.perf_counter() + 1.0
    while time.perf_counter() < settle_until:
        app.processEvents()
    meter = GapMeter(app)
    rows = []

    encoded = lambda: (segment.predictor is not None and segment.predictor.encoded_slices >= args.encode_slices)
    gap, seconds = meter.measure(segment.encode_volume, lambda: encoded() or segment.idle)
    segment.cancel()
    _wait(app, lambda: segment.idle)
    rows.append((f"encoding {args.encode_slices} slices (model load and volume hash included)", gap, seconds))

    autosaver = panel.autosaver
    saves = autosaver.saves
    gap, seconds = meter.measure(autosaver.save_now, lambda: autosaver.saves > saves)
    rows.append((f"autosaving {labels.data.nbytes / 2**20:.0f} MB of int32 labels", gap, seconds))

    gap, seconds = meter.measure(lambda: panel.save(folder / "large.session.json"), lambda: panel.idle)
    if panel.last_saved is None:
        raise RuntimeError("the session was not saved (see the notification)")
    rows.append(("saving a session (hash, labels .nii.gz, JSON)", gap, seconds))
    viewer.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--large-shape", type=lambda text: [int(value) for value in text.split(",")],
                        default=[300, 512, 512], help="Z,Y,X of the generated scan for part 3 (default 300,512,512)")
    parser.add_argument("--encode-slices", type=int, default=8, help="slices encoded during part 3 (default 8)")
    parser.add_argument("--only-large", action="store_true", help="only part 3 (event-loop gaps on a large scan)")
    args = parser.parse_args(argv)
    if args.only_large:
        return print_large_volume_gaps(args)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_sam_ft._widgets._session import SegmentSession
    from napari_sam_ft._widgets.segment import SegmentWidget
    from napari_sam_ft.engine.cache import EmbeddingCache

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-sam-ft", "ct")
    viewer.dims.set_current_step(0, SLICE)
    app = QApplication.instance()
    session = SegmentSession(EmbeddingCache(disk_dir=None))  # memory only: nothing is written
    widget = SegmentWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget, name="Segment")
    positions = _click_positions(viewer, args.clicks)
    widget.prompt_layers()[0].add([positions[0]])
    _wait(app, lambda: widget.idle)  # loads the model and encodes the clicked slice once

    rows = []
    for threads in (1, 2):
        widget.decode_threads = threads
        clicks(widget, app, positions[:2])  # warm-up
        rows.append((f"{threads} decode thread(s), viewer idle", clicks(widget, app, positions)))
        start_encoding(widget, session, app)
        rows.append((f"{threads} decode thread(s), while encoding", clicks(widget, app, positions, between_s=0.3)))
        widget.tasks.cancel()
        _wait(app, lambda: widget.idle)
    widget.decode_threads = 1
    gaps = timer_gaps(widget, session, app)

    status = widget.predictor.status()
    print(f"\nnapari-sam-ft widget latency -- CT sample slice {SLICE}, {status['device']} {status['dtype']}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(f"{'click -> preview, ms (median / p90 of ' + str(args.clicks) + ' clicks)':<44} "
          f"{'data->preview':>15} {'repainted':>13} {'decoder':>13}")
    for label, measured in rows:
        cells = [f"{np.median(measured[key]):>6.0f} / {np.percentile(measured[key], 90):<5.0f}"
                 for key in ("widget", "repainted", "decoder")]
        print(f"  {label:<42} {cells[0]:>15} {cells[1]:>13} {cells[2]:>13}")
    print(f"\nGUI timer (20 ms) while the worker encodes {status['num_slices'] - 1} slices "
          f"({gaps['per_slice_s']:.2f} s/slice): median gap {gaps['median']:.0f} ms, p99 {gaps['p99']:.0f} ms, "
          f"max {gaps['max']:.0f} ms")
    viewer.close()
    return print_large_volume_gaps(args)


def print_large_volume_gaps(args) -> int:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="napari-sam-ft-gui-bench-") as folder:
        os.environ["NAPARI_SAM_FT_AUTOSAVE"] = str(Path(folder) / "autosave")  # never the user's autosave folder
        os.environ["NAPARI_SAM_FT_CACHE"] = str(Path(folder) / "cache")
        rows = large_volume_gaps(args, Path(folder))
    shape = "x".join(str(size) for size in args.large_shape)
    print(f"\nlongest event-loop gap on a {shape} CT (target <= 100 ms), load average {os.getloadavg()[0]:.1f}\n")
    print(f"  {'while':<62} {'longest gap, ms':>15} {'took, s':>8}")
    for label, gap, seconds in rows:
        print(f"  {label:<62} {gap:>15.0f} {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
