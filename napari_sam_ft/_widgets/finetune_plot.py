"""The live training plot of the fine-tune panel: loss per step and validation Dice per validation."""

from __future__ import annotations

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


class TrainingPlot(FigureCanvasQTAgg):
    """Two small axes that grow as ``add_loss`` / ``add_validation`` are called (redrawn lazily)."""

    def __init__(self, parent=None):
        figure = Figure(figsize=(3.6, 2.4), tight_layout=True)
        super().__init__(figure)
        self.setParent(parent)
        self.setMinimumHeight(170)
        self._loss_axes = figure.add_subplot(2, 1, 1)
        self._dice_axes = figure.add_subplot(2, 1, 2, sharex=self._loss_axes)
        self.loss_points: list[tuple[int, float]] = []
        self.dice_points: list[tuple[int, float]] = []
        self.clear()

    def clear(self) -> None:
        self.loss_points, self.dice_points = [], []
        self._render()

    def add_loss(self, step: int, loss: float) -> None:
        self.loss_points.append((step, loss))
        self._render()

    def add_validation(self, step: int, dice: float) -> None:
        self.dice_points.append((step, dice))
        self._render()

    def _render(self) -> None:
        for axes, points, label, style in ((self._loss_axes, self.loss_points, "loss", "-"),
                                           (self._dice_axes, self.dice_points, "val Dice", "o-")):
            axes.clear()
            axes.set_ylabel(label, fontsize=8)
            axes.tick_params(labelsize=7)
            if points:
                steps, values = zip(*points)
                axes.plot(steps, values, style, markersize=3, linewidth=1)
        self._dice_axes.set_xlabel("step", fontsize=8)
        self.draw_idle()
