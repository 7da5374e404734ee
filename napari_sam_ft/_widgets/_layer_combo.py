"""A combo box listing the viewer's layers of one type, kept in step with the layer list."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox

from ._events import Hookups


class LayerComboBox(QComboBox):
    """Choose a layer of ``layer_type``; optional leading entries (e.g. "new layer") are not layers."""

    def __init__(self, viewer, layer_type, extra_items: tuple[str, ...] = (), exclude_names: tuple[str, ...] = (),
                 parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._layer_type = layer_type
        self._extra_items = extra_items
        self._exclude_names = exclude_names
        self._hookups = Hookups(self)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            self._hookups.connect(event, self.refresh)
        self._hookups.connect(viewer.layers.events.inserted, self._watch_name)
        for layer in viewer.layers:
            self._hookups.connect(layer.events.name, self.refresh)
        self.refresh()

    def _watch_name(self, event) -> None:
        self._hookups.connect(event.value.events.name, self.refresh)

    def layers(self) -> list:
        return [layer for layer in self._viewer.layers
                if isinstance(layer, self._layer_type) and layer.name not in self._exclude_names]

    def refresh(self, *_args) -> None:
        """Rebuild the list, keeping the current choice when it still exists."""
        current = self.currentText()
        names = [*self._extra_items, *(layer.name for layer in self.layers())]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        self.blockSignals(False)
        if current in names:
            self.setCurrentIndex(names.index(current))
        elif names:
            self.setCurrentIndex(0)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def current_layer(self):
        """The chosen layer, or None when an extra entry (or nothing) is chosen."""
        name = self.currentText()
        for layer in self.layers():
            if layer.name == name:
                return layer
        return None

    def select_layer(self, layer) -> None:
        self.refresh()
        index = self.findText(layer.name)
        if index >= 0:
            self.setCurrentIndex(index)
