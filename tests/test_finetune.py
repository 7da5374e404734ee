"""Fine-tuning scopes, the automatic head and train_adapter on the bundled CT (real forward passes)."""

import json

import numpy as np
import pytest
import torch

from napari_sam_ft.finetune import TrainSettings, VolumeAnnotations, build_training_data, train_adapter
from napari_sam_ft.finetune.adapters import METADATA_FILE, load_adapter, unload_adapter
from napari_sam_ft.finetune.validation import score_slices
from napari_sam_ft.finetune.heads import ClassHead
from napari_sam_ft.finetune.scopes import LoraSettings, expected_lora_count, prepare_scope
from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.engine.window_choice import chooses_window_per_prompt
from napari_sam_ft.scan_jobs import predictor_for
from napari_sam_ft.models.registry import load_model
from napari_sam_ft.sample import load_sample


@pytest.fixture(autouse=True)
def _torch_eager_encoder(monkeypatch):
    """These tests compare the engine's embeddings with training's torch-eager ones bit for bit; on a CPU
    without bf16 the engine would otherwise encode through ONNX Runtime (equal to ~3e-6, not bitwise)."""
    monkeypatch.setenv("NAPARI_SAM_FT_ONNX_ENCODER", "0")


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def ct():
    return load_sample("ct")


@pytest.fixture(scope="module")
def data(ct):
    labels = np.zeros_like(ct.labels.array)
    labels[[8, 14, 20]] = ct.labels.array[[8, 14, 20]]
    return build_training_data([VolumeAnnotations(ct.image, labels, "ct")], classes=[1, 5],
                               class_names=ct.class_names, validation_slices=[14])


def engine_validation_scores(model, ct, data, modes):
    """The validation slice (14) scored through the engine, with the adapter loaded on ``model``: prompts
    through the predictor's embeddings, the automatic mode through ``segment_slice`` (which finds the
    adapter's field of view again when the head was trained on it)."""
    from napari_sam_ft.engine.automatic import segment_slice
    from napari_sam_ft.finetune.validation import ClassDice

    predictor = VolumePredictor(model, ct.image)
    prompted = tuple(mode for mode in modes if mode != "none")
    scores = score_slices(model.sam, model.preprocessing, [predictor.embedding(14)], [data.validation[0].labels],
                          data.class_ids, prompted, head=model.class_head) if prompted else {}
    if "none" in modes:
        accumulator = ClassDice(data.class_ids)
        accumulator.add(segment_slice(predictor, 14), data.validation[0].labels)
        scores["none"] = accumulator.mean()
    return predictor, scores


def tiny_settings(**overrides) -> TrainSettings:
    values = dict(scope="decoder", prompt_mode="mixed", views_per_slice=1, decoder_steps=2, encoder_steps=1,
                  batch_size=2, patience=100, max_objects_per_slice=1)
    values.update(overrides)
    return TrainSettings(**values)


def test_trainable_parameter_counts_per_scope(model):
    sam = model.sam
    lora = prepare_scope(sam, "lora", LoraSettings(rank=8))
    decoder = prepare_scope(sam, "decoder")
    full = prepare_scope(sam, "full")
    from peft.tuners.lora import LoraLayer

    wrapped = sorted(name for name, module in lora.sam.named_modules() if isinstance(module, LoraLayer))
    encoder_layers = [name for name in wrapped if name.startswith("image_encoder.")]
    decoder_layers = [name for name in wrapped if name.startswith("mask_decoder.")]
    # TinyViT: 2 + 6 + 2 attention blocks, one qkv each; SAM's two-way transformer: 2 layers x 3 attentions
    # plus the final one, with q/k/v/out projections each.
    assert len(encoder_layers) == 10 and all(name.endswith(".attn.qkv") for name in encoder_layers)
    assert len(decoder_layers) == 28
    assert {name.rsplit(".", 1)[1] for name in decoder_layers} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert lora.trainable_count() == expected_lora_count(sam, LoraSettings(rank=8))
    transformer_mlps = sum(p.numel() for layer in sam.mask_decoder.transformer.layers for p in layer.mlp.parameters())
    assert transformer_mlps > 2_000_000
    assert decoder.trainable_count() == sum(p.numel() for p in sam.mask_decoder.parameters()) - transformer_mlps
    assert not any(p.requires_grad for layer in decoder.sam.mask_decoder.transformer.layers for p in layer.mlp.parameters())
    assert full.trainable_count() == sum(p.numel() for p in sam.parameters())
    assert lora.trainable_count() < decoder.trainable_count() < full.trainable_count()
    assert lora.encoder_trainable and not decoder.encoder_trainable and full.encoder_trainable
    assert not LoraSettings(encoder_targets=()).target_regex().startswith("(?:image_encoder")
    # The base network is untouched: the scopes work on copies.
    assert not any(p.requires_grad for p in sam.parameters())
    assert not any(isinstance(module, LoraLayer) for module in sam.modules())


def test_class_head_shapes_and_start(model):
    head = ClassHead.from_decoder(model.sam.mask_decoder, num_classes=3)
    embeddings = torch.randn(2, 256, 64, 64)
    with torch.no_grad():
        logits = head(model.sam, embeddings)
    assert logits.shape == (2, 4, 256, 256)
    assert torch.isfinite(logits).all()
    # Every channel starts from SAM's first mask token, told apart by a little noise.
    assert not torch.equal(logits[:, 0], logits[:, 1])
    parameters = sum(p.numel() for p in head.parameters())
    assert parameters < 200_000


def test_train_adapter_saves_a_working_adapter_and_leaves_the_model_alone(model, data, ct, tmp_path):
    before = {name: value.clone() for name, value in model.sam.state_dict().items()}
    events = []
    result = train_adapter(model, data, tmp_path / "adapter", tiny_settings(),
                           progress=lambda step, total, metrics: events.append((step, total, metrics)))
    assert result.adapter_dir is not None and result.steps == 2 and result.stopped == "steps"
    assert set(result.val_dice_before) == {"box", "none"} and set(result.val_dice_after) == {"box", "none"}
    assert result.val_dice_before["box"] > 0.5  # zero-shot box prompts already work on the CT
    decoder = sum(p.numel() for p in model.sam.mask_decoder.parameters())
    assert decoder // 2 < result.trainable_parameters < decoder  # the transformer's MLPs stay frozen
    phases = [metrics["phase"] for _, _, metrics in events]
    assert phases[0] == "encoding" and phases.index("start") < phases.index("planned")
    assert phases[-2:] == ["decoder", "checking boxes"]  # with a head: which classes boxes redraw better, last
    planned = next(metrics for _, _, metrics in events if metrics["phase"] == "planned")
    assert planned["decoder_steps"] == 2 and planned["encoder_steps"] == 0 and planned["estimate_s"] > 0
    assert all(total == 2 and metrics["eta_s"] >= 0 for _, total, metrics in events)
    assert all(0.0 <= metrics["fraction"] <= 1.0 for _, _, metrics in events)
    assert model.adapter_id == "none"
    for name, value in model.sam.state_dict().items():
        assert torch.equal(value, before[name]), name
    metadata = json.loads((result.adapter_dir / METADATA_FILE).read_text())
    assert metadata["base_model_id"] == model.model_id and metadata["class_ids"] == [1, 5]
    assert metadata["class_names"] == {"1": "spleen", "5": "liver"} and metadata["scope"] == "decoder"
    assert metadata["windows"][0]["name"] == "soft_tissue"
    assert metadata["training"]["validation_slices"] == [[0, 14]]
    assert metadata["windows_per_prompt"] is False  # mixed mode: the head needs one window per slice

    # The validation Dice stored is what the engine path reproduces with the loaded adapter.
    info = load_adapter(model, result.adapter_dir)
    try:
        _, scores = engine_validation_scores(model, ct, data, ("box", "none"))
        assert scores == pytest.approx(info.val_dice_after, abs=1e-6)
        assert not chooses_window_per_prompt(predictor_for(model, ct.image))  # it keeps its trained window
    finally:
        unload_adapter(model)


def test_lora_run_tunes_the_encoder_and_the_engine_reproduces_its_validation(model, data, ct, tmp_path):
    phases = set()
    settings = tiny_settings(scope="lora", prompt_mode="none", decoder_steps=1, encoder_steps=1)
    result = train_adapter(model, data, tmp_path / "lora", settings,
                           progress=lambda step, total, metrics: phases.add(metrics["phase"]))
    assert {"decoder", "encoder"} <= phases and result.steps == 2
    assert result.adapter_bytes < 5 * 2**20
    info = load_adapter(model, result.adapter_dir)
    try:
        assert info.scope == "lora" and model.encoder_adapted and model.class_ids == (1, 5)
        # The engine re-encodes with the adapted encoder (own cache key) and gets the stored validation Dice.
        predictor, scores = engine_validation_scores(model, ct, data, ("none",))
        assert scores["none"] == pytest.approx(info.val_dice_after["none"], abs=1e-6)
        # The head trained on the window around the annotations; outside its slice range nothing is encoded.
        assert info.metadata["cropped"]
        view = info.metadata["fields_of_view"][0]
        side = view["cols"][1] - view["cols"][0]
        assert view["volume_shape"] == list(ct.image.shape) and view["rows"][1] - view["rows"][0] == side
        assert side < ct.image.shape[2]  # a square window, narrower than the slice
        from napari_sam_ft.engine.automatic import segment_volume

        predictor = VolumePredictor(model, ct.image)
        labels = segment_volume(predictor)
        first, stop = view["slices"]
        assert 0 < first and stop < ct.image.num_slices
        assert not labels[:first].any() and not labels[stop:].any()
        for class_id, (class_first, class_stop) in view["class_slices"].items():  # each class within its own range
            assert not (labels[:class_first] == int(class_id)).any()
            assert not (labels[class_stop:] == int(class_id)).any()
        assert set(view["class_slices"]) == {"1", "5"}
        assert predictor.encoder_calls <= -(-(stop - first) // 4)  # batches of 4 slices inside the range only
    finally:
        unload_adapter(model)


def test_validation_labels_each_class_only_on_its_own_slice_range_as_inference_does(model, ct, tmp_path):
    """The spleen is painted on slices 8 and 11 only, the liver on 8-20; slice 20 validates. Inference never gives
    the spleen on slice 20 (outside its range): the validation Dice that picks the kept checkpoint must not
    either, so the stored score is the one the engine reaches."""
    from napari_sam_ft.engine.automatic import segment_slice
    from napari_sam_ft.finetune.validation import ClassDice

    labels = np.zeros_like(ct.labels.array)
    labels[[8, 11, 14, 20]] = np.where(ct.labels.array[[8, 11, 14, 20]] == 5, 5, 0)
    labels[[8, 11]] = np.where(np.isin(ct.labels.array[[8, 11]], (1, 5)), ct.labels.array[[8, 11]], 0)
    data = build_training_data([VolumeAnnotations(ct.image, labels, "ct")], classes=[1, 5],
                               class_names=ct.class_names, validation_slices=[20])
    assert dict(data.fields_of_view[0].class_slices)[1][1] <= 20  # slice 20 lies outside the spleen's range
    # A fast head, so that after 30 steps it finds some liver and, unrestricted, some spleen on slice 20: scored
    # without the restriction, another checkpoint is kept and the stored Dice differs from the engine's.
    settings = tiny_settings(prompt_mode="none", decoder_steps=30, validate_every=10, head_learning_rate=0.05,
                             views_per_slice=2)
    result = train_adapter(model, data, tmp_path / "ranges", settings)
    info = load_adapter(model, result.adapter_dir)
    try:
        predictor = VolumePredictor(model, ct.image)
        engine_labels = segment_slice(predictor, 20)
        assert not (engine_labels == 1).any()
        accumulator = ClassDice(data.class_ids)
        accumulator.add(engine_labels, data.validation[0].labels)
        assert accumulator.mean() == pytest.approx(info.val_dice_after["none"], abs=1e-6)
    finally:
        unload_adapter(model)


def test_point_prompt_training(model, data, tmp_path):
    result = train_adapter(model, data, tmp_path / "point", tiny_settings(prompt_mode="point", decoder_steps=1))
    # LiteMedSAM was trained with boxes: one click gives almost nothing before tuning. The best weights
    # are kept, so the stored validation Dice never drops below the starting one.
    assert set(result.val_dice_after) == {"point"}
    assert result.val_dice_after["point"] >= result.val_dice_before["point"]
    metadata = json.loads((result.adapter_dir / METADATA_FILE).read_text())
    assert metadata["prompt_modes"] == ["point"] and not metadata["has_class_head"]


def test_cancel_mid_epoch_keeps_the_best_adapter_so_far(model, data, ct, tmp_path):
    steps = []
    validations = []

    def progress(step, total, metrics):
        steps.append(step)
        if "val_dice" in metrics:
            validations.append(metrics["val_dice"])

    # Validation every 4 steps; cancel after step 6, before the second validation.
    settings = tiny_settings(views_per_slice=2, batch_size=1, decoder_steps=20, validate_every=4, prompt_mode="none")
    result = train_adapter(model, data, tmp_path / "cancelled", settings, progress=progress,
                           should_cancel=lambda: max(steps, default=0) >= 6)
    assert result.cancelled
    assert result.steps == 6  # stopped before the next step
    assert result.adapter_dir is not None
    assert len(validations) == 2  # before training and after step 4
    assert "STOPPED EARLY (cancelled) after 6 of 20 planned steps" in result.warning
    # The best validation's weights, measured again as stored (fp16): the same Dice up to that rounding.
    assert result.val_dice_after["none"] == pytest.approx(max(validations), abs=0.005)
    info = load_adapter(model, result.adapter_dir)
    try:
        _, scores = engine_validation_scores(model, ct, data, ("none",))
        assert scores["none"] == pytest.approx(info.val_dice_after["none"], abs=1e-6)
    finally:
        unload_adapter(model)


def test_cancel_before_training_saves_nothing(model, data, tmp_path):
    result = train_adapter(model, data, tmp_path / "never", tiny_settings(), should_cancel=lambda: True)
    assert result.cancelled and result.adapter_dir is None and result.steps == 0
    assert not (tmp_path / "never").exists()


def test_settings_are_checked(model, data, tmp_path):
    with pytest.raises(ValueError, match="scope"):
        train_adapter(model, data, tmp_path / "x", TrainSettings(scope="everything"))
    with pytest.raises(ValueError, match="prompt mode"):
        train_adapter(model, data, tmp_path / "x", TrainSettings(prompt_mode="scribble"))


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return {path.name: load_file(str(path)) for path in sorted(adapter_dir.glob("*.safetensors"))}


def test_same_seed_and_steps_give_a_bitwise_identical_adapter_on_a_slower_machine(model, data, tmp_path):
    import time

    settings = tiny_settings(prompt_mode="mixed", views_per_slice=2, decoder_steps=4, validate_every=2)
    first = train_adapter(model, data, tmp_path / "quiet", settings)
    # The second run is slowed down at every step, as a busy CPU would: the budget is steps, so nothing changes.
    second = train_adapter(model, data, tmp_path / "busy", settings,
                           progress=lambda step, total, metrics: time.sleep(0.05))
    assert first.steps == second.steps == 4 and first.stopped == second.stopped == "steps"
    quiet, busy = _adapter_tensors(first.adapter_dir), _adapter_tensors(second.adapter_dir)
    assert quiet.keys() == busy.keys() and quiet
    for name in quiet:
        assert quiet[name].keys() == busy[name].keys()
        for key in quiet[name]:
            assert torch.equal(quiet[name][key], busy[name][key]), (name, key)
    assert first.adapter_id == second.adapter_id
    assert first.val_dice_after == second.val_dice_after
    different = train_adapter(model, data, tmp_path / "seed1", tiny_settings(
        prompt_mode="mixed", views_per_slice=2, decoder_steps=4, validate_every=2, seed=1))
    assert different.adapter_id != first.adapter_id


def test_a_time_limit_stops_loudly_and_is_recorded(model, data, tmp_path, monkeypatch):
    from napari_sam_ft.finetune import train as train_module

    # A clock that jumps by an hour once the first step is reported: the limit is hit, whatever the machine.
    real_clock = train_module.time.perf_counter
    offset = [0.0]
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: real_clock() + offset[0])

    def progress(step, total, metrics):
        if step == 1:
            offset[0] = 3600.0

    settings = tiny_settings(decoder_steps=10, time_limit_s=1800.0)
    result = train_adapter(model, data, tmp_path / "limited", settings, progress=progress)
    assert result.stopped == "time_limit" and result.steps == 1 and result.steps_planned == 10
    assert "STOPPED EARLY (time limit) after 1 of 10 planned steps" in result.warning
    assert "9 more steps" in result.warning
    metadata = json.loads((result.adapter_dir / METADATA_FILE).read_text())["training"]
    assert metadata["stopped"] == "time_limit" and metadata["steps_done"] == 1 and metadata["steps_planned"] == 10
    assert metadata["more_steps_needed"] == 9


def test_steps_are_planned_from_the_data():
    from napari_sam_ft.finetune.train import plan_steps

    small, small_encoder = plan_steps(2, 1, "lora")
    large, large_encoder = plan_steps(8, 3, "lora")
    assert 300 <= small < large <= 400 and 12 <= small_encoder < large_encoder <= 30
    assert plan_steps(5, 3, "decoder")[1] == 0


def test_box_mode_learns_the_zoomed_crops_and_its_adapter_zooms_small_boxes(model, ct, tmp_path, monkeypatch):
    """A box-mode adapter trains on each small object's zoomed crop (the aorta on the CT), reproducibly although
    the views differ in shape, and with it loaded small boxes are decoded zoomed, large ones on the whole slice."""
    from napari_sam_ft.engine import zoom
    from napari_sam_ft.engine.click_search import predict_object
    from napari_sam_ft.engine.prompts import box_from_mask

    labels = np.zeros_like(ct.labels.array)
    labels[[8, 14, 20]] = ct.labels.array[[8, 14, 20]]
    data = build_training_data([VolumeAnnotations(ct.image, labels, "ct")], classes=[5, 52],
                               class_names=ct.class_names, validation_slices=[14])
    settings = tiny_settings(prompt_mode="box", views_per_slice=2, decoder_steps=3, max_objects_per_slice=2)
    assert settings.zooms and not tiny_settings(prompt_mode="mixed").zooms
    first = train_adapter(model, data, tmp_path / "first", settings)
    again = train_adapter(model, data, tmp_path / "again", settings)
    assert first.adapter_id == again.adapter_id and first.val_dice_after == again.val_dice_after
    metadata = json.loads((first.adapter_dir / METADATA_FILE).read_text())
    assert metadata["zooms_small_boxes"] is True and metadata["windows_per_prompt"] is True

    crops = []
    cropped_predictor = zoom.cropped_predictor
    monkeypatch.setattr(zoom, "cropped_predictor", lambda predictor, crop: crops.append(crop) or cropped_predictor(
        predictor, crop))
    predictor = VolumePredictor(model, ct.image)
    aorta, liver = ct.labels.array[14] == 52, ct.labels.array[14] == 5
    assert zoom.zooms(predictor) and not crops
    predict_object(predictor, 14, box=box_from_mask(liver))
    assert not crops  # too large to zoom
    info = load_adapter(model, first.adapter_dir)
    try:
        assert info.zooms_small_boxes and zoom.zooms(predictor)
        # It learnt each box in the CT window the engine chooses for it: with it, boxes are still windowed so.
        assert info.windows_per_prompt and chooses_window_per_prompt(predictor_for(model, ct.image))
        predict_object(predictor, 14, box=box_from_mask(liver))
        assert not crops
        zoomed = predict_object(predictor, 14, box=box_from_mask(aorta))
        assert len(crops) == 1 and crops[0] == zoom.zoom_crop(box_from_mask(aorta), aorta.shape)
        assert zoomed.mask.shape == aorta.shape and (zoomed.mask & aorta).any()
    finally:
        unload_adapter(model)


def test_each_class_gets_its_own_slice_range_and_is_not_looked_for_outside_it():
    """Two structures on different slices: the field of view spans both, each class only its own slices plus one
    annotation gap (at least 2), and the engine's channel ranges follow the adapter's class order."""
    from napari_sam_ft.engine.automatic import class_slice_ranges
    from napari_sam_ft.finetune.data import FieldOfView, field_of_view

    labels = np.zeros((40, 64, 64), np.int32)
    labels[[5, 8, 11], 10:20, 10:20] = 2  # every 3 slices: a gap of 3
    labels[[20, 30], 30:40, 30:40] = 7
    labels[25, 40:45, 40:45] = 9  # painted, not trained
    view = field_of_view(labels, [5, 8, 11, 20, 25, 30], class_ids=[7, 2])
    assert view.slices == (0, 36)  # the annotations' gap is 5
    assert dict(view.class_slices) == {2: (2, 15), 7: (10, 40)}  # 7: gap 10, cut at the last slice
    assert FieldOfView.from_json(view.to_json()) == view
    assert class_slice_ranges(view.to_json(), (2, 7)) == {1: (2, 15), 2: (10, 40)}
    assert class_slice_ranges({"slices": [0, 36]}, (2, 7)) == {}  # an adapter from before: no ranges


def test_boxes_around_the_heads_pieces_are_redrawn_by_the_base_model_only_for_the_classes_listed(model, data, ct,
                                                                                                  tmp_path):
    """Training records, from its validation slices, which classes the base model's boxes segment better; the
    engine redraws exactly those classes, with the base network, and leaves the adapter active."""
    from napari_sam_ft.engine.automatic import class_head_labels, segment_slice
    from napari_sam_ft.engine.box_refinement import base_model, base_predictor, refine_with_boxes
    from napari_sam_ft.finetune.adapters import update_adapter_metadata

    settings = tiny_settings(prompt_mode="none", decoder_steps=30, validate_every=10, head_learning_rate=0.05,
                             views_per_slice=2)
    result = train_adapter(model, data, tmp_path / "boxed", settings)
    metadata = json.loads((result.adapter_dir / METADATA_FILE).read_text())
    assert set(metadata["box_refinement_validation"]) <= {"1", "5"}
    for class_id in metadata["box_refined_classes"]:  # chosen only where boxing gained on the validation slice
        head, boxed = metadata["box_refinement_validation"][str(class_id)]
        assert boxed >= head + 0.01
    update_adapter_metadata(result.adapter_dir, {"box_refined_classes": [5]})
    info = load_adapter(model, result.adapter_dir)
    try:
        predictor = VolumePredictor(model, ct.image)
        head_only = class_head_labels(predictor, [14])[14]
        assert (head_only == 5).any()
        engine = segment_slice(predictor, 14)
        expected = refine_with_boxes(base_predictor(predictor), {14: head_only}, [5])[14]
        np.testing.assert_array_equal(engine, expected)
        assert not np.array_equal(engine == 5, head_only == 5)  # the liver was redrawn...
        np.testing.assert_array_equal(engine == 1, (head_only == 1) & (engine != 5))  # ...the spleen was not
        assert base_model(model).adapter is None and model.adapter_id == info.adapter_id
    finally:
        unload_adapter(model)


def test_a_box_around_a_rough_mask_gives_the_structure_back(model, ct):
    """The redrawing on its own (base model, real forward passes): a liver mask with a third of its pixels
    dropped comes back close to the reference liver (its box is the same), and the spleen is untouched."""
    from napari_sam_ft.engine.box_refinement import refine_with_boxes
    from napari_sam_ft.metrics import dice

    reference = ct.labels.array[14]
    liver = reference == 5
    rough = np.where(reference == 1, 1, 0).astype(np.int32)
    rough[liver & (np.random.default_rng(0).random(liver.shape) > 0.35)] = 5
    redrawn = refine_with_boxes(VolumePredictor(model, ct.image), {14: rough}, [5])[14]
    assert dice(rough == 5, liver) < 0.85
    assert dice(redrawn == 5, liver) > 0.9
    np.testing.assert_array_equal(redrawn == 1, rough == 1)
