"""The arithmetic with which ComfyUI and WebUI patch one weight with a LoRA, LoCon, LoHa or LoKr layer of a file,
reproduced step by step from their sources (not from our reading of the format), for the tests to compare with.

ComfyUI: comfy/lora.py `load_lora` (alpha read with .item()) and comfy/weight_adapter/{lora,loha,lokr}.py
`calculate_weight`, factors cast to float32 (the default intermediate_dtype) and the scaled difference added to a
float32 weight (ModelPatcher's fp32 patching path). WebUI 1.10.1: extensions-builtin/Lora/network_{lora,hada,lokr}.py
`calc_updown` with lyco_helpers' rebuild_conventional / rebuild_cp_decomposition / make_weight_cp / make_kron and
network.py `finalize_updown` / `calc_scale`, in float32 (`--no-half`; by default WebUI casts LoRA factors to fp16).
"""

from __future__ import annotations

import torch


def comfyui_patch(weight: torch.Tensor, layer: dict, strength: float = 1.0) -> torch.Tensor:
    """The weight after ComfyUI's LoraLoader applies one file layer (its tensors by suffix) at `strength`."""
    weight = weight.float().clone()
    alpha = layer["alpha"].item() if "alpha" in layer else None
    f = {k: v.float() for k, v in layer.items() if k != "alpha"}
    if "lora_up.weight" in f:  # LoRAAdapter
        mat1, mat2 = f["lora_up.weight"], f["lora_down.weight"]
        scale = alpha / mat2.shape[0] if alpha is not None else 1.0
        if "lora_mid.weight" in f:
            mat3 = f["lora_mid.weight"]
            final_shape = [mat2.shape[1], mat2.shape[0], mat3.shape[2], mat3.shape[3]]
            mat2 = torch.mm(mat2.transpose(0, 1).flatten(start_dim=1), mat3.transpose(0, 1).flatten(start_dim=1))
            mat2 = mat2.reshape(final_shape).transpose(0, 1)
        lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    elif "hada_w1_a" in f:  # LoHaAdapter
        w1a, w1b, w2a, w2b = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        if "hada_t1" in f:
            m1 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t1"], w1b, w1a)
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", f["hada_t2"], w2b, w2a)
        else:
            m1, m2 = torch.mm(w1a, w1b), torch.mm(w2a, w2b)
        lora_diff = (m1 * m2).reshape(weight.shape)
    else:  # LoKrAdapter
        dim = None
        if "lokr_w1" not in f:
            dim = f["lokr_w1_b"].shape[0]
            w1 = torch.mm(f["lokr_w1_a"], f["lokr_w1_b"])
        else:
            w1 = f["lokr_w1"]
        if "lokr_w2" not in f:
            dim = f["lokr_w2_b"].shape[0]
            if "lokr_t2" not in f:
                w2 = torch.mm(f["lokr_w2_a"], f["lokr_w2_b"])
            else:
                w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
        else:
            w2 = f["lokr_w2"]
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        lora_diff = torch.kron(w1, w2).reshape(weight.shape)
    if "dora_scale" in f:
        return comfyui_weight_decompose(f["dora_scale"], weight, lora_diff, scale, strength)
    return weight + (strength * scale) * lora_diff


def comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """comfy/weight_adapter/base.py `weight_decompose` (the version with the output-axis branch)."""
    weight = weight.clone()
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def _rebuild_conventional(up, down, shape):
    return (up.reshape(up.size(0), -1) @ down.reshape(down.size(0), -1)).reshape(shape)


def _make_weight_cp(t, wa, wb):
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def webui_patch(weight: torch.Tensor, layer: dict, multiplier: float = 1.0) -> torch.Tensor:
    """The weight after WebUI applies one file layer at `multiplier` (no DoRA): calc_updown, then finalize_updown."""
    weight = weight.float().clone()
    alpha = layer["alpha"].item() if "alpha" in layer else None
    f = {k: v.float() for k, v in layer.items() if k != "alpha"}
    if "lora_up.weight" in f:  # NetworkModuleLora; up/down/mid are first copied into Linear or Conv2d modules
        up, down = f["lora_up.weight"], f["lora_down.weight"]
        if weight.ndim == 2:
            up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        dim = down.shape[0]
        output_shape = [up.size(0), down.size(1)]
        if "lora_mid.weight" in f:
            mid = f["lora_mid.weight"]
            updown = torch.einsum("n m k l, i n, m j -> i j k l", mid, up.reshape(up.size(0), -1), down.reshape(down.size(0), -1))
            output_shape += mid.shape[2:]
        else:
            if len(down.shape) == 4:
                output_shape += down.shape[2:]
            updown = _rebuild_conventional(up, down, output_shape)
    elif "hada_w1_a" in f:  # NetworkModuleHada
        w1a, w1b, w2a, w2b = f["hada_w1_a"], f["hada_w1_b"], f["hada_w2_a"], f["hada_w2_b"]
        dim = w1b.shape[0]
        output_shape = [w1a.size(0), w1b.size(1)]
        if "hada_t1" in f:
            output_shape = [w1a.size(1), w1b.size(1)]
            updown1 = _make_weight_cp(f["hada_t1"], w1a, w1b)
            output_shape += f["hada_t1"].shape[2:]
        else:
            if len(w1b.shape) == 4:
                output_shape += w1b.shape[2:]
            updown1 = _rebuild_conventional(w1a, w1b, output_shape)
        updown2 = _make_weight_cp(f["hada_t2"], w2a, w2b) if "hada_t2" in f else _rebuild_conventional(w2a, w2b, output_shape)
        updown = updown1 * updown2
    else:  # NetworkModuleLokr
        dim = None
        dim = f["lokr_w1_b"].shape[0] if "lokr_w1_b" in f else dim
        dim = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else dim
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" not in f:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        else:
            w2 = _make_weight_cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        if len(weight.shape) == 4:
            output_shape = weight.shape
        if len(w2.shape) == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        updown = torch.kron(w1, w2.contiguous()).reshape(output_shape)
    # finalize_updown
    if len(output_shape) == 4:
        updown = updown.reshape(output_shape)
    if weight.size().numel() == updown.size().numel():
        updown = updown.reshape(weight.shape)
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return weight + updown * scale * multiplier
