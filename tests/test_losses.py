"""Loss formulas against independent evaluations: the reference script's weights, EDM Table 1, k-diffusion."""

from __future__ import annotations

import math

import pytest
import torch

from common.cli import UserError
from common.losses import (
    DiscreteFormulation,
    EDMFormulation,
    default_p_mean,
    discrete_sigmas,
    edm_loss_weight,
    edm_min_snr_weight,
    edm_preconditioning,
    formulation_for_scheduler,
    min_snr_weight,
    sample_lognormal_sigmas,
    sigma_to_timestep,
    snr_from_alphas_cumprod,
    v_target,
)


@pytest.fixture(scope="module")
def sdxl_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_reference_scripts_formula(sdxl_scheduler, prediction_type):
    from diffusers.training_utils import compute_snr

    timesteps = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(0))
    gamma = 5.0
    # the diffusers DreamBooth scripts' lines, verbatim in substance
    snr = compute_snr(sdxl_scheduler, timesteps)
    reference = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    reference = reference / snr if prediction_type == "epsilon" else reference / (snr + 1)
    ours = min_snr_weight(snr_from_alphas_cumprod(sdxl_scheduler.alphas_cumprod, timesteps), gamma, prediction_type)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)


def test_v_target_equals_diffusers_get_velocity(sdxl_scheduler):
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([0, 250, 600, 999])
    abar = sdxl_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(
        v_target(x0, noise, abar.sqrt(), (1 - abar).sqrt()), sdxl_scheduler.get_velocity(x0, noise, timesteps)
    )


def test_edm_preconditioning_equals_table_1_in_float64():
    sigma_data = 0.5
    sigmas = torch.tensor([0.002, 0.01, 0.3, 1.0, 5.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigmas, sigma_data)
    for i, s in enumerate(sigmas.tolist()):
        assert c_skip[i].item() == pytest.approx(sigma_data**2 / (s**2 + sigma_data**2), rel=1e-14)
        assert c_out[i].item() == pytest.approx(s * sigma_data / math.sqrt(sigma_data**2 + s**2), rel=1e-14)
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(s**2 + sigma_data**2), rel=1e-14)
        assert c_noise[i].item() == pytest.approx(0.25 * math.log(s), rel=1e-14)


def test_edm_preconditioning_equals_the_playground_scheduler():
    from diffusers import EDMDPMSolverMultistepScheduler

    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=0.5, sigma_min=0.002, sigma_max=80.0, prediction_type="epsilon")
    sigma = torch.tensor([0.05, 0.7, 12.0], dtype=torch.float64)
    x, output = torch.randn(3, 4, 2, 2, dtype=torch.float64), torch.randn(3, 4, 2, 2, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma, 0.5)
    column = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(c_in.view(-1, 1, 1, 1) * x, scheduler.precondition_inputs(x, column))
    torch.testing.assert_close(c_noise, scheduler.precondition_noise(sigma))
    torch.testing.assert_close(
        c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * output, scheduler.precondition_outputs(x, output, column)
    )


def test_edm_weight_makes_the_loss_on_the_network_output_unit_weighted():
    sigmas = torch.logspace(-3, 2, 50, dtype=torch.float64)
    _, c_out, _, _ = edm_preconditioning(sigmas, 0.5)
    torch.testing.assert_close(edm_loss_weight(sigmas, 0.5) * c_out**2, torch.ones_like(sigmas))


def test_sigma_to_timestep_is_exact_at_table_points_monotone_and_clipped(sdxl_scheduler):
    table = discrete_sigmas(sdxl_scheduler.alphas_cumprod)
    assert torch.equal(sigma_to_timestep(table, table), torch.arange(1000, dtype=torch.float64))
    dense = torch.logspace(-3, 2, 2000, dtype=torch.float64)
    timesteps = sigma_to_timestep(dense, table)
    assert bool((timesteps[1:] >= timesteps[:-1]).all()), "the map must be monotone"
    assert timesteps.min().item() == 0 and timesteps.max().item() == 999, "outside the schedule it clips"
    middle = (table[400] * table[401]).sqrt()  # the log-midpoint of two table entries
    assert sigma_to_timestep(middle.view(1), table).item() == pytest.approx(400.5, abs=1e-9)


def fake_epsilon_network(seed: int):
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.3

    def network(model_input, timestep):
        return torch.einsum("oc,bchw->bohw", weight, model_input) + 0.001 * timestep.view(-1, 1, 1, 1)

    return network


def test_reference_edm_style_loss_on_sdxl_is_the_plain_epsilon_loss_and_ours_is_not(sdxl_scheduler):
    """The reference script's --do_edm_style_training on a discrete base: sigma of a uniformly drawn
    timestep, input x / sqrt(sigma^2 + 1), x0-estimate x - sigma eps_hat, weight sigma^-2."""
    generator = torch.Generator().manual_seed(1)
    network = fake_epsilon_network(0)
    x0, noise = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    table = discrete_sigmas(sdxl_scheduler.alphas_cumprod).float()
    sigma = table[timesteps].view(-1, 1, 1, 1)
    noisy = x0 + sigma * noise
    prediction = network(noisy / (sigma**2 + 1) ** 0.5, timesteps.float())
    reference = (sigma**-2 * ((noisy - sigma * prediction) - x0) ** 2).flatten(1).mean(1)
    abar = sdxl_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    plain_epsilon = ((network(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, timesteps.float()) - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(reference, plain_epsilon, rtol=1e-4, atol=1e-6)

    ours = EDMFormulation(sigma_data=1.0, schedule_sigmas=table).loss(network, x0, sigma=table[timesteps], noise=noise)
    # same sigmas and noise: our weight on the epsilon error is lambda * sigma^2 = 1 + sigma^2 / sigma_data^2
    torch.testing.assert_close(ours, (1 + table[timesteps] ** 2) * plain_epsilon, rtol=1e-4, atol=1e-6)
    assert (ours / plain_epsilon).max() > 10, "on SDXL our --edm reweights noise levels; the reference cannot"
    unit_output = EDMFormulation(sigma_data=1.0, schedule_sigmas=table, weighting="unit-output")
    torch.testing.assert_close(unit_output.loss(network, x0, sigma=table[timesteps], noise=noise), plain_epsilon, rtol=1e-4, atol=1e-6)


def test_edm_min_snr_on_a_vp_model_reduces_to_epsilon_space_min_snr(sdxl_scheduler):
    generator = torch.Generator().manual_seed(2)
    timesteps = torch.randint(0, 1000, (64,), generator=generator)
    abar = sdxl_scheduler.alphas_cumprod[timesteps].double()
    x0, noise, epsilon_hat = (torch.randn(64, 16, generator=generator, dtype=torch.float64) for _ in range(3))
    alpha, s = abar.sqrt().view(-1, 1), (1 - abar).sqrt().view(-1, 1)
    x_t = alpha * x0 + s * noise
    x0_hat = (x_t - s * epsilon_hat) / alpha
    gamma = 5.0
    snr = abar / (1 - abar)
    epsilon_space = min_snr_weight(snr, gamma, "epsilon") * ((epsilon_hat - noise) ** 2).mean(1)
    sigma_vp = ((1 - abar) / abar).sqrt()
    x0_space = edm_min_snr_weight(sigma_vp, 1.0, gamma) * ((x0_hat - x0) ** 2).mean(1)
    torch.testing.assert_close(x0_space, epsilon_space, rtol=1e-10, atol=1e-12)


def test_soft_min_snr_with_gamma_one_equals_k_diffusion_soft_min_snr():
    sigmas, sigma_data = torch.logspace(-3, 2, 40, dtype=torch.float64), 0.5
    _, c_out, _, _ = edm_preconditioning(sigmas, sigma_data)
    k_diffusion = (sigmas * sigma_data) ** 2 / (sigmas**2 + sigma_data**2) ** 2  # weight on F, k_diffusion/layers.py
    torch.testing.assert_close(edm_min_snr_weight(sigmas, sigma_data, 1.0, soft=True) * c_out**2, k_diffusion)


def test_hard_min_snr_under_edm_caps_the_weight_on_the_network_output():
    sigmas = torch.logspace(-3, 2, 40, dtype=torch.float64)
    _, c_out, _, _ = edm_preconditioning(sigmas, 0.5)
    on_output = edm_min_snr_weight(sigmas, 0.5, 5.0) * c_out**2
    snr = 0.25 / sigmas**2
    torch.testing.assert_close(on_output, torch.minimum(snr, torch.full_like(snr, 5.0)) / (1 + snr))
    assert on_output.max() <= 1


def test_lognormal_sigmas_follow_p_mean_and_p_std():
    log_sigmas = sample_lognormal_sigmas(200_000, -1.2, 1.2, torch.Generator().manual_seed(0)).log()
    assert log_sigmas.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigmas.std().item() == pytest.approx(1.2, abs=0.01)


def test_discrete_formulation_min_snr_changes_only_the_weights(sdxl_scheduler):
    x0 = torch.randn(16, 4, 8, 8)
    network = fake_epsilon_network(3)
    plain = DiscreteFormulation(sdxl_scheduler.alphas_cumprod).loss(network, x0, torch.Generator().manual_seed(5))
    weighted = DiscreteFormulation(sdxl_scheduler.alphas_cumprod, snr_gamma=5.0).loss(network, x0, torch.Generator().manual_seed(5))
    ratio = weighted / plain
    assert bool((ratio <= 1 + 1e-6).all()) and bool((ratio < 0.999).any())


# ---------------------------------------------------------------- prediction types, base formulations, defaults


def recording_network(output: torch.Tensor):
    """A fake network with a fixed output that keeps what it was fed."""
    fed = {}

    def network(model_input, time):
        fed["input"], fed["time"] = model_input, time
        return output

    return network, fed


@pytest.mark.parametrize("scheduler_name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_denoiser_equals_the_schedulers_preconditioning_in_float64(scheduler_name, prediction_type, sigma_data):
    import diffusers

    scheduler = getattr(diffusers, scheduler_name)(sigma_data=sigma_data, prediction_type=prediction_type)
    formulation, _ = formulation_for_scheduler(scheduler.config)
    assert (formulation.prediction_type, formulation.sigma_data, formulation.schedule_sigmas) == (prediction_type, sigma_data, None)
    generator = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.002, 0.05, 0.7, 12.0, 80.0], dtype=torch.float64)
    x, output = (torch.randn(5, 4, 2, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    network, fed = recording_network(output)
    ours = formulation.denoise(network, x, sigma)
    column = sigma.view(-1, 1, 1, 1)
    expected = {
        "D": scheduler.precondition_outputs(x, output, column),
        "network input": scheduler.precondition_inputs(x, column),
        "network time": scheduler.precondition_noise(sigma),
    }
    for name, got in (("D", ours), ("network input", fed["input"]), ("network time", fed["time"])):
        difference = (got - expected[name]).abs().max().item()
        assert difference <= 1e-12, f"{name}: largest difference {difference} ({prediction_type}, sigma_data {sigma_data})"


def test_edm_prediction_types_diffusers_does_not_define_are_refused_in_one_line():
    from diffusers import EDMDPMSolverMultistepScheduler

    scheduler = EDMDPMSolverMultistepScheduler(prediction_type="sample")  # its signature lists "sample"...
    with pytest.raises(ValueError, match="sample"):  # ...but its preconditioning refuses it
        scheduler.precondition_outputs(torch.zeros(1), torch.zeros(1), torch.ones(1))
    with pytest.raises(UserError) as refused:
        formulation_for_scheduler(scheduler.config)
    message = str(refused.value)
    assert "\n" not in message and "'sample'" in message and "epsilon or v_prediction" in message, message


def test_prediction_type_flag_may_only_repeat_an_edm_bases_own():
    from diffusers import EDMEulerScheduler

    config = EDMEulerScheduler(prediction_type="v_prediction").config
    assert formulation_for_scheduler(config, prediction_type="v_prediction")[0].prediction_type == "v_prediction"
    with pytest.raises(UserError, match="--prediction_type epsilon contradicts this EDM base's scheduler \\(v_prediction\\)"):
        formulation_for_scheduler(config, prediction_type="epsilon")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_on_a_discrete_base_recovers_x0_as_the_ddpm_formulas_do(sdxl_scheduler, prediction_type):
    """At the schedule's own sigmas, D from VP preconditioning is the x0 estimate of DDPM (Ho et al. 2020,
    Eq. 15) or of v-prediction (Salimans & Ho 2022: x0 = alpha x_t - s v), written from alphas_cumprod."""
    config = {**sdxl_scheduler.config, "prediction_type": prediction_type}
    formulation, _ = formulation_for_scheduler(config, edm=True)
    assert formulation.prediction_type == prediction_type and formulation.schedule_sigmas is not None
    formulation.schedule_sigmas = discrete_sigmas(sdxl_scheduler.alphas_cumprod)  # float64 for this check
    timesteps = torch.tensor([0, 120, 500, 999])
    sigma = formulation.schedule_sigmas[timesteps]
    generator = torch.Generator().manual_seed(4)
    x, output = (torch.randn(4, 4, 2, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    network, fed = recording_network(output)
    ours = formulation.denoise(network, x, sigma)
    abar = sdxl_scheduler.alphas_cumprod[timesteps].double().view(-1, 1, 1, 1)
    x_t = x * abar.sqrt()  # x = x0 + sigma n is x_t / sqrt(abar)
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - abar).sqrt() * output) / abar.sqrt()
    else:
        x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * output
    torch.testing.assert_close(fed["input"], x_t, rtol=1e-12, atol=1e-12)
    assert torch.equal(fed["time"], timesteps.double())
    torch.testing.assert_close(ours, x0, rtol=1e-10, atol=1e-10)


def test_the_two_weightings_differ_only_on_epsilon_bases(sdxl_scheduler):
    sigma = torch.logspace(-1.5, 1.1, 30, dtype=torch.float64)
    table = discrete_sigmas(sdxl_scheduler.alphas_cumprod)
    for kind in ({"sigma_data": 0.5}, {"sigma_data": 1.0, "prediction_type": "v_prediction"},
                 {"sigma_data": 1.0, "schedule_sigmas": table, "prediction_type": "v_prediction"}):
        table1, unit = (EDMFormulation(**kind, weighting=w).weight(sigma) for w in ("table1", "unit-output"))
        torch.testing.assert_close(table1, unit, rtol=1e-12, atol=0, msg=f"{kind.keys()}")
    on_epsilon = [EDMFormulation(sigma_data=1.0, schedule_sigmas=table, weighting=w).weight(sigma) * sigma**2 for w in ("table1", "unit-output")]
    torch.testing.assert_close(on_epsilon[0], 1 + sigma**2)
    torch.testing.assert_close(on_epsilon[1], torch.ones_like(sigma))


def test_default_p_mean_keeps_the_papers_sigma_over_sigma_data(sdxl_scheduler):
    assert default_p_mean(0.5) == -1.2
    for sigma_data in (0.25, 1.0, 2.0):  # the median sigma, exp(P_mean), is the paper's 0.60 sigma_data
        assert math.exp(default_p_mean(sigma_data)) / sigma_data == pytest.approx(math.exp(-1.2) / 0.5, rel=1e-12)
    on_sdxl, _ = formulation_for_scheduler(sdxl_scheduler.config, edm=True)
    assert (on_sdxl.p_mean, on_sdxl.p_std, on_sdxl.weighting) == (pytest.approx(-1.2 + math.log(2), abs=1e-15), 1.2, "table1")
    assert formulation_for_scheduler(sdxl_scheduler.config, edm=True, p_mean=-1.2)[0].p_mean == -1.2


def edm_sampler_config_with_betas(folder) -> dict:
    """What a discrete SDXL model's scheduler_config.json holds after an EDM sampler was swapped in and saved."""
    import json

    from diffusers import EDMDPMSolverMultistepScheduler, EulerDiscreteScheduler

    sdxl = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    EDMDPMSolverMultistepScheduler.from_config(sdxl.config).save_config(folder)
    return json.loads((folder / "scheduler_config.json").read_text())


def test_an_edm_sampler_config_with_betas_trains_as_the_discrete_model_it_is(sdxl_scheduler, tmp_path):
    config = edm_sampler_config_with_betas(tmp_path)
    assert config["_class_name"] == "EDMDPMSolverMultistepScheduler" and config["beta_schedule"] == "scaled_linear"
    ddpm, note = formulation_for_scheduler(config)
    assert isinstance(ddpm, DiscreteFormulation) and not ddpm.base_is_edm
    assert "treating the base as a discrete DDPM model" in note and "\n" not in note, note
    torch.testing.assert_close(ddpm.alphas_cumprod, sdxl_scheduler.alphas_cumprod.float(), rtol=0, atol=0)
    edm, _ = formulation_for_scheduler(config, edm=True)
    assert edm.schedule_sigmas is not None and edm.sigma_data == 1.0 and not edm.base_is_edm
    native, note = formulation_for_scheduler(config, base_formulation="edm-native")
    assert native.schedule_sigmas is None and native.sigma_data == 0.5 and native.p_mean == -1.2 and native.base_is_edm
    assert "read as EDM-native, as --base_formulation says" in note, note


@pytest.mark.parametrize("kind", ["ddpm", "edm on a discrete base", "edm-native"])
def test_the_loss_feeds_the_network_the_noised_input_the_formulation_draws(sdxl_scheduler, kind):
    """`noised_input` is what `loss` feeds the network (ZipLoRA draws its inputs with it), and it is the paper's
    noising: x_t = sqrt(abar) x0 + sqrt(1 - abar) n for DDPM (Ho et al. 2020, Eq. 4), c_in (x0 + sigma n) at the
    formulation's time condition under EDM (Karras et al. 2022, Table 1), evaluated here again in float64."""
    if kind == "ddpm":
        formulation = DiscreteFormulation(sdxl_scheduler.alphas_cumprod)
    elif kind == "edm on a discrete base":
        formulation = EDMFormulation(sigma_data=1.0, schedule_sigmas=discrete_sigmas(sdxl_scheduler.alphas_cumprod))
    else:
        formulation = EDMFormulation(sigma_data=0.5)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    drawn = formulation.noised_input(x0, torch.Generator().manual_seed(2))
    network, fed = recording_network(torch.zeros_like(x0))
    formulation.loss(network, x0, torch.Generator().manual_seed(2))
    assert torch.equal(fed["input"], drawn.model_input) and torch.equal(fed["time"], drawn.time)
    noise, x0 = drawn.noise.double(), x0.double()
    if kind == "ddpm":
        abar = sdxl_scheduler.alphas_cumprod[drawn.level].double().view(-1, 1, 1, 1)
        expected = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        assert torch.equal(drawn.time, drawn.level)
    else:
        sigma = drawn.level.double().view(-1, 1, 1, 1)
        c_in = 1 / (sigma**2 + formulation.sigma_data**2).sqrt()
        expected = c_in * (x0 + sigma * noise)
        torch.testing.assert_close(drawn.noisy.double(), x0 + sigma * noise, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(drawn.model_input.double(), expected, rtol=1e-6, atol=1e-6)
