"""Finding and loading SDXL-family models: built-in names, local folders, single-file checkpoints and hub ids alike, each
read for its flavour (`common.flavours`) before its weights load."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

from common.architectures import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG
from common.builtin_models import BUILTIN_MODELS, builtin_model_path
from common.checkpoints import CheckpointInfo
from common.cli import DTYPE_NAMES, UserError, parse_dtype
from common.flavours import (
    Flavour, FlavourReading, flavour_from_scheduler_config, scheduler_config_for, vae_config_changes, with_overrides,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str) -> str:
    """A loadable location for `name_or_path`: a built-in model's cached folder, a local folder, a single-file
    checkpoint, or a hub id."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"model folder {name_or_path!r} has no model_index.json; pass a diffusers pipeline folder "
                f"(with unet/, vae/, text_encoder/, ...), a single-file checkpoint, a hub id, or one of {', '.join(BUILTIN_MODELS)}"
            )
        return str(path)
    if path.is_file():
        return str(path)
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise UserError(
        f"model {name_or_path!r} not found: it is not a local folder or file, not a hub id (owner/name), "
        f"and not one of {', '.join(BUILTIN_MODELS)}"
    )


BASE_FORMULATIONS = ("auto", "edm-native", "discrete")
BETA_SCHEDULE_KEYS = ("trained_betas", "beta_schedule", "beta_start", "beta_end")


def check_base_formulation(choice: str) -> None:
    if choice not in BASE_FORMULATIONS:
        raise UserError(f"--base_formulation {choice!r}; choose one of {', '.join(BASE_FORMULATIONS)}")


def decide_base_formulation(scheduler_config, choice: str = "auto") -> tuple[bool, str]:
    """(edm_native, note): whether a base was trained with the EDM formulation, from its scheduler config.

    EDM-native (Playground v2.5) means an EDM scheduler (its class, or its sigma_data) and no discrete beta
    schedule. A config with both is ambiguous: diffusers' `from_config` keeps a discrete scheduler's betas
    when an EDM sampler is swapped in and saved (and an EDM one's sigma_data the other way round), while
    EDM-native configs never carry betas; the base is then taken as discrete, trained on those betas, and
    `note` says so in one line. `choice` ("edm-native", "discrete") overrides the reading; a choice the
    config cannot support (no sigma_data, no betas) is refused.
    """
    check_base_formulation(choice)
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


@dataclass(frozen=True)
class FlavourOptions:
    """The options that override how a model's flavour is read: --prediction_type, --zero_terminal_snr (None: as the
    model says) and --base_formulation."""

    prediction_type: str | None = None
    zero_terminal_snr: bool | None = None
    base_formulation: str = "auto"

    @classmethod
    def of_flags(cls, prediction_type: str | None, zero_terminal_snr: bool, base_formulation: str = "auto") -> FlavourOptions:
        """From a command line, where --zero_terminal_snr left out means "as the model says", not "no"."""
        return cls(prediction_type, True if zero_terminal_snr else None, base_formulation)


@dataclass(frozen=True)
class ModelReading:
    """A model as read before its weights load: where it is, what a single file holds (None for folders and hub ids),
    its flavour as the model says it (`base`) and as the options make it (`flavour`)."""

    name: str
    location: str
    checkpoint: CheckpointInfo | None
    base: FlavourReading
    flavour: Flavour
    notes: tuple[str, ...] = ()  # one line each: how an ambiguous config was read
    weights_dtype: str | None = None  # the precision its UNet is stored in, e.g. "float16" (None: unknown, a hub model)
    scheduler_config: dict | None = None  # the scheduler config it is sampled and trained with, flavour applied
    text_encoder_layers: tuple[int, ...] | None = None  # each text encoder's depth (None: unknown, a hub model)

    def line(self) -> str:
        """The start-up line: what was read and why, and what the options changed."""
        label = Path(self.name).name or self.name
        precision = f", {DTYPE_NAMES.get(self.checkpoint.dtype, self.checkpoint.dtype)} weights" if self.checkpoint else ""
        line = f"model {label}: read as {self.base.flavour.name} ({self.base.reason}){precision}"
        if self.flavour != self.base.flavour:
            line += f"; used as {self.flavour.name}, as the options say"
        return line


def read_model(name_or_path: str, options: FlavourOptions = FlavourOptions(), what: str = "--model") -> ModelReading | None:
    """What a model is, before any weight loads: a single file's architecture, completeness and flavour (its keys), a
    folder's flavour (its scheduler and VAE configs), each with the options' overrides applied and checked. None for a
    hub id, whose configs are read when it loads."""
    import json

    from common.checkpoints import inspect_checkpoint, is_checkpoint_file

    location = resolve_model(name_or_path)
    if is_checkpoint_file(location):
        info = inspect_checkpoint(Path(location), what)
        from common.architectures import PLAYGROUND_V25_SCHEDULER_CONFIG, SDXL_SCHEDULER_CONFIG

        flavour = _override_single_file(info.reading.flavour, options)
        published = PLAYGROUND_V25_SCHEDULER_CONFIG if flavour.edm else SDXL_SCHEDULER_CONFIG
        return ModelReading(name_or_path, location, info, info.reading, flavour, weights_dtype=info.dtype,
                            scheduler_config=scheduler_config_for(flavour, published),
                            text_encoder_layers=tuple(c["num_hidden_layers"] for c in info.architecture.text_encoders))
    folder = Path(location)
    if not folder.is_dir():
        return None
    try:
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        layers = tuple(json.loads((folder / part / "config.json").read_text())["num_hidden_layers"]
                       for part in ("text_encoder", "text_encoder_2"))
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not read the configs of model {name_or_path!r}: {error}") from None
    reading = reading_of_configs(name_or_path, location, scheduler_config, vae_config, options)
    return dataclasses.replace(reading, weights_dtype=_stored_dtype(folder / "unet"), text_encoder_layers=layers)


def check_clip_skip(clip_skip: int | None, layers: tuple[int, ...] | None, model: str) -> None:
    """--clip_skip against the text encoders' depths (`layers`; None: not known yet). A CLIP encoder of L layers has
    L + 1 hidden states (the token embeddings, then each layer's), so at most L - 1 layers can be skipped before the
    penultimate; deeper, diffusers and the UIs fail with an index error."""
    if clip_skip is None or not layers:
        return
    deepest = min(layers) - 1
    if clip_skip > deepest:
        raise UserError(f"--clip_skip {clip_skip} (WebUI's Clip skip {clip_skip + 2}): the text encoders of {model!r} have {' and '.join(map(str, layers))} layers, "
                        f"so at most {deepest} can be skipped before the penultimate (WebUI's Clip skip {deepest + 2})")


def text_encoder_layers(pipe) -> tuple[int, int]:
    """The depths of a loaded pipeline's two text encoders (`check_clip_skip`'s `layers`)."""
    return pipe.text_encoder.config.num_hidden_layers, pipe.text_encoder_2.config.num_hidden_layers


def _stored_dtype(folder: Path) -> str | None:
    """The precision of a diffusers model folder's weights, read from its safetensors header (None when there is none)."""
    from safetensors import safe_open

    from common.checkpoints import SAFETENSORS_DTYPES

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as handle:
        first = next(iter(handle.keys()), None)
        return None if first is None else SAFETENSORS_DTYPES.get(handle.get_slice(first).get_dtype())


def reading_of_configs(name: str, location: str, scheduler_config, vae_config, options: FlavourOptions) -> ModelReading:
    """A folder's (or hub model's) flavour from its scheduler and VAE configs, with the options applied."""
    edm_native, note = decide_base_formulation(scheduler_config, options.base_formulation)
    flavour = flavour_from_scheduler_config(scheduler_config, vae_config, edm_native)
    words = [f"prediction_type {flavour.prediction_type}"] + (["rescale_betas_zero_snr"] if flavour.zero_terminal_snr else [])
    words = [f"{scheduler_config.get('_class_name', 'scheduler')} config"] if edm_native else words
    base = FlavourReading(flavour, "scheduler config: " + ", ".join(words))
    overridden = with_overrides(flavour, options.prediction_type, options.zero_terminal_snr)
    return ModelReading(name, location, None, base, overridden, (note,) if note else (),
                        scheduler_config=scheduler_config_for(overridden, dict(scheduler_config)))


def _override_single_file(flavour: Flavour, options: FlavourOptions) -> Flavour:
    """A single file's flavour under --base_formulation (edm-native: Playground v2.5's sigmas and latent statistics,
    for a file stripped of its markers; discrete: SDXL's betas), then --prediction_type and --zero_terminal_snr."""
    from common.architectures import PLAYGROUND_V25_LATENTS_MEAN, PLAYGROUND_V25_LATENTS_STD
    from common.flavours import PLAYGROUND_SIGMAS

    check_base_formulation(options.base_formulation)
    if options.base_formulation == "edm-native" and not flavour.edm:
        flavour = Flavour(prediction_type=flavour.prediction_type, edm=True, **PLAYGROUND_SIGMAS,
                          latents_mean=tuple(PLAYGROUND_V25_LATENTS_MEAN), latents_std=tuple(PLAYGROUND_V25_LATENTS_STD))
    elif options.base_formulation == "discrete" and flavour.edm:
        flavour = Flavour(prediction_type=flavour.prediction_type)
    return with_overrides(flavour, options.prediction_type, options.zero_terminal_snr)


def load_sdxl_pipeline(name_or_path: str, dtype: torch.dtype | dict[str, torch.dtype], *, flavour: FlavourOptions | ModelReading | None = None,
                       say=None, **from_pretrained_options):
    """StableDiffusionXLPipeline for a built-in name, folder, single-file checkpoint or hub id, pooling prompts at their
    end-of-text token, its scheduler (and a Playground VAE's statistics) set to the model's flavour as read (and
    overridden: `flavour` is the options, or their reading already made); load failures become one-line errors.
    `dtype` may differ per component ({"default": bf16, "vae": fp32}); options (revision, variant, cache_dir) go to
    diffusers' from_pretrained. `say` gets the start-up line (and any warning about the reading)."""
    from diffusers import StableDiffusionXLPipeline

    reading = flavour if isinstance(flavour, ModelReading) else read_model(name_or_path, flavour or FlavourOptions())
    try:
        if reading is not None and reading.checkpoint is not None:
            pipe = _load_single_file(reading, dtype)
        else:
            with quiet_libraries():
                pipe = StableDiffusionXLPipeline.from_pretrained(resolve_model(name_or_path), dtype=dtype, **from_pretrained_options)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load model {name_or_path!r} as an SDXL pipeline: {reason}") from None
    if reading is None:  # a hub model: its configs came with it
        options = flavour if isinstance(flavour, FlavourOptions) else FlavourOptions()
        reading = reading_of_configs(name_or_path, name_or_path, pipe.scheduler.config, pipe.vae.config, options)
    apply_flavour(pipe, reading.flavour)
    pool_at_end_of_text(pipe)
    if say is not None:
        say(reading.line())
        for line in (*reading.notes, *reading.base.warnings):
            say(line if line.startswith("warning") else f"warning: {line}")
    return pipe


def apply_flavour(pipe, flavour: Flavour) -> None:
    """The pipeline's scheduler set to sample `flavour` (a new one of the same class when anything differs) and, for
    Playground v2.5's flavour, its VAE's latent statistics."""
    current = dict(pipe.scheduler.config)
    wanted = scheduler_config_for(flavour, current)
    if any(current.get(key) != value for key, value in wanted.items() if not key.startswith("_")):
        pipe.scheduler = type(pipe.scheduler).from_config(wanted)
    changes = vae_config_changes(flavour)
    if changes and any(pipe.vae.config.get(key) != value for key, value in changes.items()):
        pipe.vae.register_to_config(**changes)


def pipeline_flavour(pipe) -> Flavour:
    """The flavour a loaded pipeline samples, read back from its scheduler and VAE configs, where its load put it."""
    edm_native, _ = decide_base_formulation(pipe.scheduler.config)
    return flavour_from_scheduler_config(pipe.scheduler.config, pipe.vae.config, edm_native)


def _load_single_file(reading: ModelReading, dtype) -> object:
    """A single file through diffusers' own loader, offline: its configs and tokenizers from a local config folder of
    the file's architecture (never the Hub), its scheduler made for the file's flavour, the whole pipeline in one
    dtype as the file's loader requires (a VAE of another dtype is read from the file's VAE tensors alone), then
    checked for parameters the file did not fill."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from common.checkpoints import VAE_PREFIX, config_folder

    info = reading.checkpoint
    default = dtype.get("default", torch.float32) if isinstance(dtype, dict) else dtype
    vae_dtype = dtype.get("vae", default) if isinstance(dtype, dict) else dtype
    folder = str(config_folder(info.architecture))
    config = reading.scheduler_config
    components = {"scheduler": getattr(diffusers, config["_class_name"]).from_config(config)}
    with quiet_libraries():
        if vae_dtype != default:
            components["vae"] = AutoencoderKL.from_single_file(info.header.tensors(VAE_PREFIX), config=folder, subfolder="vae",
                                                               dtype=vae_dtype, local_files_only=True)
        pipe = StableDiffusionXLPipeline.from_single_file(str(info.path), config=folder, local_files_only=True, dtype=default,
                                                          **components)
    empty = [f"{part}.{name}" for part in ("unet", "vae", "text_encoder", "text_encoder_2")
             for name, parameter in getattr(pipe, part).named_parameters() if parameter.is_meta]
    if empty:
        raise UserError(f"model {str(info.path)!r}: {len(empty)} weights were not filled from the file, e.g. {empty[0]}")
    return pipe


def load_vae(name_or_path: str, reading: ModelReading | None, dtype: torch.dtype):
    """A replacement VAE (--vae): a diffusers VAE folder or hub id, or a single-file VAE (LDM names, bare or under
    first_stage_model.), read with the model's VAE config so that its latent scaling stays the model's."""
    from diffusers import AutoencoderKL

    from common.checkpoints import config_folder, expected_vae_keys, read_checkpoint_header, vae_file_prefix

    path = Path(name_or_path).expanduser()
    try:
        if not path.is_file():
            with quiet_libraries():
                return AutoencoderKL.from_pretrained(name_or_path, dtype=dtype)
        header = read_checkpoint_header(path, "--vae")
        prefix = vae_file_prefix(header)
        config = str(config_folder(reading.checkpoint.architecture)) if reading and reading.checkpoint else reading.location if reading else None
        if config is None:
            raise UserError("--vae FILE needs the model's VAE config: give --model as a folder, a single file or a built-in name")
        with quiet_libraries():
            vae_config = AutoencoderKL.load_config(config, subfolder="vae")
        expected = expected_vae_keys(vae_config)
        missing = [key for key in expected if prefix + key not in header.shapes]
        wrong = [key for key in expected if prefix + key in header.shapes and header.shapes[prefix + key] != expected[key]]
        if missing or wrong:
            problem = f"lacks {len(missing)} of {len(expected)} tensors, e.g. {missing[0]}" if missing else (
                f"has {wrong[0]} of shape {header.shapes[prefix + wrong[0]]}, where this model's VAE has {expected[wrong[0]]}")
            raise UserError(f"--vae {str(path)!r} is not this model's VAE: it {problem}")
        with quiet_libraries():
            vae = AutoencoderKL.from_single_file(header.tensors(prefix), config=config, subfolder="vae", dtype=dtype,
                                                 local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(f"could not load VAE {name_or_path!r}: {str(error).strip().splitlines()[0]}") from None
    if reading is not None:
        changes = vae_config_changes(reading.flavour)
        if changes:
            vae.register_to_config(**changes)
    return vae


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
    shape, for checking a LoRA against it, without reading (or holding) its weights. A single file's configs are
    its architecture's."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    reading = read_model(name_or_path)
    try:
        with torch.device("meta"), quiet_libraries():
            if reading is not None and reading.checkpoint is not None:
                architecture = reading.checkpoint.architecture
                unet_config, text_configs = architecture.unet, [CLIPTextConfig(**c) for c in architecture.text_encoders]
            else:
                location = resolve_model(name_or_path)
                unet_config = UNet2DConditionModel.load_config(location, subfolder="unet")
                text_configs = [CLIPTextConfig.from_pretrained(location, subfolder=sub) for sub in ("text_encoder", "text_encoder_2")]
            return {
                "unet": UNet2DConditionModel.from_config(unet_config),
                "text_encoder": CLIPTextModel(text_configs[0]),
                "text_encoder_2": CLIPTextModelWithProjection(text_configs[1]),
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
