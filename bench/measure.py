"""What the benchmarks share: device names, peak FLOP rates, timing fences, reporting."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer

# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu x{torch.get_num_threads()}"


def report(rows: list[dict], out: Path | None) -> None:
    """One line per measurement on stdout; all rows as JSON to `out` when given."""
    for row in rows:
        typer.echo("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if out:
        out.write_text(json.dumps(rows, indent=2))
