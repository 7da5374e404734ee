"""A small dialog to pick one of several volumes a file or folder holds (DICOM series, 4D time points).

The reader opens the default choice and offers this dialog from its notification's button; the picked
volume's layers are added to the current viewer.
"""

from __future__ import annotations

from typing import Callable

from qtpy.QtWidgets import QDialog, QDialogButtonBox, QLabel, QListWidget, QVBoxLayout


class VolumePicker(QDialog):
    """A list of choices with Open/Cancel; ``open_choice(index)`` gives the layer data tuples to add."""

    def __init__(self, message: str, choices: list[str], open_choice: Callable[[int], list[tuple]],
                 default: int = 0, parent=None):
        super().__init__(parent)
        self.setWindowTitle("napari-sam-ft: choose a volume")
        self.open_choice = open_choice
        self.choices = QListWidget()
        self.choices.addItems(choices)
        self.choices.setCurrentRow(default)
        self.choices.itemDoubleClicked.connect(lambda _item: self.accept())
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Open | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        label = QLabel(message)
        label.setWordWrap(True)
        layout.addWidget(label)
        layout.addWidget(self.choices)
        layout.addWidget(buttons)
        self.accepted.connect(self.open_selected)

    def open_selected(self) -> list:
        """Add the layers of the selected choice to the current viewer; returns them."""
        from napari import current_viewer
        from napari.layers import Layer
        from napari.utils.notifications import show_error

        from ..volume import VolumeError

        viewer = current_viewer()
        if viewer is None or self.choices.currentRow() < 0:
            return []
        try:
            layer_data = self.open_choice(self.choices.currentRow())
        except VolumeError as error:
            show_error(f"napari-sam-ft cannot open this volume: {error}")
            return []
        return [viewer.add_layer(Layer.create(*data)) for data in layer_data]


def pick_and_open(message: str, choices: list[str], open_choice, default: int = 0) -> VolumePicker:
    """Show a ``VolumePicker`` over the current viewer (not modal: the viewer stays usable)."""
    from napari import current_viewer

    viewer = current_viewer()
    parent = None if viewer is None else viewer.window._qt_window
    picker = VolumePicker(message, choices, open_choice, default, parent)
    picker.show()
    return picker
