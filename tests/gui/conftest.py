"""Fixtures for the widget tests: a real napari viewer with the sample CT and one shared loaded model.

Nothing here imports torch or the engine before a test needs it (the widget modules import them, as npe2 does
when a user docks a widget); ``test_user_flow.py`` checks the plugin in fresh processes besides.

Run under a display: xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest tests/gui -q
"""

from __future__ import annotations

import os
import sys

import pytest

from .helpers import SLICE


@pytest.fixture(scope="session", autouse=True)
def display_available():
    """Fail with instructions, rather than crash Qt, when there is no display to draw on."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        pytest.fail('the GUI tests need a display: run them as xvfb-run -a -s "-screen 0 1280x1024x24" '
                    ".venv/bin/python -m pytest tests/gui", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def isolated_embedding_cache(tmp_path_factory):
    """Never read or fill the user's embedding cache from tests."""
    path = tmp_path_factory.mktemp("embedding-cache")
    previous = os.environ.get("NAPARI_SAM_FT_CACHE")
    os.environ["NAPARI_SAM_FT_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("NAPARI_SAM_FT_CACHE", None)
    else:
        os.environ["NAPARI_SAM_FT_CACHE"] = previous


@pytest.fixture(scope="session")
def shared_session(isolated_embedding_cache):
    """One model load and one embedding cache for every widget test (a slice is encoded once per run)."""
    from napari_sam_ft._widgets._session import SegmentSession
    from napari_sam_ft.engine.cache import EmbeddingCache

    return SegmentSession(EmbeddingCache(disk_dir=isolated_embedding_cache / "shared"))


@pytest.fixture
def ct_viewer(make_napari_viewer):
    """A viewer with the sample CT and its reference labels, on the central slice."""
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sam-ft", "ct")
    viewer.dims.set_current_step(0, SLICE)
    return viewer


@pytest.fixture
def segment_widget(ct_viewer, shared_session, qtbot):
    from napari_sam_ft._widgets.segment import SegmentWidget

    widget = SegmentWidget(ct_viewer, session=shared_session)
    ct_viewer.window.add_dock_widget(widget, name="Segment")
    qtbot.waitUntil(lambda: widget.prompt_layers() is not None, timeout=5000)
    yield widget
    widget.tasks.cancel()
    qtbot.waitUntil(lambda: widget.idle, timeout=60000)


@pytest.fixture
def notifications():
    """Messages of the napari notifications shown during the test."""
    from napari.utils.notifications import notification_manager

    messages: list = []

    def record(notification):
        messages.append(notification)

    notification_manager.notification_ready.connect(record)
    yield messages
    notification_manager.notification_ready.disconnect(record)
