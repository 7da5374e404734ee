"""Shared fixtures: the embedded model and the sample CT are loaded once per test session.

The embedding cache of the tests lives in a temporary folder (``NAPARI_SAM_FT_CACHE``), never in the
user's cache, and is shared by every test so each sample slice is encoded once per run.
"""

from __future__ import annotations

import os
import tempfile

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
