"""The public names of the ``napari_sam_ft.io`` package under their old module name.

Reading, writing, geometry and windowing live in ``napari_sam_ft.io`` (one module per format family, plus
``geometry`` and ``windowing``); this module keeps ``from napari_sam_ft.volume import ...`` working.
"""

from .io.atomic import _UMASK, _process_umask, atomic_write  # noqa: F401
from .io.errors import VolumeError  # noqa: F401
from .io.geometry import checked_geometry as _checked_geometry  # noqa: F401
from .io.geometry import display_order as _display_order  # noqa: F401
from .io.geometry import default_slicing_axis, has_world_geometry, radiological_axes, slicing_axes  # noqa: F401
from .io.nifti import MAX_GZIP_EXPANSION, NIFTI_SUFFIXES, _check_declared_size, _scaled  # noqa: F401
from .io.nifti import read_nibabel as _read_nifti  # noqa: F401
from .io.tiff_npy import NPY_SUFFIXES, TIFF_SUFFIXES, _imagej_dtype_ok  # noqa: F401
from .io.tiff_npy import read_npy as _read_npy  # noqa: F401
from .io.tiff_npy import read_tiff as _read_tiff  # noqa: F401
from .io.volume import (MAX_MODEL_CHANNELS, SUPPORTED_SUFFIXES, Volume, _channel_axis,  # noqa: F401
                        _check_voxel_type, _chosen_channels, _read_4d_channels, _select_3d, _stack_channel_files,
                        check_intensities, file_format_of, label_ids, read_channels, read_file, read_labels,
                        read_volume, strip_suffix, write_volume)
from .io.volume import read_file as _read_any  # noqa: F401
from .io.windowing import (CT_WINDOW_PRESETS, MAX_SAMPLE_VOXELS, MRI_PERCENTILES, WINDOW_CHOICES,  # noqa: F401
                           ChannelWindow, Window, channel_window, choose_window, intensity_sample, looks_like_ct)
