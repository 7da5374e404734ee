"""``napari-sam-ft finetune`` end to end on the bundled CT files."""

import json

from napari_sam_ft.cli import main
from napari_sam_ft.finetune.adapters import METADATA_FILE
from napari_sam_ft.sample import sample_paths


def test_finetune_command_writes_an_adapter(tmp_path, capsys):
    image, labels = sample_paths("ct")
    output = tmp_path / "adapter"
    code = main(["finetune", str(image), str(labels), "--slices", "8,14:16", "--val-slices", "14", "--classes", "1,5",
                 "--class-names", "1=spleen,5=liver", "--scope", "decoder", "--prompt", "box", "--decoder-epochs", "1",
                 "--views", "1", "--time-budget", "0", "-o", str(output)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "validation Dice (box):" in captured.out and "written to" in captured.out
    metadata = json.loads((output / METADATA_FILE).read_text())
    assert metadata["training"]["train_slices"] == [[0, 8], [0, 15]]
    assert metadata["training"]["validation_slices"] == [[0, 14]]
    assert metadata["class_names"] == {"1": "spleen", "5": "liver"} and metadata["prompt_modes"] == ["box"]


def test_finetune_command_explains_bad_input(tmp_path, capsys):
    image, labels = sample_paths("ct")
    assert main(["finetune", str(image), "-o", str(tmp_path / "a")]) == 1
    assert "IMAGE LABELS pairs" in capsys.readouterr().err
    assert main(["finetune", str(image), str(labels), "--slices", "12", "-o", str(tmp_path / "a")]) == 1
    assert "only one annotated slice" in capsys.readouterr().err
    assert main(["finetune", str(image), str(labels), "--slices", "5,99", "-o", str(tmp_path / "a")]) == 1
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
