"""Shared fixtures: the embedded model and the sample CT are loaded once per test session.

The embedding cache of the tests lives in a temporary folder (``NAPARI_SAM_FT_CACHE``), never in the
user's cache, and is shared by every test so each sample slice is encoded once per run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

# Set before any test imports the engine, so even CLI runs in-process use the temporary cache.
os.environ.setdefault("NAPARI_SAM_FT_CACHE", tempfile.mkdtemp(prefix="napari-sam-ft-test-cache-"))


@pytest.fixture(scope="session")
def litemedsam():
    from napari_sam_ft.models.registry import load_model

    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def ct_sample():
    from napari_sam_ft.sample import load_sample

    return load_sample("ct")


@pytest.fixture(scope="session")
def shared_cache():
    from napari_sam_ft.engine.cache import EmbeddingCache, default_cache_dir

    return EmbeddingCache(disk_dir=default_cache_dir())


@pytest.fixture
def ct_predictor(litemedsam, ct_sample, shared_cache):
    """A fresh predictor (counters at zero) over the session's shared embedding cache."""
    from napari_sam_ft.engine.predictor import VolumePredictor

    return VolumePredictor(litemedsam, ct_sample.image, cache=shared_cache)


CASES = Path(__file__).resolve().parents[1].parent / "shared" / "cases"


@pytest.fixture(scope="session")
def mni152(litemedsam, shared_cache):
    """(predictor, reference labels) of ../shared/cases mni152: a 1 mm T1 with AAL amygdala (1), pallidum (2) and
    hippocampus (3), each label holding the left and the right structure."""
    from napari_sam_ft.scan_jobs import predictor_for
    from napari_sam_ft.volume import read_labels, read_volume

    image_path = CASES / "mni152_t1.nii.gz"
    labels_path = CASES / "mni152_aal_amygdala_pallidum_hippocampus.nii.gz"
    for path in (image_path, labels_path):
        if not path.is_file():
            pytest.fail(f"{path} is missing: these tests read the real cases in ../shared/cases beside the repository")
    image = read_volume(image_path)
    labels = np.asarray(read_labels(labels_path, like=image).array)
    return predictor_for(litemedsam, image, "auto", shared_cache), labels
