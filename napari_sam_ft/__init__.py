"""napari-sam-ft: Segment Anything on 3D CT/MRI in napari, slice by slice, fine-tuned on your own corrections."""

__version__ = "0.1.0"
