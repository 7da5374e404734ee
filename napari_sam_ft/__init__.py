"""napari-sam-ft: Segment Anything on 3D CT/MRI in napari, slice by slice, fine-tuned on your own corrections."""

from . import _openmp_waiting, _triton_guard

__version__ = "0.1.0"

# Every plugin path (reader, widgets, sample data) imports this package first, before torch is imported.
_triton_guard.install()
_openmp_waiting.install()
