"""v-prediction with zero-terminal SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
Flawed"): the rescaled schedule is the paper's Algorithm 1 and ends at SNR 0, every loss weighting stays finite there
(kohya's too, where kohya reads the right SNR table), training and a conversion run work, and every sampling path
starts at the last timestep with the paper's guidance rescale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoint_helpers import tiny_checkpoint, v_pred_markers
from common.architectures import SDXL_SCHEDULER_CONFIG
from common.cli import UserError
from helpers import parse_webui_parameters, run_cli
from test_loss_variants import kohya_all_snr, kohya_process_batch_loss
from test_losses import fake_epsilon_network
from training_helpers import PROMPT, denoising_losses, train_cli, write_images

ZTSNR_CONFIG = {**SDXL_SCHEDULER_CONFIG, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def lin_algorithm_1(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1, in float64: shift sqrt(abar) so that its last value is 0, scale it so that its
    first is unchanged, and read the betas back off the ratios of consecutive abar."""
    root = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    abar = root**2
    return 1 - torch.cat([abar[:1], abar[1:] / abar[:-1]])


def kohya_zero_terminal_snr(scheduler) -> None:
    """sd-scripts library/custom_train_functions.py `fix_noise_scheduler_betas_for_zero_terminal_snr` (48d368fa): the
    same rescale in the scheduler's float32, replacing its betas, alphas and alphas_cumprod."""
    betas = scheduler.betas
    root = (1 - betas).cumprod(0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    abar = root**2
    betas = 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    scheduler.betas, scheduler.alphas = betas, 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


@pytest.fixture(scope="module")
def ztsnr_file(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ztsnr"), markers=v_pred_markers(), file_name="vpred-ztsnr.safetensors")


def test_the_rescaled_schedule_is_algorithm_1_and_its_terminal_snr_is_exactly_zero():
    from diffusers import DDPMScheduler

    from common.losses import formulation_for_scheduler, snr_from_alphas_cumprod

    from common.losses import zero_terminal_snr_betas

    plain = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    reference = lin_algorithm_1(plain.betas)
    torch.testing.assert_close(zero_terminal_snr_betas(plain.betas), reference, rtol=1e-12, atol=0)
    assert float(reference[-1]) == 1.0, "Algorithm 1 makes the last step pure noise"
    diffusers_float32 = DDPMScheduler.from_config(ZTSNR_CONFIG).betas.double()  # the same algorithm in float32
    assert 1e-5 < float(((diffusers_float32 - reference) / reference).abs().max()) < 1e-3
    formulation, _ = formulation_for_scheduler(ZTSNR_CONFIG)
    assert formulation.prediction_type == "v_prediction"
    assert float(formulation.alphas_cumprod[-1]) == 0.0
    assert float(snr_from_alphas_cumprod(formulation.alphas_cumprod, torch.tensor([999]))) == 0.0
    reference_abar = torch.cumprod(1 - reference, 0)
    assert float(formulation.alphas_cumprod[0]) == pytest.approx(float(torch.cumprod(1 - plain.betas.double(), 0)[0]), rel=1e-6)
    torch.testing.assert_close(formulation.alphas_cumprod.double(), reference_abar, rtol=1e-6, atol=1e-12)


TERMINAL_CASES = {  # what each weighting is at the terminal step (t = 999, SNR 0) of a v-prediction model
    "min-snr": (dict(min_snr_gamma=5.0), "weight min(SNR, gamma) / (SNR + 1) = 0: the step teaches nothing (Hang et al. Eq. 8)"),
    "debiased": (dict(debiased=True), "weight 1 / (SNR + 1) = 1 (Yu et al. 2024, v form)"),
    "huber snr": (dict(loss_type="huber", huber_schedule="snr", huber_c=0.1), "threshold c(sigma = inf) = c"),
    "smooth_l1 snr": (dict(loss_type="smooth_l1", huber_schedule="snr", huber_c=0.2), "threshold c(sigma = inf) = c"),
    "masked": (dict(masked=True), "the mask multiplies the finite v error"),
    "plain": ({}, "the v target is -x0: the model predicts the image from pure noise"),
}


@pytest.mark.parametrize("case", TERMINAL_CASES)
def test_every_weighting_is_finite_at_snr_zero_and_equals_kohyas_on_the_rescaled_schedule(case):
    from diffusers import DDPMScheduler

    from common.losses import DiscreteFormulation, LossRecipe, formulation_for_scheduler

    options, _ = TERMINAL_CASES[case]
    options = dict(options)
    masked = options.pop("masked", False)
    kohya = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    kohya_zero_terminal_snr(kohya)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(4, 64, 64, generator=torch.Generator().manual_seed(3)) > 0.5).float() if masked else None
    network = fake_epsilon_network(0)
    reference, _, timesteps = kohya_process_batch_loss(network, x0, kohya, torch.Generator().manual_seed(5), v_prediction=True,
                                                      timestep_range=(999, 1000), alpha_masks=mask, **options)
    assert (timesteps == 999).all()
    base, _ = formulation_for_scheduler(ZTSNR_CONFIG)
    formulation = DiscreteFormulation(base.alphas_cumprod, prediction_type="v_prediction", snr_gamma=options.get("min_snr_gamma"),
                                      objective=LossRecipe(loss_type=options.get("loss_type", "l2"), huber_c=options.get("huber_c", 0.1),
                                                           huber_schedule=options.get("huber_schedule", "snr"),
                                                           debiased=options.get("debiased", False)),
                                      timestep_range=(999, 1000))
    ours = formulation.loss(network, x0, torch.Generator().manual_seed(5), mask=mask)
    assert torch.isfinite(ours).all() and torch.isfinite(reference).all()
    torch.testing.assert_close(ours, reference, rtol=2e-5, atol=1e-7)
    if case == "min-snr":
        assert float(ours.abs().max()) == 0.0


def test_kohyas_weights_read_the_schedule_from_before_its_rescale_and_ours_do_not():
    """sd-scripts computes all_snr (prepare_scheduler_for_custom_training) before it rescales the betas
    (train_network.py, get_noise_scheduler's callers), so its Min-SNR and debiased weights are those of the original
    schedule while the noise is the rescaled one's: at t = 999 its v weight is 0.0047, not 0. Ours come from the
    schedule the noise is drawn from."""
    from diffusers import DDPMScheduler

    from common.losses import min_snr_weight, snr_from_alphas_cumprod

    kohya = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    all_snr_as_kohya_orders_it = kohya_all_snr(kohya)
    kohya_zero_terminal_snr(kohya)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    network = fake_epsilon_network(0)
    as_kohya_runs, _, _ = kohya_process_batch_loss(network, x0, kohya, torch.Generator().manual_seed(5), v_prediction=True,
                                                  timestep_range=(999, 1000), min_snr_gamma=5.0, all_snr=all_snr_as_kohya_orders_it)
    kohya_weight = float(all_snr_as_kohya_orders_it[999] / (all_snr_as_kohya_orders_it[999] + 1))
    assert kohya_weight == pytest.approx(0.0047, abs=2e-4) and float(as_kohya_runs.min()) > 0
    from common.losses import formulation_for_scheduler

    ours = formulation_for_scheduler(ZTSNR_CONFIG)[0].alphas_cumprod
    assert float(min_snr_weight(snr_from_alphas_cumprod(ours, torch.tensor([999])), 5.0, "v_prediction")) == 0.0


def test_edm_training_on_a_zero_terminal_snr_base_stays_finite():
    """Under --edm the discrete base is seen through its sigmas, the last of which is infinite here."""
    from common.losses import formulation_for_scheduler

    formulation, _ = formulation_for_scheduler(ZTSNR_CONFIG, edm=True, snr_gamma=5.0)
    assert float(formulation.schedule_sigmas[-1]) == float("inf")
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.01, 1.0, 50.0, 400.0, 1e4, 1e8])
    losses = formulation.loss(fake_epsilon_network(0), x0, torch.Generator().manual_seed(1), sigma=sigmas)
    assert torch.isfinite(losses).all(), losses


def test_epsilon_with_zero_terminal_snr_is_refused_before_anything_is_made(tmp_path, capsys):
    code, _, err = train_cli(capsys, "-m", "tiny-sdxl", "--zero_terminal_snr", "--instance_data_dir", write_images(tmp_path / "img", 1),
                             "--instance_prompt", "x", "--output_dir", tmp_path / "out")
    assert code == 2 and "zero-terminal SNR needs a v-prediction model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_conversion_run_says_what_it_does_and_its_samples_use_the_new_flavour(tmp_path, capsys):
    out = tmp_path / "convert"
    code, stdout, err = train_cli(capsys, "-m", "tiny-sdxl", "--v_parameterization", "--zero_terminal_snr", "--instance_data_dir",
                                  write_images(tmp_path / "img", 2), "--instance_prompt", PROMPT, "--resolution", 64,
                                  "--max_train_steps", 2, "--output_dir", out, "--validation_prompt", PROMPT, "--validation_steps", 2,
                                  "--num_validation_images", 1)
    assert code == 0, err
    assert "used as v-prediction with zero-terminal SNR, as the options say" in stdout
    assert "conversion run: the base is epsilon" in stdout and "--prediction_type v_prediction --zero_terminal_snr" in stdout
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["prediction_type"] == "v_prediction" and recorded["zero_terminal_snr"]
    parameters = parse_webui_parameters(Image.open(out / "samples" / "step-2.png").text["parameters"])
    assert parameters["CFG Rescale"] == "0.7"


@pytest.mark.parametrize("sampler", ["euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras", "tcd", "lcm"])
def test_every_sampler_starts_at_the_last_timestep_of_the_rescaled_schedule(sampler, ztsnr_file):
    from common.models import load_sdxl_pipeline
    from common.schedulers import make_scheduler

    scheduler = make_scheduler(sampler, load_sdxl_pipeline(str(ztsnr_file), torch.float32).scheduler)
    assert scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(8)
    assert int(scheduler.timesteps[0]) == 999
    assert float(scheduler.alphas_cumprod[-1]) < 1e-6


def test_infer_on_a_zero_terminal_snr_model_uses_the_papers_guidance_rescale_and_records_it(ztsnr_file, tmp_path, capsys):
    import infer

    def image(out, *extra):
        code, _, err = run_cli(infer.app, ["--model", ztsnr_file, "--prompt", "a dog", "--seed", "2", "--num_inference_steps", "3",
                                           "--output_dir", out, *extra], capsys)
        assert code == 0, err
        png = Image.open(sorted(out.glob("*.png"))[-1])
        return np.asarray(png).astype(int), parse_webui_parameters(png.text["parameters"])

    default, default_parameters = image(tmp_path / "default")
    explicit, _ = image(tmp_path / "explicit", "--guidance_rescale", "0.7")
    none, none_parameters = image(tmp_path / "none", "--guidance_rescale", "0")
    assert default_parameters["CFG Rescale"] == "0.7" and "CFG Rescale" not in none_parameters
    assert np.array_equal(default, explicit) and np.abs(default - none).max() > 0
    code, _, err = run_cli(infer.app, ["--model", ztsnr_file, "--prompt", "x", "--guidance_rescale", "1.5"], capsys)
    assert code == 2 and "--guidance_rescale must be in [0, 1]" in err


def test_gen_class_images_and_mjhq_take_the_same_sampling_options(ztsnr_file, tmp_path, capsys):
    import gen_class_images

    code, _, err = run_cli(gen_class_images.app, ["--model", ztsnr_file, "--class_prompt", "a dog", "--class_data_dir", tmp_path / "class",
                                                  "--num_class_images", 1, "--num_inference_steps", 2, "--width", 64, "--height", 64,
                                                  "--guidance_rescale", 0.3], capsys)
    assert code == 0, err
    assert parse_webui_parameters(Image.open(tmp_path / "class" / "class_000000.png").text["parameters"])["CFG Rescale"] == "0.3"


@pytest.mark.heavy
def test_v_prediction_training_on_a_zero_terminal_snr_model_lowers_its_own_loss(ztsnr_file, tmp_path, capsys):
    images = write_images(tmp_path / "img")
    code, _, err = train_cli(capsys, "-m", ztsnr_file, "--instance_data_dir", images, "--instance_prompt", PROMPT, "--resolution", 64,
                             "--output_dir", tmp_path / "out", "--max_train_steps", 200, "--train_batch_size", 4, "--rank", 8,
                             "--learning_rate", 5e-3, "--checkpointing_steps", 1000, "--seed", 0)
    assert code == 0, err
    timesteps = [50, 200, 500, 800, 990]
    before = denoising_losses(str(ztsnr_file), images, None, timesteps, edm=False)
    after = denoising_losses(str(ztsnr_file), images, tmp_path / "out" / "pytorch_lora_weights.safetensors", timesteps, edm=False)
    assert max(a / b for a, b in zip(after, before)) < 0.95, f"v MSE at t={timesteps}: base {before}, LoRA {after}"
