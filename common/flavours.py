"""A base model's flavour: what its network predicts and on which noise schedule, read once where the model is loaded.

Five flavours, named as ComfyUI names them (comfy/supported_models.py, `SDXL.model_type`):
- epsilon (EPS): SDXL base, Pony, Illustrious, Juggernaut, NoobAI-XL eps;
- v-prediction (V_PREDICTION);
- v-prediction with zero-terminal SNR (V_PREDICTION with zsnr): NoobAI-XL v-pred;
- EDM (Playground v2.5): continuous sigma, EDM preconditioning, its own latent statistics;
- EDM v-prediction (V_PREDICTION_EDM): CosXL.

A single file says which by marker keys (`flavour_from_checkpoint`); a diffusers folder by its scheduler config
(`flavour_from_scheduler_config`). The flavour then travels as the pipeline's scheduler config (`scheduler_config_for`),
which every script already reads: training, samplers and exports all see one reading.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

from common.architectures import PLAYGROUND_V25_LATENTS_MEAN, PLAYGROUND_V25_LATENTS_STD, PLAYGROUND_V25_VAE_CHANGES
from common.cli import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# ComfyUI's sampling settings for the two EDM flavours (comfy/supported_models.py SDXL.model_type for Playground
# v2.5; comfy/model_sampling.py ModelSamplingContinuousEDM's defaults where a CosXL file does not say)
PLAYGROUND_SIGMAS = {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
EDM_V_DEFAULT_SIGMAS = {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0}
# the flavour markers of single files, as ComfyUI and WebUI read them and ComfyUI's checkpoint saver writes them
V_PRED_KEY, ZTSNR_KEY, EDM_MEAN_KEY, EDM_STD_KEY = "v_pred", "ztsnr", "edm_mean", "edm_std"
EDM_V_SIGMA_MAX_KEY, EDM_V_SIGMA_MIN_KEY = "edm_vpred.sigma_max", "edm_vpred.sigma_min"
MARKER_KEYS = (V_PRED_KEY, ZTSNR_KEY, EDM_MEAN_KEY, EDM_STD_KEY, EDM_V_SIGMA_MAX_KEY, EDM_V_SIGMA_MIN_KEY)
# metadata other tools write about the prediction type: a hint to check against the keys, never obeyed
PREDICTION_METADATA = ("modelspec.prediction_type", "modelspec.predict_key", "ss_v_parameterization")


@dataclass(frozen=True)
class Flavour:
    """What a model predicts (`prediction_type`) on which schedule: DDPM's discrete one (rescaled to zero terminal
    SNR, Lin et al. 2024, where `zero_terminal_snr`), or EDM's continuous sigmas (`edm`, with its sigma range and
    sigma_data, and for Playground v2.5 the VAE's per-channel latent statistics)."""

    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False
    edm: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    sigma_data: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        if self.edm:
            return "EDM v-prediction (CosXL)" if self.prediction_type == "v_prediction" else "EDM (Playground v2.5)"
        if self.prediction_type == "v_prediction":
            return "v-prediction with zero-terminal SNR" if self.zero_terminal_snr else "v-prediction"
        return "epsilon"

    @property
    def modelspec_prediction(self) -> str:
        """The prediction as ComfyUI's `modelspec.predict_key` and kohya's `modelspec.prediction_type` spell it."""
        return "v" if self.prediction_type == "v_prediction" else "epsilon"


@dataclass(frozen=True)
class FlavourReading:
    """A flavour and the words that say where it came from ("keys v_pred, ztsnr"), plus what looked wrong."""

    flavour: Flavour
    reason: str
    warnings: tuple[str, ...] = ()


def flavour_from_checkpoint(keys, read_values: Callable[[str], list[float]], metadata: dict | None = None) -> FlavourReading:
    """A single file's flavour from its marker keys, in ComfyUI's order (comfy/supported_models.py `SDXL.model_type`):
    edm_mean with edm_std (Playground v2.5; the file's statistics are used), then edm_vpred.sigma_max (CosXL; its
    sigma_max and, when present, sigma_min are read), then v_pred (with ztsnr: zero-terminal SNR), else epsilon, so
    that this toolkit and ComfyUI agree on every file. `read_values(key)` gives a marker tensor's values. Metadata
    that says otherwise (kohya's merges write `modelspec.prediction_type: epsilon` whatever the base) only warns."""
    keys = set(keys)
    warnings = []
    if EDM_MEAN_KEY in keys and EDM_STD_KEY in keys:
        flavour = Flavour(edm=True, **PLAYGROUND_SIGMAS, latents_mean=tuple(read_values(EDM_MEAN_KEY)),
                          latents_std=tuple(read_values(EDM_STD_KEY)))
        reason = f"keys {EDM_MEAN_KEY}, {EDM_STD_KEY}"
        if _differ(flavour.latents_mean, PLAYGROUND_V25_LATENTS_MEAN) or _differ(flavour.latents_std, PLAYGROUND_V25_LATENTS_STD):
            warnings.append(f"the file's latent statistics ({EDM_MEAN_KEY} {_rounded(flavour.latents_mean)}, {EDM_STD_KEY} "
                            f"{_rounded(flavour.latents_std)}) differ from Playground v2.5's published ones, which ComfyUI "
                            "uses whatever the file says: using the file's")
    elif EDM_V_SIGMA_MAX_KEY in keys:
        sigmas = {**EDM_V_DEFAULT_SIGMAS, "sigma_max": read_values(EDM_V_SIGMA_MAX_KEY)[0]}
        if EDM_V_SIGMA_MIN_KEY in keys:
            sigmas["sigma_min"] = read_values(EDM_V_SIGMA_MIN_KEY)[0]
        flavour = Flavour(prediction_type="v_prediction", edm=True, **sigmas)
        reason = f"key {EDM_V_SIGMA_MAX_KEY} = {sigmas['sigma_max']:g}" + (f", {EDM_V_SIGMA_MIN_KEY}" if EDM_V_SIGMA_MIN_KEY in keys else "")
    elif V_PRED_KEY in keys:
        flavour = Flavour(prediction_type="v_prediction", zero_terminal_snr=ZTSNR_KEY in keys)
        reason = f"keys {V_PRED_KEY}, {ZTSNR_KEY}" if ZTSNR_KEY in keys else f"key {V_PRED_KEY}"
    else:
        flavour, reason = Flavour(), "no flavour keys"
        if ZTSNR_KEY in keys:
            warnings.append(f"the file has key {ZTSNR_KEY} without {V_PRED_KEY}: read as epsilon, as ComfyUI reads it (WebUI "
                            f"would rescale the schedule); if it is a v-prediction model pass --prediction_type v_prediction "
                            f"--zero_terminal_snr")
    if (EDM_MEAN_KEY in keys) != (EDM_STD_KEY in keys):
        warnings.append(f"the file has only one of {EDM_MEAN_KEY} and {EDM_STD_KEY}: not read as EDM, as ComfyUI needs both")
    disagreeing = metadata_disagreement(metadata or {}, flavour)
    if disagreeing:
        warnings.append(f"the file's metadata says {disagreeing}, but its keys say {flavour.name}: read by the keys, as ComfyUI "
                        f"and WebUI read it (kohya's merges write this metadata whatever the base); if the metadata is right, "
                        f"pass --prediction_type")
    return FlavourReading(flavour, reason, tuple(warnings))


def metadata_disagreement(metadata: dict, flavour: Flavour) -> str:
    """The metadata entries whose prediction type differs from `flavour`'s, as 'KEY VALUE' text ('' when none)."""
    said = []
    for key in PREDICTION_METADATA:
        value = str(metadata.get(key, "")).strip().lower()
        if not value:
            continue
        if key == "ss_v_parameterization":
            if value not in ("true", "false"):
                continue
            predicts_v = value == "true"
        elif value in ("v", "v_prediction", "v-prediction"):
            predicts_v = True
        elif value in ("epsilon", "eps"):
            predicts_v = False
        else:
            continue
        if predicts_v != (flavour.prediction_type == "v_prediction"):
            said.append(f"{key} {metadata[key]}")
    return ", ".join(said)


def flavour_from_scheduler_config(scheduler_config, vae_config, edm_native: bool) -> Flavour:
    """A diffusers folder's flavour: EDM-native as `decide_base_formulation` reads the config (its sigmas, sigma_data
    and the VAE's latent statistics), else discrete with the config's prediction type, rescaled to zero terminal SNR
    where `rescale_betas_zero_snr` says so."""
    prediction_type = scheduler_config.get("prediction_type") or "epsilon"
    if edm_native:
        mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
        return Flavour(prediction_type=prediction_type, edm=True, sigma_min=scheduler_config.get("sigma_min"),
                       sigma_max=scheduler_config.get("sigma_max"), sigma_data=scheduler_config.get("sigma_data"),
                       latents_mean=tuple(mean) if mean is not None else None, latents_std=tuple(std) if std is not None else None)
    return Flavour(prediction_type=prediction_type, zero_terminal_snr=bool(scheduler_config.get("rescale_betas_zero_snr")))


def with_overrides(flavour: Flavour, prediction_type: str | None = None, zero_terminal_snr: bool | None = None) -> Flavour:
    """The flavour as the options say (--prediction_type, --zero_terminal_snr), refused where it cannot be."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction_type {prediction_type!r}; use {' or '.join(PREDICTION_TYPES)}")
    if zero_terminal_snr and flavour.edm:
        raise UserError(f"--zero_terminal_snr rescales a discrete model's beta schedule; this model is {flavour.name}, whose "
                        "sigmas are continuous (no betas to rescale)")
    changed = dataclasses.replace(
        flavour,
        prediction_type=prediction_type or flavour.prediction_type,
        zero_terminal_snr=flavour.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr,
    )
    check_flavour(changed)
    return changed


def check_flavour(flavour: Flavour) -> None:
    if flavour.zero_terminal_snr and flavour.prediction_type != "v_prediction":
        raise UserError("zero-terminal SNR needs a v-prediction model (Lin et al. 2024, Sec. 3.2): at SNR 0 an epsilon "
                        "model's input is pure noise and its output says nothing of the image; add --prediction_type "
                        "v_prediction (kohya's --v_parameterization), or leave out --zero_terminal_snr")


def scheduler_config_for(flavour: Flavour, base_config: dict) -> dict:
    """The scheduler config that samples `flavour`, made from `base_config` (the model's own scheduler config, or a
    published one): the flavour's prediction type; for zero-terminal SNR, betas rescaled as Lin et al. 2024
    (Algorithm 1; diffusers' `rescale_betas_zero_snr`) and trailing timesteps (Sec. 3.3), so that sampling starts at
    the last timestep, where the SNR is 0; for EDM, its sigma range and sigma_data."""
    config = {key: value for key, value in dict(base_config).items() if not key.startswith("_") or key == "_class_name"}
    config["prediction_type"] = flavour.prediction_type
    if flavour.edm:
        config.update({k: getattr(flavour, k) for k in ("sigma_min", "sigma_max", "sigma_data") if getattr(flavour, k) is not None})
        return config
    if flavour.zero_terminal_snr or "rescale_betas_zero_snr" in config:
        config["rescale_betas_zero_snr"] = flavour.zero_terminal_snr
    if flavour.zero_terminal_snr:
        config["timestep_spacing"] = "trailing"
    return config


def checkpoint_markers(flavour: Flavour) -> dict:
    """The marker tensors a single file of `flavour` carries, as ComfyUI's saver writes them
    (comfy_extras/nodes_model_merging.py `save_checkpoint`) and both UIs read them: empty tensors for v_pred and
    ztsnr, the latent statistics for Playground v2.5, the sigma range for EDM v-prediction."""
    import torch

    if flavour.edm and flavour.prediction_type == "v_prediction":
        return {EDM_V_SIGMA_MAX_KEY: torch.tensor(float(flavour.sigma_max)), EDM_V_SIGMA_MIN_KEY: torch.tensor(float(flavour.sigma_min))}
    if flavour.edm:
        mean = flavour.latents_mean or (0.0,) * 4
        std = flavour.latents_std or (1.0,) * 4
        return {EDM_MEAN_KEY: torch.tensor(mean).view(1, -1, 1, 1), EDM_STD_KEY: torch.tensor(std).view(1, -1, 1, 1)}
    markers = {}
    if flavour.prediction_type == "v_prediction":
        markers[V_PRED_KEY] = torch.tensor([])
        if flavour.zero_terminal_snr:
            markers[ZTSNR_KEY] = torch.tensor([])
    return markers


def vae_config_changes(flavour: Flavour) -> dict:
    """What a Playground-v2.5-style flavour changes in the VAE's config: scaling 0.5 and the latent statistics."""
    if not (flavour.edm and flavour.latents_mean and flavour.latents_std):
        return {}
    return PLAYGROUND_V25_VAE_CHANGES | {"latents_mean": list(flavour.latents_mean), "latents_std": list(flavour.latents_std)}


def _differ(values, published, tolerance: float = 1e-4) -> bool:
    return len(values) != len(published) or any(not math.isclose(a, b, abs_tol=tolerance) for a, b in zip(values, published))


def _rounded(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
