"""Diffusion training losses: each formula a small pure function, each formulation a small object.

Vocabulary: x0 are clean latents, n ~ N(0, I) noise. Discrete (DDPM/VP) models see
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n; EDM models see x = x0 + sigma n. The two are one
family: sigma_t = sqrt((1 - abar_t) / abar_t) and x_t = x / sqrt(1 + sigma_t^2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

# ---------------------------------------------------------------- discrete (DDPM) formulas


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """The betas rescaled to zero terminal SNR, Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps
    are Flawed"), Algorithm 1, in float64: sqrt(abar) shifted so that its last value is 0 and scaled so that its first is
    unchanged, the betas read back from the ratios of consecutive abar. The last beta is 1: x_T is pure noise.
    (diffusers' `rescale_zero_terminal_snr` does the same in float32, 2e-4 off in the relative size of the first betas.)"""
    root = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    abar = ((root - last) * first / (first - last)) ** 2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def training_alphas_cumprod(scheduler_config) -> torch.Tensor:
    """abar_t of a discrete base's schedule (its config's betas, as diffusers' DDPMScheduler makes them), rescaled to zero
    terminal SNR in float64 where the config says `rescale_betas_zero_snr`; float32, the last value then exactly 0."""
    from diffusers import DDPMScheduler

    schedule = DDPMScheduler.from_config({**dict(scheduler_config), "rescale_betas_zero_snr": False})
    if scheduler_config.get("rescale_betas_zero_snr"):
        return torch.cumprod(1 - zero_terminal_snr_betas(schedule.betas), 0).float()
    return schedule.alphas_cumprod.to(torch.float32)


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


def cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    """The generator for a draw read on the host (a strength, a ratio): the given one if it is a CPU generator, else
    the global CPU one, so that reading it never waits for a device."""
    return generator if generator is None or generator.device.type == "cpu" else None


def multires_noise(noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, "Multi-Resolution Noise for Diffusion Model Training"), as
    kohya's sd-scripts `pyramid_noise_like`: level i adds noise drawn at 1 / r^i of the size (r uniform in [2, 4), drawn
    anew per level; i = 0 is full size) upsampled bilinearly and weighted discount^i, until a side reaches 1; the sum is
    rescaled to unit standard deviation over the whole batch. Each level's r comes from the CPU generator (a CPU
    `generator` if given) so no device value is read back."""
    batch, channels, height, width = noise.shape
    for level in range(iterations):
        ratio = float(torch.rand((), generator=cpu_generator(generator))) * 2 + 2
        low_h, low_w = max(1, int(height / ratio**level)), max(1, int(width / ratio**level))
        coarse = torch.randn((batch, channels, low_h, low_w), generator=generator, device=noise.device, dtype=noise.dtype)
        noise = noise + torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if low_h == 1 or low_w == 1:
            break
    return noise / noise.std()


def input_perturbation(noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise put into the network's input under input perturbation (Ning et al. 2023, "Input Perturbation Reduces
    Exposure Bias in Diffusion Models", Eq. 9): n + gamma xi with fresh xi ~ N(0, I); the loss's target keeps n."""
    if gamma == 0:
        return noise
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


@dataclass(frozen=True)
class NoiseRecipe:
    """The training noise, in kohya's order (sd-scripts `get_noise_noisy_latents_and_timesteps`): i.i.d. noise, plus
    offset noise, made multi-resolution (`draw`), and for the input only, perturbed (`perturbed`). `*_random_strength`: the strength of
    that step is drawn uniformly in [0, strength) once per batch (kohya's --noise_offset_random_strength and
    --ip_noise_gamma_random_strength)."""

    offset: float = 0.0
    offset_random_strength: bool = False
    multires_iterations: int = 0
    multires_discount: float = 0.3
    input_perturbation: float = 0.0
    perturbation_random_strength: bool = False

    def draw(self, like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise of the loss: i.i.d., plus offset noise, made multi-resolution."""
        noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        noise = offset_noise(noise, self._strength(self.offset, self.offset_random_strength, generator), generator)
        if self.multires_iterations:
            noise = multires_noise(noise, self.multires_iterations, self.multires_discount, generator)
        return noise

    def perturbed(self, noise: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The noise the network's input is made with (drawn after the noise level, as kohya draws it)."""
        return input_perturbation(noise, self._strength(self.input_perturbation, self.perturbation_random_strength, generator), generator)

    @staticmethod
    def _strength(strength: float, random_strength: bool, generator) -> float:
        if strength == 0 or not random_strength:
            return strength
        return float(torch.rand((), generator=cpu_generator(generator))) * strength


# ---------------------------------------------------------------- robust losses and loss weights (kohya's --loss_type)

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss at each element of the error e = prediction - target: l2 e^2, l1 |e|, and the pseudo-Huber losses of
    Khrapov et al. 2024 ("Improving Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss")
    with a per-sample threshold c: huber 2c (sqrt(e^2 + c^2) - c), smooth_l1 2 (sqrt(e^2 + c^2) - c), as kohya's
    sd-scripts `conditional_loss`. Both pseudo-Huber losses are e^2 (huber) or e^2 / c (smooth_l1) for |e| << c and
    grow linearly for |e| >> c, so outliers pull less. Evaluated as e^2 / (sqrt(e^2 + c^2) + c), the same number
    without kohya's float32 cancellation (a 1e-3 relative error at |e| = c / 100)."""
    error = prediction.float() - target.float()
    if loss_type == "l2":
        return error.pow(2)
    if loss_type == "l1":
        return error.abs()
    c = huber_c.float().view(-1, *([1] * (error.ndim - 1)))
    # sqrt(e^2 + c^2) - c, written without the cancellation that loses its digits in float32 where |e| << c
    root = error.pow(2) / (torch.sqrt(error.pow(2) + c**2) + c)
    if loss_type == "huber":
        return 2 * c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"loss type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def exponential_huber_c(timesteps: torch.Tensor, huber_c: float, num_timesteps: int) -> torch.Tensor:
    """c(t) = exp(-a t) with a = -ln(c) / T: 1 at t = 0, falling to c at t = T (kohya's `get_huber_threshold_if_needed`,
    "exponential"; Khrapov et al. 2024's exponentially decreasing delta)."""
    return torch.exp(math.log(huber_c) / num_timesteps * timesteps.double()).float()


def snr_huber_c(sigma: torch.Tensor, huber_c: float, sigma_data: float = 1.0) -> torch.Tensor:
    """c(sigma) = (1 - c) / (1 + sigma / sd)^2 + c: 1 at sigma = 0, falling to c at high noise (kohya's
    `get_huber_threshold_if_needed`, "snr", where sigma_t = sqrt((1 - abar_t) / abar_t) and sd = 1). sigma / sd keeps the
    threshold a function of the SNR sd^2 / sigma^2 on EDM-native bases too."""
    return ((1 - huber_c) / (1 + sigma.double() / sigma_data) ** 2 + huber_c).float()


def debiased_estimation_weight(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training", Sec. 4): the epsilon loss
    weighted 1 / sqrt(SNR_t), for a v target 1 / (SNR_t + 1), with SNR capped at 1000 (t = 0's is infinite), as
    kohya's sd-scripts `apply_debiased_estimation`."""
    capped = torch.minimum(snr, torch.full_like(snr, 1000.0))
    return 1 / (capped + 1) if prediction_type == "v_prediction" else 1 / capped.sqrt()


@dataclass(frozen=True)
class LossRecipe:
    """How the error of the network's output becomes a per-sample loss: `loss_type` at each element (thresholds
    scheduled by `huber_schedule`; `huber_scale` multiplies the constant and exponential thresholds, as kohya's
    --huber_scale), optionally masked, averaged over the elements, then weighted (`debiased`)."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    debiased: bool = False

    def threshold(self, sigma: torch.Tensor, sigma_data: float, timestep: torch.Tensor | None, num_timesteps: int | None):
        """The per-sample pseudo-Huber threshold c; None for l2 and l1."""
        if self.loss_type not in ("huber", "smooth_l1"):
            return None
        if self.huber_schedule == "snr":
            return snr_huber_c(sigma, self.huber_c, sigma_data)
        if self.huber_schedule == "exponential":
            return exponential_huber_c(timestep, self.huber_c, num_timesteps) * self.huber_scale
        return torch.full(sigma.shape, self.huber_c * self.huber_scale, device=sigma.device)

    def per_sample(self, prediction: torch.Tensor, target: torch.Tensor, threshold, mask: torch.Tensor | None) -> torch.Tensor:
        """The element losses, times the mask where given (kohya's `apply_masked_loss`), averaged per sample."""
        losses = elementwise_loss(prediction, target, self.loss_type, threshold)
        if mask is not None:
            losses = losses * latent_grid_mask(mask, losses.shape[-2:])
        return losses.flatten(1).mean(1)


def latent_grid_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """A (batch, H, W) pixel mask in [0, 1] on the latent grid: area-averaged, as kohya's `apply_masked_loss`
    resizes it. The masked loss is then the plain mean over every element, masked ones included (kohya's
    normalisation: a half-masked image contributes about half the loss, not a renormalised whole)."""
    mask = mask.float().unsqueeze(1) if mask.ndim == 3 else mask.float()
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = torch.nn.functional.interpolate(mask, size=tuple(size), mode="area")
    return mask


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


def sample_lognormal_sigmas(count: int, p_mean: float, p_std: float, generator=None, device=None,
                            sigma_range: tuple[float, float] | None = None) -> torch.Tensor:
    """ln(sigma) ~ N(P_mean, P_std^2), Karras et al. 2022, Sec. 5 and Table 1 (P_mean -1.2, P_std 1.2).

    sigma_range (low, high): the same distribution conditioned on low <= sigma <= high, drawn by its inverse CDF,
    ln(sigma) = P_mean + P_std Phi^-1(U), U uniform between Phi of the two bounds' standard scores."""
    if sigma_range is None:
        return (p_mean + p_std * torch.randn(count, generator=generator, device=device)).exp()
    low, high = (0.5 * (1 + math.erf((math.log(b) - p_mean) / p_std / math.sqrt(2))) for b in sigma_range)  # Phi, on the host
    uniform = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
    scores = torch.special.ndtri(low + (high - low) * uniform)
    return (p_mean + p_std * scores).exp().clamp(*sigma_range).float()


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
    """DDPM training of a discrete model: uniform timesteps (in `timestep_range`, low inclusive, high exclusive, as
    kohya's --min_timestep/--max_timestep), epsilon or v target, optional Min-SNR-gamma, the `noise` recipe and the
    `objective` (robust losses, debiased estimation)."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    noise: NoiseRecipe = NoiseRecipe()
    objective: LossRecipe = LossRecipe()
    timestep_range: tuple[int, int] | None = None
    base_is_edm = False  # the base itself is a discrete model

    def to(self, device) -> DiscreteFormulation:
        """This formulation with its schedule on `device`, so that no step copies it there."""
        return dataclasses.replace(self, alphas_cumprod=self.alphas_cumprod.to(device))

    def _signal_and_noise_scales(self, timesteps: torch.Tensor, like: torch.Tensor):
        abar = self.alphas_cumprod.to(like.device)[timesteps]
        return _broadcast(abar.sqrt(), like), _broadcast((1 - abar).sqrt(), like)

    def noised_input(self, x0: torch.Tensor, generator=None) -> NoisedInput:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n at uniform timesteps t (Ho et al. 2020, Eq. 4), fed as it is
        (with input perturbation, the n of x_t is perturbed and `noise` is not)."""
        noise = self.noise.draw(x0, generator)
        low, high = self.timestep_range or (0, len(self.alphas_cumprod))
        timesteps = torch.randint(low, high, (x0.shape[0],), generator=generator, device=x0.device)
        alpha, sigma = self._signal_and_noise_scales(timesteps, x0)
        noisy = alpha * x0 + sigma * self.noise.perturbed(noise, generator)
        return NoisedInput(model_input=noisy, time=timesteps, noisy=noisy, noise=noise, level=timesteps)

    def loss(self, network: Denoiser, x0: torch.Tensor, generator=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weighted loss; `network(model_input, timestep)` returns the UNet output; `mask` (batch, H, W)
        weights the pixels (--masked_loss)."""
        drawn = self.noised_input(x0, generator)
        if self.prediction_type == "epsilon":
            target = drawn.noise
        else:
            target = v_target(x0, drawn.noise, *self._signal_and_noise_scales(drawn.level, x0))
        snr = snr_from_alphas_cumprod(self.alphas_cumprod, drawn.level)
        threshold = self.objective.threshold(snr.double().rsqrt(), 1.0, drawn.level, len(self.alphas_cumprod))
        losses = self.objective.per_sample(network(drawn.model_input, drawn.time), target, threshold, mask)
        if self.snr_gamma:
            losses = losses * min_snr_weight(snr, self.snr_gamma, self.prediction_type)
        if self.objective.debiased:
            losses = losses * debiased_estimation_weight(snr, self.prediction_type)
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
    noise: NoiseRecipe = NoiseRecipe()
    objective: LossRecipe = LossRecipe()
    sigma_range: tuple[float, float] | None = None  # sigmas drawn from the log-normal conditioned on this range

    def __post_init__(self):
        # the discrete schedule's sigma range, read once here: read in a step it would wait for the device
        table = self.schedule_sigmas
        self._schedule_range = None if table is None else (float(table[0]), float(table[-1]))

    def to(self, device) -> EDMFormulation:
        """This formulation with its schedule on `device`, so that no step copies it there."""
        if self.schedule_sigmas is None:
            return self
        return dataclasses.replace(self, schedule_sigmas=self.schedule_sigmas.to(device))

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
        fixed evaluations). With input perturbation the n of x is perturbed; the target x0 has no noise in it."""
        if sigma is None:
            sigma = sample_lognormal_sigmas(x0.shape[0], self.p_mean, self.p_std, generator, x0.device, self.sigma_range)
        if self._schedule_range is not None:
            # a discrete model knows only its schedule's noise levels: noise and conditioning must agree
            sigma = sigma.clamp(*self._schedule_range)
        if noise is None:
            noise = self.noise.draw(x0, generator)
        noisy = x0 + _broadcast(sigma, x0) * self.noise.perturbed(noise, generator)
        _, _, c_in, time = self.preconditioning(sigma)
        return NoisedInput(model_input=_broadcast(c_in, noisy) * noisy, time=time, noisy=noisy, noise=noise, level=sigma)

    def loss(self, network: Denoiser, x0: torch.Tensor, generator=None, sigma: torch.Tensor | None = None, noise=None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weighted loss lambda(sigma) ||D(x; sigma) - x0||^2 (Karras et al. 2022, Eq. 8).

        It is computed as lambda c_out^2 ||F - F_target||^2 with F_target = (x0 - c_skip x) / c_out, the same number,
        so that a robust loss (--loss_type) acts on the error of the network's own output, as kohya's acts on the
        epsilon error; on a discrete epsilon base F - F_target is exactly that epsilon error. The weight multiplies
        outside, as kohya's Min-SNR weight does."""
        drawn = self.noised_input(x0, generator, sigma=sigma, noise=noise)
        c_skip, c_out, _, _ = self.preconditioning(drawn.level)
        target = (x0 - _broadcast(c_skip, x0) * drawn.noisy) / _broadcast(c_out, x0)
        timestep = None if self.schedule_sigmas is None else drawn.time
        steps = None if self.schedule_sigmas is None else len(self.schedule_sigmas)
        threshold = self.objective.threshold(drawn.level, self.sigma_data, timestep, steps)
        losses = self.objective.per_sample(network(drawn.model_input, drawn.time), target, threshold, mask)
        return self.weight(drawn.level) * c_out.float() ** 2 * losses


def prior_preservation_loss(instance_losses: torch.Tensor, class_losses: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2023, Eq. 2): the instance loss plus prior_loss_weight times the
    loss on the model's own class images, each a mean of per-sample (already weighted) losses."""
    return instance_losses.mean() + prior_loss_weight * class_losses.mean()


def formulation_for_scheduler(scheduler_config, *, edm: bool = False, prediction_type: str | None = None,
                              p_mean: float | None = None, p_std: float = 1.2, snr_gamma: float | None = None,
                              soft_min_snr: bool = False, noise: NoiseRecipe = NoiseRecipe(), objective: LossRecipe = LossRecipe(),
                              timestep_range: tuple[int | None, int | None] = (None, None),
                              sigma_range: tuple[float | None, float | None] = (None, None), base_formulation: str = "auto",
                              weighting: str = "table1") -> tuple[DiscreteFormulation | EDMFormulation, str]:
    """(formulation, note): the formulation a model trains with, chosen once from its scheduler config, and
    the one-line reason to show when the config had to be read one way among two (`decide_base_formulation`).
    EDM on an EDM-native base (overridden by `base_formulation`) or when asked (`edm`, a discrete base seen
    through its sigmas), else DDPM. The prediction type is the scheduler's; on a discrete base
    `prediction_type` may change the training target, on an EDM-native base it may only repeat the
    scheduler's, which decides how the sampler reads the output. p_mean None: `default_p_mean(sigma_data)`.

    The noise-level range is given as timesteps (`timestep_range`, kohya's min/max timestep) or as sigmas
    (`sigma_range`, EDM's): on a discrete base under EDM, timesteps become the sigmas of the schedule's table; an
    EDM-native base has no timesteps, and DDPM no sigmas to draw. Options a formulation has no meaning for are
    refused with the reason (UserError)."""
    from diffusers import DDPMScheduler

    from common.cli import UserError
    from common.models import decide_base_formulation

    scheduler_type = scheduler_config.get("prediction_type") or "epsilon"
    accepted = " or ".join(EDM_PREDICTION_TYPES)
    edm_native, note = decide_base_formulation(scheduler_config, base_formulation)
    asks_timesteps, asks_sigmas = timestep_range != (None, None), sigma_range != (None, None)
    if edm_native:
        if prediction_type not in (None, scheduler_type):
            raise UserError(f"--prediction_type {prediction_type} contradicts this EDM base's scheduler ({scheduler_type}), "
                            f"which decides how its output is read when sampling; leave --prediction_type out")
        if scheduler_type not in EDM_PREDICTION_TYPES:
            raise UserError(f"this EDM base's scheduler has prediction_type {scheduler_type!r}; EDM preconditioning is defined for {accepted}")
        if asks_timesteps:
            raise UserError("--min_timestep/--max_timestep: an EDM-native base has no timesteps; give the noise range as "
                            "--min_sigma/--max_sigma")
        if objective.loss_type in ("huber", "smooth_l1") and objective.huber_schedule == "exponential":
            raise UserError("--huber_schedule exponential decays over a discrete model's timesteps, which an EDM-native base "
                            "has not; use snr (a function of sigma) or constant")
        sigma_data, schedule_sigmas, prediction_type = float(scheduler_config.get("sigma_data") or 0.5), None, scheduler_type
    else:
        prediction_type = prediction_type or scheduler_type
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise UserError(f"prediction_type {prediction_type!r} is not supported for training; use {accepted}")
        alphas_cumprod = training_alphas_cumprod(scheduler_config)
        steps = len(alphas_cumprod)
        low, high = timestep_range[0] or 0, steps if timestep_range[1] is None else timestep_range[1]
        if not 0 <= low < high <= steps:
            raise UserError(f"--min_timestep {low} and --max_timestep {high}: need 0 <= min < max <= {steps} (max is exclusive)")
        if not edm:
            if asks_sigmas:
                raise UserError("--min_sigma/--max_sigma are for EDM training; a DDPM run draws timesteps: use "
                                "--min_timestep/--max_timestep (or add --edm)")
            return DiscreteFormulation(alphas_cumprod, prediction_type=prediction_type, snr_gamma=snr_gamma, noise=noise,
                                       objective=objective, timestep_range=(low, high) if asks_timesteps else None), note
        # a discrete VP model's latents are scaled to unit variance, its implicit sigma_data (k-diffusion)
        sigma_data, schedule_sigmas = 1.0, discrete_sigmas(alphas_cumprod)
        if asks_timesteps:
            if asks_sigmas:
                raise UserError("give the noise range once: --min_timestep/--max_timestep or --min_sigma/--max_sigma")
            sigma_range = (float(schedule_sigmas[low]), float(schedule_sigmas[high - 1]))
    if objective.debiased:
        raise UserError("--debiased_estimation_loss weights a discrete model's timesteps by 1/sqrt(SNR); EDM weights its "
                        "noise levels with lambda(sigma): use --edm_weighting or --snr_gamma instead")
    if asks_sigmas or asks_timesteps:
        low = sigma_range[0] if sigma_range[0] is not None else 0.0
        high = sigma_range[1] if sigma_range[1] is not None else math.inf
        if not 0 <= low < high:
            raise UserError(f"--min_sigma {low:g} and --max_sigma {high:g}: need 0 <= min < max")
        sigma_range = (max(low, 1e-30), high)
    else:
        sigma_range = None
    formulation = EDMFormulation(sigma_data=sigma_data, p_mean=default_p_mean(sigma_data) if p_mean is None else p_mean, p_std=p_std,
                                 schedule_sigmas=schedule_sigmas, prediction_type=prediction_type, weighting=weighting,
                                 snr_gamma=snr_gamma, soft_min_snr=soft_min_snr, noise=noise, objective=objective,
                                 sigma_range=sigma_range)
    return formulation, note
