#!/usr/bin/env python
"""Where train_lora.py's --edm puts its noise levels and its loss weight on a discrete base (SDXL).

    python bench/edm_sigma_table.py        # the two markdown tables of bench/RESULTS.md

For each candidate ln(sigma) ~ N(P_mean, P_std^2), sigma is clamped to SDXL's schedule (scaled_linear betas
0.00085..0.012, 1000 steps: sigma 0.0292..14.6) and mapped to its fractional timestep as training does
(`sigma_to_timestep`). Exact quadrature on a dense grid of ln(sigma), no sampling: the numbers do not move
between runs. "Uniform t" is SDXL's own training (DDPM: uniform timesteps, plain epsilon MSE), for reference.

Two yardsticks for where the loss weight goes, by timestep band:
- epsilon weight: the weight on ||eps_hat - eps||^2 (= lambda(sigma) sigma^2), i.e. how much each band counts
  if the network's epsilon error were the same everywhere; on it SDXL's own training is flat (10/20/30/40 %).
- ideal loss: lambda(sigma) times the error per element left by the best denoiser of Gaussian latents of
  variance sd^2, sigma^2 sd^2 / (sigma^2 + sd^2) (that denoiser is D = c_skip x, the reasoning behind EDM's
  preconditioning, Karras et al. 2022, Sec. 5), i.e. how much each band contributes to the expected loss.
  It matters because an epsilon network's error falls like 1 / sigma^2 at high noise, which the first
  yardstick ignores.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.losses import EDMFormulation, default_p_mean, discrete_sigmas, sigma_to_timestep  # noqa: E402

BANDS = ((0, 100), (100, 300), (300, 600), (600, 1000))
QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
SIGMA_DATA = 1.0  # SDXL latents are scaled to unit variance
CANDIDATES = (  # (label, P_mean, P_std)
    ("EDM paper", -1.2, 1.2),
    ("paper ratio (default)", default_p_mean(SIGMA_DATA), 1.2),
    ("EDM2 latents, as is", -0.4, 1.0),
    ("EDM2 latents, σ_data 0.5 → 1", -0.4 + math.log(2), 1.0),
)


def sdxl_schedule_sigmas() -> torch.Tensor:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    return discrete_sigmas(scheduler.alphas_cumprod)


def lognormal_nodes(p_mean: float, p_std: float, count: int = 200_001, span: float = 10.0):
    """(sigma, probability) on an even grid of z = (ln sigma - P_mean) / P_std over +-span: the normal law's
    mass beyond 10 standard deviations is below 1e-22."""
    z = torch.linspace(-span, span, count, dtype=torch.float64)
    density = torch.exp(-z**2 / 2)
    return (p_mean + p_std * z).exp(), density / density.sum()


def uniform_timestep_nodes(table: torch.Tensor):
    return table.clone(), torch.full_like(table, 1 / len(table))


def band_shares(timesteps: torch.Tensor, mass: torch.Tensor) -> list[float]:
    total = mass.sum()
    return [float(mass[(timesteps >= low) & (timesteps < high)].sum() / total) for low, high in BANDS]


def timestep_quantiles(timesteps: torch.Tensor, probability: torch.Tensor) -> list[float]:
    """Quantiles of the (monotone in sigma, so already sorted) fractional timestep."""
    cumulative = probability.cumsum(0)
    return [float(timesteps[torch.searchsorted(cumulative, torch.tensor(q, dtype=torch.float64))]) for q in QUANTILES]


def describe(sigma: torch.Tensor, probability: torch.Tensor, table: torch.Tensor, weighting: str) -> dict:
    """Sampling statistics and the two loss-weight yardsticks for one distribution of sigma."""
    clamped = sigma.clamp(table[0], table[-1])
    timesteps = sigma_to_timestep(clamped, table)
    weight = EDMFormulation(sigma_data=SIGMA_DATA, schedule_sigmas=table, weighting=weighting).weight(clamped)
    epsilon_weight = weight * clamped**2
    ideal_loss = weight * clamped**2 * SIGMA_DATA**2 / (clamped**2 + SIGMA_DATA**2)
    return {
        "median_sigma": float(clamped[torch.searchsorted(probability.cumsum(0), torch.tensor(0.5, dtype=torch.float64))]),
        "quantiles": timestep_quantiles(timesteps, probability),
        "at_first": float(probability[sigma <= table[0]].sum()),
        "at_last": float(probability[sigma >= table[-1]].sum()),
        "samples": band_shares(timesteps, probability),
        "mean_epsilon_weight": float((probability * epsilon_weight).sum()),
        "epsilon_weight": band_shares(timesteps, probability * epsilon_weight),
        "ideal_loss": band_shares(timesteps, probability * ideal_loss),
    }


def percent(values: list[float]) -> str:
    return " | ".join(f"{100 * v:.1f}" for v in values)


def main() -> None:
    table = sdxl_schedule_sigmas()
    band_names = " | ".join(f"t {low}–{high - 1}" for low, high in BANDS)
    rows = [("uniform t (SDXL's DDPM training)", None, None, uniform_timestep_nodes(table), ("unit-output",))]
    rows += [(label, mean, std, lognormal_nodes(mean, std), ("table1", "unit-output")) for label, mean, std in CANDIDATES]

    print("Sampled noise levels (share of samples in %):\n")
    print(f"| setting | P_mean | P_std | median σ/σ_data | t at 10/25/50/75/90 % | clamped to t=0 | clamped to t=999 | {band_names} |")
    print("| --- " * 11 + "|")
    for label, mean, std, (sigma, probability), _ in rows:
        stats = describe(sigma, probability, table, "unit-output")
        quantiles = " / ".join(f"{q:.0f}" for q in stats["quantiles"])
        parameters = "– | –" if mean is None else f"{mean:.3f} | {std:.1f}"
        print(f"| {label} | {parameters} | {stats['median_sigma'] / SIGMA_DATA:.2f} | {quantiles} | "
              f"{100 * stats['at_first']:.2f} | {100 * stats['at_last']:.2f} | {percent(stats['samples'])} |")

    print("\nWhere the loss weight goes (share in %; epsilon weight, then ideal loss, per band):\n")
    print(f"| setting | weighting | mean ε-weight | ε-weight: {band_names} | ideal loss: {band_names} |")
    print("| --- " * 11 + "|")
    for label, _, _, (sigma, probability), weightings in rows:
        for weighting in weightings:
            stats = describe(sigma, probability, table, weighting)
            name = "ε-MSE" if label.startswith("uniform") else weighting
            print(f"| {label} | {name} | {stats['mean_epsilon_weight']:.2f} | {percent(stats['epsilon_weight'])} | "
                  f"{percent(stats['ideal_loss'])} |")


if __name__ == "__main__":
    main()
