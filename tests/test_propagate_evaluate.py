"""``evaluate --prompt propagate``: one reference box on the slice where the class is largest, grown through z."""

from __future__ import annotations

import json

import numpy as np

from napari_sam_ft.cli import main
from napari_sam_ft.sample import sample_paths

SPLEEN, LIVER = 1, 5
SLICES = (10, 20)  # ten slices of the sample CT keep it short


def test_propagation_reaches_the_box_target_and_reports_where_it_stopped(ct_predictor, ct_sample):
    from napari_sam_ft.evaluate import evaluate

    labels = ct_sample.labels.array
    names = ct_sample.class_names
    box, _ = evaluate(ct_predictor, labels, "box", (SLICES[0], SLICES[1] - 1), [SPLEEN, LIVER], names, with_hd95=False)
    grown, prediction = evaluate(ct_predictor, labels, "propagate", (SLICES[0], SLICES[1] - 1), [SPLEEN, LIVER], names,
                                 with_hd95=False)
    for name in ("spleen", "liver"):
        entry = grown["per_class"][name]
        assert entry["dice"] >= 0.85 * box["per_class"][name]["dice"], (name, entry["dice"], box["per_class"][name])
        propagation = entry["propagation"]
        key = propagation["key_slice"]
        areas = (labels[SLICES[0]:SLICES[1]] == entry["label"]).sum(axis=(1, 2))
        assert key == SLICES[0] + int(np.argmax(areas))
        assert SLICES[0] <= propagation["below"]["reached"] <= key <= propagation["above"]["reached"] <= SLICES[1] - 1
        assert all(isinstance(propagation[side]["stop"], str) and propagation[side]["stop"] for side in ("below", "above"))
    assert not prediction[:SLICES[0]].any() and not prediction[SLICES[1]:].any()


def test_the_cli_prints_the_propagation_report(capsys):
    image, labels = sample_paths("ct")
    assert main(["evaluate", str(image), str(labels), "--prompt", "propagate", "--slices", "12:16", "--classes", "5",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt"] == "propagate"
    assert set(report["per_class"]["liver"]["propagation"]) == {"key_slice", "below", "above"}
    assert report["per_class"]["liver"]["dice"] > 0.8
