"""Finding and loading SDXL-family models: built-in names, local folders and hub ids alike."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

from common.cli import UserError
from common.builtin_models import BUILTIN_MODELS, SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, builtin_model_path

# The precisions by their command-line names, as torch's attribute names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str) -> str:
    """A loadable location for `name_or_path`: a built-in model's cached folder, a local folder, or a hub id."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model folder {name_or_path!r} has no model_index.json; pass a diffusers pipeline folder "
                f"(with unet/, vae/, text_encoder/, ...), a hub id, or one of {', '.join(BUILTIN_MODELS)}"
            )
        return str(path)
    if path.is_file():
        raise UserError(
            f"model {name_or_path!r} is a single file; pass a diffusers pipeline folder, a hub id, "
            f"or one of {', '.join(BUILTIN_MODELS)}"
        )
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise UserError(
        f"model {name_or_path!r} not found: it is not a local folder, not a hub id (owner/name), "
        f"and not one of {', '.join(BUILTIN_MODELS)}"
    )


BASE_FORMULATIONS = ("auto", "edm-native", "discrete")
BETA_SCHEDULE_KEYS = ("trained_betas", "beta_schedule", "beta_start", "beta_end")


def decide_base_formulation(scheduler_config, choice: str = "auto") -> tuple[bool, str]:
    """(edm_native, note): whether a base was trained with the EDM formulation, from its scheduler config.

    EDM-native (Playground v2.5) means an EDM scheduler (its class, or its sigma_data) and no discrete beta
    schedule. A config with both is ambiguous: diffusers' `from_config` keeps a discrete scheduler's betas
    when an EDM sampler is swapped in and saved (and an EDM one's sigma_data the other way round), while
    EDM-native configs never carry betas; the base is then taken as discrete, trained on those betas, and
    `note` says so in one line. `choice` ("edm-native", "discrete") overrides the reading; a choice the
    config cannot support (no sigma_data, no betas) is refused.
    """
    if choice not in BASE_FORMULATIONS:
        raise UserError(f"--base_formulation {choice!r}; choose one of {', '.join(BASE_FORMULATIONS)}")
    class_name = scheduler_config.get("_class_name") or "scheduler"
    edm_scheduler = class_name.startswith("EDM") or "sigma_data" in scheduler_config
    betas = [key for key in BETA_SCHEDULE_KEYS if scheduler_config.get(key) is not None]
    if choice == "edm-native":
        if not edm_scheduler:
            raise UserError(f"--base_formulation edm-native needs an EDM scheduler config (with sigma_data); this {class_name} config has none")
        return True, "" if not betas else f"{class_name} config with {', '.join(betas)} read as EDM-native, as --base_formulation says"
    if choice == "discrete":
        if edm_scheduler and not betas:
            raise UserError(f"--base_formulation discrete needs the base's beta schedule; its {class_name} config has no {', '.join(BETA_SCHEDULE_KEYS)}")
        return False, "" if not edm_scheduler else f"{class_name} config read as discrete (its {', '.join(betas)}), as --base_formulation says"
    if edm_scheduler and betas:
        return False, (
            f"{class_name} config with EDM settings and a discrete beta schedule ({', '.join(betas)}): treating the base as a "
            f"discrete DDPM model with an EDM sampler swapped in (EDM-native configs carry no betas); if it was trained "
            f"with EDM, pass --base_formulation edm-native"
        )
    return edm_scheduler, ""


def is_edm_scheduler_config(scheduler_config) -> bool:
    """Whether a model was trained with the EDM formulation, read from its scheduler config
    (`decide_base_formulation` without an override)."""
    return decide_base_formulation(scheduler_config)[0]


def pick_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return device


def parse_dtype(name: str) -> torch.dtype:
    """torch's dtype for a precision's command-line name (fp32, fp16, bf16)."""
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])


def load_sdxl_pipeline(name_or_path: str, dtype: torch.dtype | dict[str, torch.dtype], **from_pretrained_options):
    """StableDiffusionXLPipeline for a built-in name, folder or hub id, pooling prompts at their end-of-text
    token; load failures become one-line errors. `dtype` may differ per component ({"default": bf16, "vae":
    fp32}); options (revision, variant, cache_dir) go to diffusers' from_pretrained."""
    from diffusers import StableDiffusionXLPipeline

    location = resolve_model(name_or_path)
    try:
        with quiet_libraries():
            pipe = StableDiffusionXLPipeline.from_pretrained(location, dtype=dtype, **from_pretrained_options)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load model {name_or_path!r} as an SDXL pipeline: {reason}") from None
    pool_at_end_of_text(pipe)
    return pipe


def pool_at_end_of_text(pipe) -> None:
    """Make both text encoders pool each prompt at its <|endoftext|> token, whatever tokens are added.

    SDXL's published text-encoder configs carry eos_token_id 2, a placeholder from before transformers knew
    CLIP's, and with it transformers pools at the prompt's highest token id: the end of text for CLIP's own
    vocabulary, but a pivotal-tuning token such as <s1> (id 49409) once one is added, so SDXL's pooled
    conditioning would come from the new token. The base model was trained on the end-of-text state, and the
    UIs pool there too (ComfyUI renumbers the end of text above its embeddings, comfy/sd1_clip.py; WebUI keeps
    the ids of the embedding name's words), so training and sampling here do as well.
    """
    from transformers import CLIPTextModel

    for encoder, tokenizer in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        if encoder is None or tokenizer is None:
            continue
        encoder.config.eos_token_id = tokenizer.eos_token_id
        for module in encoder.modules():
            if isinstance(module, CLIPTextModel):
                module.eos_token_id = tokenizer.eos_token_id


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers' and transformers' progress bars and info warnings while loading.

    Their per-component bars, load reports and notes (a UNet-only LoRA "has no text encoder
    keys", new token rows "initialised from a normal distribution", a second adapter) drown the
    script's own output; the loaders here check for real problems themselves.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    levels = {name: logging.getLogger(name).level for name in ("diffusers", "transformers")}
    for name in levels:
        # CRITICAL, not ERROR: diffusers logs a failed LoRA load before raising, and the raise
        # becomes our one-line error; the log would print the same failure a second time.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            # peft's notes on a second adapter and on block-filtered LoRAs whose config names more layers
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            warnings.filterwarnings("ignore", message="While injecting the PEFT adapters")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)



def speed_up_unet(unet, device: torch.device, compile_unet: bool = False, allow_tf32: bool = True):
    """The UNet laid out and compiled for fast sampling (infer.py --compile) and training (train_lora.py
    --torch_compile) on `device`; returns the module to call.

    On a GPU, channels-last convolutions are free speed, and TF32 matmuls for any fp32 work are too where
    `allow_tf32` (training asks for them with --allow_tf32); torch.compile fuses the many small norm/activation
    kernels between the big matmuls, autotuning them ("max-autotune-no-cudagraphs": CUDA graphs would pin the
    memory of every shape a run meets). The CPU path is left as it is.
    """
    import torch

    if device.type == "cuda":
        if allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        return torch.compile(unet, mode="max-autotune-no-cudagraphs")
    return unet


def graph_break_summary() -> str:
    """One line on torch.compile's graph breaks so far (torch._dynamo's counters): each break is a return to
    Python in the middle of the step, and its kernels are not fused across it."""
    import sys

    if "torch._dynamo" not in sys.modules:
        return "torch.compile: nothing compiled yet"
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    if not breaks:
        return "torch.compile: the UNet compiled without graph breaks"
    reason, count = breaks.most_common(1)[0]
    return f"torch.compile: {sum(breaks.values())} graph break(s), most often ({count}x): {reason.splitlines()[0][:160]}"


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the peak torch allocated on it; CPU: the process's peak resident size (Linux reports KiB)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_and_dtype(device_name: str = "auto", dtype_name: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device, and the dtype to run on it: auto means bf16 on a GPU and fp32 on the CPU."""
    import torch

    device = pick_device(device_name)
    if dtype_name == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = parse_dtype(dtype_name)
    if device.type == "cpu" and dtype == torch.float16:
        raise UserError("--dtype fp16 is not supported on the CPU (many CPU kernels lack it); use fp32 or bf16")
    return device, dtype


def cpu_processes_requested() -> bool:
    """Several processes on a machine without a GPU (torchrun on a CPU box): accelerate uses gloo
    multi-CPU only when it is told that the CPU is the device."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def launcher_asked_processes() -> int | None:
    """The --num_processes of an `accelerate launch` that started this process, read from the parent's command
    line (Linux /proc); None when there is none or it cannot be read."""
    try:
        words = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return accelerate_launch_processes(words)


def accelerate_launch_processes(words: list[str]) -> int | None:
    """--num_processes N (or --num-processes=N) of an `accelerate launch` command line; None for another command."""
    if "launch" not in words or not any(Path(w).name == "accelerate" for w in words):
        return None
    for position, word in enumerate(words):
        match = re.fullmatch(r"--num[_-]processes(?:=(\d+))?", word)
        if match:
            value = match.group(1) or (words[position + 1] if position + 1 < len(words) else "")
            return int(value) if value.isdigit() else None
    return None


def warn_about_lost_processes(num_processes: int) -> None:
    """accelerate launch --cpu --num_processes N starts one process and says nothing; say it, and what works."""
    asked = launcher_asked_processes()
    if asked and asked > num_processes:
        print(f"warning: accelerate launch asked for {asked} processes but this run has {num_processes}: with --cpu, "
              f"accelerate starts one. On a CPU use torchrun --nproc_per_node {asked} SCRIPT ..., or accelerate launch "
              f"--multi_gpu --num_processes {asked} SCRIPT ...", file=sys.stderr)


def normalise_latents(raw, vae_config):
    """Latents as the base model expects them (what its pipeline undoes before decoding):
    (z - latents_mean) * scaling_factor / latents_std with per-channel statistics when the VAE config
    has them (Playground v2.5: scaling 0.5, giving latents of std about sigma_data = 0.5), else
    z * scaling_factor (SDXL: 0.13025, unit variance)."""
    mean, std = vae_config.get("latents_mean"), vae_config.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = raw.new_tensor(mean).view(shape)
        std = raw.new_tensor(std).view(shape)
        return (raw - mean) * vae_config["scaling_factor"] / std
    return raw * vae_config["scaling_factor"]


def model_modules_on_meta(name_or_path: str) -> dict[str, torch.nn.Module]:
    """A model's UNet and text encoders built from its configs on the meta device: every module's name and
    shape, for checking a LoRA against it, without reading (or holding) its weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    location = resolve_model(name_or_path)
    try:
        with torch.device("meta"), quiet_libraries():
            return {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(location, subfolder="unet")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(location, subfolder="text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(location, subfolder="text_encoder_2")),
            }
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not read the configs of model {name_or_path!r}: {reason}") from None


@functools.cache
def sdxl_module_names() -> frozenset[str]:
    """Every module name of SDXL's UNet and text encoders, component-prefixed, built on the meta device (once)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"), quiet_libraries():
        names = {f"unet.{n}" for n, _ in UNet2DConditionModel(**SDXL_UNET_CONFIG).named_modules()}
        names |= {f"text_encoder.{n}" for n, _ in CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[0])).named_modules()}
        names |= {f"text_encoder_2.{n}" for n, _ in CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[1])).named_modules()}
    return frozenset(names)
