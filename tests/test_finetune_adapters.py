"""Adapters: save -> load gives identical outputs, switching, exact unload, refusal of foreign adapters."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_sam_ft.engine.predictor import VolumePredictor
from napari_sam_ft.finetune.adapters import (CLASS_HEAD_FILE, LORA_WEIGHTS_FILE, METADATA_FILE, AdapterError,
                                             AttachedAdapter, active_adapter, adapter_size_bytes, load_adapter,
                                             read_adapter_info, save_adapter, unload_adapter)
from napari_sam_ft.finetune.heads import ClassHead
from napari_sam_ft.finetune.scopes import LoraSettings, prepare_scope
from napari_sam_ft.models.registry import load_model
from napari_sam_ft.sample import load_sample

SLICE = 15
BOX = np.array([40, 30, 90, 80], np.float32)


@pytest.fixture(scope="module", autouse=True)
def _torch_eager_encoder():
    """These tests compare the engine's embeddings with training's torch-eager ones bit for bit; on a CPU
    without bf16 the engine would otherwise encode through ONNX Runtime (equal to ~3e-6, not bitwise).
    Module scope: the module's cached outputs are computed under it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NAPARI_SAM_FT_ONNX_ENCODER", "0")
        yield


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def ct():
    return load_sample("ct")


def outputs(loaded_model, volume) -> dict[str, torch.Tensor]:
    """Embedding, box-prompted logits and (if any) automatic-head logits through the engine's own path."""
    predictor = VolumePredictor(loaded_model, volume)
    embedding = predictor.embedding(SLICE)
    logits, _, _ = predictor.decode(SLICE, None, None, BOX[None], None, False)
    result = {"embedding": embedding, "box_logits": logits}
    if loaded_model.class_head is not None:
        with torch.no_grad():
            result["class_logits"] = loaded_model.class_head(loaded_model.sam, embedding)
    return result


def make_adapter(model, scope, directory, seed, with_head=True):
    """A trained-looking adapter: the scope's weights moved off their starting values at random."""
    trainable = prepare_scope(model.sam, scope, LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in trainable.named_trainable():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    trainable.load_adapter_state(trainable.adapter_state())  # as training restores its best: in the stored precision
    head = ClassHead.from_decoder(trainable.sam.mask_decoder, 2, seed=seed) if with_head else None
    if head is not None:
        with torch.no_grad():
            head.class_tokens.add_(torch.randn(head.class_tokens.shape, generator=generator))
    metadata = {"base_model_id": model.model_id, "base_model_name": model.name, "class_ids": [1, 5],
                "class_names": {"1": "spleen", "5": "liver"}, "prompt_modes": ["box", "none"],
                "encoder_adapted": trainable.encoder_trainable, "val_dice_before": {"box": 0.9},
                "val_dice_after": {"box": 0.95}}
    info = save_adapter(directory, scope=scope, weights=trainable.adapter_state(),
                        lora_config=trainable.lora_config, class_head=head, metadata=metadata)
    reference_info = dataclasses.replace(info, adapter_id=f"reference-{scope}-{seed}", encoder_adapted=True)
    reference_model = dataclasses.replace(model, sam=trainable.sam,
                                          adapter=AttachedAdapter(reference_info, class_head=head))
    return info, reference_model


def assert_same(first: dict, second: dict):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def base_outputs(model, ct):
    return outputs(model, ct.image)


@pytest.fixture(scope="module")
def lora_adapter(model, ct, tmp_path_factory):
    """A lora adapter with a class head, and the outputs of the network it was saved from."""
    info, reference = make_adapter(model, "lora", tmp_path_factory.mktemp("lora") / "adapter", seed=1)
    return info, outputs(reference, ct.image)


@pytest.fixture(scope="module")
def decoder_adapter(model, ct, tmp_path_factory):
    info, reference = make_adapter(model, "decoder", tmp_path_factory.mktemp("decoder") / "adapter", seed=3,
                                   with_head=False)
    return info, outputs(reference, ct.image)


def test_lora_adapter_round_trip_gives_identical_outputs_and_unload_restores_the_base(model, ct, base_outputs,
                                                                                      lora_adapter):
    info, expected = lora_adapter
    assert not torch.equal(expected["box_logits"], base_outputs["box_logits"])
    assert not torch.equal(expected["embedding"], base_outputs["embedding"])

    sam_before = model.sam
    loaded = load_adapter(model, info.adapter_dir)
    assert model.sam is sam_before  # adapters go into the live network; it is not rebuilt
    assert model.adapter_id == info.adapter_id == loaded.adapter_id and len(model.adapter_id) == 12
    assert model.encoder_adapted and model.class_ids == (1, 5)
    assert active_adapter(model).adapter_dir == info.adapter_dir
    assert_same(outputs(model, ct.image), expected)

    unload_adapter(model)
    assert model.adapter_id == "none" and not model.encoder_adapted and model.class_head is None
    assert active_adapter(model) is None
    assert_same(outputs(model, ct.image), base_outputs)
    assert not any("lora" in name for name, _ in model.sam.named_parameters())
    assert adapter_size_bytes(info.adapter_dir) < 5 * 2**20
    assert (info.adapter_dir / LORA_WEIGHTS_FILE).is_file() and (info.adapter_dir / "adapter_config.json").is_file()


def test_switching_between_adapters_of_different_scopes(model, ct, base_outputs, lora_adapter, decoder_adapter):
    load_adapter(model, lora_adapter[0].adapter_dir)
    load_adapter(model, decoder_adapter[0].adapter_dir)  # switches: the LoRA adapter is unloaded first
    assert not model.encoder_adapted and model.class_head is None and model.class_ids == ()
    from napari_sam_ft.engine.zoom import zooms
    assert not zooms(VolumePredictor(model, ct.image))  # trained on whole slices only: small boxes stay whole
    decoder_outputs = outputs(model, ct.image)
    assert_same(decoder_outputs, decoder_adapter[1])
    assert torch.equal(decoder_outputs["embedding"], base_outputs["embedding"])  # the encoder is the base one
    # Only the weights the decoder scope trains are stored, in fp16: under 5 MB (the whole decoder is 16 MB in fp32).
    assert adapter_size_bytes(decoder_adapter[0].adapter_dir) < 5 * 2**20
    load_adapter(model, lora_adapter[0].adapter_dir)
    assert_same(outputs(model, ct.image), lora_adapter[1])
    unload_adapter(model)
    assert_same(outputs(model, ct.image), base_outputs)


def test_adapter_for_another_base_model_is_refused(model, lora_adapter):
    other = dataclasses.replace(model, weights_hash="0" * 64)  # same architecture, other weights
    with pytest.raises(AdapterError, match="trained for base model .* but the loaded model is"):
        load_adapter(other, lora_adapter[0].adapter_dir)
    assert other.adapter_id == "none" and active_adapter(other) is None

def test_damaged_or_foreign_folders_are_refused(model, tmp_path):
    with pytest.raises(AdapterError, match="no such adapter folder"):
        load_adapter(model, tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(AdapterError, match="not a napari-sam-ft adapter"):
        load_adapter(model, tmp_path / "plain")
    info, _ = make_adapter(model, "lora", tmp_path / "adapter", seed=5)
    head_path = info.adapter_dir / CLASS_HEAD_FILE
    head_path.write_bytes(head_path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(AdapterError, match="do not match the metadata"):
        load_adapter(model, info.adapter_dir)
    assert model.adapter_id == "none"
    metadata = json.loads((info.adapter_dir / METADATA_FILE).read_text())
    metadata["format_version"] = 99
    (info.adapter_dir / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(AdapterError, match="newer"):
        read_adapter_info(info.adapter_dir)


def test_saving_never_overwrites_a_foreign_folder(model, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        make_adapter(model, "lora", tmp_path / "notes", seed=6)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    first, _ = make_adapter(model, "lora", tmp_path / "adapter", seed=7)
    second, _ = make_adapter(model, "lora", tmp_path / "adapter", seed=8)  # an older adapter is replaced
    assert first.adapter_id != second.adapter_id
    assert read_adapter_info(tmp_path / "adapter").adapter_id == second.adapter_id


def test_tuned_weights_outside_their_scope_are_refused_and_the_model_stays_as_it_was(model, ct, base_outputs,
                                                                                    decoder_adapter, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from napari_sam_ft.finetune.adapters import TUNED_WEIGHTS_FILE, _sha256_files, _weight_files

    foreign = tmp_path / "foreign"
    shutil.copytree(decoder_adapter[0].adapter_dir, foreign)
    weights = load_file(str(foreign / TUNED_WEIGHTS_FILE))
    weights["image_encoder.patch_embed.seq.0.c.weight"] = torch.zeros(1)
    save_file(weights, str(foreign / TUNED_WEIGHTS_FILE))
    metadata = json.loads((foreign / METADATA_FILE).read_text())
    metadata["files_sha256"] = _sha256_files(_weight_files(foreign))  # well formed, only its contents are wrong
    (foreign / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(AdapterError, match="outside the decoder scope"):
        load_adapter(model, foreign)
    assert model.adapter_id == "none"
    assert_same(outputs(model, ct.image), base_outputs)
