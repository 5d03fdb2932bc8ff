"""The SDXL base 1.0 UNet's shape (its published unet/config.json), for benchmarks with random weights."""

from __future__ import annotations

import torch

from common.architectures import SDXL_UNET_CONFIG

TEXT_TOKENS, TEXT_WIDTH, POOLED_WIDTH = 77, 2048, 1280


def sdxl_unet(device="meta", dtype=torch.bfloat16):
    """An SDXL-shaped UNet with random weights (no download); on `meta` it costs no memory."""
    from diffusers import UNet2DConditionModel

    from common.models import quiet_libraries

    with torch.device(device), quiet_libraries():
        return UNet2DConditionModel(**SDXL_UNET_CONFIG).to(dtype)


def unet_inputs(batch: int, height: int, width: int, device="meta", dtype=torch.bfloat16) -> dict:
    """One UNet call's inputs: latents at 1/8 of the image size, SDXL's text and micro-conditioning."""
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    return {
        "sample": make(batch, 4, height // 8, width // 8),
        "timestep": torch.tensor(500.0, device=device),
        "encoder_hidden_states": make(batch, TEXT_TOKENS, TEXT_WIDTH),
        "added_cond_kwargs": {"text_embeds": make(batch, POOLED_WIDTH), "time_ids": make(batch, 6)},
    }


def unet_forward_flops(unet, batch: int, height: int, width: int) -> int:
    """FLOPs of one UNet forward, counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(unet.parameters())
    inputs = unet_inputs(batch, height, width, parameter.device, parameter.dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**inputs)
    return counter.get_total_flops()
