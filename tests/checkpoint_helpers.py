"""Single files for the tests: the tiny models written as checkpoints (with any marker set), and full-size key sets of
SDXL, its refiner and SD 1.5 built on the meta device (shapes only), for the UIs' classification rules."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

META = "meta"


def tiny_checkpoint(folder: Path, name: str = "tiny-sdxl", *, markers: dict | None = None, metadata: dict | None = None,
                    drop: tuple[str, ...] = (), extra: dict | None = None, file_name: str | None = None) -> Path:
    """Built-in model `name` as a single file (our writer), with marker tensors added, keys dropped or extra tensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from common.builtin_models import write_builtin_checkpoint

    plain = folder / f"{name}.safetensors"
    if not plain.exists():
        write_builtin_checkpoint(name, plain)
    if not (markers or metadata or drop or extra):
        return plain
    tensors = {k: v for k, v in load_file(str(plain)).items() if k not in drop}
    with safe_open(str(plain), "pt") as handle:
        written_metadata = handle.metadata() or {}
    tensors.update(markers or {})
    tensors.update(extra or {})
    path = folder / (file_name or f"{name}-changed.safetensors")
    save_file(tensors, str(path), metadata={**written_metadata, **(metadata or {})})
    return path


def v_pred_markers(zsnr: bool = True) -> dict:
    return {"v_pred": torch.tensor([]), **({"ztsnr": torch.tensor([])} if zsnr else {})}


def meta_tensors(shapes: dict) -> dict:
    return {key: torch.empty(shape, device=META) for key, shape in shapes.items()}


def sdxl_key_set() -> dict:
    """SDXL base 1.0's 2,515 tensors on the meta device, under our writer's names (a new dict each call)."""
    return dict(_sdxl_key_set())


@functools.cache
def _sdxl_key_set() -> dict:
    from common.checkpoints import ARCHITECTURES, expected_shapes

    return meta_tensors(expected_shapes(ARCHITECTURES[0]))


def _open_clip_g(prefix: str) -> dict:
    shapes = {prefix + "token_embedding.weight": (49408, 1280), prefix + "positional_embedding": (77, 1280),
              prefix + "ln_final.weight": (1280,), prefix + "ln_final.bias": (1280,), prefix + "text_projection": (1280, 1280)}
    for i in range(32):
        block = f"{prefix}transformer.resblocks.{i}."
        shapes.update({block + "ln_1.weight": (1280,), block + "ln_1.bias": (1280,), block + "ln_2.weight": (1280,),
                       block + "ln_2.bias": (1280,), block + "attn.in_proj_weight": (3840, 1280), block + "attn.in_proj_bias": (3840,),
                       block + "attn.out_proj.weight": (1280, 1280), block + "attn.out_proj.bias": (1280,),
                       block + "mlp.c_fc.weight": (5120, 1280), block + "mlp.c_fc.bias": (5120,),
                       block + "mlp.c_proj.weight": (1280, 5120), block + "mlp.c_proj.bias": (1280,)})
    return meta_tensors(shapes)


def _unet(prefix_levels_with_attention, **config) -> dict:
    from diffusers import UNet2DConditionModel

    from common.checkpoints import unet_module_to_sgm

    with torch.device(META):
        unet = UNet2DConditionModel(**config)
    out = {}
    for key, value in unet.state_dict().items():
        module, _, param = key.rpartition(".")
        out[f"model.diffusion_model.{unet_module_to_sgm(module, up_levels_with_attention=prefix_levels_with_attention)}.{param}"] = value
    return out


def refiner_key_set() -> dict:
    """The SDXL refiner's layout: a 384-channel UNet of four levels, OpenCLIP-bigG alone as embedders.0."""
    unet = _unet((1, 2), block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560)
    return {**unet, **_open_clip_g("conditioner.embedders.0.model.")}


def sd15_key_set() -> dict:
    """Stable Diffusion 1.5's layout: a 4-level UNet with 768-wide cross-attention, CLIP-L as cond_stage_model."""
    unet = _unet((1, 2, 3), cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    prefix = "cond_stage_model.transformer.text_model."
    return {**unet, **meta_tensors({prefix + "embeddings.token_embedding.weight": (49408, 768),
                                    prefix + "embeddings.position_embedding.weight": (77, 768)})}


def header_of(tensors: dict, path: str = "model.safetensors", metadata: dict | None = None):
    """A CheckpointHeader over in-memory tensors (meta ones included), as `read_checkpoint_header` makes for a file."""
    from common.checkpoints import CheckpointHeader

    return CheckpointHeader(Path(path), {k: tuple(v.shape) for k, v in tensors.items()},
                            {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}, metadata or {}, tensor=tensors.__getitem__)
