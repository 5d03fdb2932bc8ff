"""The generation options that infer.py, gen_class_images.py and mjhq_fid.py's generate/all share, declared
once (as fields of GenerationOptions, from which each command's options are made), and loading a pipeline
ready to sample with them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

import typer

from typing import TYPE_CHECKING

from common.cli import REQUIRED, UserError, option, parse_dtype
from common.generation import MIN_IMAGE_SIDE, SamplingSettings
from common.long_prompts import CLIP_WINDOW, check_max_token_length
from common.lora_formats import BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK, LoraSpec, parse_blocks, parse_weighted_path
from common.flavours import PREDICTION_TYPES
from common.prompt_syntax import check_prompt_syntax
from common.models import FlavourOptions, check_base_formulation, read_model
from common.schedulers import SCHEDULER_NAMES, check_scheduler_name

if TYPE_CHECKING:  # common.tokens needs torch, which option parsing and --help go without
    from common.tokens import EmbeddingSpec

MODEL, SAMPLING, ADAPTERS, MEMORY = "Model", "Sampling", "LoRA and embeddings", "Memory"


@dataclass(frozen=True)
class GenerationOptions:
    """How to build and run the pipeline: the model, its adapters, the sampler and the memory options.
    Checked when made; `loras` and `embeddings` are the adapter options parsed."""

    model: str = option(REQUIRED, "--pretrained_model_name_or_path", "-m", panel=MODEL,
                        help="tiny-sdxl, tiny-edm, full-sdxl, full-edm, a diffusers pipeline folder, a single-file checkpoint "
                             "(.safetensors, as WebUI and ComfyUI keep them), or a hub id")
    vae: Optional[str] = option(None, "--pretrained_vae_model_name_or_path", panel=MODEL,
                                help="a VAE to use instead of the model's: a diffusers folder, a hub id or a single file "
                                     "(e.g. sdxl_vae.safetensors)")
    dtype: str = option("auto", panel=MODEL, help="auto (bf16 on a GPU, fp32 on the CPU), fp32, fp16 or bf16")
    device: str = option("auto", panel=MODEL, help="auto (cuda if present, else cpu), cpu, cuda, cuda:N")
    base_formulation: str = option("auto", panel=MODEL,
                                   help="auto (read from the model), edm-native or discrete: how the model was trained")
    prediction_type: Optional[str] = option(None, panel=MODEL,
                                            help="epsilon or v_prediction: what the model predicts, where its file or config "
                                                 "does not say it (default: read from the model: a single file's v_pred key, a "
                                                 "folder's scheduler config)")
    zero_terminal_snr: bool = option(False, "--rescale_betas_zero_snr", panel=MODEL,
                                     help="the model was trained with zero-terminal SNR (Lin et al. 2024), where it does not "
                                          "say so itself (a single file's ztsnr key); needs v-prediction")
    negative_prompt: Optional[str] = option(None, panel=SAMPLING, help="what to steer away from")
    num_inference_steps: int = option(30, panel=SAMPLING, help="sampling steps")
    guidance_scale: float = option(5.0, panel=SAMPLING, help="classifier-free guidance scale (1 disables it)")
    guidance_rescale: Optional[float] = option(None, panel=SAMPLING,
                                               help="rescale the guided prediction's std to the conditional one's, mixed in "
                                                    "at this share (Lin et al. 2024, Sec. 3.4; 0-1); default 0.7 on "
                                                    "zero-terminal-SNR models, as the paper, else 0")
    width: Optional[int] = option(None, panel=SAMPLING, help="image width, a multiple of 8 (default: the model's, 1024 for SDXL)")
    height: Optional[int] = option(None, panel=SAMPLING, help="image height, a multiple of 8 (default: the model's)")
    scheduler: str = option("default", panel=SAMPLING, help=", ".join(SCHEDULER_NAMES))
    max_token_length: int = option(CLIP_WINDOW, panel=SAMPLING,
                                   help="75: prompts cut at CLIP's 75 tokens, as diffusers cuts them; 150, 225, ...: "
                                        "long prompts encoded in 75-token chunks up to this length (ComfyUI's chunks, or "
                                             "WebUI's with --prompt_syntax webui)")
    prompt_syntax: Optional[str] = option(None, panel=SAMPLING,
                                          help="how prompts are read: plain (default: text, as diffusers reads it), webui "
                                               "((x) x1.1, [x] /1.1, (x:w), nesting multiplies, BREAK) or comfyui ((x:w) "
                                               "replaces outer weights, [x] is text, embedding:NAME), each with its UI's "
                                               "chunking and weighting")
    emphasis: Optional[str] = option(None, panel=SAMPLING,
                                     help="with --prompt_syntax webui: original (default: weights, then each chunk rescaled "
                                          "to its unweighted mean) or no_norm (weights only), WebUI's two modes")
    clip_skip: Optional[int] = option(None, panel=SAMPLING,
                                      help="text-encoder layers skipped before the penultimate (diffusers' and train_lora's "
                                           "numbering: 1 reads the third-last layer). WebUI's and Forge's 'Clip skip' is this "
                                           "plus 2 (their SDXL default 2 is the penultimate); ComfyUI's CLIPSetLastLayer is "
                                           "-(this + 2)")
    eta: Optional[float] = option(None, panel=SAMPLING,
                                  help="stochasticity of DDIM-like steps; TCD's gamma (default 0.3 for tcd, else 0)")
    lora: Optional[list[str]] = option(None, panel=ADAPTERS, help="PATH[:WEIGHT], diffusers or kohya format; repeat to combine")
    lora_scale: float = option(1.0, panel=ADAPTERS, help="multiplies every LoRA's weight")
    lora_blocks: Optional[str] = option(None, panel=ADAPTERS,
                                        help="load only these blocks of each --lora, comma-separated (e.g. up_blocks.0.attentions.1)")
    content_lora: Optional[str] = option(None, panel=ADAPTERS, help=f"B-LoRA: PATH[:ALPHA], only its content block {BLORA_CONTENT_BLOCK}")
    style_lora: Optional[str] = option(None, panel=ADAPTERS, help=f"B-LoRA: PATH[:ALPHA], only its style block {BLORA_STYLE_BLOCK}")
    embedding: Optional[list[str]] = option(None, panel=ADAPTERS,
                                            help="PATH[:TOKENS] with clip_l/clip_g rows; tokens default to <s0>,<s1>,...")
    batch_size: int = option(1, "-b", panel=MEMORY, help="images per forward pass")
    cpu_offload: bool = option(False, panel=MEMORY, help="keep idle components in CPU memory (GPU only)")
    vae_tiling: bool = option(False, panel=MEMORY, help="decode the VAE in tiles (large images)")
    vae_slicing: bool = option(False, panel=MEMORY, help="decode the VAE one image at a time")
    compile_unet: bool = option(False, "--compile", panel=MEMORY, help="torch.compile the UNet (slow first batch, faster after)")

    def __post_init__(self):
        check_image_size("width", self.width)
        check_image_size("height", self.height)
        for name in ("batch_size", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.guidance_scale < 0:
            raise UserError(f"--guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.guidance_rescale is not None and not 0 <= self.guidance_rescale <= 1:
            raise UserError(f"--guidance_rescale must be in [0, 1] (0.7 is the paper's), got {self.guidance_rescale}")
        check_prompt_syntax(self.prompt_syntax or "plain", self.emphasis or "original")
        if self.emphasis is not None and (self.prompt_syntax or "plain") != "webui":
            raise UserError(f"--emphasis {self.emphasis} is WebUI's; it applies with --prompt_syntax webui")
        if self.clip_skip is not None and self.clip_skip < 0:
            raise UserError(f"--clip_skip must be >= 0 (layers skipped before the penultimate), got {self.clip_skip}")
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"--prediction_type {self.prediction_type!r}; use {' or '.join(PREDICTION_TYPES)}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        check_max_token_length(self.max_token_length)
        check_base_formulation(self.base_formulation)
        object.__setattr__(self, "scheduler", check_scheduler_name(self.scheduler))
        self.loras, self.embeddings  # parsed now: a bad spec is reported before any model loads

    @property
    def flavour_options(self) -> FlavourOptions:
        return FlavourOptions.of_flags(self.prediction_type, self.zero_terminal_snr, self.base_formulation)

    @cached_property
    def loras(self) -> list[LoraSpec]:
        return lora_specs(self.lora or [], lora_scale=self.lora_scale, lora_blocks=self.lora_blocks,
                          content_lora=self.content_lora, style_lora=self.style_lora)

    @cached_property
    def embeddings(self) -> list[EmbeddingSpec]:
        from common.tokens import parse_embedding_spec

        return [parse_embedding_spec(spec) for spec in self.embedding or []]


def check_image_size(name: str, value: int | None) -> None:
    if value is not None and (value < MIN_IMAGE_SIDE or value % 8):
        raise UserError(f"--{name} {value} is not a multiple of 8 of at least {MIN_IMAGE_SIDE} (the VAE downsamples by 8, and the "
                        f"UNet's smallest latent is 2x2); try {max(MIN_IMAGE_SIDE, round(value / 8) * 8)}")


def lora_specs(
    loras: list[str], *, lora_scale: float, lora_blocks: str | None, content_lora: str | None, style_lora: str | None
) -> list[LoraSpec]:
    """Every adapter to load, with its weight times --lora_scale and the blocks it may touch."""
    blocks = parse_blocks(lora_blocks) or None
    specs = []
    for spec in loras:
        path, weight = parse_weighted_path(spec)
        specs.append(LoraSpec(path, weight * lora_scale, blocks))
    for spec, block, role in ((content_lora, BLORA_CONTENT_BLOCK, "content LoRA"), (style_lora, BLORA_STYLE_BLOCK, "style LoRA")):
        if spec:
            path, alpha = parse_weighted_path(spec, role)
            specs.append(LoraSpec(path, alpha * lora_scale, (block,)))
    return specs


def check_generation_prompts(config: GenerationOptions, prompts: list[str]) -> None:
    """The prompts (and the negative prompt) read by the run's syntax before anything loads: WebUI's per-step constructs
    and ComfyUI embedding names no --embedding file has refused by name; with plain text, one warning line when a
    prompt holds weighting syntax."""
    from common.prompt_syntax import check_prompts
    from common.tokens import embedding_names

    weighted = check_prompts([*prompts, *([config.negative_prompt] if config.negative_prompt else [])], config.prompt_syntax or "plain",
                             [name for spec in config.embeddings for name in embedding_names(spec.path)])
    if weighted:
        typer.echo(f"warning: {weighted}", err=True)


def read_generation_model(config: GenerationOptions):
    """The model read before anything loads or is created (`common.models.read_model`): a file that is no SDXL base,
    flavour options it cannot take, or a --clip_skip deeper than its text encoders, are refused here, and so are
    LoRA and embedding files that cannot be read or hold non-finite values."""
    from common.lora_formats import check_lora_files
    from common.models import check_clip_skip
    from common.tokens import read_embedding

    reading = read_model(config.model, config.flavour_options)
    check_clip_skip(config.clip_skip, reading and reading.text_encoder_layers, config.model)
    check_lora_files(config.loras)
    for embedding in config.embeddings:
        read_embedding(embedding.path)
    return reading


def prepare_pipeline(config: GenerationOptions, device_name: str | None, reading):
    """Load the model with its scheduler and adapters on its device; (pipeline, sampling settings).
    `device_name` overrides config.device (a distributed launch gives each process its own); `reading` is what
    `read_generation_model` made before anything loaded (None for a hub id), so its checks are not made twice."""
    from common.models import check_clip_skip, decide_base_formulation, load_sdxl_pipeline, load_vae, text_encoder_layers
    from common.schedulers import make_scheduler

    device, dtype = resolve_device_and_dtype(config, device_name)
    pipe = load_sdxl_pipeline(config.model, dtype, flavour=reading or config.flavour_options, say=typer.echo)
    check_clip_skip(config.clip_skip, text_encoder_layers(pipe), config.model)  # a hub model's depths are known only now
    if config.vae:
        pipe.vae = load_vae(config.vae, reading, dtype)
    edm, _ = decide_base_formulation(pipe.scheduler.config, config.base_formulation)  # the load said how it read it
    pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler, model_is_edm=edm)
    load_adapters(pipe, config)
    move_to_device(pipe, device, config)
    return pipe, sampling_settings(pipe, config)


def sampling_settings(pipe, options: GenerationOptions) -> SamplingSettings:
    """Settings for the pipeline's current scheduler from a run's GenerationOptions; size defaults to the
    model's native one (UNet sample size times the VAE factor, 1024 for SDXL)."""
    from common.schedulers import SCHEDULERS, scheduler_name_of

    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    name = scheduler_name_of(pipe.scheduler)
    choice = SCHEDULERS.get(name)
    return SamplingSettings(
        width=options.width or native,
        height=options.height or native,
        num_inference_steps=options.num_inference_steps,
        guidance_scale=options.guidance_scale,
        guidance_rescale=default_guidance_rescale(pipe.scheduler.config) if options.guidance_rescale is None else options.guidance_rescale,
        scheduler_name=name,
        webui_sampler=choice.webui_sampler if choice else name,
        webui_schedule=choice.webui_schedule if choice else "",
        eta=options.eta if options.eta is not None else (choice.default_eta if choice else 0.0),
        model=Path(options.model).name or options.model,
        max_token_length=options.max_token_length,
        adapters=adapter_description(options),
        prompt_syntax=options.prompt_syntax or "plain",
        emphasis=options.emphasis or "original",
        clip_skip=options.clip_skip,
        embedding_names=getattr(pipe, EMBEDDING_NAMES, {}),
    )


EMBEDDING_NAMES = "_embedding_names"  # on a pipeline: each name of a loaded embedding (`embedding_names`) -> its tokens


def default_guidance_rescale(scheduler_config) -> float:
    """Lin et al. 2024's 0.7 (Sec. 3.4, Fig. 7) on a zero-terminal-SNR model, whose plain CFG over-exposes; 0 otherwise."""
    return ZERO_TERMINAL_SNR_GUIDANCE_RESCALE if scheduler_config.get("rescale_betas_zero_snr") else 0.0


ZERO_TERMINAL_SNR_GUIDANCE_RESCALE = 0.7


def resolve_device_and_dtype(config: GenerationOptions, device_name: str | None = None):
    from common.models import device_and_dtype

    device, dtype = device_and_dtype(device_name or config.device, config.dtype)
    if config.cpu_offload and device.type != "cuda":
        raise UserError("--cpu_offload moves components between CPU and GPU memory and needs a CUDA GPU; drop it on the CPU")
    return device, dtype


def load_adapters(pipe, config: GenerationOptions) -> None:
    from common.lora_formats import load_loras
    from common.tokens import embedding_names, load_embedding

    names = pipe.__dict__.setdefault(EMBEDDING_NAMES, {})
    for spec in config.embeddings:
        tokens = load_embedding(pipe, spec)
        names |= dict.fromkeys(embedding_names(spec.path), "".join(tokens))
        typer.echo(f"embedding {spec.path.name}: write {''.join(tokens)} in the prompt (or its name, as the UIs do, with "
                   "--prompt_syntax webui or embedding:NAME with comfyui)")
    load_loras(pipe, config.loras)
    for spec in config.loras:
        if spec.weight == 0:
            typer.echo(f"LoRA {spec.path.name} has weight 0: not loaded, the model is the base model exactly")


def move_to_device(pipe, device, config: GenerationOptions) -> None:
    """The pipeline on its device (or offloaded), with the memory and speed options applied."""
    from common.models import speed_up_unet

    if config.cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.unet = speed_up_unet(pipe.unet, device, config.compile_unet)
    if config.vae_tiling:
        pipe.vae.enable_tiling()
    if config.vae_slicing:
        pipe.vae.enable_slicing()


def adapter_description(config: GenerationOptions) -> dict[str, str]:
    """The adapters as WebUI's PNG Info shows them (`Lora: name:weight, ...`)."""
    described = {}
    if config.loras:
        described["Lora"] = ", ".join(
            f"{spec.path.name}:{spec.weight:g}" + (f" [{'+'.join(spec.blocks)}]" if spec.blocks else "") for spec in config.loras
        )
    if config.embeddings:
        described["Embeddings"] = ", ".join(spec.path.name for spec in config.embeddings)
    return described


def describe_model(config: GenerationOptions) -> str:
    """A short label for reports: the model's name and its adapters."""
    adapters = adapter_description(config)
    parts = [Path(config.model).name or config.model] + [f"{key}: {value}" for key, value in adapters.items()]
    return " + ".join(parts)
