"""The one error type for files that cannot be used as scans or masks, and the header-size check every reader makes."""


class VolumeError(ValueError):
    """A file that cannot be used as a 3D volume; the message names the file and the problem."""


# Deflate and bzip2 expand at most ~1032:1: compressed data cannot hold more voxel bytes than this times its size.
MAX_COMPRESSION_EXPANSION = 1100


def refuse_oversized_header(path, shape, voxel_type, declared_bytes: int, available_bytes: int) -> None:
    """Refuse a header that declares more voxel data than the file can hold (a damaged or truncated file),
    before anything tries to allocate or decompress that much."""
    if declared_bytes > available_bytes:
        raise VolumeError(f"{path}: the header declares {tuple(shape)} voxels of {voxel_type} "
                          f"({declared_bytes / 2**20:.1f} MiB) but the file can hold at most "
                          f"{available_bytes / 2**20:.1f} MiB; it is truncated or its header is damaged")
