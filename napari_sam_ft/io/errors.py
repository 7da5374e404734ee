"""The one error type for files that cannot be used as scans or masks."""


class VolumeError(ValueError):
    """A file that cannot be used as a 3D volume; the message names the file and the problem."""
