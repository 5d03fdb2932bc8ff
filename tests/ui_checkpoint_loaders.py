"""How ComfyUI and AUTOMATIC1111's WebUI classify a single-file (SGM/LDM-layout) checkpoint, re-expressed from their
sources for the tests: which architecture, prediction type ("flavour"), noise schedule and text encoders each would
load. Inputs are {key: tensor}; shapes suffice (meta tensors are fine) except where a UI reads a value (ComfyUI's
`edm_vpred.sigma_max`/`sigma_min`, and the SD2 v-prediction probe, which the helpers report as unknown on meta).

ComfyUI (comfyanonymous/ComfyUI; the index holds files at different commits, named per rule):
  comfy/sd.py `load_state_dict_guess_config` (a 2025 copy with `metadata`, index id 25400458): prefix -> model
      config -> model_type -> VAE -> `process_clip_state_dict` -> CLIP `load_state_dict(strict=False)`, warning on
      missing keys other than `.logit_scale` / `.transformer.text_projection.weight`.
  comfy/model_detection.py @ d415a44f / 006dd0ae: `unet_prefix_from_state_dict` (most-used of the candidates, > 5
      keys, else "model."; newer versions add "net."), `detect_unet_config` (UNet branch), `count_blocks`,
      `calculate_transformer_depth`, `model_config_from_unet_config` (first `matches` in `supported_models.models`).
  comfy/supported_models.py @ c4d1a8d3: the configs, `SDXL.model_type`, `SD20.model_type`, `process_clip_state_dict`;
      `models` order; newer versions put `LotusD` first (seen in a 2025 copy; it needs adm_in_channels 4).
  comfy/supported_models_base.py @ 01e93c7b: `BASE.matches` (every listed key equal, then `required_keys` in the
      file), `inpaint_model` (in_channels > 4), `get_model` (set_inpaint).
  comfy/model_sampling.py (a copy with `rescale_zero_terminal_snr_sigmas`, index id 421159105; the stored ComfyUI
      versions @ 005e3702 / 5b40e7a5 predate zsnr) and
      comfy/ldm/modules/diffusionmodules/util.py @ 220afe33 `make_beta_schedule` (float64 linspace of sqrt betas).
  comfy/utils.py @ 2ba5cc8b `state_dict_prefix_replace`, `transformers_convert`, `clip_text_transformers_convert`;
  comfy/clip_model.py @ 22100a77 (`CLIPTextModel.text_projection` a bias-free Linear initialised to eye),
  comfy/sdxl_clip.py @ 565d6747, comfy/sd1_clip.py (`SDClipModel.logit_scale`), comfy/latent_formats.py.
WebUI (AUTOMATIC1111/stable-diffusion-webui @ 1359040a, dev with PRs #16567/#16569/#16606):
  modules/sd_models_config.py `guess_model_config_from_state_dict` (an SDXL file with `v_pred` -> configs/sd_xl_v.yaml,
      and the `v_pred` key is deleted from the state dict); modules/sd_models.py `set_model_type`,
      `load_model_weights` (`model.ztsnr = 'ztsnr' in state_dict`), `rescale_zero_terminal_snr_abar`,
      `apply_alpha_schedule_override` (ZTSNR when the option says so *or* model.ztsnr; infotext "Noise Schedule" gets
      the option's value); modules/sd_models_xl.py @ 0bba67e8 `extend_sdxl` (parameterization "v" iff the config's
      scaling is VScaling; alphas_cumprod from sgm LegacyDDPMDiscretization, float32); configs/sd_xl_v.yaml (VScaling,
      VWeighting) and configs/sd_xl_inpaint.yaml (EpsScaling). A `<checkpoint>.yaml` beside the file overrides all this.
"""

from __future__ import annotations

import math
import re

import torch

# Guidance rescale in a PNG `parameters` infotext. A1111 itself writes none. The extension "CFG Rescale"
# (Seshelle/CFG_Rescale_webui scripts/CFGRescale.py @ f271e34f) writes p.extra_generation_params["CFG Rescale"] (only when
# > 0) and on paste also accepts "CFG Rescale φ" (ljleb/sd-webui-neutral-prompt lib_neutral_prompt/ui.py @ 02766b04
# writes that spelling) and the older "CFG Rescale phi".
WEBUI_GUIDANCE_RESCALE_FIELD = "CFG Rescale"

ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # both UIs pin the last alpha_bar of the rescaled schedule to this


def _shape(t) -> tuple:
    return tuple(t.shape)


def _item(sd, key) -> float:
    t = sd[key]
    if getattr(t, "is_meta", False):
        raise ValueError(f"ComfyUI reads the value of {key!r}; pass a real tensor, not a meta one")
    return float(t.item())


def _count_blocks(keys, fmt: str) -> int:
    """comfy count_blocks: the first n for which no key starts with fmt.format(n)."""
    n = 0
    while any(k.startswith(fmt.format(n)) for k in keys):
        n += 1
    return n


def _depth(sd, keys, prefix):
    """calculate_transformer_depth: (depth, context_dim, linear proj_in, video) of block `prefix`, or None."""
    tp = prefix + "1.transformer_blocks."
    if not any(k.startswith(tp) for k in keys):
        return None
    video = any(f"{prefix}1.{s}.0.attn1.to_q.weight" in sd for s in ("time_stack", "time_mix_blocks"))
    return (_count_blocks(keys, tp + "{}"), _shape(sd[tp + "0.attn2.to_k.weight"])[1],
            len(_shape(sd[prefix + "1.proj_in.weight"])) == 2, video)


def comfyui_unet_prefix(sd) -> str:
    counts = {c: sum(k.startswith(c) for k in sd) for c in ("model.diffusion_model.", "model.model.", "net.")}
    top = max(counts, key=counts.get)  # ties: the first candidate
    return top if counts[top] > 5 else "model."


def comfyui_detect_unet_config(sd, prefix: str) -> dict | None:
    """The UNet branch of detect_unet_config (the DiT branches before it look for keys a UNet file lacks)."""
    keys = list(sd)
    if prefix + "input_blocks.0.0.weight" not in sd:
        return None
    cfg = {"adm_in_channels": None}
    if prefix + "label_emb.0.0.weight" in sd:
        cfg = {"num_classes": "sequential", "adm_in_channels": _shape(sd[prefix + "label_emb.0.0.weight"])[1]}
    model_channels, in_channels = _shape(sd[prefix + "input_blocks.0.0.weight"])[:2]
    out_channels = _shape(sd[prefix + "out.2.weight"])[0] if prefix + "out.2.weight" in sd else 4
    res_blocks, mult, depth, depth_out = [], [], [], []
    context_dim, linear, video, last_res, last_mult = None, False, False, 0, 0
    n_in = _count_blocks(keys, prefix + "input_blocks.{}.")
    for i in range(n_in):
        p, po = f"{prefix}input_blocks.{i}.", f"{prefix}output_blocks.{n_in - i - 1}."
        if not any(k.startswith(p) for k in keys):
            break
        if p + "0.op.weight" in sd:  # a downsampler starts a new level
            res_blocks.append(last_res), mult.append(last_mult)
            last_res = last_mult = 0
            out = _depth(sd, keys, po)
            depth_out.append(out[0] if out else 0)
            continue
        if p + "0.in_layers.0.weight" in sd:
            last_res += 1
            last_mult = _shape(sd[p + "0.out_layers.3.weight"])[0] // model_channels
            out = _depth(sd, keys, p)
            depth.append(out[0] if out else 0)
            if out and context_dim is None:
                _, context_dim, linear, video = out
        if po + "0.in_layers.0.weight" in sd:
            out = _depth(sd, keys, po)
            depth_out.append(out[0] if out else 0)
    res_blocks.append(last_res), mult.append(last_mult)
    if prefix + "middle_block.1.proj_in.weight" in sd:
        middle = _count_blocks(keys, prefix + "middle_block.1.transformer_blocks.{}")
    else:
        middle = -1 if prefix + "middle_block.0.in_layers.0.weight" in sd else -2
    cfg.update(in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
               num_res_blocks=res_blocks, transformer_depth=depth, transformer_depth_output=depth_out,
               channel_mult=mult, transformer_depth_middle=middle, use_linear_in_transformer=linear,
               context_dim=context_dim, use_temporal_resblock=video, use_temporal_attention=video)
    return cfg


_SD15 = dict(context_dim=768, model_channels=320, use_linear_in_transformer=False, adm_in_channels=None,
             use_temporal_attention=False)
_SD20 = dict(context_dim=1024, model_channels=320, use_linear_in_transformer=True, adm_in_channels=None,
             use_temporal_attention=False)
_SDXL = dict(model_channels=320, use_linear_in_transformer=True, transformer_depth=[0, 0, 2, 2, 10, 10],
             context_dim=2048, adm_in_channels=2816, use_temporal_attention=False)
_SVD = dict(model_channels=320, in_channels=8, use_linear_in_transformer=True, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            context_dim=1024, adm_in_channels=768, use_temporal_attention=True, use_temporal_resblock=True)
# (name, unet_config to match, required file keys, family) in supported_models.models order; the entries after
# SD_X4Upscaler that are not video models match only DiT/cascade/audio configs, never a UNet's.
COMFYUI_MODELS = (
    ("LotusD", dict(model_channels=320, use_linear_in_transformer=True, use_temporal_attention=False,
                    adm_in_channels=4, in_channels=4), (), "other"),
    ("Stable_Zero123", {**_SD15, "in_channels": 8}, ("cc_projection.weight", "cc_projection.bias"), "plain_eps"),
    ("SD15_instructpix2pix", {**_SD15, "in_channels": 8}, (), "plain_eps"),
    ("SD15", _SD15, (), "sd15"),
    ("SD20", _SD20, (), "sd20"),
    ("SD21UnclipL", {**_SD20, "adm_in_channels": 1536}, (), "sd20"),
    ("SD21UnclipH", {**_SD20, "adm_in_channels": 2048}, (), "sd20"),
    ("SDXL_instructpix2pix", {**_SDXL, "in_channels": 8}, (), "sdxl_ip2p"),
    ("SDXLRefiner", dict(model_channels=384, use_linear_in_transformer=True, context_dim=1280, adm_in_channels=2560,
                         transformer_depth=[0, 0, 4, 4, 4, 4, 0, 0], use_temporal_attention=False), (), "refiner"),
    ("SDXL", _SDXL, (), "sdxl"),
    ("SSD1B", {**_SDXL, "transformer_depth": [0, 0, 2, 2, 4, 4]}, (), "sdxl"),
    ("KOALA_700M", {**_SDXL, "transformer_depth": [0, 2, 5]}, (), "sdxl"),
    ("KOALA_1B", {**_SDXL, "transformer_depth": [0, 2, 6]}, (), "sdxl"),
    ("Segmind_Vega", {**_SDXL, "transformer_depth": [0, 0, 1, 1, 2, 2]}, (), "sdxl"),
    ("SD_X4Upscaler", dict(context_dim=1024, model_channels=256, in_channels=7, use_linear_in_transformer=True,
                           adm_in_channels=None, use_temporal_attention=False), (), "other"),
    ("SV3D_u", {**_SVD, "adm_in_channels": 256}, (), "other"),
    ("SV3D_p", {**_SVD, "adm_in_channels": 1280}, (), "other"),
    ("SVD_img2vid", _SVD, (), "other"),
)
_LATENT = {"sd15": "SD15", "sd20": "SD15", "plain_eps": "SD15", "sdxl": "SDXL", "sdxl_ip2p": "SDXL", "refiner": "SDXL"}
_SCALE = {"SD15": 0.18215, "SDXL": 0.13025, "SDXL_Playground_2_5": 0.5}


def _zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift sqrt(alpha_bar) so its last value is 0, rescale so its first is unchanged, square, pin the last."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    s = (s - last) * (first / (first - last))
    out = s ** 2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


def comfyui_discrete_sigmas(zsnr=False, linear_start=0.00085, linear_end=0.012, timesteps=1000) -> torch.Tensor:
    """ModelSamplingDiscrete's sigmas (float32, ascending): the schedule in float64, ZTSNR applied there, then cast."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    if zsnr:  # rescale_zero_terminal_snr_sigmas: sigma -> alpha_bar -> rescaled -> sigma, all float64
        alphas_cumprod = _zero_terminal_snr(1 / (sigmas * sigmas + 1))
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return sigmas.float()


def _comfyui_model_type(family, unet_config, sd, prefix, settings):
    """(model_type, latent format) from SDXL.model_type / SD20.model_type / BASE (EPS), mutating `settings`."""
    latent = _LATENT.get(family)
    if family in ("sdxl", "sdxl_ip2p"):
        if "edm_mean" in sd and "edm_std" in sd:  # Playground v2.5
            settings.update(sigma_data=0.5, sigma_max=80.0, sigma_min=0.002)
            return "EDM", "SDXL_Playground_2_5"
        if "edm_vpred.sigma_max" in sd:  # CosXL-style
            settings["sigma_max"] = _item(sd, "edm_vpred.sigma_max")
            if "edm_vpred.sigma_min" in sd:
                settings["sigma_min"] = _item(sd, "edm_vpred.sigma_min")
            return "V_PREDICTION_EDM", latent
        if "v_pred" in sd:
            if "ztsnr" in sd:
                settings["zsnr"] = True
            return "V_PREDICTION", latent
        return "EPS", latent
    if family == "sd20":
        bias = sd.get(prefix + "output_blocks.11.1.transformer_blocks.0.norm1.bias")
        if unet_config["in_channels"] != 4 or bias is None:
            return "EPS", latent
        if getattr(bias, "is_meta", False) or not isinstance(bias, torch.Tensor):
            return None, latent  # decided by the std of real values (> 0.09 -> V_PREDICTION)
        return ("V_PREDICTION" if torch.std(bias.float(), unbiased=False) > 0.09 else "EPS"), latent
    if family in ("sd15", "plain_eps", "refiner"):
        return "EPS", latent
    return None, latent  # model_base classes not reproduced here (Lotus, x4 upscaler, video)


def _clip_expected(name, layers, width, ff):
    """The CLIP module's parameters (ComfyUI clip_model.CLIPTextModel inside sd1_clip.SDClipModel) and shapes."""
    p = f"{name}.transformer.text_model."
    out = {p + "embeddings.token_embedding.weight": (49408, width), p + "embeddings.position_embedding.weight": (77, width),
           p + "final_layer_norm.weight": (width,), p + "final_layer_norm.bias": (width,),
           f"{name}.transformer.text_projection.weight": (width, width), f"{name}.logit_scale": ()}
    layer = {"mlp.fc1.weight": (ff, width), "mlp.fc1.bias": (ff,), "mlp.fc2.weight": (width, ff), "mlp.fc2.bias": (width,)}
    for norm in ("layer_norm1", "layer_norm2"):
        layer.update({f"{norm}.weight": (width,), f"{norm}.bias": (width,)})
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        layer.update({f"self_attn.{proj}.weight": (width, width), f"self_attn.{proj}.bias": (width,)})
    for i in range(layers):
        out.update({f"{p}encoder.layers.{i}.{k}": shape for k, shape in layer.items()})
    return out


_OPENCLIP_TOP = {"positional_embedding": "embeddings.position_embedding.weight", "token_embedding.weight":
                 "embeddings.token_embedding.weight", "ln_final.weight": "final_layer_norm.weight",
                 "ln_final.bias": "final_layer_norm.bias"}
_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def _comfyui_clip_keys(sd, family) -> dict:
    """{ComfyUI CLIP key: shape} after process_clip_state_dict: the prefix replacement (keeping only the text
    encoders' keys), then clip_text_transformers_convert(sd, 'clip_g.', 'clip_g.transformer.') on the open_clip keys."""
    if family == "refiner":
        prefixes = {"conditioner.embedders.0.model.": "clip_g."}
    else:
        prefixes = {"conditioner.embedders.0.transformer.text_model": "clip_l.transformer.text_model",
                    "conditioner.embedders.1.model.": "clip_g."}
    renamed = {}
    for old, new in prefixes.items():
        renamed.update({new + k[len(old):]: _shape(v) for k, v in sd.items() if k.startswith(old)})
    out, g = {}, "clip_g.transformer."
    for key, shape in renamed.items():
        rest = key[len("clip_g."):] if key.startswith("clip_g.") else ""
        block, packed = _RESBLOCK.match(rest), _IN_PROJ.match(rest)
        if rest in _OPENCLIP_TOP:
            out[g + "text_model." + _OPENCLIP_TOP[rest]] = shape
        elif packed and int(packed[1]) < 32:  # q, k, v packed along dim 0: three equal slices
            for proj in ("q_proj", "k_proj", "v_proj"):
                out[f"{g}text_model.encoder.layers.{packed[1]}.self_attn.{proj}.{packed[2]}"] = (shape[0] // 3,) + shape[1:]
        elif block and int(block[1]) < 32 and block[2] in _OPENCLIP_BLOCK:
            out[f"{g}text_model.encoder.layers.{block[1]}.{_OPENCLIP_BLOCK[block[2]]}.{block[3]}"] = shape
        elif rest not in ("text_projection.weight", "text_projection"):
            out[key] = shape
    if "clip_g.text_projection.weight" in renamed:  # taken as is ...
        out[g + "text_projection.weight"] = renamed["clip_g.text_projection.weight"]
    if "clip_g.text_projection" in renamed:  # ... then the open_clip matrix, transposed, replaces it
        out[g + "text_projection.weight"] = renamed["clip_g.text_projection"][::-1]
    return out


def comfyui_clip_g_text_projection(sd, prefix: str = "conditioner.embedders.1.model.") -> torch.Tensor:
    """The weight W of ComfyUI's clip_g `text_projection` Linear (no bias): pooled_projected = pooled @ W.T.

    An open_clip file stores P as `<prefix>text_projection` (used as `pooled @ P`); ComfyUI loads P.T, so the result
    equals open_clip's (and WebUI's FrozenOpenCLIPEmbedder2's) `pooled @ P`. A `<prefix>text_projection.weight` is taken
    as-is, but the bare key, converted after it, wins. With neither, ComfyUI keeps its eye() init and only debug-logs
    the missing key. Use prefix "conditioner.embedders.0.model." for a refiner file.
    """
    width = _shape(sd[prefix + "ln_final.weight"])[0] if prefix + "ln_final.weight" in sd else 1280
    weight = torch.eye(width)
    if prefix + "text_projection.weight" in sd:
        weight = sd[prefix + "text_projection.weight"]
    if prefix + "text_projection" in sd:
        weight = sd[prefix + "text_projection"].transpose(0, 1).contiguous()
    return weight


def comfyui_classify(state_dict) -> dict:
    """ComfyUI's reading of a checkpoint file: model config, model type, sampling, latent format and text encoders."""
    sd = state_dict
    prefix = comfyui_unet_prefix(sd)
    unet = comfyui_detect_unet_config(sd, prefix)
    res = {"unet_prefix": prefix, "unet_config": unet, "model": None, "model_type": None, "zsnr": False,
           "sampling_settings": {}, "latent_format": None, "inpaint": False, "clip_l_found": None, "clip_g_found": None}
    match = next((m for m in COMFYUI_MODELS if unet is not None and all(k in unet and unet[k] == v for k, v in m[1].items())
                  and all(k in sd for k in m[2])), None)
    if match is None:
        return res  # ComfyUI then tries the file as a bare diffusion model
    name, _, _, family = match
    settings = {}
    model_type, latent = _comfyui_model_type(family, unet, sd, prefix, settings)
    res.update(model=name, model_type=model_type, zsnr=bool(settings.get("zsnr", False)), sampling_settings=settings,
               latent_format=latent, latent_scale_factor=_SCALE.get(latent),
               inpaint=family in ("sd15", "sd20", "sdxl") and unet["in_channels"] > 4)
    if model_type in ("EPS", "V_PREDICTION"):  # ModelSamplingDiscrete
        sigmas = comfyui_discrete_sigmas(res["zsnr"])
        res.update(sigma_data=1.0, sigma_min=sigmas[0].item(), sigma_max=sigmas[-1].item())
    elif model_type in ("EDM", "V_PREDICTION_EDM"):  # ModelSamplingContinuousEDM: exp of a float32 log-linspace
        lo, hi = settings.get("sigma_min", 0.002), settings.get("sigma_max", 120.0)
        sigmas = torch.linspace(math.log(lo), math.log(hi), 1000).exp()
        res.update(sigma_data=settings.get("sigma_data", 1.0), sigma_min=sigmas[0].item(), sigma_max=sigmas[-1].item())
    if family in ("sdxl", "sdxl_ip2p", "refiner"):
        got = _comfyui_clip_keys(sd, family)
        encoders = {"clip_l": (12, 768, 3072), "clip_g": (32, 1280, 5120)}
        if family == "refiner":  # SDXLRefinerClipModel holds clip_g only
            del encoders["clip_l"]
            res["clip_l_found"] = False
        expected = {}
        for enc, dims in encoders.items():
            exp = _clip_expected(enc, *dims)
            expected.update(exp)
            missing = [k for k in exp if k not in got
                       and ".logit_scale" not in k and ".transformer.text_projection.weight" not in k]
            bad = [k for k in exp if k in got and tuple(got[k]) != exp[k]]
            res[f"{enc}_missing"], res[f"{enc}_size_mismatch"] = missing, bad
            res[f"{enc}_found"] = not missing and not bad
        res["clip_loaded"] = len(got) > 0
        res["clip_unexpected"] = sorted(k for k in got if k not in expected)
        res["clip_g_text_projection_transposed"] = (
            ("conditioner.embedders.0.model." if family == "refiner" else "conditioner.embedders.1.model.")
            + "text_projection") in sd
    return res


_SGM_CONFIGS = ("sd_xl_base.yaml", "sd_xl_v.yaml", "sd_xl_refiner.yaml", "sd_xl_inpaint.yaml")


def webui_classify(state_dict) -> dict:
    """guess_model_config_from_state_dict + set_model_type + the v_pred / ztsnr handling of WebUI dev."""
    sd = state_dict
    inp = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    sd2 = sd.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    unclip = sd.get("embedder.model.ln_final.weight")
    res = {"config": None, "v_pred_key_deleted": False, "needs_unet_probe": False}
    if "model.diffusion_model.x_embedder.proj.weight" in sd:
        res["config"] = "sd3-inference.yaml"
    elif sd.get("conditioner.embedders.1.model.ln_final.weight") is not None:
        if _shape(inp)[1] == 9:  # (WebUI raises here if the file has no UNet input conv)
            res["config"] = "sd_xl_inpaint.yaml"
        elif "v_pred" in sd:
            res.update(config="sd_xl_v.yaml", v_pred_key_deleted=True)
        else:
            res["config"] = "sd_xl_base.yaml"
    elif sd.get("conditioner.embedders.0.model.ln_final.weight") is not None:
        res["config"] = "sd_xl_refiner.yaml"
    elif sd.get("depth_model.model.pretrained.act_postprocess3.0.project.0.bias") is not None:
        res["config"] = "v2-midas-inference.yaml"
    elif unclip is not None and _shape(unclip)[0] in (768, 1024):
        res["config"] = f"v2-1-stable-unclip-{'l' if _shape(unclip)[0] == 768 else 'h'}-inference.yaml"
    elif sd2 is not None and _shape(sd2)[1] == 1024:
        if _shape(inp)[1] == 9:
            res["config"] = "v2-inpainting-inference.yaml"
        else:  # is_using_v_parameterization_for_sd2 runs the UNet once: v2-inference-v.yaml if the probe says v
            res.update(config="v2-inference.yaml", needs_unet_probe=True)
    elif inp is not None and _shape(inp)[1] in (8, 9):
        res["config"] = {9: "v1-inpainting-inference.yaml", 8: "instruct-pix2pix.yaml"}[_shape(inp)[1]]
    elif sd.get("cond_stage_model.roberta.embeddings.word_embeddings.weight") is not None:
        m18 = _shape(sd["cond_stage_model.transformation.weight"])[0] == 1024
        res["config"] = "alt-diffusion-m18-inference.yaml" if m18 else "alt-diffusion-inference.yaml"
    else:
        res["config"] = "v1-inference.yaml"  # shared.sd_default_config
    config = res["config"]
    is_sdxl = config in _SGM_CONFIGS  # set_model_type: the model has a `conditioner`
    res.update(
        is_sdxl=is_sdxl,
        is_ssd=is_sdxl and "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in sd,
        is_sdxl_inpaint=config == "sd_xl_inpaint.yaml",
        is_sd2=config.startswith("v2-"),
        # parameterization: "v" only from sd_xl_v.yaml among these; None where this module did not read the config
        v_prediction=True if config == "sd_xl_v.yaml" else False if config in _SGM_CONFIGS or config.startswith(
            ("v1-", "instruct-", "alt-", "v2-inpainting")) else None,
        ztsnr="ztsnr" in sd,  # any family; the alpha schedule is then rescaled at load and before each generation
    )
    # apply_alpha_schedule_override(sd_model, p) also writes the *option's* value (default "Default") to the infotext
    res["infotext"] = {"Noise Schedule": "Default"} if res["ztsnr"] else {}
    return res


def webui_alphas_cumprod(ztsnr: bool = False, downcast: bool = False) -> torch.Tensor:
    """WebUI's SDXL alphas_cumprod after apply_alpha_schedule_override: sgm's float64 schedule cast to float32,
    optionally to half (option use_downcasted_alpha_bar), and then, for ztsnr, rescaled in that dtype."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float32)
    if downcast:
        alphas_cumprod = alphas_cumprod.half()
    return _zero_terminal_snr(alphas_cumprod) if ztsnr else alphas_cumprod
