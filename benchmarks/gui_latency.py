"""How the segment widget feels: click-to-preview latency and GUI responsiveness while a volume encodes.

Run under a display (or Xvfb):

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python benchmarks/gui_latency.py

1. Click-to-preview: with the slice's embedding cached, a positive point is added to the widget's points
   layer ~10 times; we time from the points-layer data change to the preview layer's refresh (the widget's
   own measurement) and to the end of the next event-loop pass (what the user waits for), and the decoder
   alone (``predictor.last_decode_ms``).
2. Responsiveness: a QTimer ticks every 20 ms on the GUI thread while the widget's background worker
   encodes the volume; the largest gap between ticks is how long the viewer froze. Measured with torch's
   default thread count and with one thread left to the GUI (``torch.set_num_threads(cores - 1)``).
Prints one table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _wait(app, condition, timeout_s: float = 600.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        app.processEvents()
        time.sleep(0.002)
        if time.perf_counter() > deadline:
            raise TimeoutError("the widget did not finish in time")


def click_latency(viewer, widget, app, clicks: int, slice_index: int) -> dict[str, float]:
    """Median and 90th percentile of click -> preview times over ``clicks`` clicks on a cached slice."""
    from napari_sam_ft.engine.prompts import box_from_mask

    points, boxes, preview = widget.prompt_layers()
    reference = np.asarray(viewer.layers["sample CT reference"].data[slice_index]) == 5  # liver
    viewer.dims.set_current_step(0, slice_index)
    x0, y0, x1, y1 = box_from_mask(reference)
    boxes.add_rectangles(np.array([[slice_index, y0, x0], [slice_index, y0, x1],
                                   [slice_index, y1, x1], [slice_index, y1, x0]]))
    _wait(app, lambda: widget.idle)  # loads the model and encodes this slice once
    rows, cols = np.nonzero(reference)
    rng = np.random.default_rng(0)
    widget_ms, visible_ms, decode_ms = [], [], []
    for index in rng.choice(len(rows), size=clicks, replace=False):
        started = time.perf_counter()
        points.add([[slice_index, rows[index], cols[index]]])
        app.processEvents()  # the canvas redraws with the new preview
        visible_ms.append((time.perf_counter() - started) * 1000.0)
        widget_ms.append(widget.last_click_to_preview_ms)
        decode_ms.append(widget.predictor.last_decode_ms)
    assert widget.idle, "a click re-encoded the slice: the embedding was not cached"
    return {"points-layer change -> preview layer": widget_ms, "click -> repainted viewer": visible_ms,
            "decoder alone": decode_ms}


def encoding_responsiveness(widget, session, app, gui_threads: int | None) -> dict:
    """Largest gap between 20 ms timer ticks on the GUI thread while the widget encodes the whole volume."""
    import torch
    from qtpy.QtCore import QTimer

    default_threads = torch.get_num_threads()
    if gui_threads is not None:
        torch.set_num_threads(max(1, default_threads - gui_threads))
    session.cache.clear_memory()  # memory-only cache: every slice is really encoded
    try:
        ticks: list[float] = []
        timer = QTimer()
        timer.setInterval(20)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        widget.encode_volume()
        _wait(app, lambda: widget.idle)
        timer.stop()
        outcome = widget.tasks.last_outcome
        assert outcome.succeeded, outcome
        gaps = np.diff(ticks) * 1000.0
        num_slices = widget.predictor.volume.num_slices
        return {"threads": torch.get_num_threads(), "per_slice_s": outcome.seconds / num_slices,
                "max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
                "median_gap_ms": float(np.median(gaps))}
    finally:
        torch.set_num_threads(default_threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--slice", type=int, default=15)
    args = parser.parse_args(argv)
    os.environ.setdefault("NAPARI_SAM_FT_CACHE", tempfile.mkdtemp(prefix="napari-sam-ft-bench-"))

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_sam_ft._widgets._session import SegmentSession
    from napari_sam_ft._widgets.segment import SegmentWidget
    from napari_sam_ft.engine.cache import EmbeddingCache

    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-sam-ft", "ct")
    app = QApplication.instance()
    session = SegmentSession(EmbeddingCache(disk_dir=None))
    widget = SegmentWidget(viewer, session=session)
    viewer.window.add_dock_widget(widget, name="Segment")
    latencies = click_latency(viewer, widget, app, args.clicks, args.slice)
    responsiveness = [encoding_responsiveness(widget, session, app, gui_threads) for gui_threads in (None, 1)]
    status = widget.predictor.status()
    print(f"\nnapari-sam-ft widget latency: CT sample, {status['device']} {status['dtype']}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    print(f"{'click -> preview (' + str(args.clicks) + ' clicks, cached embedding)':<52} {'median ms':>10} {'p90 ms':>8}")
    for name, values in latencies.items():
        print(f"  {name:<50} {np.median(values):>10.0f} {np.percentile(values, 90):>8.0f}")
    print(f"\n{'encoding all ' + str(status['num_slices']) + ' slices in the worker, 20 ms GUI timer':<52} "
          f"{'s/slice':>8} {'median gap':>11} {'p99 gap':>8} {'max gap ms':>11}")
    for label, result in zip(("torch default threads", "one core left to the GUI"), responsiveness):
        print(f"  {label + ' (' + str(result['threads']) + ' threads)':<50} {result['per_slice_s']:>8.2f} "
              f"{result['median_gap_ms']:>11.0f} {result['p99_gap_ms']:>8.0f} {result['max_gap_ms']:>11.0f}")
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
