"""A combo box listing the viewer's layers of one type, kept in step with the layer list."""

from __future__ import annotations

from qtpy.QtWidgets import QComboBox


class LayerComboBox(QComboBox):
    """Choose a layer of ``layer_type``; optional leading entries (e.g. "new layer") are not layers."""

    def __init__(self, viewer, layer_type, extra_items: tuple[str, ...] = (), exclude_names: tuple[str, ...] = (),
                 parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._layer_type = layer_type
        self._extra_items = extra_items
        self._exclude_names = exclude_names
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed, viewer.layers.events.moved):
            event.connect(self.refresh)
        viewer.layers.events.inserted.connect(self._watch_name)
        for layer in viewer.layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    def _watch_name(self, event) -> None:
        event.value.events.name.connect(self.refresh)

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
