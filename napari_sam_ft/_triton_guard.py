"""Keep triton from crashing napari: refuse to import it once an OpenGL driver has loaded its own LLVM.

triton ships a private copy of LLVM. Mesa's OpenGL drivers (llvmpipe/swrast under Xvfb, on VMs and remote
desktops; radeonsi on AMD GPUs) load the system's ``libLLVM``. When triton is imported *after* such a driver,
the two LLVMs collide and the process dies with a segmentation fault; imported before, both work. In napari the
OpenGL context always exists before any plugin code runs, and triton is reached indirectly from code we need
(``torchvision`` and ``transformers``, via ``peft``, import ``torch._dynamo``, which imports triton when present).

``install()`` adds an import hook that, at the moment triton is first imported, checks whether an LLVM is
already mapped into this process; if so the import raises ``ModuleNotFoundError`` instead of crashing. torch
treats that as "triton not installed" (as on any CPU-only machine): nothing the plugin runs needs triton, and
``torch.compile`` on the CPU does not use it. Where no foreign LLVM is loaded (the CLI, NVIDIA drivers, macOS,
Windows) the hook lets triton import as usual.
"""

from __future__ import annotations

import importlib.abc
import sys
from pathlib import Path

GUARDED_PACKAGE = "triton"
# Shared libraries that carry LLVM in Mesa's drivers: libLLVM-15.so.1, libLLVM.so.18.1, and Mesa >= 24's
# libgallium-*.so, which may link LLVM statically.
LLVM_LIBRARY_PREFIXES = ("libLLVM", "libgallium")


def loaded_llvm_libraries(maps_path: str | Path = "/proc/self/maps") -> list[str]:
    """The LLVM-carrying shared libraries mapped into this process (Linux; elsewhere always empty)."""
    try:
        lines = Path(maps_path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    libraries = {line.split()[-1] for line in lines if "/" in line}
    return sorted(path for path in libraries if Path(path).name.startswith(LLVM_LIBRARY_PREFIXES))


class TritonGuard(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that answers only for ``triton`` and only while importing it would crash."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != GUARDED_PACKAGE and not fullname.startswith(GUARDED_PACKAGE + "."):
            return None
        llvm = loaded_llvm_libraries()
        if not llvm:
            return None  # safe here: the normal finders import triton
        # Remembered for the whole process: importlib.util.find_spec("triton") then says None, and every later
        # ``import triton`` fails at once instead of loading a second LLVM.
        sys.modules[GUARDED_PACKAGE] = None
        raise ModuleNotFoundError(
            f"napari-sam-ft: not importing triton, because the OpenGL driver already loaded {Path(llvm[0]).name} "
            "and a second LLVM would crash napari; torch runs without triton here", name=GUARDED_PACKAGE)


def install() -> None:
    """Put the guard first on ``sys.meta_path`` (once per process); a no-op when triton is imported already."""
    if GUARDED_PACKAGE in sys.modules:
        return  # imported before any OpenGL driver: that order is safe
    if not any(isinstance(finder, TritonGuard) for finder in sys.meta_path):
        sys.meta_path.insert(0, TritonGuard())
