"""Safety: checkpoints never run code, prompts out of range name the value and the range, writes are atomic,
and the encoder batch is sized to the accelerator's free memory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_sam_ft.cli import main
from napari_sam_ft.engine.predictor import (CPU_BATCH_SIZE, MAX_BATCH_SIZE, VolumePredictor, batch_size_for_memory,
                                            default_batch_size, encoder_bytes_per_image, free_device_memory)
from napari_sam_ft.engine.prompts import PromptError, load_prompts, parse_prompts
from napari_sam_ft.models.checkpoints import CheckpointError, load_state_dict
from napari_sam_ft.models.registry import load_model
from napari_sam_ft.volume import VolumeError, atomic_write, read_volume, write_volume

CT_SHAPE = (30, 101, 122)  # (Z, Y, X) of the sample CT


class RunsCodeWhenUnpickled:
    """What a malicious checkpoint holds: unpickling it would create a marker file (i.e. run any command)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(ct_sample, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {"weight": torch.zeros(2)}, "payload": RunsCodeWhenUnpickled(marker)}, checkpoint)
    with pytest.raises(CheckpointError, match="never unpickles code") as error:
        load_state_dict(checkpoint)
    assert "evil.pth" in str(error.value) and ".safetensors" in str(error.value)
    with pytest.raises(CheckpointError, match="never unpickles code"):
        load_model("vit_b", checkpoint=checkpoint)
    assert main(["embed", str(ct_sample.image_path), "--model", "vit_b", "--checkpoint", str(checkpoint),
                 "--no-disk-cache"]) == 1
    assert "never unpickles code" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("item, message", [
    ({"slice": 30, "box": [1, 1, 5, 5]}, r"prompt 0: slice = 30 is out of range 0\.\.29"),
    ({"slice": -1, "points": [[3, 3]]}, r"slice = -1 is out of range 0\.\.29"),
    ({"slice": 3, "box": [1, 1, 122.5, 5]}, r"box x_max = 122\.5 is out of range 0\.\.122"),
    ({"slice": 3, "box": [1, -2.5, 5, 5]}, r"box y_min = -2\.5 is out of range 0\.\.101"),
    ({"slice": 3, "points": [[3, 102]]}, r"point y = 102 is out of range 0\.\.101"),
    ({"slice": 3, "points": [[3, 3]], "point_labels": [2]}, r"'point_labels' must list 0 or 1"),
    ({"slice": 2.5, "box": [1, 1, 5, 5]}, r"'slice' must be an integer, got 2\.5"),
])
def test_out_of_range_prompts_name_the_value_and_the_allowed_range(item, message):
    with pytest.raises(PromptError, match=message):
        parse_prompts([{"label": 1, **item}], CT_SHAPE)


def test_the_segment_command_reports_a_bad_prompt_file_in_one_line(ct_sample, tmp_path, capsys):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"slice": 14, "box": [10, 20, 60, 70]}, {"slice": 45, "box": [1, 1, 4, 4]}]))
    with pytest.raises(PromptError, match=r"prompts\.json: prompt 1: slice = 45 is out of range 0\.\.29"):
        load_prompts(prompts, CT_SHAPE)
    code = main(["segment", str(ct_sample.image_path), "--prompts", str(prompts), "-o", str(tmp_path / "out.nii.gz"),
                 "--no-disk-cache"])
    error = capsys.readouterr().err
    assert code == 1 and "slice = 45 is out of range 0..29" in error and "Traceback" not in error
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_write_that_fails_halfway_leaves_the_previous_file_and_no_temporary(ct_sample, tmp_path):
    path = tmp_path / "mask.nii.gz"
    first = np.zeros(CT_SHAPE, np.uint8)
    first[10:12, 20:30, 20:30] = 1
    write_volume(path, first, like=ct_sample.image)
    before = path.read_bytes()

    def half_a_file(temporary: Path) -> None:
        temporary.write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_a_file)
    assert path.read_bytes() == before
    assert sorted(item.name for item in tmp_path.iterdir()) == ["mask.nii.gz"]
    assert np.array_equal(read_volume(path, check_values=False).array, first)


def test_batch_size_follows_free_memory_within_limits():
    gib = 1 << 30
    assert batch_size_for_memory(16 * gib, int(1.5 * gib)) == 5  # half of 16 GiB in 1.5 GiB images
    assert batch_size_for_memory(80 * gib, 96 << 20) == MAX_BATCH_SIZE
    assert batch_size_for_memory(100 << 20, 2 * gib) == 1  # never zero: the encoder still runs
    assert batch_size_for_memory(8 * gib, gib, headroom=0.25) == 2
    with pytest.raises(ValueError, match="bytes_per_image must be positive"):
        batch_size_for_memory(gib, 0)
    assert encoder_bytes_per_image("tiny_vit", 1024) == 16 * encoder_bytes_per_image("tiny_vit", 256)
    assert encoder_bytes_per_image("vit_h", 1024) > encoder_bytes_per_image("vit_b", 1024)


def test_the_predictor_sizes_its_batch_for_its_device(litemedsam, ct_sample):
    assert free_device_memory(torch.device("cpu")) is None
    assert default_batch_size(litemedsam) == CPU_BATCH_SIZE
    assert VolumePredictor(litemedsam, ct_sample.image).batch_size == CPU_BATCH_SIZE
    assert VolumePredictor(litemedsam, ct_sample.image, batch_size=5).batch_size == 5
    if torch.cuda.is_available():  # on a GPU runner: the real free memory decides
        gpu = load_model("litemedsam", device="cuda")
        free = free_device_memory(gpu.device)
        assert free is not None and free > 0
        assert 1 <= default_batch_size(gpu) <= MAX_BATCH_SIZE


def test_unreadable_paths_get_a_volume_error_naming_them(tmp_path):
    folder = tmp_path / "scan.nii.gz"
    folder.mkdir()  # a folder with a scan's name
    with pytest.raises(VolumeError, match="scan.nii.gz"):
        read_volume(folder)
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.npy"
        np.save(locked, np.arange(27, dtype=np.float32).reshape(3, 3, 3))
        locked.chmod(0)
        with pytest.raises(VolumeError, match="locked.npy"):
            read_volume(locked)
