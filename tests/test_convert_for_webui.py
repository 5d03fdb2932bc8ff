"""convert_for_webui.py: kohya files equal to the diffusers LoRA through diffusers' loader, keys that map
onto SDXL's modules, embeddings, and installation into WebUI and ComfyUI folder trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_for_webui
from common.lora_formats import kohya_module_name
from helpers import load_pipe, make_dora_lora, make_peft_lora, run_cli


def run_convert(capsys, *argv):
    return run_cli(convert_for_webui.app, [str(a) for a in argv], capsys)


@pytest.fixture()
def trained(tiny_sdxl_path, tmp_path) -> Path:
    """A training output folder: alpha != rank, text-encoder LoRAs, an embedding and training_args.json."""
    folder = tmp_path / "my_dog"
    make_peft_lora(tiny_sdxl_path, folder, rank=4, alpha=8, text_encoders=True)
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}, folder / "my_dog_emb.safetensors")
    (folder / "training_args.json").write_text(json.dumps(
        {"instance_prompt": "a TOK icon of an astronaut", "token_map": {"TOK": ["<s0>", "<s1>"]}, "rank": 4}))
    return folder


def fused_weights(pipe) -> dict[str, torch.Tensor]:
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"])
    weights = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for key, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in key:
                weights[f"{component}.{key.replace('.base_layer', '')}"] = value.clone()
    return weights


def test_exported_file_fuses_to_the_same_weights_as_the_diffusers_file(trained, tiny_sdxl_path, tmp_path, capsys):
    code, out, err = run_convert(capsys, trained, "--out", tmp_path / "export", "--save_precision", "fp32")
    assert code == 0, err
    original, exported = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    original.load_lora_weights(str(trained))
    exported.load_lora_weights(str(tmp_path / "export"), weight_name="my_dog.safetensors")
    a, b = fused_weights(original), fused_weights(exported)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"largest difference {worst}"
    plain = load_pipe(tiny_sdxl_path)
    moved = max(float((a[k] - v).abs().max()) for k, v in fused_weights_without_lora(plain).items())
    assert moved > 1e-3, "the LoRA must change the weights for the comparison to mean anything"


def fused_weights_without_lora(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v for c in ("unet", "text_encoder", "text_encoder_2") for k, v in getattr(pipe, c).state_dict().items()}


def test_alpha_and_metadata_carry_the_trained_strength(trained, tmp_path, capsys):
    code, out, _ = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0
    state = load_file(tmp_path / "my_dog.safetensors")
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_") for k in state)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_") for k in state)
    with safe_open(str(tmp_path / "my_dog.safetensors"), "pt") as handle:
        metadata = handle.metadata()
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["modelspec.trigger_phrase"] == "a my_dog icon of an astronaut"
    assert "WebUI prompt: a my_dog icon of an astronaut <lora:my_dog:1>" in out
    assert "prompt: a embedding:my_dog icon of an astronaut" in out


def test_every_exported_key_maps_onto_a_module_of_the_sdxl_architecture(trained, tmp_path, capsys):
    """diffusers' own kohya conversion over the file, against SDXL's UNet and CLIP encoders built on the meta device."""
    import sys

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from sdxl_unet import SDXL_UNET_CONFIG

    code, _, err = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0, err
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name="my_dog.safetensors",
                                                             unet_config=_frozen(SDXL_UNET_CONFIG))
    with torch.device("meta"):
        modules = {f"unet.{n}" for n, _ in UNet2DConditionModel(**SDXL_UNET_CONFIG).named_modules()}
        modules |= {f"text_encoder.{n}" for n, _ in CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=12)).named_modules()}
        modules |= {f"text_encoder_2.{n}" for n, _ in CLIPTextModelWithProjection(
            CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)).named_modules()}
    renames = {".to_k_lora.": ".k_proj.", ".to_q_lora.": ".q_proj.", ".to_v_lora.": ".v_proj.", ".to_out_lora.": ".out_proj."}
    unmapped = []
    for key in converted:
        module = key.split(".lora")[0].replace(".processor", "")
        for old, new in renames.items():
            if key.startswith("text_encoder") and old in key:
                module = key.split(old)[0] + new.rstrip(".")
        if key.startswith("unet."):
            module = key.split(".processor.")[0] + "." + key.split(".processor.")[1].split("_lora")[0].replace("to_out", "to_out.0")
        module = module.replace("text_encoder.text_model.", "text_encoder.")
        if module not in modules:
            unmapped.append(key)
    assert converted and not unmapped, unmapped[:5]


def _frozen(config: dict):
    from diffusers.configuration_utils import FrozenDict

    return FrozenDict(config)


def test_embedding_is_written_for_the_uis_and_loads_in_diffusers(trained, tiny_sdxl_path, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained, "--out", tmp_path)
    assert code == 0, err
    exported = load_file(tmp_path / "embeddings" / "my_dog.safetensors")
    original = load_file(trained / "my_dog_emb.safetensors")
    pipe = load_pipe(tiny_sdxl_path)
    pipe.load_textual_inversion(exported["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(exported["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    ids = pipe.tokenizer_2.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[ids].detach(), original["clip_g"])


def test_installs_into_webui_and_comfyui_trees_and_never_overwrites_without_force(trained, tmp_path, capsys):
    webui, comfyui = tmp_path / "webui", tmp_path / "ComfyUI"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    (comfyui / "models" / "checkpoints").mkdir(parents=True)
    assert run_convert(capsys, trained, "--webui_dir", webui)[0] == 0
    assert (webui / "models" / "Lora" / "my_dog.safetensors").is_file() and (webui / "embeddings" / "my_dog.safetensors").is_file()
    assert run_convert(capsys, trained, "--comfyui_dir", comfyui, "--name", "dog")[0] == 0
    assert (comfyui / "models" / "loras" / "dog.safetensors").is_file() and (comfyui / "models" / "embeddings" / "dog.safetensors").is_file()
    code, _, err = run_convert(capsys, trained, "--webui_dir", webui)
    assert code == 2 and "exists; pass --force to replace it" in err
    assert run_convert(capsys, trained, "--webui_dir", webui, "--force")[0] == 0
    code, _, err = run_convert(capsys, trained, "--webui_dir", tmp_path / "nothing")
    assert code == 2 and "does not look like a stable-diffusion-webui installation" in err
    assert not list(webui.rglob(".*partial"))


def test_round_trip_diffusers_kohya_diffusers_is_bit_identical(trained, tiny_sdxl_path, tmp_path, capsys):
    assert run_convert(capsys, trained, "--out", tmp_path / "kohya", "--save_precision", "fp32")[0] == 0
    code, _, err = run_convert(capsys, tmp_path / "kohya" / "my_dog.safetensors", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 0, err
    original = load_file(trained / "pytorch_lora_weights.safetensors")
    back = load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    a, b = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    a.load_lora_weights(str(trained))
    b.load_lora_weights(str(tmp_path / "back"))
    wa, wb = fused_weights(a), fused_weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6, "alphas survive the round trip"


@pytest.mark.heavy
def test_a_dora_is_baked_into_a_plain_lora_equal_to_the_dora_adapted_weights(tiny_sdxl_path, tmp_path, capsys):
    make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=4, alpha=8, seed=0)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--out", tmp_path / "x")
    assert code == 2 and "needs the base model, --model MODEL" in err
    code, out, err = run_convert(capsys, tmp_path / "dora", "--model", tiny_sdxl_path, "--name", "baked", "--out", tmp_path / "out",
                                 "--rank", "full", "--save_precision", "fp32")
    assert code == 0, err
    assert "DoRA baked into a plain LoRA (rank full:" in out
    dora, baked = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    dora.load_lora_weights(str(tmp_path / "dora"))
    baked.load_lora_weights(str(tmp_path / "out"), weight_name="baked.safetensors")
    wa, wb = fused_weights(dora), fused_weights(baked)
    worst = max(float((wa[k] - wb[k]).abs().max() / wa[k].abs().max().clamp_min(1e-12)) for k in wa)
    assert worst <= 1e-5, f"largest relative difference {worst}"


def test_check_passes_exports_and_flags_a_misspelled_key(trained, tmp_path, capsys):
    assert run_convert(capsys, trained, "--out", tmp_path)[0] == 0
    code, out, _ = run_convert(capsys, tmp_path / "my_dog.safetensors", "--check")
    assert code == 0 and "every key maps onto SDXL" in out and "parts: te1, te2, unet; layers: 160 LoRA; ranks: [4]; alphas: [8.0]" in out
    state = load_file(tmp_path / "my_dog.safetensors")
    wrong = next(k for k in state if k.startswith("lora_unet_") and k.endswith("lora_up.weight"))
    state[wrong.replace("transformer_blocks", "transformer_block")] = state.pop(wrong)
    q_proj = next(k for k in state if k.startswith("lora_te2_") and "q_proj.lora_down" in k).split(".")[0]
    for key in [k for k in state if k.startswith(q_proj + ".")]:
        state.pop(key)  # a layer that lacks its q projection altogether
    save_file(state, tmp_path / "broken.safetensors")
    code, out, _ = run_convert(capsys, tmp_path / "broken.safetensors", "--check")
    assert code == 1
    assert "no SDXL module is named" in out and "transformer_block_" in out
    assert "only k_proj, out_proj, v_proj of q/k/v/out_proj" in out


def test_diffusers_converter_writes_alpha_equal_to_rank_where_ours_keeps_the_trained_alpha(trained, tmp_path, capsys):
    """diffusers' convert_state_dict_to_kohya sets every alpha to the rank, so a LoRA trained with
    alpha 8 at rank 4 would load at half strength in the UIs."""
    from diffusers.utils import convert_state_dict_to_kohya

    theirs = convert_state_dict_to_kohya({k: v for k, v in load_file(trained / "pytorch_lora_weights.safetensors").items()
                                          if k.startswith("unet.")})
    assert {float(v) for k, v in theirs.items() if k.endswith(".alpha")} == {4.0}
    assert run_convert(capsys, trained, "--out", tmp_path)[0] == 0
    ours = load_file(tmp_path / "my_dog.safetensors")
    assert {float(v) for k, v in ours.items() if k.endswith(".alpha")} == {8.0}


def comfyui_patched_weight(weight, up, down, alpha, dora_scale) -> torch.Tensor:
    """One weight as ComfyUI patches it at strength 1, reproduced from its source: LoRAAdapter.calculate_weight
    (comfy/weight_adapter/lora.py) and weight_decompose (comfy/weight_adapter/base.py), in float32 as
    ModelPatcher casts weights before patching."""
    weight = weight.float().clone()
    lora_diff = torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1)).reshape(weight.shape)
    alpha = alpha / down.shape[0] if alpha is not None else 1.0
    if dora_scale is None:
        return weight + alpha * lora_diff
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:  # wd_on_output_axis: the norm of the base weight's rows
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    norm = norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale.float() / norm)


def native_comfyui_export(capsys, tiny_sdxl_path: str, tmp_path: Path, *, alpha: float) -> dict:
    """A rank-4 DoRA in tmp_path/dora written natively for ComfyUI in fp32 (which needs --model) as tmp_path/k/native."""
    make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=4, alpha=alpha, seed=1)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "comfyui", "--out", tmp_path / "k")
    assert code == 2 and "needs the base model (--model MODEL)" in err
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "comfyui", "--model", tiny_sdxl_path,
                               "--name", "native", "--out", tmp_path / "k", "--save_precision", "fp32")
    assert code == 0, err
    return load_file(tmp_path / "k" / "native.safetensors")


@pytest.mark.heavy
def test_native_comfyui_dora_gives_peft_weights_through_comfyuis_arithmetic(tiny_sdxl_path, tmp_path, capsys):
    kohya = native_comfyui_export(capsys, tiny_sdxl_path, tmp_path, alpha=8)
    peft_pipe, base = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    peft_pipe.load_lora_weights(str(tmp_path / "dora"))
    peft_weights = fused_weights(peft_pipe)
    original = load_file(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    modules = sorted(k.removeprefix("unet.").removesuffix(".lora_magnitude_vector") for k in original if k.endswith("lora_magnitude_vector"))
    assert modules
    worst, worst_naive = 0.0, 0.0
    for module in modules:
        name = kohya_module_name("unet", module)
        weight = base.unet.get_submodule(module).weight.detach()
        expected = peft_weights[f"unet.{module}.weight"]
        parts = [kohya[f"{name}.{p}"] for p in ("lora_up.weight", "lora_down.weight")]
        ours = comfyui_patched_weight(weight, *parts, float(kohya[f"{name}.alpha"]), kohya[f"{name}.dora_scale"])
        worst = max(worst, float((ours - expected).norm() / expected.norm()))
        # peft's magnitudes written as they are (the export before this fix): off by a part of the change itself
        magnitude = original[f"unet.{module}.lora_magnitude_vector"].reshape(-1, 1)
        naive = comfyui_patched_weight(weight, *parts, float(kohya[f"{name}.alpha"]), magnitude)
        worst_naive = max(worst_naive, float((naive - expected).norm() / (expected - weight).norm()))
    assert worst <= 1e-5, f"largest relative difference from peft's merged weights {worst}"
    assert worst_naive > 0.1, "peft's magnitudes as dora_scale must be visibly wrong in ComfyUI for this test to mean anything"
    webui = tmp_path / "webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "comfyui", "--model", tiny_sdxl_path, "--webui_dir", webui)
    assert code == 2 and "WebUI would apply it to the other axis" in err and not (webui / "models" / "Lora").exists()


def test_dora_written_natively_for_comfyui_round_trips_through_diffusers(tiny_sdxl_path, tmp_path, capsys):
    kohya = native_comfyui_export(capsys, tiny_sdxl_path, tmp_path, alpha=4)
    code, _, err = run_convert(capsys, tmp_path / "dora", "--dora_native", "webui", "--out", tmp_path / "w")
    assert code == 2 and "only comfyui" in err
    scales = {k: v for k, v in kohya.items() if k.endswith(".dora_scale")}
    assert scales and all(v.ndim == 2 and v.shape[1] == 1 for v in scales.values())
    code, _, err = run_convert(capsys, tmp_path / "k" / "native.safetensors", "--to", "diffusers", "--out", tmp_path / "back")
    assert code == 2 and "needs the base model (--model)" in err
    code, _, err = run_convert(capsys, tmp_path / "k" / "native.safetensors", "--to", "diffusers", "--out", tmp_path / "back",
                               "--model", tiny_sdxl_path)
    assert code == 0, err
    original = load_file(tmp_path / "dora" / "pytorch_lora_weights.safetensors")
    back = load_file(tmp_path / "back" / "pytorch_lora_weights.safetensors")
    assert original.keys() == back.keys()
    factors = [k for k in original if not k.endswith("lora_magnitude_vector")]
    assert all(torch.equal(original[k], back[k]) for k in factors)
    worst = max(float(((original[k] - back[k]) / original[k]).abs().max()) for k in original if k not in factors)
    assert worst <= 1e-6, f"magnitudes come back within float32 rounding, not {worst}"


def test_check_gives_each_uis_verdict_on_planted_faults(trained, tmp_path, capsys):
    assert run_convert(capsys, trained, "--out", tmp_path)[0] == 0
    clean = load_file(tmp_path / "my_dog.safetensors")

    def check(state: dict) -> tuple[int, str]:
        save_file(state, tmp_path / "planted.safetensors")
        code, out, _ = run_convert(capsys, tmp_path / "planted.safetensors", "--check")
        return code, out

    def layer_of(prefix: str, projection: str) -> str:
        return next(k for k in clean if k.startswith(prefix) and f"{projection}.lora_down" in k).split(".")[0]

    def without(state: dict, *keys: str) -> dict:
        return {k: v for k, v in state.items() if k not in keys and k.split(".")[0] not in keys}

    code, out = check(without(clean, layer_of("lora_te1_", "q_proj")))  # HF CLIP: k/v/out are patched without q
    assert code == 0 and "WebUI: every key maps onto SDXL" in out and "ComfyUI: every key maps onto SDXL" in out
    code, out = check(without(clean, layer_of("lora_te2_", "q_proj")))  # OpenCLIP's fused attention in WebUI
    assert code == 1 and "WebUI skips: " in out and "only k_proj, out_proj, v_proj of q/k/v/out_proj" in out
    assert "ComfyUI: every key maps onto SDXL" in out
    layer = next(k for k in clean if k.startswith("lora_unet_")).split(".")[0]
    code, out = check(without(clean, f"{layer}.lora_down.weight"))
    assert code == 1 and "WebUI: refuses the whole file" in out and "ComfyUI: refuses the whole file" in out
    code, out = check(without(clean, f"{layer}.lora_up.weight"))
    assert "WebUI: refuses the whole file" in out and f"ComfyUI skips: {layer}" in out
    out_features, in_features = clean[f"{layer}.lora_up.weight"].shape[0], clean[f"{layer}.lora_down.weight"].shape[1]
    code, out = check(clean | {f"{layer}.dora_scale": torch.ones(out_features, 1)})
    assert code == 1 and f"WebUI misapplies: {layer}.dora_scale ({out_features}, 1)" in out
    assert "ComfyUI: every key maps onto SDXL" in out
    code, out = check(clean | {f"{layer}.dora_scale": torch.ones(1, in_features)})
    assert code == 0, out
    code, out = check(clean | {f"{layer}.dora_scale": torch.ones(3)})
    assert code == 1 and "WebUI skips" in out and "ComfyUI skips" in out and "fits neither axis" in out


def test_check_recognises_an_embedding_file_and_its_widths(trained, tmp_path, capsys):
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "sdxl_emb.safetensors")
    code, out, _ = run_convert(capsys, tmp_path / "sdxl_emb.safetensors", "--check")
    assert code == 0 and "an SDXL embedding with both tables" in out
    code, out, _ = run_convert(capsys, trained / "my_dog_emb.safetensors", "--check")  # the tiny model's 32/64 widths
    assert code == 1 and "clip_l is (2, 32); SDXL's first text encoder takes (tokens, 768)" in out and "(tokens, 1280)" in out
    save_file({"clip_l": torch.randn(2, 768)}, tmp_path / "half.safetensors")
    code, out, _ = run_convert(capsys, tmp_path / "half.safetensors", "--check")
    assert code == 1 and "no clip_g table" in out
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run_convert(capsys, tmp_path / "junk.safetensors", "--check")
    assert code == 2 and "could not read" in err and "Traceback" not in err


def test_an_embedding_named_like_a_word_is_warned_about(trained, tmp_path, capsys):
    code, _, err = run_convert(capsys, trained, "--out", tmp_path / "a", "--name", "dog")
    assert code == 0 and "'dog', an ordinary word of CLIP's vocabulary" in err and "--name dog_emb" in err
    code, _, err = run_convert(capsys, trained, "--out", tmp_path / "b", "--name", "my_dog")
    assert code == 0 and "ordinary word" not in err


def baked(capsys, tiny_sdxl_path: str, tmp_path: Path, *options) -> tuple[str, dict, dict, set]:
    """A rank-2 DoRA baked with `options`: (output, {kohya layer: rank}, {layer: truncation error}, factor dtypes)."""
    if not (tmp_path / "dora").exists():
        make_dora_lora(tiny_sdxl_path, tmp_path / "dora", rank=2, alpha=2, seed=0)
    out_dir = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    code, out, err = run_convert(capsys, tmp_path / "dora", "--model", tiny_sdxl_path, "--name", "baked", "--out", out_dir, *options)
    assert code == 0, err
    with safe_open(str(out_dir / "baked.safetensors"), "pt") as handle:
        ranks = {k.removesuffix(".lora_down.weight"): handle.get_slice(k).get_shape()[0] for k in handle.keys() if k.endswith("lora_down.weight")}
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys() if k.endswith("weight")}
        errors = json.loads(handle.metadata()["bake_truncation_errors"])
    return out, ranks, errors, dtypes


def test_default_dora_bake_is_sized_by_error_up_to_twice_its_rank_in_fp16(tiny_sdxl_path, tmp_path, capsys):
    """By default each layer gets the smallest rank within 1% relative error, at most twice the DoRA's rank (2 x 2):
    a layer is either within 1% or at that cap, and the cap is said in one line."""
    out, ranks, errors, dtypes = baked(capsys, tiny_sdxl_path, tmp_path)
    assert dtypes == {"F16"} and max(ranks.values()) <= 4
    dora_layers = [k for k in load_file(tmp_path / "dora" / "pytorch_lora_weights.safetensors") if k.endswith("lora_A.weight")]
    assert len(errors) == len(dora_layers) == len(ranks)
    by_layer = {name: ranks[kohya_module_name(*name.split(".", 1))] for name in errors}
    assert all(error <= 0.01 or by_layer[name] == 4 for name, error in errors.items()), errors
    capped = sum(1 for name, error in errors.items() if error > 0.01)
    assert "relative truncation error" in out and f"largest {max(errors.values()):.2e}" in out
    assert "rank 1%, at most twice the DoRA's rank" in out
    assert (f"note: {capped} of {len(errors)} layers stopped at twice the DoRA's rank" in out) == (capped > 0), out


@pytest.mark.heavy
def test_an_error_target_dora_bake_meets_it_on_every_layer_at_the_smallest_rank(tiny_sdxl_path, tmp_path, capsys):
    """--rank 1% with room (--max_rank 64): every layer within 1%, and one rank less would miss it (checked against the
    layer's own spectrum)."""
    out, ranks, errors, _ = baked(capsys, tiny_sdxl_path, tmp_path, "--rank", "1%", "--max_rank", 64)
    assert all(0 < e <= 0.01 for e in errors.values()), errors
    assert len(set(ranks.values())) > 1 and "rank 1%, at most 64" in out and "note:" not in out
    pipe, dora = load_pipe(tiny_sdxl_path), load_pipe(tiny_sdxl_path)
    dora.load_lora_weights(str(tmp_path / "dora"))
    adapted = fused_weights(dora)
    for name in list(errors)[:6]:
        component, module = name.split(".", 1)
        delta = adapted[f"{name}.weight"].double() - getattr(pipe, component).get_submodule(module).weight.detach().double()
        singular = torch.linalg.svdvals(delta)
        rank = ranks[kohya_module_name(component, module)]
        assert float(singular[rank - 1:].square().sum().sqrt() / singular.square().sum().sqrt()) > 0.01, (name, rank)


def webui_weight_decompose(orig_weight, updown, dora_scale):
    """WebUI's NetworkModule.apply_weight_decompose (extensions-builtin/Lora/network.py), reproduced: the
    adapted weight minus the original, with the merged weight's input-column norms."""
    merged = updown + orig_weight
    norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
    return merged * (dora_scale / norm) - orig_weight


@pytest.mark.parametrize("out_features, in_features", [(6, 6), (6, 4)])
def test_dora_scale_verdicts_are_what_each_uis_own_arithmetic_does(out_features, in_features):
    """For each shape a dora_scale is found in, run WebUI's and ComfyUI's reproduced arithmetic: an exception is
    a layer skipped, a result other than the scale's meaning (rows for (out, 1), columns otherwise) misapplied."""
    from common.lora_formats import dora_scale_effects

    torch.manual_seed(0)
    weight, up, down = torch.randn(out_features, in_features), torch.randn(out_features, 2), torch.randn(2, in_features)
    delta = up @ down
    adapted = weight + delta
    rows, columns = torch.rand(out_features, 1) + 0.5, torch.rand(1, in_features) + 0.5
    meaning = {"rows": adapted * rows / adapted.norm(dim=1, keepdim=True), "columns": adapted * columns / adapted.norm(dim=0, keepdim=True)}
    # on a square layer (out,) is (in,): a 1-D scale then means columns, as WebUI reads it
    shapes = {(out_features, 1): rows, (1, in_features): columns, (out_features,): rows.reshape(-1),
              (in_features,): columns.reshape(-1), (3,): torch.rand(3) + 0.5}

    def effect(apply, scale, meant) -> str | None:
        try:
            result = apply(scale)
        except RuntimeError:
            return "skips"
        return None if result.shape == meant.shape and torch.allclose(result, meant, atol=1e-5) else "misapplies"

    for shape, scale in shapes.items():
        meant = meaning["rows" if shape == (out_features, 1) else "columns"]
        # comfyui_patched_weight (above) works on a base weight whose rows' norms it uses for an output-axis scale;
        # an output-axis scale meaning m / ||W + dW|| rows is written for it as m (||W|| + eps) / ||W + dW||
        comfy_scale = scale * (weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps) / adapted.norm(dim=1, keepdim=True) \
            if shape == (out_features, 1) else scale
        found = (effect(lambda s: webui_weight_decompose(weight, delta, s) + weight, scale, meant),
                 effect(lambda s: comfyui_patched_weight(weight, up, down, 2.0, s), comfy_scale, meant))
        assert dora_scale_effects(shape, out_features, in_features) == found, shape
