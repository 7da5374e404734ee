"""Training data from annotations, augmentation and simulated prompts (no network needed)."""

import numpy as np
import pytest

from napari_sam_ft.finetune.augment import AugmentSettings, augment_pair, jittered_box, sampled_points
from napari_sam_ft.finetune.data import FinetuneDataError, VolumeAnnotations, annotated_slices, build_training_data
from napari_sam_ft.sample import load_sample


@pytest.fixture(scope="module")
def ct():
    return load_sample("ct")


def sparse_labels(ct, slices):
    """The sample's reference labels on ``slices`` only, as a user who painted those slices would have."""
    labels = np.zeros_like(ct.labels.array)
    labels[slices] = ct.labels.array[slices]
    return labels


def test_only_annotated_slices_are_used_and_one_is_held_out(ct):
    labels = sparse_labels(ct, [4, 10, 16, 22, 28])
    assert annotated_slices(labels) == [4, 10, 16, 22, 28]
    data = build_training_data([VolumeAnnotations(ct.image, labels, "ct")], class_names=ct.class_names)
    used = sorted(example.slice_index for example in data.train + data.validation)
    assert used == [4, 10, 16, 22, 28]  # unlabelled slices are never taken as background
    assert len(data.validation) == 1 and len(data.train) == 4
    assert set(data.class_ids) == set(np.unique(labels[[4, 10, 16, 22, 28]]).tolist()) - {0}
    assert data.class_names[1] == "spleen"
    example = data.train[0]
    assert example.image_01.dtype == np.float32 and 0.0 <= example.image_01.min() <= example.image_01.max() <= 1.0
    np.testing.assert_array_equal(example.labels, labels[example.slice_index])


def test_classes_explicit_slices_and_validation(ct):
    labels = sparse_labels(ct, [4, 10, 16, 22])
    data = build_training_data([VolumeAnnotations(ct.image, labels)], slices=[4, 10, 16, 22, 25],
                               validation_slices=[16], classes=[1, 5])
    assert [example.slice_index for example in data.validation] == [16]
    # Slice 25 was listed as reviewed: it is a true background slice.
    assert sorted(example.slice_index for example in data.train) == [4, 10, 22, 25]
    assert data.class_ids == (1, 5)
    for example in data.train + data.validation:
        assert set(np.unique(example.labels)) <= {0, 1, 5}
    indices = data.class_indices(np.array([[0, 1, 5, 7]]))
    np.testing.assert_array_equal(indices, [[0, 1, 2, 0]])


def test_several_volumes_combine(ct):
    mr = load_sample("mr")
    data = build_training_data([VolumeAnnotations(ct.image, sparse_labels(ct, [5, 15, 25]), "ct"),
                                VolumeAnnotations(mr.image, mr.labels.array * (np.arange(20) == 8)[:, None, None],
                                                  "mr")], classes=[5])
    volumes = {(example.volume_index, example.slice_index) for example in data.train + data.validation}
    assert volumes == {(0, 5), (0, 15), (0, 25), (1, 8)}
    assert len(data.windows) == 2 and data.windows[0].name != data.windows[1].name  # CT preset vs MR percentiles


def test_of_two_annotated_slices_the_smaller_annotation_is_held_out(ct):
    labels = sparse_labels(ct, [8, 14])
    labels[14][labels[14] != 0] = 0
    labels[14, 100:110, 100:110] = 5  # a small painting on slice 14, a large one on slice 8
    for order in ([8, 14], [14, 8]):
        data = build_training_data([VolumeAnnotations(ct.image, labels)], slices=order)
        assert [example.slice_index for example in data.validation] == [14]
        assert [example.slice_index for example in data.train] == [8]


def test_empty_annotations_give_a_clear_error(ct):
    with pytest.raises(FinetuneDataError, match="no annotations"):
        build_training_data([VolumeAnnotations(ct.image, np.zeros_like(ct.labels.array))])


def test_single_slice_annotation_gives_a_clear_error(ct):
    with pytest.raises(FinetuneDataError, match="only one annotated slice"):
        build_training_data([VolumeAnnotations(ct.image, sparse_labels(ct, [12]))])


def test_mismatched_shapes_and_missing_classes_are_refused(ct):
    with pytest.raises(FinetuneDataError, match="does not match"):
        build_training_data([VolumeAnnotations(ct.image, sparse_labels(ct, [3, 4])[:, :50])])
    with pytest.raises(FinetuneDataError, match="not painted"):
        build_training_data([VolumeAnnotations(ct.image, sparse_labels(ct, [3, 4]))], classes=[999])


def test_augmentation_keeps_label_ids_and_is_seeded(ct):
    image = ct.image.array[15].astype(np.float32)
    image = (image - image.min()) / (image.max() - image.min())
    labels = ct.labels.array[15].astype(np.int32)
    first = augment_pair(image, labels, np.random.default_rng(3), AugmentSettings())
    second = augment_pair(image, labels, np.random.default_rng(3), AugmentSettings())
    np.testing.assert_array_equal(first[0], second[0])
    assert set(np.unique(first[1])) <= set(np.unique(labels))  # nearest-neighbour: no blended ids
    assert first[0].shape == image.shape and 0.0 <= first[0].min() and first[0].max() <= 1.0
    assert not np.array_equal(first[0], image)


def test_simulated_prompts_fit_the_mask(ct):
    mask = ct.labels.array[15] == 5
    rng = np.random.default_rng(0)
    rows, cols = np.nonzero(mask)
    width, height = np.ptp(cols) + 1, np.ptp(rows) + 1
    for _ in range(20):
        x0, y0, x1, y1 = jittered_box(mask, rng)
        assert 0 <= x0 <= x1 <= mask.shape[1] and 0 <= y0 <= y1 <= mask.shape[0]
        assert abs(x0 - cols.min()) <= 0.1 * width + 5 and abs(y1 - (rows.max() + 1)) <= 0.1 * height + 5
        coords, labels = sampled_points(mask, rng)
        np.testing.assert_array_equal(coords % 1, 0.5)  # pixel centres, as clicks reach the model
        for (x, y), label in zip(coords.astype(int), labels):
            assert mask[y, x] == bool(label)


def test_training_prompts_are_the_prompts_inference_gets(ct):
    """Simulated prompts use the engine's continuous pixel convention, and the training decoder path gives
    the mask the engine's predictor gives for the same prompt (real LiteMedSAM forward passes)."""
    import torch

    from napari_sam_ft.engine.predictor import VolumePredictor
    from napari_sam_ft.engine.prompts import box_from_mask, points_zyx_to_prompts
    from napari_sam_ft.finetune.validation import decode_prompts
    from napari_sam_ft.metrics import dice
    from napari_sam_ft.models.registry import load_model

    mask = ct.labels.array[15] == 5
    # No jitter, no margin: exactly the engine's tight box, far edges one past the last pixel.
    box = jittered_box(mask, np.random.default_rng(0), jitter=0.0, max_margin_px=0.0)
    np.testing.assert_array_equal(box, box_from_mask(mask))
    rows, cols = np.nonzero(mask)
    assert box[2] == cols.max() + 1 and box[3] == rows.max() + 1
    # A sampled click is where a napari click on that pixel lands (napari puts pixel centres at integers).
    coords, labels = sampled_points(mask, np.random.default_rng(1), max_negative=0)
    x, y = coords[0]
    clicked = points_zyx_to_prompts(np.array([[15, int(y), int(x)]], np.float32), np.array([True]))[0]
    np.testing.assert_array_equal(clicked.points[0], coords[0])

    model = load_model()
    predictor = VolumePredictor(model, ct.image)
    height, width = mask.shape
    with torch.no_grad():
        training_logits = decode_prompts(model.sam, model.preprocessing, predictor.embedding(15), height, width,
                                         boxes_xyxy=box[None])
        training_click = decode_prompts(model.sam, model.preprocessing, predictor.embedding(15), height, width,
                                        points_xy=coords[None, :1], point_labels=labels[None, :1])
    inference_masks, _ = predictor.predict_boxes(box[None], slice_index=15)
    assert inference_masks[0].sum() > 100
    # The engine decodes with its fast decoder (same weights, same arithmetic up to rounding): the masks
    # differ by a few border pixels at most, and the logits by rounding.
    assert dice(training_logits[0, 0].numpy() > 0, inference_masks[0]) > 0.99
    click_logits, _, _ = predictor.decode(15, clicked.points[None], clicked.point_labels[None].astype(np.float32),
                                          None, None, False)
    difference = (training_click[0, 0] - click_logits[0, 0].float()).abs().max()
    assert difference < 0.05 * float(click_logits[0, 0].abs().max()), difference

def test_zoomed_box_examples_are_the_slice_as_an_adapter_that_zooms_decodes_it():
    """Large objects stay on the whole slice; each small one gets the crop inference decodes its box on, labelled
    with only the objects lying wholly inside it."""
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.engine.zoom import zoom_crop
    from napari_sam_ft.finetune.data import AnnotatedSlice, zoomed_box_examples

    labels = np.zeros((200, 240), np.int32)
    labels[20:150, 20:140] = 1  # large: its crop would be most of the slice
    labels[160:172, 180:190] = 2  # small
    labels[174:180, 182:192] = 3  # small, inside the crop of class 2's lower box
    labels[150:158, 150:156] = 2  # a second piece of class 2 next to the large object
    image = np.random.default_rng(0).random((200, 240)).astype(np.float32)
    whole, crops = zoomed_box_examples(AnnotatedSlice(0, 7, image, labels), [1, 2, 3])

    np.testing.assert_array_equal(whole.image_01, image)
    assert set(np.unique(whole.labels)) == {0, 1} and (whole.labels == 1).sum() == (labels == 1).sum()
    assert len(crops) == 3 and all(crop.slice_index == 7 for crop in crops)
    lower_piece = np.zeros(labels.shape, bool)
    lower_piece[160:172, 180:190] = True
    crop = zoom_crop(box_from_mask(lower_piece), labels.shape)
    assert crops[1].labels.shape == crop.shape  # class 2's lower piece, in the order objects_on_slice finds them
    np.testing.assert_array_equal(crops[1].image_01, image[crop.top:crop.bottom, crop.left:crop.right])
    inside = crops[1].labels
    assert (inside == 2).sum() == 12 * 10 and (inside == 3).sum() == 10 * 6  # both wholly inside
    assert not (inside == 1).any()  # the large object is cut by the crop's edge: never prompted there
    empty_whole, no_crops = zoomed_box_examples(AnnotatedSlice(0, 0, image, np.zeros_like(labels)), [1])
    assert empty_whole.labels.sum() == 0 and no_crops == []


def test_zoomed_box_examples_keep_at_most_max_crops_spread_over_the_objects():
    """A chest slice holds ~25 rib cross-sections: only ``max_crops`` of them are zoomed, first and last included."""
    from napari_sam_ft.finetune.data import AnnotatedSlice, zoomed_box_examples

    labels = np.zeros((200, 200), np.int32)
    for row in range(10):  # ten small objects down the left side, found top to bottom
        labels[10 + 18 * row:16 + 18 * row, 10:16] = 1
    image = np.random.default_rng(0).random(labels.shape).astype(np.float32)
    example = AnnotatedSlice(0, 3, image, labels)
    _, every = zoomed_box_examples(example, [1])
    _, capped = zoomed_box_examples(example, [1], max_crops=4)
    assert len(every) == 10 and len(capped) == 4
    chosen = [next(index for index, crop in enumerate(every) if np.array_equal(crop.image_01, kept.image_01))
              for kept in capped]
    assert chosen == [0, 3, 6, 9]


def synthetic_chest_ct() -> tuple[np.ndarray, np.ndarray]:
    """A (4, 128, 128) CT in Hounsfield units: air around a soft-tissue body holding a lung with a solid lesion
    in it and an organ; labels 1 lesion, 2 organ, 3 lung (on every slice)."""
    image = np.full((4, 128, 128), -1000.0, np.float32)
    image[:, 10:118, 10:118] = 40.0
    image[:, 20:80, 20:70] = -850.0  # the lung
    rows, cols = np.mgrid[:128, :128]
    lesion = (rows - 45) ** 2 + (cols - 40) ** 2 <= 36  # round: its box's corners are lung
    image[:, lesion] = 30.0
    image[:, 90:110, 80:110] = 60.0  # an organ below
    image += np.random.default_rng(1).normal(0.0, 5.0, image.shape).astype(np.float32)
    labels = np.zeros(image.shape, np.int32)
    labels[:, 20:80, 20:70] = 3
    labels[:, lesion] = 1
    labels[:, 90:110, 80:110] = 2
    return image, labels


def test_a_ct_on_the_automatic_window_is_learnt_in_the_window_each_box_is_decoded_in():
    """The engine windows each box on an automatic-window CT on its own (a lesion in the lung flatter than the
    lung, the organ in soft tissue): ``windowed_per_prompt`` gives one copy of the slice per window its objects'
    boxes choose, windowed so and labelled with those objects only. An explicit window, or an MRI, stays one."""
    from napari_sam_ft.engine.prompts import box_from_mask
    from napari_sam_ft.engine.window_choice import window_for_box
    from napari_sam_ft.finetune.data import windowed_per_prompt

    image, labels = synthetic_chest_ct()
    data = build_training_data([VolumeAnnotations(image, labels, "chest")], validation_slices=[2])
    example = data.train[0]
    np.testing.assert_array_equal(example.raw, image[example.slice_index])
    pieces = windowed_per_prompt(example, data.class_ids)
    expected = {class_id: window_for_box(example.raw, box_from_mask(example.labels == class_id)).name
                for class_id in (1, 2, 3)}
    assert expected == {1: "solid_in_air", 2: "soft_tissue", 3: "wide"}
    assert len(pieces) == 3
    for piece in pieces:
        (class_id,) = set(np.unique(piece.labels)) - {0}
        np.testing.assert_array_equal(piece.labels == class_id, labels[example.slice_index] == class_id)
        window = window_for_box(example.raw, box_from_mask(piece.labels == class_id))
        np.testing.assert_array_equal(piece.image_01, window.apply(example.raw))
        assert piece.raw is None
    soft = next(piece for piece in pieces if (piece.labels == 2).any())
    np.testing.assert_array_equal(soft.image_01, example.image_01)  # the volume's own window is soft tissue

    explicit = build_training_data([VolumeAnnotations(image, labels, "chest", window="lung")], validation_slices=[2])
    mr_like = build_training_data([VolumeAnnotations(image + 1100.0, labels, "mr")], validation_slices=[2])
    for other in (explicit.train[0], mr_like.train[0]):
        assert other.raw is None and windowed_per_prompt(other, data.class_ids) == [other]
