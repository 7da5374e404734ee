"""``napari-sam-ft bench NAME``: run one of the scripts in the repository's ``benchmarks/`` folder.

The benchmarks print tables and assert nothing; they live beside the tests, in the source checkout. Those that
do not write their own record (``cases``, ``finetune`` and ``batch`` do) have their printed output kept in
``docs/results/NAME.md`` with the date, CPU and command, so every figure the docs quote comes from a file a
command wrote.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = {
    "encoder": ("engine_bench.py", "encoder s/slice (fp32 vs bf16; fp32 eager vs ONNX Runtime with their mask Dice on "
                "lung1 and the sample), click latency, auto-segment vs a naive loop"),
    "compare": ("compare_naive.py", "Dice of the naive LiteMedSAM loop against napari-sam-ft on the same slices"),
    "finetune": ("finetune_bench.py", "few-shot adapting on ../shared/cases: zero-shot vs lora/decoder in none and "
                 "box modes; held-out Dice, steps, seconds, adapter MB (--with-load: beside a CPU-bound process)"),
    "large": ("large_volume.py", "a generated 512x512x600 CT: peak RSS, time to first mask, auto-segment time"),
    "cases": ("cases_bench.py", "real cases: Dice per prompt mode (box, click, click + box, propagate, automatic), "
              "CT windows, naive loop; --latency: click and encoder latency on lung1"),
    "gui": ("gui_latency.py", "click-to-preview latency, and the longest event-loop gap while encoding, autosaving "
            "and saving a session on a 300x512x512 scan, in a real viewer (needs a display)"),
    "batch": ("batch_bench.py", "scans per hour of batch evaluate with 1 and 2 local dask workers, and their ratio"),
}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark and print its table",
                                  description="Benchmarks: " + "; ".join(f"{name}: {text}"
                                                                         for name, (_, text) in BENCHMARKS.items()))
    bench.add_argument("name", choices=tuple(BENCHMARKS))
    bench.add_argument("options", nargs="*", help="options for the benchmark (after --), e.g. -- --slices 4")
    bench.set_defaults(run=run_bench)


def run_bench(args) -> int:
    script = benchmarks_dir() / BENCHMARKS[args.name][0]
    if not script.exists():
        raise RuntimeError(f"benchmark script {script} not found: benchmarks ship with the source checkout "
                           "(install with pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"napari_sam_ft_benchmark_{args.name}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if args.name in WRITE_THEIR_OWN_RESULTS:
        return int(module.main(list(args.options)) or 0)
    printed = _Tee(sys.stdout)
    sys.stdout = printed
    try:
        status = int(module.main(list(args.options)) or 0)
    finally:
        sys.stdout = printed.console
    if status == 0:
        print(f"wrote {record_output(args.name, list(args.options), printed.text())}")
    return status


# Benchmarks that write their own tables under docs/results/.
WRITE_THEIR_OWN_RESULTS = ("cases", "finetune", "batch")


class _Tee(io.TextIOBase):
    """Writes to the console and keeps a copy of the text."""

    def __init__(self, console):
        self.console = console
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.console.write(text)
        return self.kept.write(text)

    def flush(self) -> None:
        self.console.flush()

    def text(self) -> str:
        return self.kept.getvalue()


def record_output(name: str, options: list[str], printed: str) -> Path:
    """Keep a benchmark's printed output in ``docs/results/NAME.md`` with the date, machine and command."""
    import platform

    import torch

    from ..devices import cpu_has_native_bf16, cpu_model_name

    results = benchmarks_dir().parent / "docs" / "results"
    results.mkdir(parents=True, exist_ok=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{cpu_model_name()} ({'native bf16' if cpu_has_native_bf16() else 'no native bf16'}), "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Python {platform.python_version()}")
    command = " ".join(["napari-sam-ft bench", name, *(["--", *options] if options else [])])
    path = results / f"{name}.md"
    path.write_text(f"# `{command}`\n\n{date}; {machine}.\n\n```\n{printed.rstrip()}\n```\n")
    return path
