"""``napari-sam-ft finetune`` end to end on the bundled CT files."""

import json

from napari_sam_ft.cli import main
from napari_sam_ft.finetune.adapters import METADATA_FILE
from napari_sam_ft.sample import sample_paths


def test_finetune_command_writes_an_adapter(tmp_path, capsys):
    image, labels = sample_paths("ct")
    output = tmp_path / "adapter"
    code = main(["finetune", str(image), str(labels), "--slices", "8,14:16", "--val-slices", "14", "--classes", "1,5",
                 "--class-names", "1=spleen,5=liver", "--scope", "decoder", "--prompt", "box", "--decoder-steps", "1",
                 "--views", "1", "-o", str(output)])
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


def test_the_training_window_is_recorded_applied_and_checked_on_load(tmp_path):
    """An adapter trained on soft-tissue-windowed CT gets that window back under "auto" on a volume whose own
    automatic window differs, and an explicit different window is refused with a clear message."""
    from argparse import Namespace

    import pytest

    from napari_sam_ft.cli.common import open_predictor
    from napari_sam_ft.finetune.adapters import AdapterError, read_adapter_info

    image, labels = sample_paths("ct")
    output = tmp_path / "adapter"
    assert main(["finetune", str(image), str(labels), "--slices", "8,14", "--val-slices", "14", "--classes", "5",
                 "--scope", "decoder", "--prompt", "box", "--decoder-steps", "1", "--views", "1",
                 "--window", "bone", "-o", str(output)]) == 0
    recorded = read_adapter_info(output).windows
    assert [window["name"] for window in recorded] == ["bone"]

    def args(window: str) -> Namespace:
        return Namespace(image=str(image), device="cpu", model="litemedsam", checkpoint=None, adapter=str(output),
                         no_disk_cache=True, window=window, precision="auto", axis=None, channel=None, channels=None,
                         with_sequences=None)

    _, predictor = open_predictor(args("auto"))  # "auto" alone would give the soft-tissue window on this CT
    assert (predictor.window.low, predictor.window.high) == pytest.approx((recorded[0]["low"], recorded[0]["high"]))
    _, predictor = open_predictor(args("bone"))
    assert predictor.window.name == "bone"
    with pytest.raises(AdapterError, match="was trained on images windowed to"):
        open_predictor(args("soft_tissue"))

    # The Segment panel builds its predictor through the same predictor_for: same window, same refusal.
    from napari_sam_ft._widgets._session import SegmentSession, SessionChoices
    from napari_sam_ft.engine.cache import EmbeddingCache
    from napari_sam_ft.volume import read_volume

    volume, session = read_volume(image), SegmentSession(cache=EmbeddingCache())
    panel = session.build(SessionChoices("litemedsam", "", "cpu", "auto", str(output)), volume)
    assert (panel.window.low, panel.window.high) == pytest.approx((recorded[0]["low"], recorded[0]["high"]))
    with pytest.raises(AdapterError, match="was trained on images windowed to"):
        session.build(SessionChoices("litemedsam", "", "cpu", "soft_tissue", str(output)), volume)
    assert session.build(SessionChoices("litemedsam", "", "cpu", "soft_tissue"), volume).window.name == "soft_tissue"
