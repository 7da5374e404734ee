"""napari event hookups owned by a Qt widget, undone when Qt destroys the widget.

napari's events (and key bindings, and mouse callbacks) keep calling into a widget after Qt has deleted
it, which raises "wrapped C/C++ object has been deleted"; undoing every hookup on ``destroyed`` prevents it.
"""

from __future__ import annotations

from typing import Callable

from qtpy.QtCore import QObject


class Hookups:
    """Connections and other registrations to undo when ``owner`` is destroyed (or on ``release()``)."""

    def __init__(self, owner: QObject):
        self._undo: list[Callable[[], None]] = []
        owner.destroyed.connect(self.release)

    def connect(self, emitter, callback) -> None:
        """``emitter.connect(callback)`` for a napari EventEmitter, disconnected on release."""
        emitter.connect(callback)
        self._undo.append(lambda: emitter.disconnect(callback))

    def bind_key(self, provider, key: str, callback: Callable) -> None:
        """A key binding on a viewer or layer, unbound on release if it is still ours."""
        provider.bind_key(key, callback, overwrite=True)

        def unbind() -> None:
            if provider.keymap.get(_normalised(key)) is callback:
                provider.bind_key(key, None)

        self._undo.append(unbind)

    def add_mouse_callback(self, layer, callback: Callable, first: bool = True) -> None:
        """A mouse-drag callback on ``layer`` (run before napari's own when ``first``), removed on release."""
        if first:
            layer.mouse_drag_callbacks.insert(0, callback)
        else:
            layer.mouse_drag_callbacks.append(callback)
        self._undo.append(lambda: layer.mouse_drag_callbacks.remove(callback))  # ValueError if gone: ignored

    def on_release(self, callback: Callable[[], None]) -> None:
        self._undo.append(callback)

    def release(self, *_args) -> None:
        undo, self._undo = self._undo, []
        for step in reversed(undo):
            try:
                step()
            except (ValueError, KeyError, RuntimeError):  # already gone with the viewer: nothing to undo
                pass


def _normalised(key: str):
    from napari.utils.key_bindings import coerce_keybinding

    return coerce_keybinding(key)
