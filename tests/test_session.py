"""Sessions resume everything; autosaves survive a killed process and are offered back after a crash."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_sam_ft.cli import main
from napari_sam_ft.engine.prompts import SlicePrompt
from napari_sam_ft.session import (DAMAGED_SUFFIX, Autosaver, SessionError, autosave_files, discard_autosave,
                                   find_recoverable_autosave, open_session, read_autosave_info, read_session_file,
                                   restore_autosave, save_session, scan_autosaves, session_from_volume)
from napari_sam_ft.volume import read_labels, read_volume


@pytest.fixture(autouse=True)
def autosave_folder(tmp_path, monkeypatch):
    folder = tmp_path / "autosave"
    monkeypatch.setenv("NAPARI_SAM_FT_AUTOSAVE", str(folder))
    return folder


@pytest.fixture
def scan(ct_sample, tmp_path):
    """A copy of the sample CT and its labels in a folder of the test's own."""
    image = tmp_path / "scan.nii.gz"
    labels = tmp_path / "scan_labels.nii.gz"
    shutil.copyfile(ct_sample.image_path, image)
    shutil.copyfile(ct_sample.labels_path, labels)
    return image, labels


def test_a_saved_session_reopens_with_labels_prompts_choices_and_reviewed_slices(scan, tmp_path):
    image_path, labels_path = scan
    volume = read_volume(image_path)
    labels = read_labels(labels_path, like=volume).array
    prompts = [SlicePrompt(14, 5, box=np.array([10, 20, 60, 70], np.float32)),
               SlicePrompt(15, 1, points=np.array([[30, 40], [50, 45]], np.float32), point_labels=np.array([1, 0]))]
    state = session_from_volume(volume, model_name="litemedsam", adapter_dir=str(tmp_path / "adapter"),
                                window=[40.0, 400.0], reviewed_slices=[3, 5, 6], prompts=prompts)
    path = save_session(tmp_path / "work" / "liver.session.json", state, labels, like=volume)
    assert (path.parent / "liver.labels.nii.gz").exists()
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # not a private temporary file's 0600

    opened = open_session(path)
    assert opened.warnings == []
    assert np.array_equal(opened.labels, labels) and np.array_equal(opened.volume.array, volume.array)
    restored = opened.state
    assert restored.reviewed_slices == [3, 5, 6] and restored.window == [40.0, 400.0]
    assert restored.adapter_dir == str(tmp_path / "adapter") and restored.model_name == "litemedsam"
    assert [prompt.to_json() for prompt in restored.prompts] == [prompt.to_json() for prompt in prompts]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_opening_a_session_says_what_is_wrong(scan, tmp_path):
    image_path, labels_path = scan
    volume = read_volume(image_path)
    path = save_session(tmp_path / "s.session.json", session_from_volume(volume), None, like=volume)

    changed = np.asarray(volume.array).copy()
    changed[0, 0, 0] += 1
    from napari_sam_ft.volume import write_volume

    write_volume(image_path, changed, like=volume)
    assert "changed since the session was saved" in open_session(path).warnings[0]

    data = json.loads(path.read_text())
    for field, value, message in (("reviewed_slices", [30], r"reviewed slice 30 is out of range 0\.\.29"),
                                  ("prompts", [{"slice": 2, "box": [0, 0, 500, 5]}], r"x_max = 500 is out of range"),
                                  ("shape", "big", "shape"),
                                  ("napari_sam_ft_session", 99, "not a napari-sam-ft session")):
        broken = tmp_path / f"broken_{field}.session.json"
        broken.write_text(json.dumps({**data, field: value}))
        with pytest.raises(SessionError, match=message):
            read_session_file(broken)
    (tmp_path / "garbage.session.json").write_text("{not json")
    with pytest.raises(SessionError, match="not a valid session file"):
        open_session(tmp_path / "garbage.session.json")
    image_path.unlink()
    with pytest.raises(SessionError, match="is missing"):
        open_session(path)


def test_session_commands_save_open_and_describe_files(scan, tmp_path, capsys):
    image_path, labels_path = scan
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"slice": 14, "label": 5, "box": [10, 20, 60, 70]}]))
    session = tmp_path / "cli.session.json"
    assert main(["session", "save", str(session), "--image", str(image_path), "--labels", str(labels_path),
                 "--prompts", str(prompts), "--reviewed", "3,5-7", "--window", "40,400"]) == 0
    assert main(["session", "info", str(session)]) == 0
    assert "reviewed:  4 slices [3, 5, 6, 7]" in capsys.readouterr().out
    out_labels, out_prompts = tmp_path / "out.nii.gz", tmp_path / "out.json"
    assert main(["session", "open", str(session), "--labels-out", str(out_labels),
                 "--prompts-out", str(out_prompts)]) == 0
    volume = read_volume(image_path)
    assert np.array_equal(read_labels(out_labels, like=volume).array, read_labels(labels_path, like=volume).array)
    assert json.loads(out_prompts.read_text())[0]["box"] == [10.0, 20.0, 60.0, 70.0]
    assert main(["session", "save", str(tmp_path / "x.session.json"), "--image", str(image_path),
                 "--reviewed", "12,40"]) == 1
    assert "slice(s) [40] are out of range 0..29" in capsys.readouterr().err
    assert main(["session", "info", str(image_path)]) == 0
    assert "no autosaved labels" in capsys.readouterr().out


def test_autosave_writes_every_n_edits_in_the_background_and_is_removed_on_discard(scan):
    image_path, _ = scan
    labels = np.zeros((30, 101, 122), np.int32)
    saved = []
    autosaver = Autosaver(image_path, lambda: labels, every_edits=3, background=True, on_saved=saved.append)
    labels[5, 10:20, 10:20] = 2
    assert autosaver.record_edit() is False and autosaver.record_edit() is False
    assert autosaver.record_edit() is True
    autosaver.wait()
    assert saved == [autosaver.path] and autosaver.saves == 1 and autosave_files(image_path) == [autosaver.path]
    info = read_autosave_info(autosaver.path)
    assert info.edits == 3 and info.shape == (30, 101, 122) and not info.image_changed
    assert info.writer_alive and find_recoverable_autosave(image_path) is None  # live work is not offered back
    restored = restore_autosave(info, like=read_volume(image_path))
    assert restored.dtype == np.uint8 and (restored[5, 10:20, 10:20] == 2).all()
    autosaver.discard()
    assert autosave_files(image_path) == []


def test_a_background_autosave_takes_its_copy_off_the_calling_thread(scan):
    import threading

    image_path, _ = scan
    labels = np.zeros((30, 101, 122), np.int32)
    copied_on = []

    def get_labels():
        copied_on.append(threading.current_thread())
        return labels

    autosaver = Autosaver(image_path, get_labels, every_edits=1, background=True)
    autosaver.record_edit()
    autosaver.wait()
    assert autosaver.saves == 1 and copied_on and threading.current_thread() not in copied_on
    autosaver.discard()


def test_two_layers_and_two_processes_autosaving_one_image_write_separate_files(scan, autosave_folder):
    image_path, _ = scan
    organs, lesions = np.zeros((30, 101, 122), np.uint8), np.zeros((30, 101, 122), np.uint8)
    organs[3], lesions[4] = 1, 2
    first = Autosaver(image_path, lambda: organs, every_edits=1, layer_name="organs")
    second = Autosaver(image_path, lambda: lesions, every_edits=1, layer_name="organs")  # same name, other layer
    first.record_edit()
    second.record_edit()
    other_process = crash_after_autosaving(image_path, autosave_folder, stroke_value=9)
    files = autosave_files(image_path)
    assert len(files) == 3 and first.path in files and second.path in files
    assert np.array_equal(restore_autosave(read_autosave_info(first.path)), organs)
    assert np.array_equal(restore_autosave(read_autosave_info(second.path)), lesions)
    # Only the other (now dead) process's autosave is offered back; this process's two are live work.
    assert [info.path for info in scan_autosaves(image_path).recoverable] == [other_process]


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from napari_sam_ft.session import write_autosave
    image_path = sys.argv[1]
    rng = np.random.default_rng(0)
    # Two versions of the labels, each incompressible enough that a write takes a while.
    versions = [rng.integers(0, 200, size=(48, 256, 256), dtype=np.uint8) | np.uint8(1), None]
    versions[1] = versions[0][::-1].copy()
    write_autosave(image_path, versions[0], edits=0)
    print("ready", flush=True)
    edits = 0
    while True:
        edits += 1
        write_autosave(image_path, versions[edits % 2], edits=edits)
""")


def test_killing_the_process_during_autosaves_leaves_the_old_or_the_new_complete_file(scan, autosave_folder, tmp_path):
    image_path, _ = scan
    rng = np.random.default_rng(0)
    first = rng.integers(0, 200, size=(48, 256, 256), dtype=np.uint8) | np.uint8(1)
    versions = (first, first[::-1])
    killed_mid_write = 0
    for trial in range(4):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(image_path)], stdout=subprocess.PIPE,
                                   env={**os.environ, "NAPARI_SAM_FT_AUTOSAVE": str(autosave_folder)})
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(0.2 + 0.15 * trial)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        temporaries = list(autosave_folder.glob(".*"))
        killed_mid_write += bool(temporaries)
        for temporary in temporaries:
            temporary.unlink()
        info = find_recoverable_autosave(image_path)  # the writer is dead: its autosave is offered
        assert info is not None
        labels = restore_autosave(info)
        assert any(np.array_equal(labels, version) for version in versions), trial
        assert info.edits % 2 == (0 if np.array_equal(labels, versions[0]) else 1)
    assert killed_mid_write >= 1, "no kill landed inside a write: the test did not exercise the crash"


CRASHING_SESSION = textwrap.dedent("""
    import os, signal, sys, numpy as np
    from napari_sam_ft.session import Autosaver
    labels = np.zeros((30, 101, 122), np.int32)
    autosaver = Autosaver(sys.argv[1], lambda: labels, every_edits=2)
    for edit in range(5):  # the user paints five strokes; autosaves after the 2nd and 4th
        labels[10 + edit, 20:40, 30:50] = edit + 1
        autosaver.record_edit()
    print("painted", flush=True)
    sys.stdin.readline()  # napari keeps running until it crashes
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_after_a_crash_the_next_open_offers_the_last_autosave_and_restores_it(scan, autosave_folder):
    image_path, _ = scan
    environment = {**os.environ, "NAPARI_SAM_FT_AUTOSAVE": str(autosave_folder)}
    process = subprocess.Popen([sys.executable, "-c", CRASHING_SESSION, str(image_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env=environment)
    assert process.stdout.readline().strip() == b"painted"
    assert find_recoverable_autosave(image_path) is None  # still running: not ours to restore
    process.stdin.write(b"crash\n")
    process.stdin.flush()
    assert process.wait(timeout=30) == -signal.SIGKILL

    info = find_recoverable_autosave(image_path)
    assert info is not None and info.edits == 4
    labels = restore_autosave(info, like=read_volume(image_path))
    assert [int(labels[10 + edit].max()) for edit in range(5)] == [1, 2, 3, 4, 0]  # the 5th stroke was unsaved
    assert main(["session", "recover", str(image_path), "-o", str(image_path.parent / "recovered.nii.gz"),
                 "--discard"]) == 0
    assert np.array_equal(read_labels(image_path.parent / "recovered.nii.gz").array, labels)
    assert find_recoverable_autosave(image_path) is None


def test_an_autosave_for_another_shape_is_refused_and_a_damaged_one_is_reported_and_kept(scan, autosave_folder):
    image_path, _ = scan
    path = crash_after_autosaving(image_path, autosave_folder, shape=(4, 5, 6))
    with pytest.raises(SessionError, match=r"shape \(4, 5, 6\) but the image has \(30, 101, 122\)"):
        restore_autosave(find_recoverable_autosave(image_path), like=read_volume(image_path))
    damaged_bytes = b"PK\x03\x04 damaged"
    path.write_bytes(damaged_bytes)
    scan_result = scan_autosaves(image_path)
    assert scan_result.recoverable == [] and len(scan_result.damaged) == 1
    kept = scan_result.damaged[0]
    assert kept.name == path.name + DAMAGED_SUFFIX and kept.read_bytes() == damaged_bytes and not path.exists()
    assert scan_autosaves(image_path).damaged == []  # reported once; the file stays aside
    with pytest.raises(SessionError, match="no autosaved labels"):
        restore_autosave(image_path)
    assert kept.exists()


def test_an_autosave_damaged_after_it_was_found_is_moved_aside_on_restore(scan, autosave_folder):
    image_path, _ = scan
    info = read_autosave_info(crash_after_autosaving(image_path, autosave_folder))
    info.path.write_bytes(b"not an archive")
    with pytest.raises(SessionError, match="cannot be read.*kept as"):
        restore_autosave(info)
    assert not info.path.exists() and info.path.with_name(info.path.name + DAMAGED_SUFFIX).exists()
    discard_autosave(info)  # nothing left to delete: no error


AUTOSAVING_PROCESS = textwrap.dedent("""
    import sys, numpy as np
    from napari_sam_ft.session import Autosaver
    shape, value = tuple(int(size) for size in sys.argv[2].split(",")), int(sys.argv[3])
    labels = np.full(shape, value, np.uint8)
    autosaver = Autosaver(sys.argv[1], lambda: labels, every_edits=1, layer_name="labels")
    autosaver.record_edit()
    print(autosaver.path)
""")


def crash_after_autosaving(image_path, autosave_folder, shape=(30, 101, 122), stroke_value: int = 1):
    """Another napari-sam-ft process autosaves labels of ``shape`` for the image, then ends: its file's path."""
    finished = subprocess.run([sys.executable, "-c", AUTOSAVING_PROCESS, str(image_path), ",".join(map(str, shape)),
                               str(stroke_value)], capture_output=True, text=True, timeout=120, check=True,
                              env={**os.environ, "NAPARI_SAM_FT_AUTOSAVE": str(autosave_folder)})
    from pathlib import Path

    return Path(finished.stdout.strip().splitlines()[-1])
