"""Diffusion training losses: each formula a small pure function, each formulation a small object.

Vocabulary: x0 are clean latents, n ~ N(0, I) noise. Discrete (DDPM/VP) models see
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n; EDM models see x = x0 + sigma n. The two are one
family: sigma_t = sqrt((1 - abar_t) / abar_t) and x_t = x / sqrt(1 + sigma_t^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# ---------------------------------------------------------------- discrete (DDPM) formulas


def snr_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t), the signal-to-noise ratio of x_t (Hang et al. 2023, Sec. 3)."""
    abar = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (abar / (1 - abar)).float()


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting", Eq. 8).

    The x0-error weight min(SNR, gamma) expressed on the network's own target:
    ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 and ||v_hat - v||^2 = (SNR + 1) ||x0_hat - x0||^2,
    so the weight is min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v.
    """
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"Min-SNR is defined for epsilon and v_prediction targets, not {prediction_type!r}")


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = alpha_t n - sigma_t x0 (Salimans & Ho 2022, "Progressive Distillation", Sec. 4), alpha^2 + sigma^2 = 1."""
    return alpha * noise - sigma * x0


def offset_noise(noise: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise plus a per-channel constant (Guttenberg 2023, "Diffusion with Offset Noise"): lets the model
    learn to shift an image's mean brightness, which plain i.i.d. noise never perturbs."""
    if strength == 0:
        return noise
    shape = (*noise.shape[:2], 1, 1)
    return noise + strength * torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)


# ---------------------------------------------------------------- EDM formulas (Karras et al. 2022)


EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_edm_prediction_type(prediction_type: str) -> None:
    """EDM preconditioning is defined for these outputs only (diffusers' EDM schedulers refuse others too)."""
    if prediction_type not in EDM_PREDICTION_TYPES:
        raise ValueError(f"EDM preconditioning is defined for {' and '.join(EDM_PREDICTION_TYPES)} models, not {prediction_type!r}")


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float, prediction_type: str = "epsilon"):
    """(c_skip, c_out, c_in, c_noise) of EDM, Karras et al. 2022, Table 1 ("Ours" column):

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4; D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
    A v_prediction network's F is the negative of that one, so c_out changes sign (k-diffusion's
    VDenoiser, diffusers' EDM schedulers' `precondition_outputs`).
    """
    check_edm_prediction_type(prediction_type)
    total = sigma**2 + sigma_data**2
    c_out = sigma * sigma_data / total.sqrt()
    return sigma_data**2 / total, c_out if prediction_type == "epsilon" else -c_out, 1 / total.sqrt(), sigma.log() / 4


def vp_preconditioning(sigma: torch.Tensor, prediction_type: str = "epsilon"):
    """(c_skip, c_out, c_in) of a discrete VP model seen through sigma_t = sqrt((1 - abar_t) / abar_t), whose
    input is x / sqrt(sigma^2 + 1) = x_t: Karras et al. 2022, Table 1 "VP" column for an epsilon network
    (c_skip 1, c_out -sigma); for a v network (Salimans & Ho 2022, x0 = alpha x_t - s v) c_skip =
    1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1), k-diffusion's VDenoiser with sigma_data 1."""
    check_edm_prediction_type(prediction_type)
    c_in = 1 / (sigma**2 + 1).sqrt()
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    return c_in**2, -sigma * c_in, c_in


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2, Karras et al. 2022, Table 1: equals 1 / c_out^2
    of that column, so the loss on its network output F is unit-weighted at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def unit_output_weight(c_out: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) = 1 / c_out(sigma)^2, Karras et al. 2022, Sec. 5 and Eq. 8: the weight that makes the
    loss on the network's own output unit-weighted, whatever the preconditioning. With VP preconditioning
    (c_out = -sigma) it is Table 1's VP weight 1 / sigma^2, i.e. the plain epsilon MSE."""
    return 1 / c_out**2


def default_p_mean(sigma_data: float) -> float:
    """The mean of ln(sigma) that keeps Karras et al. 2022's choice (P_mean -1.2 for sigma_data 0.5 pixels,
    Table 1, i.e. a median sigma of 0.6 sigma_data) in units of the base's sigma_data: -1.2 + ln(sd / 0.5)."""
    return -1.2 + math.log(sigma_data / 0.5)


def edm_snr(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """SNR(sigma) = sd^2 / sigma^2: signal variance over noise variance of x = x0 + sigma n."""
    return sigma_data**2 / sigma**2


def edm_min_snr_weight(sigma: torch.Tensor, sigma_data: float, gamma: float, soft: bool = False) -> torch.Tensor:
    """Min-SNR-gamma in EDM form: the weight on the x0-error ||D - x0||^2 (replacing lambda(sigma)).

    Derivation: Hang et al. 2023 clip the SNR at gamma in the x0-error weight, min(SNR, gamma); their
    epsilon and v weights (`min_snr_weight`) are that weight divided by the factor SNR or SNR + 1
    converting x0-error into the target's error. With x = x0 + sigma n the SNR is sd^2 / sigma^2
    (`edm_snr`); for a VP model in its unit-variance normalisation (sd = 1, sigma_t^2 = (1 - abar)/abar)
    this is abar / (1 - abar), the SNR of Hang et al., so the per-sample weights coincide.
    Dividing by sd^2 keeps the scale of lambda(sigma) = (1 + SNR) / sd^2, which it equals below gamma
    up to the "+1": on F the weight is min(SNR, gamma) / (1 + SNR) <= 1.

    soft=True: the smooth minimum 1 / (1/SNR + 1/gamma), whose gamma = 1 case is k-diffusion's
    "soft-min-snr" weighting (Crowson et al. 2024, k_diffusion/layers.py).
    """
    snr = edm_snr(sigma, sigma_data)
    clipped = 1 / (1 / snr + 1 / gamma) if soft else torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / sigma_data**2


def sample_lognormal_sigmas(count: int, p_mean: float, p_std: float, generator=None, device=None) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), Karras et al. 2022, Sec. 5 and Table 1 (P_mean -1.2, P_std 1.2)."""
    return (p_mean + p_std * torch.randn(count, generator=generator, device=device)).exp()


def discrete_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1: the discrete model's noise levels in EDM units."""
    abar = alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def sigma_to_timestep(sigma: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of a discrete model for a continuous sigma, by linear interpolation in
    log-sigma over its training schedule and clipped to the schedule's range (as k-diffusion's
    DiscreteSchedule.sigma_to_t): exact at the table's points, monotone in between."""
    log_table = schedule_sigmas.double().log().to(sigma.device)
    log_sigma = sigma.double().log().clamp(log_table[0], log_table[-1])
    upper = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    lower = upper - 1
    fraction = (log_sigma - log_table[lower]) / (log_table[upper] - log_table[lower])
    return (lower + fraction).to(sigma.dtype)


# ---------------------------------------------------------------- formulations: chosen once, before the loop

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (model input, timestep) -> network output


def _per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class NoisedInput:
    """One draw of a formulation's training noise: what the network is fed (`model_input` at condition `time`)
    and what its loss compares the output with (`noisy` latents, the `noise` in them and their noise `level`:
    the timesteps of a discrete model, sigma under EDM)."""

    model_input: torch.Tensor
    time: torch.Tensor
    noisy: torch.Tensor
    noise: torch.Tensor
    level: torch.Tensor


@dataclass
class DiscreteFormulation:
    """DDPM training of a discrete model: uniform timesteps, epsilon or v target, optional Min-SNR-gamma."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    base_is_edm = False  # the base itself is a discrete model

    def _signal_and_noise_scales(self, timesteps: torch.Tensor, like: torch.Tensor):
        abar = self.alphas_cumprod.to(like.device)[timesteps]
        return _broadcast(abar.sqrt(), like), _broadcast((1 - abar).sqrt(), like)

    def noised_input(self, x0: torch.Tensor, generator=None) -> NoisedInput:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n at uniform timesteps t (Ho et al. 2020, Eq. 4), fed as it is."""
        noise = offset_noise(torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype), self.noise_offset, generator)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=generator, device=x0.device)
        alpha, sigma = self._signal_and_noise_scales(timesteps, x0)
        noisy = alpha * x0 + sigma * noise
        return NoisedInput(model_input=noisy, time=timesteps, noisy=noisy, noise=noise, level=timesteps)

    def loss(self, network: Denoiser, x0: torch.Tensor, generator=None) -> torch.Tensor:
        """Per-sample weighted loss; `network(model_input, timestep)` returns the UNet output."""
        drawn = self.noised_input(x0, generator)
        if self.prediction_type == "epsilon":
            target = drawn.noise
        else:
            target = v_target(x0, drawn.noise, *self._signal_and_noise_scales(drawn.level, x0))
        losses = _per_sample_mse(network(drawn.model_input, drawn.time), target)
        if self.snr_gamma:
            snr = snr_from_alphas_cumprod(self.alphas_cumprod, drawn.level)
            losses = losses * min_snr_weight(snr, self.snr_gamma, self.prediction_type)
        return losses


EDM_WEIGHTINGS = ("table1", "unit-output")


@dataclass
class EDMFormulation:
    """EDM training (Karras et al. 2022): log-normal sigmas, preconditioning, lambda(sigma) or Min-SNR weights.

    On an EDM-native base (Playground v2.5) the network is F of Table 1, fed c_in x and
    c_noise = ln(sigma)/4. On a discrete base (SDXL) the network is its epsilon (or v) predictor seen
    through VP preconditioning, fed x / sqrt(sigma^2 + 1) and t(sigma) from `sigma_to_timestep`.
    `weighting`: "table1" is Table 1's lambda(sigma) on ||D - x0||^2; "unit-output" is 1 / c_out^2 of the
    preconditioning in use. They agree on EDM-native and v bases; on an epsilon base, table1 weights the
    epsilon error by 1 + sigma^2 / sd^2 and unit-output by 1 (the plain epsilon MSE).
    """

    sigma_data: float
    p_mean: float = -1.2
    p_std: float = 1.2
    schedule_sigmas: torch.Tensor | None = None  # set for a discrete base; None for an EDM-native one
    prediction_type: str = "epsilon"
    weighting: str = "table1"
    snr_gamma: float | None = None
    soft_min_snr: bool = False
    noise_offset: float = 0.0

    @property
    def base_is_edm(self) -> bool:
        """Whether the base itself was trained with EDM (no discrete schedule to map sigma onto)."""
        return self.schedule_sigmas is None

    def preconditioning(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, network time): Table 1 "Ours" and c_noise on an EDM-native base, VP and
        the fractional timestep on a discrete one."""
        if self.schedule_sigmas is None:
            return edm_preconditioning(sigma, self.sigma_data, self.prediction_type)
        return *vp_preconditioning(sigma, self.prediction_type), sigma_to_timestep(sigma, self.schedule_sigmas)

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.snr_gamma:
            return edm_min_snr_weight(sigma, self.sigma_data, self.snr_gamma, soft=self.soft_min_snr)
        if self.weighting == "unit-output":
            return unit_output_weight(self.preconditioning(sigma)[1])
        return edm_loss_weight(sigma, self.sigma_data)

    def denoise(self, network: Denoiser, noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma), the model's estimate of x0 from x = x0 + sigma n."""
        _, _, c_in, time = self.preconditioning(sigma)
        return self._denoised(noisy, sigma, network(_broadcast(c_in, noisy) * noisy, time))

    def _denoised(self, noisy: torch.Tensor, sigma: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F from the network's output F (Karras et al. 2022, Eq. 7)."""
        c_skip, c_out, _, _ = self.preconditioning(sigma)
        return _broadcast(c_skip, noisy) * noisy + _broadcast(c_out, noisy) * output.to(noisy.dtype)

    def noised_input(self, x0: torch.Tensor, generator=None, sigma: torch.Tensor | None = None, noise=None) -> NoisedInput:
        """x = x0 + sigma n with ln(sigma) ~ N(P_mean, P_std^2), fed to the network as c_in x at its time
        condition (Karras et al. 2022, Eq. 7 and Table 1); sigma and noise are drawn unless given (tests and
        fixed evaluations)."""
        if sigma is None:
            sigma = sample_lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, generator, x0.device)
        if self.schedule_sigmas is not None:
            # a discrete model knows only its schedule's noise levels: noise and conditioning must agree
            low, high = float(self.schedule_sigmas[0]), float(self.schedule_sigmas[-1])
            sigma = sigma.clamp(low, high)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            noise = offset_noise(noise, self.noise_offset, generator)
        noisy = x0 + _broadcast(sigma, x0) * noise
        _, _, c_in, time = self.preconditioning(sigma)
        return NoisedInput(model_input=_broadcast(c_in, noisy) * noisy, time=time, noisy=noisy, noise=noise, level=sigma)

    def loss(
        self, network: Denoiser, x0: torch.Tensor, generator=None, sigma: torch.Tensor | None = None, noise=None
    ) -> torch.Tensor:
        """Per-sample weighted loss lambda(sigma) ||D(x; sigma) - x0||^2 (Karras et al. 2022, Eq. 8)."""
        drawn = self.noised_input(x0, generator, sigma=sigma, noise=noise)
        denoised = self._denoised(drawn.noisy, drawn.level, network(drawn.model_input, drawn.time))
        return self.weight(drawn.level) * _per_sample_mse(denoised, x0)


def prior_preservation_loss(instance_losses: torch.Tensor, class_losses: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, Eq. 2): the instance loss plus prior_loss_weight times the
    loss on the model's own class images, each a mean of per-sample (already weighted) losses."""
    return instance_losses.mean() + prior_loss_weight * class_losses.mean()


def formulation_for_scheduler(scheduler_config, *, edm: bool = False, prediction_type: str | None = None,
                              p_mean: float | None = None, p_std: float = 1.2, snr_gamma: float | None = None,
                              soft_min_snr: bool = False, noise_offset: float = 0.0, base_formulation: str = "auto",
                              weighting: str = "table1") -> tuple[DiscreteFormulation | EDMFormulation, str]:
    """(formulation, note): the formulation a model trains with, chosen once from its scheduler config, and
    the one-line reason to show when the config had to be read one way among two (`decide_base_formulation`).
    EDM on an EDM-native base (overridden by `base_formulation`) or when asked (`edm`, a discrete base seen
    through its sigmas), else DDPM. The prediction type is the scheduler's; on a discrete base
    `prediction_type` may change the training target, on an EDM-native base it may only repeat the
    scheduler's, which decides how the sampler reads the output. p_mean None: `default_p_mean(sigma_data)`."""
    from diffusers import DDPMScheduler

    from common.cli import UserError
    from common.models import decide_base_formulation

    scheduler_type = scheduler_config.get("prediction_type") or "epsilon"
    accepted = " or ".join(EDM_PREDICTION_TYPES)
    edm_native, note = decide_base_formulation(scheduler_config, base_formulation)
    if edm_native:
        if prediction_type not in (None, scheduler_type):
            raise UserError(f"--prediction_type {prediction_type} contradicts this EDM base's scheduler ({scheduler_type}), "
                            f"which decides how its output is read when sampling; leave --prediction_type out")
        if scheduler_type not in EDM_PREDICTION_TYPES:
            raise UserError(f"this EDM base's scheduler has prediction_type {scheduler_type!r}; EDM preconditioning is defined for {accepted}")
        sigma_data, schedule_sigmas, prediction_type = float(scheduler_config.get("sigma_data") or 0.5), None, scheduler_type
    else:
        prediction_type = prediction_type or scheduler_type
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise UserError(f"prediction_type {prediction_type!r} is not supported for training; use {accepted}")
        alphas_cumprod = DDPMScheduler.from_config(scheduler_config).alphas_cumprod.to(torch.float32)
        if not edm:
            return DiscreteFormulation(alphas_cumprod, prediction_type=prediction_type, snr_gamma=snr_gamma, noise_offset=noise_offset), note
        # a discrete VP model's latents are scaled to unit variance, its implicit sigma_data (k-diffusion)
        sigma_data, schedule_sigmas = 1.0, discrete_sigmas(alphas_cumprod)
    formulation = EDMFormulation(sigma_data=sigma_data, p_mean=default_p_mean(sigma_data) if p_mean is None else p_mean, p_std=p_std,
                                 schedule_sigmas=schedule_sigmas, prediction_type=prediction_type, weighting=weighting,
                                 snr_gamma=snr_gamma, soft_min_snr=soft_min_snr, noise_offset=noise_offset)
    return formulation, note
