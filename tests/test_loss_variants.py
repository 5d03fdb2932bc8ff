"""kohya's loss and noise options (robust losses, debiased estimation, input perturbation, multi-resolution noise,
timestep and sigma ranges, masked loss) against kohya's sd-scripts code reproduced here from its source
(library/custom_train_functions.py and library/train_util.py at 48d368fa), with its random draws taken from one
torch generator in kohya's order so that both sides see the same numbers."""

from __future__ import annotations

import math

import pytest
import torch

from common.cli import UserError
from test_losses import fake_epsilon_network as fake_network  # a linear map of the input, plus the timestep
from common.losses import (
    DiscreteFormulation, EDMFormulation, LossRecipe, NoiseRecipe, discrete_sigmas, elementwise_loss, formulation_for_scheduler,
    latent_grid_mask, min_snr_weight, multires_noise, sample_lognormal_sigmas,
)


@pytest.fixture(scope="module")
def sdxl_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ---------------------------------------------------------------- kohya's functions, reproduced from source


def kohya_conditional_loss(model_pred, target, loss_type, huber_c=None):
    """train_util.conditional_loss with reduction "none"."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(model_pred, target, reduction="none")
    huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
    if loss_type == "huber":
        return 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
    return 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)


def kohya_huber_threshold(schedule, huber_c, huber_scale, timesteps, noise_scheduler):
    """train_util.get_huber_threshold_if_needed for huber and smooth_l1."""
    if schedule == "exponential":
        alpha = -math.log(huber_c) / noise_scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * huber_scale
    if schedule == "snr":
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    return torch.full((timesteps.shape[0],), huber_c * huber_scale)


def kohya_all_snr(noise_scheduler):
    """custom_train_functions.prepare_scheduler_for_custom_training's all_snr."""
    alphas_cumprod = noise_scheduler.alphas_cumprod
    return (alphas_cumprod.sqrt() / (1.0 - alphas_cumprod).sqrt()) ** 2


def kohya_debiased(loss, timesteps, all_snr, v_prediction):
    """custom_train_functions.apply_debiased_estimation."""
    snr_t = torch.stack([all_snr[t] for t in timesteps])
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)
    weight = 1 / (snr_t + 1) if v_prediction else 1 / torch.sqrt(snr_t)
    return weight * loss


def kohya_pyramid_noise_like(noise, iterations, discount, random_random, randn):
    """custom_train_functions.pyramid_noise_like; `random.random()` and `torch.randn` passed in."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = random_random() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def kohya_apply_masked_loss(loss, alpha_masks):
    """custom_train_functions.apply_masked_loss, alpha-mask branch."""
    mask_image = alpha_masks.to(dtype=loss.dtype).unsqueeze(1)
    mask_image = torch.nn.functional.interpolate(mask_image, size=loss.shape[2:], mode="area")
    return loss * mask_image


def kohya_process_batch_loss(network, latents, noise_scheduler, generator, *, loss_type="l2", huber_c=0.1, huber_scale=1.0,
                             huber_schedule="snr", min_snr_gamma=None, debiased=False, v_prediction=False, ip_noise_gamma=0.0,
                             multires=(0, 0.3), timestep_range=None, alpha_masks=None, all_snr=None):
    """train_util.get_noise_noisy_latents_and_timesteps + train_network.process_batch's loss, per sample (before the
    batch mean), with every draw from `generator` in kohya's order. `all_snr`: the SNR table kohya's weights read
    (default: the one of the scheduler's own alphas_cumprod)."""
    noise = torch.randn(latents.shape, generator=generator)
    if multires[0]:
        noise = kohya_pyramid_noise_like(noise, multires[0], multires[1], lambda: float(torch.rand((), generator=generator)),
                                         lambda *shape: torch.randn(shape, generator=generator))
    low, high = timestep_range or (0, noise_scheduler.config.num_train_timesteps)
    timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator)
    if ip_noise_gamma:
        noisy_latents = noise_scheduler.add_noise(latents, noise + ip_noise_gamma * torch.randn(latents.shape, generator=generator), timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    threshold = kohya_huber_threshold(huber_schedule, huber_c, huber_scale, timesteps, noise_scheduler) if loss_type in ("huber", "smooth_l1") else None
    loss = kohya_conditional_loss(network(noisy_latents, timesteps).float(), target.float(), loss_type, threshold)
    if alpha_masks is not None:
        loss = kohya_apply_masked_loss(loss, alpha_masks)
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    all_snr = kohya_all_snr(noise_scheduler) if all_snr is None else all_snr
    if min_snr_gamma:
        snr = torch.stack([all_snr[t] for t in timesteps])
        min_snr = torch.minimum(snr, torch.ones_like(snr) * min_snr_gamma)
        loss = loss * (min_snr / (snr + 1) if v_prediction else min_snr / snr)
    if debiased:
        loss = kohya_debiased(loss, timesteps, all_snr, v_prediction)
    return loss, noisy_latents, timesteps


def recording(network):
    fed = {}

    def wrapped(model_input, time):
        fed["input"], fed["time"] = model_input, time
        return network(model_input, time)

    return wrapped, fed


# ---------------------------------------------------------------- the discrete formulation equals kohya's loss


KOHYA_CASES = {
    "huber snr": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1),
    "huber exponential scaled": dict(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5),
    "huber constant": dict(loss_type="huber", huber_schedule="constant", huber_c=0.3, huber_scale=0.5),
    "smooth_l1 snr": dict(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.1),
    "l1": dict(loss_type="l1"),
    "debiased": dict(debiased=True),
    "debiased v with min-snr": dict(debiased=True, v_prediction=True, min_snr_gamma=5.0),
    "huber with min-snr": dict(loss_type="huber", min_snr_gamma=5.0),
    "input perturbation": dict(ip_noise_gamma=0.1),
    "multires noise": dict(multires=(6, 0.3)),
    "timestep range": dict(timestep_range=(200, 700)),
    "everything": dict(loss_type="smooth_l1", huber_schedule="exponential", debiased=True, ip_noise_gamma=0.2, multires=(4, 0.5),
                       timestep_range=(10, 990), min_snr_gamma=1.0),
}


@pytest.mark.parametrize("case", KOHYA_CASES)
def test_the_discrete_loss_equals_kohyas_process_batch_draw_for_draw(sdxl_scheduler, case):
    options = KOHYA_CASES[case]
    x0 = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    network = fake_network(0)
    reference, noisy, timesteps = kohya_process_batch_loss(network, x0, sdxl_scheduler, torch.Generator().manual_seed(7), **options)

    formulation = DiscreteFormulation(
        sdxl_scheduler.alphas_cumprod.float(),
        prediction_type="v_prediction" if options.get("v_prediction") else "epsilon",
        snr_gamma=options.get("min_snr_gamma"),
        noise=NoiseRecipe(multires_iterations=options.get("multires", (0, 0.3))[0], multires_discount=options.get("multires", (0, 0.3))[1],
                          input_perturbation=options.get("ip_noise_gamma", 0.0)),
        objective=LossRecipe(loss_type=options.get("loss_type", "l2"), huber_c=options.get("huber_c", 0.1),
                             huber_schedule=options.get("huber_schedule", "snr"), huber_scale=options.get("huber_scale", 1.0),
                             debiased=options.get("debiased", False)),
        timestep_range=options.get("timestep_range"),
    )
    seen, fed = recording(network)
    ours = formulation.loss(seen, x0, torch.Generator().manual_seed(7))
    assert torch.equal(fed["time"], timesteps)
    torch.testing.assert_close(fed["input"], noisy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=1e-7)
    if "timestep_range" in options:
        low, high = options["timestep_range"]
        many = formulation.noised_input(torch.zeros(40_000, 1, 1, 1), torch.Generator().manual_seed(0)).level
        assert int(many.min()) == low and int(many.max()) == high - 1


def test_pseudo_huber_keeps_its_digits_where_kohyas_float32_form_cancels():
    """sqrt(e^2 + c^2) - c in float32 cancels where |e| << c: kohya's form is off by about 1e-3 of the value there,
    ours stays at float32 precision against a float64 evaluation."""
    error = torch.logspace(-4, 1, 200).view(-1, 1, 1, 1)
    c = torch.full((200,), 0.1)
    exact = 2 * 0.1 * error.double() ** 2 / (torch.sqrt(error.double() ** 2 + 0.01) + 0.1)  # the same, no cancellation in float64
    ours = elementwise_loss(error, torch.zeros_like(error), "huber", c).double()
    kohya = kohya_conditional_loss(error, torch.zeros_like(error), "huber", c).double()
    assert float(((ours - exact) / exact).abs().max()) < 1e-6
    assert float(((kohya - exact) / exact).abs().max()) > 1e-4


def test_robust_losses_pull_less_on_outliers_and_agree_with_l2_on_small_errors():
    small, large = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 10.0)
    c = torch.tensor([0.1])
    zero = torch.zeros(1, 1, 1, 1)
    assert float(elementwise_loss(small, zero, "huber", c)) == pytest.approx(1e-6, rel=1e-3)  # e^2 below c
    assert float(elementwise_loss(large, zero, "huber", c)) == pytest.approx(2 * 0.1 * (math.hypot(10, 0.1) - 0.1), rel=1e-6)
    assert float(elementwise_loss(large, zero, "huber", c)) < float(elementwise_loss(large, zero, "l2")) / 40
    assert float(elementwise_loss(small, zero, "smooth_l1", c)) == pytest.approx(1e-6 / 0.1, rel=1e-3)


def test_multires_noise_equals_kohyas_pyramid_noise_with_the_same_draws():
    noise = torch.randn(2, 4, 32, 24, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    reference = kohya_pyramid_noise_like(noise.clone(), 8, 0.4, lambda: float(torch.rand((), generator=generator)),
                                         lambda *shape: torch.randn(shape, generator=generator))
    ours = multires_noise(noise.clone(), 8, 0.4, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert ours.std().item() == pytest.approx(1.0, abs=1e-6)
    low_frequency = torch.nn.functional.avg_pool2d(ours, 8)
    assert low_frequency.std() > 1.3 * torch.nn.functional.avg_pool2d(noise, 8).std()  # coarse levels add what i.i.d. noise lacks


def test_random_strengths_stay_within_their_bound_and_change_per_batch():
    recipe = NoiseRecipe(input_perturbation=0.5, perturbation_random_strength=True)
    noise = torch.zeros(1000, 1, 1, 1)
    generator = torch.Generator().manual_seed(0)
    strengths = [float((recipe.perturbed(noise, generator)).std()) for _ in range(20)]
    assert all(0 <= s < 0.5 for s in strengths) and len({round(s, 4) for s in strengths}) == 20
    offset = NoiseRecipe(offset=0.1, offset_random_strength=True).draw(torch.zeros(2, 4, 8, 8), torch.Generator().manual_seed(1))
    assert offset.shape == (2, 4, 8, 8)


# ---------------------------------------------------------------- EDM: the same options on sigma


def test_edm_loss_on_a_discrete_epsilon_base_applies_the_robust_loss_to_the_epsilon_error(sdxl_scheduler):
    """Under EDM on a discrete base the loss acts on F - F_target, the epsilon error itself: at the schedule's own
    sigmas with the unit-output weight it is kohya's Huber loss of the same epsilon error, threshold schedule included."""
    table = discrete_sigmas(sdxl_scheduler.alphas_cumprod).float()
    generator = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(8, 4, 8, 8, generator=generator), torch.randn(8, 4, 8, 8, generator=generator)
    timesteps = torch.randint(0, 1000, (8,), generator=generator)
    network = fake_network(1)
    abar = sdxl_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    epsilon_hat = network(x_t, timesteps.float())
    for schedule in ("snr", "exponential", "constant"):
        threshold = kohya_huber_threshold(schedule, 0.1, 1.0, timesteps, sdxl_scheduler)
        reference = kohya_conditional_loss(epsilon_hat, noise, "huber", threshold).flatten(1).mean(1)
        formulation = EDMFormulation(sigma_data=1.0, schedule_sigmas=table, weighting="unit-output",
                                     objective=LossRecipe(loss_type="huber", huber_schedule=schedule))
        ours = formulation.loss(network, x0, sigma=table[timesteps], noise=noise)
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_edm_l2_loss_is_still_lambda_times_the_x0_error(sigma_data):
    generator = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(16, 4, 8, 8, generator=generator), torch.randn(16, 4, 8, 8, generator=generator)
    sigma = torch.logspace(-2, 1.5, 16)
    network = fake_network(2)
    formulation = EDMFormulation(sigma_data=sigma_data)
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    noisy = x0 + sigma.view(-1, 1, 1, 1) * noise
    output = network(c_in.view(-1, 1, 1, 1) * noisy, sigma.log() / 4)
    c_skip, c_out = sigma_data**2 / (sigma**2 + sigma_data**2), sigma * sigma_data * c_in
    denoised = c_skip.view(-1, 1, 1, 1) * noisy + c_out.view(-1, 1, 1, 1) * output
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    reference = weight * ((denoised - x0) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(formulation.loss(network, x0, sigma=sigma, noise=noise), reference, rtol=1e-4, atol=1e-6)


def test_edm_snr_huber_threshold_is_a_function_of_sigma_over_sigma_data():
    recipe = LossRecipe(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    sigma = torch.tensor([0.0, 0.5, 1.0, 100.0])
    native = recipe.threshold(sigma * 0.5, 0.5, None, None)
    discrete = recipe.threshold(sigma, 1.0, torch.zeros(4), 1000)
    torch.testing.assert_close(native, discrete)
    torch.testing.assert_close(discrete, torch.tensor([1.0, 0.9 / 2.25 + 0.1, 0.9 / 4 + 0.1, 0.9 / 101**2 + 0.1]))


def test_truncated_lognormal_sigmas_follow_the_conditioned_distribution():
    from scipy import stats

    p_mean, p_std, low, high = -1.2, 1.2, 0.1, 2.0
    sigmas = sample_lognormal_sigmas(20_000, p_mean, p_std, torch.Generator().manual_seed(0), sigma_range=(low, high))
    assert float(sigmas.min()) >= low and float(sigmas.max()) <= high
    a, b = (math.log(low) - p_mean) / p_std, (math.log(high) - p_mean) / p_std
    result = stats.kstest(sigmas.double().log().numpy(), stats.truncnorm(a, b, loc=p_mean, scale=p_std).cdf)
    assert result.statistic < 0.015, result
    plain = sample_lognormal_sigmas(5, p_mean, p_std, torch.Generator().manual_seed(0))
    assert torch.equal(plain, (p_mean + p_std * torch.randn(5, generator=torch.Generator().manual_seed(0))).exp())


def test_timestep_range_under_edm_on_a_discrete_base_becomes_the_tables_sigmas(sdxl_scheduler):
    formulation, _ = formulation_for_scheduler(sdxl_scheduler.config, edm=True, timestep_range=(100, 801))
    table = discrete_sigmas(sdxl_scheduler.alphas_cumprod)
    assert formulation.sigma_range == pytest.approx((float(table[100]), float(table[800])))
    drawn = formulation.noised_input(torch.zeros(2000, 1, 1, 1), torch.Generator().manual_seed(0)).time
    assert float(drawn.min()) >= 100 - 1e-3 and float(drawn.max()) <= 800 + 1e-3


EDM_NATIVE = {"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5, "prediction_type": "epsilon",
              "sigma_min": 0.002, "sigma_max": 80.0}


@pytest.mark.parametrize("options, message", [
    (dict(timestep_range=(100, None)), "an EDM-native base has no timesteps; give the noise range as --min_sigma/--max_sigma"),
    (dict(objective=LossRecipe(loss_type="huber", huber_schedule="exponential")), "--huber_schedule exponential decays over"),
    (dict(objective=LossRecipe(debiased=True)), "--debiased_estimation_loss weights a discrete model's timesteps"),
    (dict(sigma_range=(2.0, 1.0)), "--min_sigma 2 and --max_sigma 1: need 0 <= min < max"),
])
def test_options_without_meaning_on_an_edm_native_base_are_refused_with_the_reason(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        formulation_for_scheduler(EDM_NATIVE, **options)
    assert "\n" not in str(error.value)


def test_sigma_range_on_a_ddpm_run_and_bad_timesteps_are_refused(sdxl_scheduler):
    with pytest.raises(UserError, match="a DDPM run draws timesteps: use --min_timestep/--max_timestep"):
        formulation_for_scheduler(sdxl_scheduler.config, sigma_range=(0.1, None))
    with pytest.raises(UserError, match=r"--min_timestep 500 and --max_timestep 500: need 0 <= min < max <= 1000"):
        formulation_for_scheduler(sdxl_scheduler.config, timestep_range=(500, 500))
    with pytest.raises(UserError, match="--min_timestep 0 and --max_timestep 1001"):
        formulation_for_scheduler(sdxl_scheduler.config, timestep_range=(None, 1001))


# ---------------------------------------------------------------- masked loss


def test_masked_loss_equals_kohyas_apply_masked_loss_and_its_mean(sdxl_scheduler):
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    masks = torch.zeros(3, 64, 64)
    masks[0] = 1
    masks[1, :, :32] = 1  # left half
    masks[2, 16:48, 16:48] = torch.rand(32, 32, generator=torch.Generator().manual_seed(9))
    network = fake_network(3)
    reference, _, _ = kohya_process_batch_loss(network, x0, sdxl_scheduler, torch.Generator().manual_seed(1), alpha_masks=masks,
                                               loss_type="huber")
    formulation = DiscreteFormulation(sdxl_scheduler.alphas_cumprod.float(), objective=LossRecipe(loss_type="huber"))
    torch.testing.assert_close(formulation.loss(network, x0, torch.Generator().manual_seed(1), mask=masks), reference, rtol=2e-5, atol=1e-7)
    unmasked = formulation.loss(network, x0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(reference[0], unmasked[0])
    assert float(reference[1]) < float(unmasked[1])  # half the pixels count: no renormalisation, as kohya
    grid = latent_grid_mask(masks, (8, 8))
    assert grid.shape == (3, 1, 8, 8) and float(grid[1, 0, :, :4].min()) == 1 and float(grid[1, 0, :, 4:].max()) == 0


def test_min_snr_weight_still_multiplies_the_robust_loss(sdxl_scheduler):
    x0 = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    recipe = LossRecipe(loss_type="smooth_l1")
    plain = DiscreteFormulation(sdxl_scheduler.alphas_cumprod.float(), objective=recipe)
    weighted = DiscreteFormulation(sdxl_scheduler.alphas_cumprod.float(), objective=recipe, snr_gamma=5.0)
    network, fed = recording(fake_network(4))
    ours = weighted.loss(network, x0, torch.Generator().manual_seed(3))
    snr = sdxl_scheduler.alphas_cumprod[fed["time"]] / (1 - sdxl_scheduler.alphas_cumprod[fed["time"]])
    torch.testing.assert_close(ours, plain.loss(network, x0, torch.Generator().manual_seed(3)) * min_snr_weight(snr.float(), 5.0, "epsilon"))


@pytest.mark.parametrize("kind", ["edm-native", "edm on a discrete base"])
def test_masks_weight_the_edm_loss_as_they_weight_the_discrete_one(sdxl_scheduler, kind):
    schedule = None if kind == "edm-native" else discrete_sigmas(sdxl_scheduler.alphas_cumprod)
    formulation = EDMFormulation(sigma_data=0.5 if schedule is None else 1.0, schedule_sigmas=schedule)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    network = fake_network(5)
    masks = torch.ones(2, 64, 64)
    masks[1, :, 32:] = 0
    plain = formulation.loss(network, x0, torch.Generator().manual_seed(1))
    masked = formulation.loss(network, x0, torch.Generator().manual_seed(1), mask=masks)
    torch.testing.assert_close(masked[0], plain[0])
    elementwise = formulation.loss(network, x0[1:], torch.Generator().manual_seed(1), mask=torch.zeros(1, 64, 64))
    assert float(elementwise) == 0 and 0 < float(masked[1]) < float(plain[1])
