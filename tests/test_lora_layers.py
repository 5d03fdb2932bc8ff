"""--lora_layers: each set is, on every layer of the full-size SDXL UNet (built on the meta device), the list kohya's
sd-scripts, OneTrainer or peft makes, and trains the parameter counts the README states; on the tiny model every adapter
type trains on every set, and its kohya export names each adapted layer where WebUI finds it and patches it as peft
merges it."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from common.adapters import ADAPTERS, file_layers, peft_config
from common.cli import UserError
from common.lora_formats import BLORA_BLOCKS, kohya_module_name, trained_adapter_file, ui_findings
from common.lora_layers import (DEFAULT_LAYER_SET, KOHYA_LAYER_SET, LORA_LAYER_SETS, LORA_LAYERS_HELP, choose_layer_set,
                                is_conv_layer, lora_layer_names)
from layer_references import kohya_unet_lora_names, onetrainer_layer_names, webui_unet_layer, webui_unet_layers
from ui_loaders import webui_patch

# At full size: (layers, LoRA parameters at rank 16). kohya's networks.lora, run on its own SDXL UNet, makes 722 UNet
# modules of 42,557,440 parameters at rank 16 (layer_references.py); the issue rounds them to 42.6 M and attn's to 23.2 M.
FULL_SIZE = {"attn": (560, 23_224_320), "attn-mlp": (722, 42_557_440), "all-linear": (743, 43_298_816)}


@pytest.fixture(scope="module")
def full_unet():
    from diffusers import UNet2DConditionModel

    from common.architectures import SDXL_UNET_CONFIG
    from common.models import quiet_libraries

    with torch.device("meta"), quiet_libraries():
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def lora_parameters(unet, names: list[str], rank: int) -> int:
    """A rank-r LoRA on a Linear (out, in) holds r (in + out) parameters (Hu et al. 2022, Sec. 4.1: B is out x r, A r x in)."""
    return sum(rank * (unet.get_submodule(n).in_features + unet.get_submodule(n).out_features) for n in names)


# ---------------------------------------------------------------- the sets at full size, against the other trainers' lists


def test_attn_is_onetrainers_attn_only_and_the_attention_projections_of_every_attention(full_unet):
    ours = lora_layer_names(full_unet, "attn")
    assert ours == onetrainer_layer_names(full_unet, "attn-only"), sorted(set(ours) ^ set(onetrainer_layer_names(full_unet, "attn-only")))[:5]
    projections = sorted({name.rpartition(".attn")[2] for name in ours})
    assert projections == [f"{a}.{p}" for a in ("1", "2") for p in ("to_k", "to_out.0", "to_q", "to_v")], projections


def test_attn_mlp_is_onetrainers_attn_mlp_and_kohyas_networks_lora_by_kohyas_names(full_unet):
    ours = lora_layer_names(full_unet, "attn-mlp")
    onetrainer = onetrainer_layer_names(full_unet, "attn-mlp")
    assert ours == onetrainer, sorted(set(ours) ^ set(onetrainer))[:5]
    kohya = kohya_unet_lora_names(full_unet)
    exported = {kohya_module_name("unet", name): name for name in ours}
    assert exported == kohya, sorted(set(exported) ^ set(kohya))[:5]
    kinds = {re.sub(r"^.*\.attentions\.\d+\.(transformer_blocks\.\d+\.)?", "", name) for name in ours}
    attention = {f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert kinds == attention | {"ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"}, sorted(kinds)


def test_all_linear_is_peft_all_linear_and_adds_the_embeddings_and_time_projections_to_attn_mlp(full_unet):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    ours = lora_layer_names(full_unet, "all-linear")
    peft = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), full_unet).target_modules
    assert set(ours) == peft, sorted(set(ours) ^ peft)[:5]
    added = sorted(set(ours) - set(lora_layer_names(full_unet, "attn-mlp")))
    embeddings = [f"{e}.linear_{i}" for e in ("add_embedding", "time_embedding") for i in (1, 2)]
    assert [n for n in added if not n.endswith(".time_emb_proj")] == embeddings and len(added) == 4 + 17, added


@pytest.mark.parametrize("layer_set", FULL_SIZE)
def test_each_set_trains_the_parameters_the_readme_states_at_rank_16(full_unet, layer_set):
    names = lora_layer_names(full_unet, layer_set)
    found = (len(names), lora_parameters(full_unet, names, 16))
    assert found == FULL_SIZE[layer_set], (layer_set, found)
    assert f"{found[0]} layers" in LORA_LAYER_SETS[layer_set].description
    assert f"{found[1] / 1e6:.1f} M" in LORA_LAYER_SETS[layer_set].description, (layer_set, found)


@pytest.mark.slow
def test_peft_creates_the_parameters_counted_at_rank_16(full_unet):
    """peft's own layers, made on the meta device, hold the counts above (LoHa twice LoRA's: two factor pairs)."""
    from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

    for layer_set, (_, parameters) in FULL_SIZE.items():
        names = lora_layer_names(full_unet, layer_set)
        for config, factor in ((LoraConfig(r=16, target_modules=names), 1), (LoHaConfig(r=16, target_modules=names), 2)):
            model = inject_adapter_in_model(config, copy.deepcopy(full_unet), low_cpu_mem_usage=True)
            found = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "hada_" in n)
            assert found == factor * parameters, (layer_set, type(config).__name__, found)


@pytest.mark.parametrize("layer_set", FULL_SIZE)
def test_every_set_has_layers_in_both_blora_blocks_and_in_every_transformer_block(full_unet, layer_set):
    """So --use_blora, --lora_unet_blocks and the block weights (kohya's blocks are the transformers' SGM blocks) find
    layers in every set."""
    names = lora_layer_names(full_unet, layer_set)
    transformers = {name for name, module in full_unet.named_modules() if type(module).__name__ == "Transformer2DModel"}
    empty = [block for block in sorted(transformers) if not any(n.startswith(block + ".") for n in names)]
    assert not empty and {b.removeprefix("unet.") for b in BLORA_BLOCKS} <= transformers, (layer_set, empty)


def test_locon_adds_kohyas_conv_dim_convolutions_to_every_set(full_unet):
    """With --conv_rank: kohya's --conv_dim convolutions (ResNet blocks, down- and upsamplers), whatever the set;
    kohya's networks.lora then also adapts the ResNets' time_emb_proj Linear, which all-linear holds."""
    kohya = set(kohya_unet_lora_names(full_unet, conv_dim=True).values())
    convolutions = [n for n, m in full_unet.named_modules() if isinstance(m, torch.nn.Conv2d) and is_conv_layer(n)]
    assert set(convolutions) == {n for n in kohya if isinstance(full_unet.get_submodule(n), torch.nn.Conv2d)}
    for layer_set in FULL_SIZE:
        chosen = set(lora_layer_names(full_unet, layer_set)) | set(convolutions)
        assert lora_layer_names(full_unet, layer_set, convolutions=True) == [n for n, _ in full_unet.named_modules() if n in chosen]
    assert kohya == set(lora_layer_names(full_unet, "attn-mlp", convolutions=True)) | {n for n in kohya if n.endswith("time_emb_proj")}


# ---------------------------------------------------------------- choosing the set


def test_kohyas_flag_names_choose_kohyas_set_and_say_so():
    layer_set, message = choose_layer_set(None, kohya_flags=True)
    assert layer_set == KOHYA_LAYER_SET == "attn-mlp"
    assert "--lora_layers attn-mlp (" in message and "722 in SDXL" in message and "--lora_layers attn," in message, message
    ratio = FULL_SIZE["attn-mlp"][1] / FULL_SIZE["attn"][1]
    assert f"{ratio:.1f}x the parameters" in message, (ratio, message)


def test_the_diffusers_flags_keep_the_attention_projections_silently():
    assert choose_layer_set(None, kohya_flags=False) == (DEFAULT_LAYER_SET, None) == ("attn", None)


@pytest.mark.parametrize("kohya_flags", [False, True])
def test_a_given_set_wins_over_the_default(kohya_flags):
    assert choose_layer_set("all-linear", kohya_flags=kohya_flags) == ("all-linear", None)


def test_an_unknown_set_is_refused_naming_the_accepted_ones():
    with pytest.raises(UserError, match=r"--lora_layers 'mlp' is no layer set; accepted: attn, attn-mlp, all-linear"):
        choose_layer_set("mlp", kohya_flags=False)


def test_the_help_names_each_set_with_its_layers():
    for layer_set in LORA_LAYER_SETS.values():
        assert f"{layer_set.name}, {layer_set.description}" in LORA_LAYERS_HELP


# ---------------------------------------------------------------- every adapter type on every set, exported for WebUI

ADAPTER_CASES = {"lora": ("lora", False), "locon": ("lora", True), "loha": ("loha", False), "lokr": ("lokr", False)}
# LoRA on each set, and each adapter type on all-linear, which holds every layer of the other sets
SET_CASES = [(layer_set, "lora") for layer_set in LORA_LAYER_SETS] + [("all-linear", case) for case in ("locon", "loha", "lokr")]


@pytest.fixture(scope="module")
def tiny_unet(tiny_sdxl_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")


@pytest.mark.parametrize("layer_set, case", SET_CASES)
def test_every_adapter_trains_on_every_set_and_its_export_patches_each_layer_in_webui(tiny_unet, layer_set, case):
    from peft import inject_adapter_in_model

    adapter, convolutions = ADAPTER_CASES[case]
    unet = copy.deepcopy(tiny_unet)
    names = lora_layer_names(unet, layer_set, convolutions=convolutions)
    webui_layers = webui_unet_layers(unet)
    conv_ranks = {n: 2 for n in names if is_conv_layer(n)}
    inject_adapter_in_model(peft_config(ADAPTERS[adapter], rank=4, alpha=2, target_modules=names, rank_pattern=conv_ranks,
                                        alpha_pattern=conv_ranks), unet)
    torch.manual_seed(0)
    with torch.no_grad():  # every factor non-zero (peft starts one at zero), so each layer's ΔW is seen
        for name, parameter in unet.named_parameters():
            if ".default" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    state = trained_adapter_file({"unet": unet})
    layers = file_layers(state)
    assert set(layers) == {kohya_module_name("unet", n) for n in names}, (layer_set, case, sorted(set(layers) ^ {kohya_module_name("unet", n) for n in names})[:5])
    assert ui_findings(state) == {"WebUI": [], "ComfyUI": []}, (layer_set, case)
    for name, tensors in layers.items():
        found = webui_unet_layer(name + ".alpha", webui_layers)
        assert found is not None and found[0] in names, f"{layer_set} {case}: WebUI finds {found} for {name}"
        path, shape = found
        layer = unet.get_submodule(path)
        base = layer.get_base_layer().weight.detach()
        expected = base + layer.get_delta_weight("default").detach()
        torch.testing.assert_close(webui_patch(base, tensors), expected, rtol=1e-5, atol=1e-6,
                                   msg=f"{layer_set} {case}: {name} ({path}, {shape})")
