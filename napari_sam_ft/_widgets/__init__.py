"""Qt widgets of the napari plugin; the only place in the package that imports Qt."""
