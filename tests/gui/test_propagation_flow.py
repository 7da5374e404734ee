"""Propagation you can check, as a user does it in a fresh napari process (``propagation_flow.py``): the panel
shows each grown slice's predicted IoU, "Go to weakest slice" moves the viewer there, and after the user paints a
correction, "Re-propagate" regrows only the slices between the key and the corrected slice, leaving both exactly
as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from napari_sam_ft.sample import sample_paths

from .helpers import LIVER, SLICE

pytestmark = pytest.mark.gui
FLOW = Path(__file__).with_name("propagation_flow.py")
FLOW_TIMEOUT_S = 600
REACH = 4  # slices grown on each side of the key: 8 slices to encode keep the test short


def test_weakest_slice_painted_then_repropagated_keeps_the_correction_and_regrows_between(tmp_path):
    image, labels = sample_paths("ct")
    environment = dict(os.environ, NAPARI_SAM_FT_CACHE=str(tmp_path / "cache"),
                       NAPARI_SAM_FT_AUTOSAVE=str(tmp_path / "autosave"))
    command = [sys.executable, str(FLOW), str(image), str(labels), str(LIVER), str(SLICE), str(REACH)]
    try:
        finished = subprocess.run(command, capture_output=True, text=True, timeout=FLOW_TIMEOUT_S, env=environment)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the propagation flow hung for {FLOW_TIMEOUT_S} s; stderr:\n{error.stderr}")
    assert finished.returncode == 0, f"exit code {finished.returncode}; stderr:\n{finished.stderr[-6000:]}"
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    print(f"propagation flow: {report}")

    weakest = report["weakest"]
    assert "predicted IoU" in report["shown_iou"] and f"{weakest}:" in report["shown_iou"]
    assert weakest != SLICE and abs(weakest - SLICE) <= REACH
    assert report["viewer_slice"] == weakest  # "Go to weakest slice" moved the viewer there
    assert report["painted"], "the brush strokes changed nothing"
    assert report["corrected_identical"] and report["key_identical"]
    between = set(range(min(weakest, SLICE) + 1, max(weakest, SLICE)))
    assert between, f"the weakest slice {weakest} is next to the key: nothing lies between them to regrow"
    regrown = set(report["changed"]) - {weakest}
    assert regrown and regrown <= between, (regrown, between)  # only between the keys, never a key
    assert str(weakest) not in report["scores"]  # the corrected slice is a key now, not a grown slice
