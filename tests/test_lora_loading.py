"""LoRA loading: diffusers and kohya files give the same model, weights scale delta W linearly, blocks stay put."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.cli import UserError
from common.lora_formats import BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK, LoraSpec, adapter_layers, load_loras, parse_weighted_path
from helpers import generate_array, load_pipe, make_peft_lora

RANK, ALPHA = 4, 8  # alpha != rank: a loader that ignores alpha loads at half strength


def to_kohya(peft_file: Path, alpha: float) -> dict[str, torch.Tensor]:
    """The same LoRA in kohya/WebUI naming, written independently of diffusers' converter.

    Text-encoder layers carry CLIP's `text_model` level as WebUI files do (transformers 5 keeps it
    in CLIPTextModelWithProjection but not in CLIPTextModel).
    """
    prefixes = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_text_model_", "text_encoder_2.": "lora_te2_text_model_"}
    kohya = {}
    for key, value in load_file(peft_file).items():
        component = max((p for p in prefixes if key.startswith(p)), key=len)
        module, factor = key[len(component):].rsplit(".lora_", 1)
        name = prefixes[component] + module.removeprefix("text_model.").replace(".", "_")
        kohya[f"{name}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha))
    return kohya


@pytest.fixture()
def peft_lora(tiny_sdxl_path, tmp_path) -> Path:
    return make_peft_lora(tiny_sdxl_path, tmp_path / "lora", rank=RANK, alpha=ALPHA)


def test_loaded_delta_w_equals_alpha_over_rank_times_b_a_from_the_file(tiny_sdxl_path, peft_lora):
    pipe = load_pipe(tiny_sdxl_path)
    load_loras(pipe, [LoraSpec(peft_lora, weight=0.5)])
    state = load_file(peft_lora)
    layers = {f"unet.{n}": m for n, m in adapter_layers(pipe.unet, "lora_0").items()}
    layers |= {f"text_encoder_2.{n}": m for n, m in adapter_layers(pipe.text_encoder_2, "lora_0").items()}
    assert len(layers) == sum(1 for k in state if ".lora_A." in k and not k.startswith("text_encoder."))
    for name, layer in layers.items():
        expected = 0.5 * (ALPHA / RANK) * state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        torch.testing.assert_close(layer.get_delta_weight("lora_0"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.heavy
def test_kohya_file_gives_the_same_image_as_the_diffusers_file(tiny_sdxl_path, peft_lora, tmp_path):
    save_file(to_kohya(peft_lora, ALPHA), tmp_path / "kohya.safetensors")
    images = []
    for file in (peft_lora, tmp_path / "kohya.safetensors"):
        pipe = load_pipe(tiny_sdxl_path)
        load_loras(pipe, [LoraSpec(file)])
        images.append(generate_array(pipe))
    plain = generate_array(load_pipe(tiny_sdxl_path))
    assert np.abs(images[0] - plain).max() > 0.05, "the LoRA must visibly change the image for this test to mean anything"
    difference = np.abs(images[0] - images[1]).max()
    assert difference <= 1e-5, f"kohya and diffusers files differ by {difference}"


def weight_changes(pipe, base) -> dict[str, torch.Tensor]:
    """{component.module: patched weight - base weight} for every Linear or Conv2d weight that moved."""
    changes = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        before = dict(getattr(base, component).named_parameters())
        for name, parameter in getattr(pipe, component).named_parameters():
            name = name.replace(".base_layer", "")  # a fused peft adapter's weights sit in its base layer
            if name in before and name.endswith("weight") and (parameter.detach() - before[name].detach()).abs().max() > 0:
                changes[f"{component}.{name.removesuffix('.weight')}"] = parameter.detach() - before[name].detach()
    return changes


def test_a_kohya_file_patches_every_layer_with_alpha_over_rank_times_up_down(tiny_sdxl_path, peft_lora, tmp_path):
    """WebUI's names (CLIP's `text_model` level, which transformers 5's CLIP no longer has), each layer's weight moved
    by weight x (alpha / rank) up @ down, as the UIs patch it, and the same ΔW peft gives the diffusers file."""
    kohya = to_kohya(peft_lora, ALPHA)
    save_file(kohya, tmp_path / "kohya.safetensors")
    pipe = load_pipe(tiny_sdxl_path)
    assert load_loras(pipe, [LoraSpec(tmp_path / "kohya.safetensors", 0.5)]) == [], "applied as weight patches"
    changes = weight_changes(pipe, load_pipe(tiny_sdxl_path))
    peft_file = load_file(peft_lora)
    assert len(changes) == sum(1 for k in peft_file if k.endswith("lora_A.weight")), "every layer of the file, nothing else"
    for name, change in changes.items():
        expected = 0.5 * (ALPHA / RANK) * peft_file[f"{name}.lora_B.weight"] @ peft_file[f"{name}.lora_A.weight"]
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6, msg=name)
    diffusers_pipe = load_pipe(tiny_sdxl_path)
    load_loras(diffusers_pipe, [LoraSpec(peft_lora, 0.5)])
    layer = adapter_layers(diffusers_pipe.text_encoder, "lora_0")["encoder.layers.1.self_attn.k_proj"]
    torch.testing.assert_close(changes["text_encoder.encoder.layers.1.self_attn.k_proj"], layer.get_delta_weight("lora_0"),
                               rtol=1e-4, atol=1e-6)


def test_weight_patches_unload_bit_for_bit(tiny_sdxl_path, peft_lora, tmp_path):
    from common.adapters import unpatch_weights

    save_file(to_kohya(peft_lora, ALPHA), tmp_path / "kohya.safetensors")
    pipe = load_pipe(tiny_sdxl_path)
    load_loras(pipe, [LoraSpec(tmp_path / "kohya.safetensors", 0.7), LoraSpec(tmp_path / "kohya.safetensors", -0.3)])
    assert weight_changes(pipe, load_pipe(tiny_sdxl_path))
    unpatch_weights(pipe)
    assert weight_changes(pipe, load_pipe(tiny_sdxl_path)) == {}


def test_weight_zero_is_not_loaded_so_the_image_is_the_base_models_bit_for_bit(tiny_sdxl_path, peft_lora):
    """A LoRA at weight 0 leaves the model as it was: no adapter enters its module tree, so the pipeline runs the
    base model's own code path and the image is bit-identical (a claim about one path, as for two base runs)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = load_pipe(tiny_sdxl_path)
    assert load_loras(pipe, [LoraSpec(peft_lora, weight=0.0)]) == []
    wrapped = [name for component in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
               for name, module in component.named_modules() if isinstance(module, BaseTunerLayer)]
    assert not wrapped, f"a weight-0 LoRA was injected into {len(wrapped)} layers, e.g. {wrapped[0]}"
    assert np.array_equal(generate_array(pipe), generate_array(load_pipe(tiny_sdxl_path)))


def test_an_adapter_set_to_weight_zero_adds_exactly_zero_in_every_layer(tiny_sdxl_path, peft_lora):
    """Why skipping is the right depth: peft's own arithmetic at weight 0 is exact (base output + B A x * 0), layer by
    layer on the same input. A whole image through the adapted module tree is another code path, whose kernels
    may round differently in the last bits on some CPUs (seen as 1e-6 on an AVX-512/AMX machine)."""
    pipe = load_pipe(tiny_sdxl_path)
    names = load_loras(pipe, [LoraSpec(peft_lora, weight=1.0)])
    pipe.set_adapters(names, adapter_weights=[0.0])
    layers = adapter_layers(pipe.unet, "lora_0") | adapter_layers(pipe.text_encoder_2, "lora_0")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in layers.items():
            x = torch.randn(2, 3, layer.in_features, generator=generator)
            assert torch.equal(layer(x), layer.get_base_layer()(x)), name


def test_a_weight_zero_lora_must_still_be_a_readable_file(tiny_sdxl_path, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="could not read LoRA .*junk.safetensors.* as a safetensors file"):
        load_loras(load_pipe(tiny_sdxl_path), [LoraSpec(junk, weight=0.0)])


def test_two_loras_add_their_weighted_deltas(tiny_sdxl_path, peft_lora, tmp_path):
    other = make_peft_lora(tiny_sdxl_path, tmp_path / "other", rank=2, alpha=2, seed=1)
    pipe = load_pipe(tiny_sdxl_path)
    load_loras(pipe, [LoraSpec(peft_lora, 0.8), LoraSpec(other, 0.3)])
    layer = adapter_layers(pipe.unet, "lora_0")["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"]
    first, second = load_file(peft_lora), load_file(other)
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v"
    expected = 0.8 * (ALPHA / RANK) * first[f"{key}.lora_B.weight"] @ first[f"{key}.lora_A.weight"]
    expected += 0.3 * second[f"{key}.lora_B.weight"] @ second[f"{key}.lora_A.weight"]
    total = layer.get_delta_weight("lora_0") + layer.get_delta_weight("lora_1")
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)


def fused_unet_weight_changes(pipe) -> dict[str, float]:
    """How far each UNet weight moved when the active adapters are fused in."""
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    pipe.fuse_lora(components=["unet"])
    after = {k: v for k, v in pipe.unet.state_dict().items() if "lora" not in k}
    base_name = lambda key: key.replace(".base_layer", "")  # noqa: E731
    after = {base_name(k): v for k, v in after.items()}
    return {base_name(k): float((after[base_name(k)] - v).abs().max()) for k, v in before.items()}


def test_b_lora_touches_only_the_content_and_style_blocks(tiny_sdxl_path, peft_lora, tmp_path):
    style = make_peft_lora(tiny_sdxl_path, tmp_path / "style", seed=3)
    pipe = load_pipe(tiny_sdxl_path)
    load_loras(pipe, [LoraSpec(peft_lora, 1.0, (BLORA_CONTENT_BLOCK,)), LoraSpec(style, 1.0, (BLORA_STYLE_BLOCK,))])
    changes = fused_unet_weight_changes(pipe)
    changed = {k for k, v in changes.items() if v > 0}
    blocks = tuple(block.removeprefix("unet.") + "." for block in (BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK))
    assert changed, "the content and style blocks must change"
    assert all(k.startswith(blocks) for k in changed), sorted(changed - {k for k in changed if k.startswith(blocks)})
    assert any(k.startswith(blocks[0]) for k in changed) and any(k.startswith(blocks[1]) for k in changed)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert not adapter_layers(encoder, "lora_0") and not adapter_layers(encoder, "lora_1")


def test_b_lora_alpha_scales_delta_w_linearly_not_squared(tiny_sdxl_path, peft_lora):
    deltas = {}
    for alpha in (1.0, 0.5):
        pipe = load_pipe(tiny_sdxl_path)
        load_loras(pipe, [LoraSpec(peft_lora, alpha, (BLORA_CONTENT_BLOCK,))])
        layer = adapter_layers(pipe.unet, "lora_0")["up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
        deltas[alpha] = layer.get_delta_weight("lora_0")
    torch.testing.assert_close(deltas[0.5], 0.5 * deltas[1.0])


@pytest.mark.heavy
def test_lora_blocks_keeps_only_the_named_blocks_in_any_format(tiny_sdxl_path, peft_lora, tmp_path):
    save_file(to_kohya(peft_lora, ALPHA), tmp_path / "kohya.safetensors")
    blocks = ("mid_block", "down_blocks.2.attentions.1")
    for file in (peft_lora, tmp_path / "kohya.safetensors"):
        pipe = load_pipe(tiny_sdxl_path)
        load_loras(pipe, [LoraSpec(file, 1.0, blocks)])
        if file == peft_lora:
            pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
        names = set(weight_changes(pipe, load_pipe(tiny_sdxl_path)))
        assert names and all(n.startswith(("unet.mid_block.", "unet.down_blocks.2.attentions.1.")) for n in names), (file.name, names)
        assert any(n.startswith("unet.mid_block.") for n in names) and any(n.startswith("unet.down_blocks.2.") for n in names)


def test_a_block_the_lora_does_not_have_is_refused(tiny_sdxl_path, peft_lora, tmp_path):
    save_file(to_kohya(peft_lora, ALPHA), tmp_path / "kohya.safetensors")
    for file in (peft_lora, tmp_path / "kohya.safetensors"):
        with pytest.raises(UserError, match=r"has no layers under 'unet.up_blocks.9'"):
            load_loras(load_pipe(tiny_sdxl_path), [LoraSpec(file, 1.0, ("up_blocks.9",))])


@pytest.mark.heavy
def test_layers_that_the_model_lacks_are_refused_not_skipped(tiny_sdxl_path, peft_lora, tmp_path):
    state = load_file(peft_lora)
    state["unet.mid_block.attentions.0.transformer_blocks.0.attn3.to_q.lora_A.weight"] = torch.randn(4, 64)
    state["unet.mid_block.attentions.0.transformer_blocks.0.attn3.to_q.lora_B.weight"] = torch.randn(64, 4)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(UserError, match=r"does not match this model: \d+ unet layers in the file, \d+ applied"):
        load_loras(load_pipe(tiny_sdxl_path), [LoraSpec(tmp_path / "extra.safetensors")])
    kohya = to_kohya(peft_lora, ALPHA)
    kohya["lora_unet_middle_block_1_transformer_blocks_0_attn3_to_q.lora_down.weight"] = torch.randn(4, 64)
    kohya["lora_unet_middle_block_1_transformer_blocks_0_attn3_to_q.lora_up.weight"] = torch.randn(64, 4)
    save_file(kohya, tmp_path / "extra_kohya.safetensors")
    pipe = load_pipe(tiny_sdxl_path)
    with pytest.raises(UserError, match=r"its layer 'lora_unet_middle_block_1_transformer_blocks_0_attn3_to_q' names no layer"):
        load_loras(pipe, [LoraSpec(tmp_path / "extra_kohya.safetensors")])
    assert weight_changes(pipe, load_pipe(tiny_sdxl_path)) == {}, "nothing is applied partially"
    kohya = to_kohya(peft_lora, ALPHA)
    kohya["lora_unet_middle_block_1_proj_in.lora_down.weight"] = torch.randn(4, 63)
    kohya["lora_unet_middle_block_1_proj_in.lora_up.weight"] = torch.randn(64, 4)
    save_file(kohya, tmp_path / "misshapen.safetensors")
    with pytest.raises(UserError, match=r"layer lora_unet_middle_block_1_proj_in does not fit its \(64, 64\) weight"):
        load_loras(pipe, [LoraSpec(tmp_path / "misshapen.safetensors")])
    assert weight_changes(pipe, load_pipe(tiny_sdxl_path)) == {}


def test_weighted_path_parsing(tmp_path):
    lora = tmp_path / "a:b.safetensors"
    lora.touch()
    assert parse_weighted_path(f"{lora}:0.25") == (lora, 0.25)
    assert parse_weighted_path(str(lora)) == (lora, 1.0)
    with pytest.raises(UserError, match="LoRA file 'missing.safetensors' not found"):
        parse_weighted_path("missing.safetensors:0.5")
