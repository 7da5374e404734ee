"""The triton guard: once an OpenGL driver has loaded LLVM, ``import triton`` fails cleanly instead of crashing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from napari_sam_ft._triton_guard import loaded_llvm_libraries


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_llvm_libraries_are_read_from_the_process_map(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n"
                    "7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libgallium-24.2.so\n"
                    "7f04-7f05 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f06-7f07 rw-p 00000000 00:00 0 [heap]\n")
    assert loaded_llvm_libraries(maps) == ["/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1",
                                           "/usr/lib/x86_64-linux-gnu/libgallium-24.2.so"]
    assert loaded_llvm_libraries(tmp_path / "missing") == []


def test_with_a_foreign_llvm_loaded_triton_is_refused_and_torch_runs_without_it():
    finished = run_python("""
        import importlib.util, sys
        import napari_sam_ft._triton_guard as guard
        guard.loaded_llvm_libraries = lambda: ["/usr/lib/libLLVM-15.so.1"]  # as after napari's OpenGL context
        import napari_sam_ft
        try:
            import triton
        except ImportError as error:
            print("refused:", error)
        assert importlib.util.find_spec("triton") is None
        import torch.utils._triton as torch_triton
        assert not torch_triton.has_triton_package()
        import torchvision  # imports torch._dynamo, which looks for triton
        print("torchvision ok")
    """)
    assert finished.returncode == 0, finished.stderr
    assert "refused: napari-sam-ft: not importing triton" in finished.stdout and "libLLVM-15.so.1" in finished.stdout
    assert "torchvision ok" in finished.stdout


def test_without_a_foreign_llvm_triton_imports_as_usual():
    finished = run_python("""
        import importlib.util
        import napari_sam_ft._triton_guard as guard
        guard.loaded_llvm_libraries = lambda: []
        import napari_sam_ft
        if importlib.util.find_spec("triton") is not None:  # installed with CUDA builds of torch
            import triton
            print("imported", triton.__name__)
        else:
            print("not installed")
    """)
    assert finished.returncode == 0, finished.stderr
    assert "imported triton" in finished.stdout or "not installed" in finished.stdout
