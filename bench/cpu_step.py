#!/usr/bin/env python
"""The CPU baseline of train_lora.py's step at SDXL's real size, for later changes to be compared with in one run.

    python bench/cpu_step.py                       # full-sdxl at 64² and 128², bf16, batch 1, rank 16
    python bench/cpu_step.py --model tiny-sdxl     # the same on the tiny model (a check, not a baseline)

train_lora.py's own step (bench/gpu.py's `train_row`: its functions with --cache_latents, bf16 autocast, LoRA rank 16,
AdamW) timed over a few steps after two warm-up steps, its model FLOPs counted by FlopCounterMode on one more step,
and the utilisation against the rate this CPU itself reaches on a large bf16 matrix product (a measured ceiling: the
data sheets of CPUs give no bf16 peak one could trust for a 2-core slice of a server).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.cli import flags, run_app  # noqa: E402
from gpu import train_row, write_images  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def matmul_tflops(size: int = 4096, repeats: int = 5) -> float:
    """The bf16 matrix-product rate this CPU reaches (TFLOP/s): the best of `repeats` size x size products."""
    a, b = (torch.randn(size, size).to(torch.bfloat16) for _ in range(2))
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e12


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


@app.command()
def main(
    model: Annotated[str, typer.Option(*flags("model", "-m"))] = "full-sdxl",
    resolutions: Annotated[str, typer.Option(*flags("resolutions"))] = "64,128",
    steps: Annotated[int, typer.Option(*flags("steps"))] = 4,
) -> None:
    """Print the Markdown table of s/step and FLOP utilisation for bench/RESULTS.md."""
    from common.builtin_models import builtin_model_path

    path = str(builtin_model_path(model))
    ceiling = matmul_tflops()
    lines = [f"CPU: {torch.get_num_threads()} threads; torch {torch.__version__}; bf16 matmul ceiling {ceiling:.3f} TFLOP/s", "",
             "| model | resolution | s / step | TFLOP / step | TFLOP/s | of the matmul ceiling |", "| --- | --- | --- | --- | --- | --- |"]
    for resolution in (int(r) for r in resolutions.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            images = Path(scratch) / "images"
            images.mkdir()
            write_images(images, resolution, 2)
            row = train_row(path, images, Path(scratch), resolution, 1, False, steps)
        achieved = row["flops"] / row["s"] / 1e12
        lines.append(f"| {model} | {resolution}² | {row['s']:.2f} | {row['flops'] / 1e12:.3f} | {achieved:.3f} | {achieved / ceiling:.0%} |")
    typer.echo("\n".join(lines))


if __name__ == "__main__":
    run_app(app)
