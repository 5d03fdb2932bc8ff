"""LoRA-family files written by the LyCORIS library itself, for the tests that load and merge them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from helpers import load_pipe

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
LYCORIS_FILES = {  # name: LyCORIS's create_lycoris arguments
    "locon": {"algo": "locon", "linear_dim": 4, "linear_alpha": 2, "conv_dim": 3, "conv_alpha": 6},
    "locon tucker": {"algo": "locon", "linear_dim": 4, "linear_alpha": 2, "use_tucker": True},
    "loha": {"algo": "loha", "linear_dim": 4, "linear_alpha": 8},
    "loha tucker": {"algo": "loha", "linear_dim": 4, "linear_alpha": 8, "use_tucker": True},
    "lokr": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4},
    "lokr decomposed": {"algo": "lokr", "linear_dim": 2, "linear_alpha": 2, "factor": 8, "decompose_both": True},
    "lokr full": {"algo": "lokr", "linear_dim": 10000, "linear_alpha": 1, "factor": 4},
    "lokr tucker": {"algo": "lokr", "linear_dim": 4, "linear_alpha": 2, "factor": 4, "use_tucker": True},
    "dora": {"algo": "locon", "linear_dim": 4, "linear_alpha": 4, "dora_wd": True},
}


def lycoris_file(tiny_sdxl_path: str, folder: Path, name: str, seed: int = 0) -> Path:
    """A file written by LyCORIS's own wrapper (SimpleTuner trains through it) for the tiny UNet, every tensor random
    (LyCORIS starts one factor at zero)."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    pipe = load_pipe(tiny_sdxl_path)
    LycorisNetwork.apply_preset({"target_module": UNET_BLOCKS})
    network = create_lycoris(pipe.unet, 1.0, **LYCORIS_FILES[name])
    network.apply_to()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, parameter in network.named_parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.5 if "dora_scale" not in key else 0.05) + ("dora_scale" in key))
    path = folder / f"{name.replace(' ', '_')}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    network.restore()
    return path
