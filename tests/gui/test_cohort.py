"""The "Run on all scans…" panel in a real viewer: the active adapter over a folder, in worker processes."""

from __future__ import annotations

import csv
import multiprocessing

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def scans_folder(tmp_path_factory):
    """Two small real scans (slices of the sample CT and MR), as NIfTI files with their own geometry."""
    import nibabel as nib

    from napari_sam_ft.sample import sample_paths

    folder = tmp_path_factory.mktemp("scans")
    for name, first in (("ct", 14), ("mr", 9)):
        image = nib.load(str(sample_paths(name)[0]))
        nib.save(image.slicer[:, :, first:first + 2], str(folder / f"{name}_two_slices.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def class_head_adapter(tmp_path_factory):
    """A decoder adapter with a class head for spleen and liver (weights moved off their start at random)."""
    from napari_sam_ft.finetune.adapters import save_adapter
    from napari_sam_ft.finetune.heads import ClassHead
    from napari_sam_ft.finetune.scopes import LoraSettings, prepare_scope
    from napari_sam_ft.models.registry import load_model

    model = load_model()
    trainable = prepare_scope(model.sam, "decoder", LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, parameter in trainable.named_trainable():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    head = ClassHead.from_decoder(trainable.sam.mask_decoder, 2, seed=7)
    metadata = {"base_model_id": model.model_id, "base_model_name": model.name, "class_ids": [1, 5],
                "class_names": {"1": "spleen", "5": "liver"}, "prompt_modes": ["none"],
                "encoder_adapted": trainable.encoder_trainable}
    info = save_adapter(tmp_path_factory.mktemp("adapter") / "spleen-liver", scope="decoder",
                        weights=trainable.adapter_state(), lora_config=trainable.lora_config, class_head=head,
                        metadata=metadata)
    return info.adapter_dir


def in_process_auto(image_path, adapter_dir) -> np.ndarray:
    """``napari-sam-ft auto --adapter`` on one scan in this process: what each worker must reproduce."""
    from napari_sam_ft.engine.automatic import segment_volume
    from napari_sam_ft.finetune.adapters import load_adapter
    from napari_sam_ft.models.registry import load_model
    from napari_sam_ft.scan_jobs import predictor_for
    from napari_sam_ft.volume import read_volume

    from napari_sam_ft.batch.worker import usable_cpus

    model = load_model()
    load_adapter(model, adapter_dir)
    # With as many torch threads as the one worker has: bf16 sums in another order move a random head's
    # near-zero logits across the threshold on a few percent of voxels.
    previous = torch.get_num_threads()
    torch.set_num_threads(usable_cpus())
    try:
        return segment_volume(predictor_for(model, read_volume(image_path)))
    finally:
        torch.set_num_threads(previous)


def cohort_panel(viewer, qtbot):
    from napari_sam_ft._widgets.cohort import CohortWidget

    panel = CohortWidget(viewer)
    viewer.window.add_dock_widget(panel, name="Run on all scans…")
    return panel


def test_the_panel_applies_the_active_adapter_to_every_scan_of_a_folder(ct_viewer, qtbot, scans_folder,
                                                                      class_head_adapter, tmp_path):
    from napari_sam_ft._widgets.session_panel import CHOICES_KEY
    from napari_sam_ft.volume import read_labels, read_volume

    # What the Segment panel records on the image it segments: the panel takes the adapter from there.
    ct_viewer.layers[0].metadata[CHOICES_KEY] = {"model_name": "litemedsam", "adapter_dir": str(class_head_adapter),
                                                 "window": "auto"}
    ct_viewer.layers.selection.active = ct_viewer.layers[0]
    panel = cohort_panel(ct_viewer, qtbot)
    assert panel.adapter_edit.text() == str(class_head_adapter)
    panel.folder_edit.setText(str(scans_folder))
    panel.output_edit.setText(str(tmp_path / "out"))
    panel.workers_spin.setValue(1)
    task = panel.run()
    assert task is not None and not panel.run_button.isEnabled() and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: panel.last_outcome is not None, timeout=600_000)
    assert panel.last_outcome.succeeded, panel.status_label.text()
    assert panel.progress_bar.value() == panel.progress_bar.maximum() == 2
    assert "2 of 2 scans segmented" in panel.status_label.text() and panel.run_button.isEnabled()
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows] == ["ok", "ok"]
    assert {row["adapter"] for row in rows} != {"none"}
    for row in rows:
        mask = read_labels(row["mask"], like=read_volume(row["image"]))
        assert set(np.unique(mask.array)) <= {0, 1, 5}  # the adapter's classes: its class head labelled them
        expected = in_process_auto(row["image"], class_head_adapter)
        assert (mask.array == expected).mean() > 0.999


def test_cancel_stops_the_run_and_its_worker_processes(ct_viewer, qtbot, scans_folder, tmp_path):
    panel = cohort_panel(ct_viewer, qtbot)
    panel.adapter_edit.setText("")
    panel.folder_edit.setText(str(scans_folder))
    panel.output_edit.setText(str(tmp_path / "out"))
    panel.workers_spin.setValue(1)
    panel.run()
    qtbot.waitUntil(lambda: any(text.startswith("started a local dask cluster") for text in panel.messages),
                    timeout=120_000)
    panel.cancel()
    qtbot.waitUntil(lambda: panel.last_outcome is not None, timeout=120_000)
    assert panel.last_outcome.cancelled
    assert panel.status_label.text().startswith("cancelled") and panel.run_button.isEnabled()
    assert not (tmp_path / "out" / "results.csv").exists()
    qtbot.waitUntil(lambda: not multiprocessing.active_children(), timeout=30_000)  # the local cluster is closed
