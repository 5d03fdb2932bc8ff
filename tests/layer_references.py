"""Which UNet layers kohya's sd-scripts and OneTrainer adapt, and how WebUI finds a kohya file's UNet layer, re-expressed
from their sources (not from our layer sets) for tests/test_lora_layers.py to compare with.

kohya-ss/sd-scripts @ 48d368fa, networks/lora.py `LoRANetwork.__init__`'s create_modules: for each module whose class
name is in UNET_TARGET_REPLACE_MODULE (["Transformer2DModel"]; with --conv_dim also ResnetBlock2D, Downsample2D and
Upsample2D), each descendant of class name Linear or Conv2d is named `lora_unet_` + its path with '.' as '_' and gets
a LoRA at the rank when it is Linear or a 1x1 Conv2d, at --conv_dim when another Conv2d. kohya's SDXL UNet
(library/sdxl_original_unet.py) has the SGM module paths and the same class names, so its paths are diffusers' mapped
by the SGM conversion of diffusers' own script (tests/sgm_reference.py). Run on kohya's own UNet built on the meta
device, that code makes 722 UNet modules (42,557,440 parameters at rank 16), and 788 with --conv_dim.

Nerogar/OneTrainer @ 23df3832, modules/modelSetup/BaseStableDiffusionXLSetup.py LAYER_PRESETS ({"attn-mlp":
["attentions"], "attn-only": ["attn"], "full": []}), modules/module/LoRAModule.py `LoRAModuleWrapper.__create_modules`
(every Linear or Conv2d of diffusers' UNet whose path a filter matches, all of them without filters) and
modules/util/ModuleFilter.py `matches` (a substring test unless layer_filter_regex is set).

WebUI 1.10.1, extensions-builtin/Lora/networks.py `load_network`: a UNet key's layer name (the key before its first
'.') goes through `convert_diffusers_name_to_compvis`, which leaves SGM-style lora_unet_ names as they are, is not
found among the model's names, and is looked up again with lora_unet replaced by diffusion_model, among the names
`assign_network_names_to_compvis_modules` gives the SGM model's modules (their paths with '.' as '_').
"""

from __future__ import annotations

import torch

from sgm_reference import unet_to_sgm

KOHYA_UNET_TARGETS = ["Transformer2DModel"]
KOHYA_CONV_TARGETS = ["ResnetBlock2D", "Downsample2D", "Upsample2D"]
ONETRAINER_SDXL_PRESETS = {"attn-mlp": ["attentions"], "attn-only": ["attn"], "full": []}


def sgm_paths(unet) -> dict[str, str]:
    """diffusers module path -> SGM module path, for the UNet's Linear and Conv2d layers."""
    layers = [path for path, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    converted = unet_to_sgm({f"{path}.weight": path for path in layers})
    return {path: sgm.removesuffix(".weight") for sgm, path in converted.items()}


def kohya_unet_lora_names(unet, conv_dim: bool = False) -> dict[str, str]:
    """kohya's lora_name of each UNet layer networks.lora adapts -> its diffusers module path."""
    targets = KOHYA_UNET_TARGETS + (KOHYA_CONV_TARGETS if conv_dim else [])
    sgm = sgm_paths(unet)
    names = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in targets:
            continue
        for child_name, child in module.named_modules():
            linear, conv = type(child).__name__ == "Linear", type(child).__name__ == "Conv2d"
            if linear or conv and (child.kernel_size == (1, 1) or conv_dim):
                path = f"{name}.{child_name}"
                names["lora_unet_" + sgm[path].replace(".", "_")] = path
    return names


def onetrainer_layer_names(unet, preset: str) -> list[str]:
    """The UNet module paths OneTrainer's SDXL LoRA adapts under `preset`."""
    filters = ONETRAINER_SDXL_PRESETS[preset]
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and (not filters or any(f in name for f in filters))]


def webui_unet_layers(unet) -> dict[str, tuple[str, tuple[int, ...]]]:
    """WebUI's name for each Linear and Conv2d layer of the SGM UNet (`diffusion_model_<path>`) -> (the diffusers
    path of that layer, its weight's shape)."""
    shapes = {path: tuple(module.weight.shape) for path, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}
    return {"diffusion_model_" + sgm.replace(".", "_"): (path, shapes[path]) for path, sgm in sgm_paths(unet).items()}


def webui_unet_layer(key: str, layers: dict) -> tuple[str, tuple[int, ...]] | None:
    """The layer WebUI patches with a kohya file's UNet key (`webui_unet_layers`), None where it matches none."""
    name = key.partition(".")[0]
    if not name.startswith("lora_unet_"):
        return None
    return layers.get(name) or layers.get(name.replace("lora_unet", "diffusion_model"))
