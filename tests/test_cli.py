"""The napari-sam-ft command line, run in-process on the bundled sample."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_sam_ft.cli import main
from napari_sam_ft.sample import sample_paths

CT, CT_LABELS = (str(path) for path in sample_paths("ct"))


def test_every_subcommand_has_help(capsys):
    for command in ("info", "embed", "segment", "auto", "evaluate", "sample", "demo"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: napari-sam-ft" in capsys.readouterr().out


def test_info_names_device_dtype_models_and_cache(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for expected in ("device:", "encoder dtype:", "litemedsam", "vit_h", "mobilesam", "cache:", "embedded:"):
        assert expected in out
    assert "fp32 encoder: litemedsam on ONNX Runtime" in out  # the CPU's fp32 runtime (engine.onnx_encoder)


def test_evaluate_box_beats_the_naive_loop_and_prints_json_last(capsys):
    assert main(["evaluate", CT, CT_LABELS, "--prompt", "box", "--classes", "1,2,3,5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    per_class = report["per_class"]
    assert per_class["spleen"]["dice"] >= 0.93
    assert per_class["liver"]["dice"] >= 0.86
    assert per_class["kidney_right"]["dice"] >= 0.86
    assert per_class["kidney_left"]["dice"] >= 0.86
    assert report["dice"] == pytest.approx(np.mean([entry["dice"] for entry in per_class.values()]), abs=1e-3)
    assert report["window"].startswith("soft_tissue")  # chosen automatically for CT


def test_evaluate_point_and_none_on_a_slice_range(capsys, tmp_path):
    assert main(["evaluate", CT, CT_LABELS, "--prompt", "point", "--slices", "14:16", "--classes", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["slices"] == [14, 15] and set(report["per_class"]) == {"liver"}
    output = tmp_path / "auto.nii.gz"
    assert main(["evaluate", CT, CT_LABELS, "--prompt", "none", "--slices", "14:16", "--classes", "1,5", "--json",
                 "-o", str(output)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["prompt"] == "none" and report["per_class"]["liver"]["dice"] > 0.5
    assert nib.load(str(output)).shape == nib.load(CT).shape


def test_segment_from_a_prompt_file_with_propagation_writes_a_mask_in_the_input_geometry(tmp_path, capsys):
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.sample import load_sample

    sample = load_sample("ct")
    spleen = sample.labels.array == 1
    box = box_from_mask(spleen[15])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"slice": 15, "label": 7, "box": [float(value) for value in box]}]))
    output = tmp_path / "spleen.nii.gz"
    assert main(["segment", CT, "--prompts", str(prompts), "--propagate", "-o", str(output)]) == 0
    written = nib.load(str(output))
    assert np.allclose(written.affine, nib.load(CT).affine)
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.volume import read_labels

    labels = read_labels(output, like=sample.image).array
    assert set(np.unique(labels)) == {0, 7}
    assert labels.any(axis=(1, 2)).sum() > 10
    assert dice(labels == 7, spleen) > 0.85


def test_bad_input_gets_one_line_and_exit_code_1(tmp_path, capsys):
    flat = tmp_path / "flat.npy"
    np.save(flat, np.zeros((20, 30), np.float32))
    assert main(["embed", str(flat)]) == 1
    err = capsys.readouterr().err
    assert "flat.npy: is 2D" in err and "Traceback" not in err
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"slice": 99, "box": [1, 2, 3, 4]}]))
    assert main(["segment", CT, "--prompts", str(prompts), "-o", str(tmp_path / "x.nii.gz")]) == 1
    assert "slice = 99 is out of range 0..29" in capsys.readouterr().err
    assert main(["evaluate", CT, CT_LABELS, "--slices", "5:99"]) == 1
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_sample_writes_the_bundled_files(tmp_path):
    assert main(["sample", "-o", str(tmp_path)]) == 0
    assert (tmp_path / "example_ct_sm.nii.gz").exists() and (tmp_path / "example_seg.nii.gz").exists()


def test_several_sequences_feed_the_three_input_channels_from_the_cli(tmp_path, capsys):
    from napari_sam_ft.sample import sample_paths as paths

    mr, _ = paths("mr")
    image = nib.load(str(mr))
    data = np.asanyarray(image.dataobj)
    four_d = tmp_path / "mr_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data[::-1], data], axis=-1), image.affine), str(four_d))
    assert main(["embed", str(four_d), "--channels", "0,1,2", "--no-disk-cache"]) == 0
    assert "encoded 20 slices" in capsys.readouterr().out
    assert main(["embed", str(mr), "--with-sequences", str(mr), "--no-disk-cache"]) == 0
    assert "encoded 20 slices" in capsys.readouterr().out
    assert main(["embed", str(four_d), "--channels", "0,7", "--no-disk-cache"]) == 1
    assert "0..2" in capsys.readouterr().err
