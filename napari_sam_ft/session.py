"""Sessions and autosave: everything needed to resume work on a scan, and labels that survive a crash.

A session is a JSON file (``*.session.json``) next to a compressed label file (``*.labels.nii.gz``, in the
image's geometry, so any viewer opens it). It records the image path and content hash, the prompts, the
model, checkpoint and adapter, the window, slicing axis and channels, and the slices marked reviewed.

Autosave keeps the user's labels in one ``.npz`` per image, process and labels layer under the user data folder
(or ``$NAPARI_SAM_FT_AUTOSAVE``), written every N edits through ``atomic_write``: after a crash the file is either
the previous complete autosave or the new one, never a mix, and no other napari instance writes it.
``scan_autosaves`` finds those left by processes that ended, on the next open, and moves damaged ones aside
(``*.damaged``, reported, never deleted); ``restore_autosave`` returns the labels. No Qt here: the session panel
and the CLI use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np

from .engine.prompts import PromptError, SlicePrompt, parse_prompts
from .volume import Volume, VolumeError, atomic_write, read_channels, read_labels, read_volume, write_volume

SESSION_VERSION = 1
SESSION_SUFFIX = ".session.json"
LABELS_SUFFIX = ".labels.nii.gz"
AUTOSAVE_EVERY_EDITS = 20
AUTOSAVE_SUFFIX = ".autosave.npz"
DAMAGED_SUFFIX = ".damaged"
# zlib level 1: label volumes are mostly zeros and compress ~20x at a fraction of the default level's time.
AUTOSAVE_COMPRESSLEVEL = 1
STALE_TEMPORARY_SECONDS = 600


class SessionError(ValueError):
    """A session or autosave that cannot be used; the message names the file and the problem."""


# --- sessions ------------------------------------------------------------------------------------------

@dataclass
class SessionState:
    """What a session file records (paths absolute; prompts in SAM coordinates of the (Z, Y, X) volume)."""

    image_path: str
    image_hash: str
    shape: tuple[int, int, int]
    model_name: str = "litemedsam"
    checkpoint: str | None = None
    adapter_dir: str | None = None
    window: str | list = "auto"
    axis: int | None = None
    channels: list[int] | None = None
    reviewed_slices: list[int] = field(default_factory=list)
    prompts: list[SlicePrompt] = field(default_factory=list)
    labels_file: str | None = None  # relative to the session file's folder
    saved_at: str = ""

    def to_json(self) -> dict:
        return {"napari_sam_ft_session": SESSION_VERSION, "image_path": self.image_path,
                "image_hash": self.image_hash, "shape": list(self.shape), "model_name": self.model_name,
                "checkpoint": self.checkpoint, "adapter_dir": self.adapter_dir, "window": self.window,
                "axis": self.axis, "channels": self.channels, "reviewed_slices": sorted(set(self.reviewed_slices)),
                "prompts": [prompt.to_json() for prompt in self.prompts], "labels_file": self.labels_file,
                "saved_at": self.saved_at}


@dataclass
class OpenedSession:
    """A session read back: its state, the image, the labels (or None) and anything the user should know."""

    path: Path
    state: SessionState
    volume: Volume
    labels: np.ndarray | None
    warnings: list[str]


def read_session_volume(image_path: str | os.PathLike, axis: int | None = None,
                        channels: list[int] | None = None) -> Volume:
    """The image as the session saw it: one file, one channel of it, or 2-3 channels (``read_channels``)."""
    if channels is not None and len(channels) > 1:
        return read_channels(image_path, channels, slicing_axis=axis)
    return read_volume(image_path, slicing_axis=axis, channel=channels[0] if channels else None)


def labels_path_for(session_path: str | os.PathLike) -> Path:
    session_path = Path(session_path)
    name = session_path.name
    stem = name[: -len(SESSION_SUFFIX)] if name.endswith(SESSION_SUFFIX) else session_path.stem
    return session_path.with_name(stem + LABELS_SUFFIX)


def save_session(session_path: str | os.PathLike, state: SessionState, labels: np.ndarray | None = None,
                 like: Volume | None = None) -> Path:
    """Write the labels (if any, in ``like``'s geometry) and then the session JSON, each atomically.

    The labels go first: a crash between the two leaves the previous session JSON, which still opens.
    """
    session_path = Path(session_path)
    session_path.parent.mkdir(parents=True, exist_ok=True)
    if labels is not None:
        labels = np.asarray(labels)
        if tuple(labels.shape) != tuple(state.shape):
            raise SessionError(f"labels have shape {labels.shape} but the image has {tuple(state.shape)}")
        labels_path = labels_path_for(session_path)
        write_volume(labels_path, labels.astype(_label_dtype(labels), copy=False), like=like)
        state.labels_file = labels_path.name
    state.saved_at = datetime.now().isoformat(timespec="seconds")
    payload = json.dumps(state.to_json(), indent=1)
    atomic_write(session_path, lambda temporary: temporary.write_text(payload, encoding="utf-8"))
    return session_path


def session_from_volume(volume: Volume, **choices) -> SessionState:
    """A ``SessionState`` for ``volume`` (read from a file) with the given model/window/prompt choices."""
    from .engine.cache import volume_content_hash

    if volume.source_path is None:
        raise SessionError("this image was not read from a file; save it as a .nii.gz first, then save the session")
    return SessionState(image_path=str(Path(volume.source_path).resolve()),
                        image_hash=volume_content_hash(volume.array), shape=tuple(volume.shape), **choices)


def read_session_file(session_path: str | os.PathLike) -> SessionState:
    """Parse and validate a session JSON without reading the image (prompts are checked against its shape)."""
    session_path = Path(session_path)
    try:
        data = json.loads(session_path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SessionError(f"{session_path}: cannot read session file ({error})") from error
    except (ValueError, RecursionError) as error:
        raise SessionError(f"{session_path}: is not a valid session file ({error})") from error
    if not isinstance(data, dict) or data.get("napari_sam_ft_session") != SESSION_VERSION:
        raise SessionError(f"{session_path}: is not a napari-sam-ft session (version {SESSION_VERSION})")
    try:
        shape = tuple(int(size) for size in data["shape"])
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape {shape}")
        prompts = parse_prompts(data["prompts"], shape) if data.get("prompts") else []
        reviewed = [int(index) for index in data.get("reviewed_slices") or []]
        for index in reviewed:
            if not 0 <= index < shape[0]:
                raise ValueError(f"reviewed slice {index} is out of range 0..{shape[0] - 1}")
        channels = data.get("channels")
        state = SessionState(
            image_path=str(data["image_path"]), image_hash=str(data["image_hash"]), shape=shape,
            model_name=str(data.get("model_name") or "litemedsam"), checkpoint=data.get("checkpoint"),
            adapter_dir=data.get("adapter_dir"), window=data.get("window") or "auto",
            axis=None if data.get("axis") is None else int(data["axis"]),
            channels=None if channels is None else [int(channel) for channel in channels],
            reviewed_slices=reviewed, prompts=prompts, labels_file=data.get("labels_file"),
            saved_at=str(data.get("saved_at", "")))
    except PromptError as error:
        raise SessionError(f"{session_path}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
        raise SessionError(f"{session_path}: session field missing or invalid ({problem})") from None
    return state


def open_session(session_path: str | os.PathLike) -> OpenedSession:
    """Read a session, its image (checked against the recorded hash) and its labels.

    A missing image or one of another shape raises ``SessionError``; a changed image of the same shape is
    opened with a warning.
    """
    from .engine.cache import volume_content_hash

    session_path = Path(session_path)
    state = read_session_file(session_path)
    image_path = Path(state.image_path)
    if not image_path.is_absolute():
        image_path = session_path.parent / image_path
    if not image_path.exists():
        raise SessionError(f"{session_path}: its image {image_path} is missing; put it back there or edit "
                           "'image_path' in the session file")
    volume = read_session_volume(image_path, state.axis, state.channels)
    if tuple(volume.shape) != tuple(state.shape):
        raise SessionError(f"{session_path}: the image {image_path} now has shape {volume.shape}, the session was "
                           f"saved for {tuple(state.shape)}")
    warnings = []
    if volume_content_hash(volume.array) != state.image_hash:
        warnings.append(f"the image {image_path} changed since the session was saved ({state.saved_at}); "
                        "check the labels still fit it")
    labels = None
    if state.labels_file:
        labels_path = session_path.parent / state.labels_file
        if not labels_path.exists():
            raise SessionError(f"{session_path}: its labels file {labels_path} is missing")
        try:
            labels = read_labels(labels_path, like=volume).array
        except VolumeError as error:
            raise SessionError(f"{session_path}: {error}") from None
    return OpenedSession(session_path, state, volume, labels, warnings)


def _label_dtype(labels: np.ndarray) -> np.dtype:
    from ._layer_data import smallest_label_dtype

    return smallest_label_dtype(labels)


# --- autosave ------------------------------------------------------------------------------------------

def autosave_dir() -> Path:
    """``$NAPARI_SAM_FT_AUTOSAVE`` or the platform's user data folder."""
    override = os.environ.get("NAPARI_SAM_FT_AUTOSAVE")
    if override:
        return Path(override)
    from platformdirs import user_data_dir

    return Path(user_data_dir("napari-sam-ft")) / "autosave"


def image_key(image_path: str | os.PathLike) -> str:
    """Names an image in autosave file names: a hash of its absolute path."""
    return hashlib.blake2b(str(Path(image_path).resolve()).encode(), digest_size=10).hexdigest()


def autosave_owner(layer_name: str = "", unique: bool = False) -> str:
    """Who writes an autosave: this process and the layer (``unique``: plus a token, one per ``Autosaver``).

    Part of the file name, so two napari instances, or two labels layers of one image, never write one file.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "_", layer_name).strip("_")[:40] or "labels"
    token = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    return f"{os.getpid()}{token}-{slug}"


def autosave_path(image_path: str | os.PathLike, owner: str | None = None) -> Path:
    """The autosave file of ``image_path`` written by ``owner`` (default: this process, unnamed layer)."""
    return autosave_dir() / f"{image_key(image_path)}-{owner or autosave_owner()}{AUTOSAVE_SUFFIX}"


def autosave_files(image_path: str | os.PathLike) -> list[Path]:
    """Every finished autosave of ``image_path``, by any process or layer (temporaries start with a dot)."""
    folder = autosave_dir()
    return sorted(folder.glob(f"{image_key(image_path)}-*{AUTOSAVE_SUFFIX}")) if folder.is_dir() else []


def move_aside(path: Path) -> Path:
    """Rename a damaged autosave to ``*.damaged`` (kept for the user, never deleted); returns the new path."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    count = 1
    while target.exists():
        count += 1
        target = path.with_name(f"{path.name}.{count}{DAMAGED_SUFFIX}")
    os.replace(path, target)
    return target


@dataclass(frozen=True)
class AutosaveInfo:
    """An autosave found on disk, described without loading its labels."""

    path: Path
    image_path: str
    saved_at: float  # seconds since the epoch
    edits: int
    shape: tuple[int, ...]
    layer_name: str
    image_changed: bool  # the image file's size or modification time differ from when it was saved
    writer_alive: bool = False  # written by a process still running on this machine (this one included)

    @property
    def saved_at_text(self) -> str:
        return datetime.fromtimestamp(self.saved_at).strftime("%Y-%m-%d %H:%M:%S")


def write_npz(path: Path, arrays: dict[str, np.ndarray], compresslevel: int = AUTOSAVE_COMPRESSLEVEL) -> None:
    """A standard compressed ``.npz`` (``np.load`` reads it) written atomically, at a chosen zlib level."""

    def write(temporary: Path) -> None:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    atomic_write(path, write)


def _image_stamp(image_path: Path) -> tuple[int, int]:
    status = image_path.stat()
    return int(status.st_size), int(status.st_mtime_ns)


def write_autosave(image_path: str | os.PathLike, labels: np.ndarray, *, edits: int = 0, layer_name: str = "",
                   owner: str | None = None) -> Path:
    """Save ``labels`` for ``image_path`` as ``owner``'s autosave (default: this process and layer), atomically."""
    image_path = Path(image_path).resolve()
    labels = np.asarray(labels)
    size, mtime_ns = _image_stamp(image_path)
    meta = {"version": SESSION_VERSION, "image_path": str(image_path), "image_size": size, "image_mtime_ns": mtime_ns,
            "saved_at": time.time(), "edits": int(edits), "pid": os.getpid(), "host": socket.gethostname(),
            "layer_name": layer_name, "shape": list(labels.shape)}
    path = autosave_path(image_path, owner or autosave_owner(layer_name))
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    write_npz(path, {"labels": labels.astype(_label_dtype(labels), copy=False),
                     "meta": np.array(json.dumps(meta))})
    return path


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries of ``atomic_write`` left by a process killed mid-write (never the file itself)."""
    now = time.time()
    for temporary in path.parent.glob(f".{path.name}.*"):
        try:
            if now - temporary.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                temporary.unlink()
        except OSError:
            pass


def _read_meta(path: Path) -> dict:
    """The metadata of an autosave; raises ``SessionError`` for a file that cannot be one (damaged, foreign)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
    except Exception as error:
        raise SessionError(f"{path}: the autosave cannot be read ({type(error).__name__}: {error})") from error
    if not isinstance(meta, dict):
        raise SessionError(f"{path}: the autosave's metadata is not a record")
    return meta


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@dataclass
class AutosaveScan:
    """The autosaves of one image: those to offer back (newest first) and the damaged ones moved aside."""

    recoverable: list[AutosaveInfo] = field(default_factory=list)
    damaged: list[Path] = field(default_factory=list)  # where each damaged autosave was moved (``*.damaged``)


def read_autosave_info(path: Path) -> AutosaveInfo:
    """Describe the autosave at ``path`` from its metadata; ``SessionError`` for a damaged or foreign file."""
    meta = _read_meta(path)
    image = Path(str(meta.get("image_path", "")))
    try:
        changed = _image_stamp(image) != (meta.get("image_size"), meta.get("image_mtime_ns"))
    except OSError:
        changed = True
    pid = int(meta.get("pid", 0))
    alive = meta.get("host") == socket.gethostname() and pid > 0 and (pid == os.getpid() or _process_alive(pid))
    return AutosaveInfo(path, str(image), float(meta.get("saved_at", 0.0)), int(meta.get("edits", 0)),
                        tuple(meta.get("shape", ())), str(meta.get("layer_name", "")), changed, alive)


def scan_autosaves(image_path: str | os.PathLike) -> AutosaveScan:
    """Autosaves of ``image_path`` left by processes that are gone (a crash, or a close without saving).

    Autosaves of running processes on this machine, this one included, are live work and not offered. A damaged
    autosave is renamed to ``*.damaged`` and listed in ``damaged``, so it is reported once and kept for the user.
    """
    scan = AutosaveScan()
    for path in autosave_files(image_path):
        try:
            info = read_autosave_info(path)
        except SessionError:
            try:
                scan.damaged.append(move_aside(path))
            except OSError:  # e.g. a read-only folder: still reported, left where it is
                scan.damaged.append(path)
            continue
        if not info.writer_alive:
            scan.recoverable.append(info)
    scan.recoverable.sort(key=lambda info: info.saved_at, reverse=True)
    return scan


def find_recoverable_autosave(image_path: str | os.PathLike) -> AutosaveInfo | None:
    """The newest autosave ``scan_autosaves`` offers for ``image_path``, or None."""
    recoverable = scan_autosaves(image_path).recoverable
    return recoverable[0] if recoverable else None


def restore_autosave(info: AutosaveInfo | str | os.PathLike, like: Volume | None = None) -> np.ndarray:
    """The autosaved labels ((Z, Y, X) integers), checked against ``like``'s shape when given.

    ``info`` is an autosave found by ``scan_autosaves``, or an image path (its newest recoverable autosave). A file
    that cannot be read is moved aside (``*.damaged``) and named in the ``SessionError``.
    """
    if not isinstance(info, AutosaveInfo):
        found = find_recoverable_autosave(info)
        if found is None:
            raise SessionError(f"{info}: no autosaved labels to recover")
        info = found
    path = info.path
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive["labels"]
    except Exception as error:
        kept = move_aside(path) if path.exists() else path
        raise SessionError(f"{path}: the autosave cannot be read ({type(error).__name__}: {error}); "
                           f"it was kept as {kept}") from error
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise SessionError(f"{path}: the autosave does not hold 3D integer labels")
    if like is not None and tuple(labels.shape) != tuple(like.shape):
        raise SessionError(f"{path}: the autosaved labels have shape {labels.shape} but the image has {like.shape}")
    return labels


def discard_autosave(autosave: AutosaveInfo | str | os.PathLike) -> None:
    """Delete one autosave (an ``AutosaveInfo`` or the autosave file's path), once the user said so."""
    Path(autosave.path if isinstance(autosave, AutosaveInfo) else autosave).unlink(missing_ok=True)


class Autosaver:
    """Autosaves one labels layer of one image every ``every_edits`` edits (``record_edit``), optionally in a thread.

    Each autosaver writes its own file (``path``: this process, a token, the layer name), so other layers and
    other napari instances never overwrite it. ``get_labels()`` returns the current (Z, Y, X) labels. In the
    background mode the copy is taken in the writer thread too, so the GUI thread does no work per autosave (a
    stroke painted during the copy may be half in this snapshot; the next one holds it whole). Writes never
    overlap, and while one runs only one more waits. ``discard()`` (an explicit save) removes the file.
    """

    def __init__(self, image_path: str | os.PathLike, get_labels: Callable[[], np.ndarray], *,
                 every_edits: int = AUTOSAVE_EVERY_EDITS, layer_name: str = "", background: bool = False,
                 on_saved: Callable[[Path], None] | None = None, on_error: Callable[[Exception], None] | None = None):
        if every_edits < 1:
            raise ValueError(f"every_edits must be at least 1, got {every_edits}")
        self.image_path = Path(image_path)
        self.every_edits = int(every_edits)
        self.layer_name = layer_name
        self.owner = autosave_owner(layer_name, unique=True)
        self.path = autosave_path(self.image_path, self.owner)
        self.edits_since_save = 0
        self.total_edits = 0
        self.saves = 0
        self._get_labels = get_labels
        self._background = background
        self._on_saved = on_saved
        self._on_error = on_error
        self._lock = threading.Lock()
        self._save_pending = False
        self._worker: threading.Thread | None = None

    def record_edit(self, count: int = 1) -> bool:
        """Count edits; at every ``every_edits``-th one, autosave. Returns True when a save was started."""
        self.total_edits += count
        self.edits_since_save += count
        if self.edits_since_save < self.every_edits:
            return False
        self.save_now()
        return True

    def save_now(self) -> None:
        self.edits_since_save = 0
        if not self._background:
            self._write(np.array(self._get_labels(), copy=True))
            return
        with self._lock:
            self._save_pending = True
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._drain, name="napari-sam-ft autosave", daemon=True)
                self._worker.start()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._save_pending:
                    self._worker = None
                    return
                self._save_pending = False
            try:
                snapshot = np.array(self._get_labels(), copy=True)
            except Exception as error:  # e.g. the layer went away meanwhile
                if self._on_error is not None:
                    self._on_error(error)
                continue
            self._write(snapshot)

    def _write(self, snapshot: np.ndarray) -> None:
        try:
            path = write_autosave(self.image_path, snapshot, edits=self.total_edits, layer_name=self.layer_name,
                                  owner=self.owner)
        except Exception as error:  # a full disk must not take the user's session down with it
            if self._on_error is not None:
                self._on_error(error)
            return
        self.saves += 1
        if self._on_saved is not None:
            self._on_saved(path)

    def wait(self, timeout: float = 60.0) -> None:
        """Block until a background write has finished (tests; closing)."""
        worker = self._worker
        if worker is not None:
            worker.join(timeout)

    def discard(self) -> None:
        """Stop autosaving pending snapshots and remove this autosaver's file (the labels are safe elsewhere)."""
        with self._lock:
            self._save_pending = False
        self.wait()
        discard_autosave(self.path)
