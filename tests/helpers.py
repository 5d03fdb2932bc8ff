"""Helpers the tests share: loading tiny pipelines, LoRA files made with peft, in-process CLI runs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def load_pipe(path: str):
    from common.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(path, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_cli(app, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a script's Typer app in-process exactly as `python script.py ARGV` would; (exit code, stdout, stderr).
    With capsys None (a fixture wider than one test has none) the output is left to pytest and comes back empty."""
    from common.cli import run_app

    saved_argv = sys.argv
    sys.argv = ["script.py", *map(str, argv)]
    code = 0
    try:
        run_app(app)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_webui_parameters(text: str) -> dict[str, str]:
    """Read back a WebUI `parameters` text: prompt, negative prompt and the `Key: value` fields."""
    import json
    import re

    lines = text.split("\n")
    fields_line = lines[-1]
    parsed = {"prompt": lines[0]}
    for line in lines[1:-1]:
        if line.startswith("Negative prompt: "):
            parsed["negative_prompt"] = line[len("Negative prompt: ") :]
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', fields_line):
        parsed[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return parsed


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_peft_lora(
    model_path: str, out_dir: Path, rank: int = 4, alpha: float = 4, text_encoders: bool = True, seed: int = 0
) -> Path:
    """A diffusers-format LoRA with non-zero random A and B (peft's init_lora_weights=False), alpha in its metadata."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = load_pipe(model_path)
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, init_lora_weights=False)
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet), "unet_lora_adapter_metadata": unet_config.to_dict()}
    if text_encoders:
        text_config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
        pipe.text_encoder.add_adapter(text_config)
        pipe.text_encoder_2.add_adapter(text_config)
        layers.update(
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
            text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
            text_encoder_lora_adapter_metadata=text_config.to_dict(),
            text_encoder_2_lora_adapter_metadata=text_config.to_dict(),
        )
    StableDiffusionXLPipeline.save_lora_weights(out_dir, **layers)
    return out_dir / "pytorch_lora_weights.safetensors"


def generate_array(pipe, prompt: str = "a photo of a dog", seed: int = 0, steps: int = 4, **kwargs):
    """One float32 image in [0, 1] as a numpy array, from a fixed CPU generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images[0]


def make_dora_lora(model_path: str, out_dir: Path, rank: int = 4, alpha: float = 4, seed: int = 0) -> Path:
    """A diffusers-format UNet DoRA with random non-zero factors and, as after training, magnitudes that
    differ from the adapted rows' norms (peft initialises them equal, which would make m / ||W + dW|| = 1)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = load_pipe(model_path)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=UNET_TARGETS, use_dora=True, init_lora_weights=False)
    pipe.unet.add_adapter(config)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.randn_like(parameter))
    StableDiffusionXLPipeline.save_lora_weights(out_dir, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                unet_lora_adapter_metadata=config.to_dict())
    return out_dir / "pytorch_lora_weights.safetensors"


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous (a fixed port collides with parallel runs)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
