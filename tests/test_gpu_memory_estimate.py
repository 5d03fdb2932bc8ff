"""bench/gpu_memory.py's method, checked where a CPU can check it: the fake-tensor count of train_lora.py's step
equals the count of the same step on real tensors, and that count follows the CPU allocator's own running total.

At full size (bench/RESULTS.md) the count and the allocator agree within 0.2 %; on the tiny model the kernels'
own scratch buffers (CPU flash attention's per-thread blocks), which no tensor count sees, are a visible part of
a step that only allocates a few MB, so the agreement is checked in bytes here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # after the scripts: bench/infer.py is not infer.py

import gpu_memory  # noqa: E402
from common.architectures import TINY_UNET_CONFIG  # noqa: E402


@pytest.mark.heavy
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_tensor_accounting_of_a_training_step_equals_the_allocators_on_real_tensors(tiny_sdxl_path, checkpointing):
    from diffusers import UNet2DConditionModel

    real_unet = gpu_memory.frozen(UNet2DConditionModel.from_pretrained(Path(tiny_sdxl_path) / "unet"), torch.bfloat16)
    real = gpu_memory.measure_training(real_unet, None, 64, 2, 4, checkpointing)
    fake_unet = gpu_memory.sdxl_unet("meta", torch.bfloat16, TINY_UNET_CONFIG)
    fake = gpu_memory.measure_training(fake_unet, None, 64, 2, 4, checkpointing, gpu_memory.new_fake_mode())

    assert fake["tracked_start"] == real["tracked_start"] and fake["tracked_peak"] == pytest.approx(real["tracked_peak"], rel=1e-3), (fake, real)
    rise = real["tracked_peak"] - real["tracked_start"]
    assert rise > 1e6, "the step allocates megabytes of activations, gradients and optimizer state"
    assert abs(real["allocator_rise"] - rise) < 2**20, f"allocator {real['allocator_rise']} B, counted {rise} B"
