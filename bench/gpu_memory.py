#!/usr/bin/env python
"""Peak GPU memory of train_lora.py's training step and of infer.py's sampling at SDXL's real size, without a GPU.

    python bench/gpu_memory.py estimate                      # the README's table: 1024², bf16
    python bench/gpu_memory.py validate --resolution 128     # the accounting against measured allocations

Method. The trainer's own functions (add_lora, make_optimizer, batch_loss, training_step, vae_posterior,
encode_captions: peft LoRA, AdamW, autocast, gradient checkpointing, cached posteriors or the fp32 VAE) and
diffusers' StableDiffusionXLPipeline run on SDXL base 1.0's exact architecture with fake tensors (torch's
FakeTensorMode: shapes, dtypes and storages, no data, no arithmetic). A dispatch mode (`LiveStorages`) counts
every live storage, each rounded up to the 512-byte blocks of CUDA's caching allocator, and keeps the peak:
the quantity torch.cuda.max_memory_allocated reports. Not in it: the CUDA context (about 0.3-0.6 GiB outside
torch's allocator: in nvidia-smi, not in max_memory_allocated), the caching allocator's reserve above the
allocated peak (fragmentation, typically a few per cent), cuDNN/cuBLAS workspaces, and what accelerate's
prepare() adds for DDP (gradient buckets: a copy of the trainable gradients, small for a LoRA).

Validation (`validate`): the same code on real tensors, on the CPU, at a size a CPU can run (the full-size
UNet in bf16 at 64² or 128²). The CPU allocator's own running total, read through torch's profiler, must match
the count on the real tensors, and the count on fake tensors must match it on real ones.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import weakref
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import torch
import typer
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))  # last: bench/infer.py must not shadow the script when tests import this

import train_lora  # noqa: E402
from common.architectures import SDXL_TEXT_ENCODER_CONFIGS, SDXL_UNET_CONFIG, SDXL_VAE_CONFIG  # noqa: E402
from common.cli import flags, run_app  # noqa: E402
from common.models import quiet_libraries  # noqa: E402
from common.training_data import vae_posterior  # noqa: E402
from measure import report  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
GIB = 2**30
PROMPT = "a photo of an astronaut riding a horse on mars"


def fresh_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision="bf16", cpu=True)


def fake_copy(module: torch.nn.Module, mode) -> torch.nn.Module:
    """Turn a module built on the meta device into fake CPU tensors of `mode`, in place. (A module cannot be
    built in fake mode and then converted: module.to would swap fake tensors, which torch refuses.)"""
    cpu = torch.device("cpu")
    for child in module.modules():
        for name, parameter in list(child._parameters.items()):
            if parameter is not None:
                fake = mode.fake_tensor_converter.from_meta_and_device(mode, parameter.data, cpu)
                child._parameters[name] = torch.nn.Parameter(fake, requires_grad=parameter.requires_grad)
        for name, buffer in list(child._buffers.items()):
            if buffer is not None:
                child._buffers[name] = mode.fake_tensor_converter.from_meta_and_device(mode, buffer, cpu)
    return module


def new_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def frozen(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(dtype).requires_grad_(False).eval()


def sdxl_unet(device="meta", dtype=torch.bfloat16, config: dict = SDXL_UNET_CONFIG):
    from diffusers import UNet2DConditionModel

    with quiet_libraries(), torch.device(device):
        return frozen(UNet2DConditionModel(**config), dtype)


def sdxl_vae(device="meta", dtype=torch.float32):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return frozen(AutoencoderKL(**SDXL_VAE_CONFIG), dtype)


class CachedText:
    """The trainer's CaptionEncoder once captions are cached and the encoders have left the GPU: each caption's
    (embeddings, pooled) in the compute dtype, as wide as the UNet takes them."""

    def __init__(self, batch: int, dtype: torch.dtype, unet_config):
        pooled_width = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
        self.embeds = torch.randn(batch, 77, unet_config.cross_attention_dim).to(dtype)
        self.pooled = torch.randn(batch, pooled_width).to(dtype)

    def embed(self, captions, step):
        return self.embeds, self.pooled


def measure_training(unet, vae, resolution: int, batch: int, rank: int, checkpointing: bool, fake_mode=None, steps: int = 2,
                     adapter: dict | None = None) -> dict:
    """Run `steps` of train_lora.py's step (the second has AdamW's state) under LiveStorages and, on real tensors,
    under the profiler; peaks in bytes. With `fake_mode` the modules come on the meta device and run as fake
    tensors. `vae` None means --cache_latents (the VAE has left the GPU). `adapter`: train_lora's adapter options
    (adapter, conv_rank, ...; default a LoRA on the attention projections)."""
    config = train_lora.TrainConfig(pretrained_model_name_or_path="full-sdxl", output_dir="-", rank=rank, resolution=resolution,
                                    train_batch_size=batch, gradient_checkpointing=checkpointing, cache_latents=vae is None,
                                    mixed_precision="bf16", max_train_steps=steps, **(adapter or {}))
    accelerator = fresh_accelerator()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    with quiet_libraries():
        unet = train_lora.add_lora(unet, config)
    if fake_mode is not None:
        from peft.tuners.lycoris_utils import LycorisLayer

        for layer in unet.modules():
            # peft's LoHa and LoKr draw torch.rand(1) for module dropout even at 0, a value fake tensors cannot hold;
            # out of training mode they skip the draw and run the same ΔW path
            if isinstance(layer, LycorisLayer):
                layer.training = False
        for module in (unet, vae):
            if module is not None:
                fake_copy(module, fake_mode)
    index = torch.zeros(batch, dtype=torch.long)  # a real tensor: the trainer reads captions from it with tolist()
    with fake_mode or contextlib.nullcontext():
        return _training_steps(unet, vae, config, accelerator, resolution, index, steps)


def _training_steps(unet, vae, config, accelerator, resolution: int, index: torch.Tensor, steps: int) -> dict:
    from diffusers import DDPMScheduler

    from common.losses import DiscreteFormulation

    pipe = SimpleNamespace(unet=unet, vae=vae or SimpleNamespace(config=SDXL_VAE_CONFIG), text_encoder=torch.nn.Module(),
                           text_encoder_2=torch.nn.Module())
    optimizer, lr_scheduler, _ = train_lora.make_optimizer(config, unet, pipe, accelerator, 1, len(index))  # one batch of len(index)
    schedule = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    formulation = DiscreteFormulation(schedule.alphas_cumprod)
    batch, side = len(index), resolution // 8
    images = ({"latent_mean": torch.randn(batch, 4, side, side), "latent_std": torch.rand(batch, 4, side, side)} if vae is None
              else {"pixels": torch.rand(batch, 3, resolution, resolution) * 2 - 1})
    images |= {"index": index, "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * batch).float(),
               "captions": ["a photo of sks dog"] * batch}
    text = CachedText(batch, torch.bfloat16, unet.config)

    tracker = LiveStorages()
    tracker.add(*module_tensors(unet), *(module_tensors(vae) if vae is not None else []),
                *(v for v in images.values() if isinstance(v, torch.Tensor)), text.embeds, text.pooled)
    start = tracker.current
    batch_loss = train_lora.BatchLoss(pipe=pipe, unet=unet, caption_encoder=text, formulation=formulation,
                                      accelerator=accelerator, prior_loss_weight=config.prior_loss_weight)
    with tracker, allocator_log(enabled=not is_fake(unet)) as log:
        for step in range(steps):
            train_lora.training_step(partial(batch_loss, images, None, step), models=[unet], accelerator=accelerator,
                                     optimizer=optimizer, lr_scheduler=lr_scheduler, max_grad_norm=config.max_grad_norm)
    return {"tracked_peak": tracker.peak, "tracked_start": start, "allocator_rise": log.peak_rise if log else None}


def measure_startup(resolution: int, images_per_call: int | None = None, unet_waits: bool = True) -> dict:
    """The trainer's phases before its loop. --cache_latents: the fp32 VAE encodes the images (as many per call
    as common.data.CachedLatents takes) beside both text encoders, the UNet still in CPU memory (load_models;
    `unet_waits=False` shows the device holding it too); then, the UNet on the device, every caption is embedded
    once (CaptionEncoder) before the text encoders leave."""
    from common.data import ENCODE_PIXELS

    images_per_call = images_per_call or max(1, ENCODE_PIXELS // resolution**2)
    mode = new_fake_mode()
    pipe = fake_sdxl_pipeline(mode)
    pipe.vae = fake_copy(sdxl_vae(), mode)  # fp32, as the trainer keeps it
    tracker = LiveStorages()
    on_device = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2] + ([] if unet_waits else [pipe.unet])
    with mode:
        tracker.add(*[t for module in on_device for t in module_tensors(module)])
        with tracker, torch.no_grad():
            vae_posterior(pipe.vae, torch.rand(images_per_call, 3, resolution, resolution), torch.device("cpu"))
            latent_caching = tracker.peak
            if unet_waits:
                tracker.add(*module_tensors(pipe.unet))
            train_lora.encode_captions([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                       ["a photo of sks dog"], None, torch.device("cpu"))
    return {"latent_caching_peak": latent_caching, "startup_peak": tracker.peak, "images_per_call": images_per_call}


def measure_inference(pipe, resolution: int, batch: int, fake_mode, steps: int = 2) -> dict:
    """StableDiffusionXLPipeline as infer.py calls it (CFG, one CPU generator per image), decoding to tensors."""
    with fake_mode:
        return _sampling(pipe, resolution, batch, steps)


def _sampling(pipe, resolution: int, batch: int, steps: int) -> dict:
    tracker = LiveStorages()
    tracker.add(*[t for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2) for t in module_tensors(module)])
    generators = [torch.Generator("cpu").manual_seed(k) for k in range(batch)]
    with tracker, torch.inference_mode(), quiet_libraries():
        pipe(prompt=[PROMPT] * batch, width=resolution, height=resolution, num_inference_steps=steps, guidance_scale=5.0,
             generator=generators, output_type="pt")
    return {"tracked_peak": tracker.peak}


CUDA_BLOCK = 512  # CUDA's caching allocator hands out whole 512-byte blocks (c10/cuda/CUDACachingAllocator.cpp)


class LiveStorages(TorchDispatchMode):
    """Bytes held by live tensor storages, each rounded up to CUDA's allocation block, and their peak.

    Every tensor an operation returns is counted once per storage (views share theirs) until the storage is
    freed; torch keeps one Python object per live storage, so a weak reference to it says when that is.
    (torch's MemTracker does this too, but installs gradient hooks on every parameter, which a frozen base
    model refuses.)
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def add(self, *tensors: torch.Tensor) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._alive:
                continue
            size = -(-storage.nbytes() // CUDA_BLOCK) * CUDA_BLOCK
            self._alive[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
            self.current += size
            self.peak = max(self.peak, self.current)

    def _free(self, key: int, size: int) -> None:
        self._alive.pop(key, None)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        self.add(*(t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)))
        return output


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def is_fake(module) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(next(module.parameters()), FakeTensor)


@contextlib.contextmanager
def allocator_log(enabled: bool):
    """The CPU allocator's own bookkeeping: torch's profiler records every allocation and free with its size
    (the `[memory]` events of its trace); their running sum over the block is how far the allocated total
    rose above its value at the start."""
    if not enabled:
        yield None
        return
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    log = SimpleNamespace(peak_rise=0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        yield log
    with tempfile.TemporaryDirectory() as scratch:
        profiler.export_chrome_trace(str(Path(scratch) / "trace.json"))
        events = json.loads((Path(scratch) / "trace.json").read_text())["traceEvents"]
    running = 0
    for event in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0))):
        running += event["args"]["Bytes"]
        log.peak_rise = max(log.peak_rise, running)


def fake_sdxl_pipeline(mode, dtype=torch.bfloat16):
    """StableDiffusionXLPipeline of SDXL base 1.0's architecture on fake tensors, with the real CLIP tokenizers."""
    import tempfile

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from common.architectures import write_clip_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        write_clip_tokenizer(Path(scratch) / "1", "<|endoftext|>")
        write_clip_tokenizer(Path(scratch) / "2", "!")
        tokenizers = [CLIPTokenizer.from_pretrained(Path(scratch) / k) for k in ("1", "2")]
    with quiet_libraries(), torch.device("meta"):
        text_encoders = (frozen(CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[0])), dtype),
                         frozen(CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_ENCODER_CONFIGS[1])), dtype))
    unet, vae = sdxl_unet("meta", dtype), sdxl_vae("meta", dtype)
    for module in (unet, vae, *text_encoders):
        fake_copy(module, mode)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    # Its plan and its step read its own sigmas as numbers: they stay real tensors, latents stay fake.
    scheduler.set_timesteps, scheduler.step = outside_fake_mode(scheduler.set_timesteps), outside_fake_mode(scheduler.step)
    with quiet_libraries():
        return StableDiffusionXLPipeline(
            vae=vae, unet=unet, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1],
            text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], scheduler=scheduler,
        )


def outside_fake_mode(method):
    import functools

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return method(*args, **kwargs)

    return wrapped


@app.command()
def estimate(
    resolution: Annotated[int, typer.Option(*flags("resolution"))] = 1024,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    ranks: Annotated[str, typer.Option(*flags("ranks"))] = "16,32",
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """Peak allocated GPU memory at `resolution`, bf16: training for every batch x rank x checkpointing x
    cached latents, and sampling for every batch."""
    rows = []
    batches = [int(b) for b in batch_sizes.split(",")]
    startup = measure_startup(resolution)
    rows.append({"job": "train_lora.py startup", "resolution": resolution, "images_per_vae_call": startup["images_per_call"],
                 "latent_caching_gib": startup["latent_caching_peak"] / GIB, "caption_caching_gib": startup["startup_peak"] / GIB})
    for batch, rank, checkpointing, cached in itertools.product(batches, [int(r) for r in ranks.split(",")], (True, False), (True, False)):
        vae = None if cached else sdxl_vae()
        peak = measure_training(sdxl_unet(), vae, resolution, batch, rank, checkpointing, new_fake_mode())["tracked_peak"]
        # the whole run's peak: its steps, or its start (the VAE's encoding, then the captions' with the UNet
        # beside the text encoders; the fp32 VAE is counted there even where --cache_latents has sent it away)
        overall = max(peak, startup["startup_peak"])
        rows.append({"job": "train_lora.py", "resolution": resolution, "batch": batch, "rank": rank, "grad_checkpointing": checkpointing,
                     "cache_latents": cached, "step_peak_gib": peak / GIB, "peak_allocated_gib": overall / GIB})
    for batch in batches:
        mode = new_fake_mode()
        peak = measure_inference(fake_sdxl_pipeline(mode), resolution, batch, mode)["tracked_peak"]
        rows.append({"job": "infer.py", "resolution": resolution, "batch": batch, "peak_allocated_gib": peak / GIB})
    report(rows, out)


ADAPTER_RUNS = {  # --adapter and the options that make each kind, at --rank 16 (and 16 on the convolutions)
    "LoRA": {}, "LoCon": {"conv_rank": 16}, "LoHa": {"adapter": "loha", "conv_rank": 16},
    "LoKr": {"adapter": "lokr", "conv_rank": 16}, "DoRA": {"use_dora": True},
}


@app.command()
def adapters(
    resolution: Annotated[int, typer.Option(*flags("resolution"))] = 1024,
    batch_sizes: Annotated[str, typer.Option(*flags("batch_sizes"))] = "1,4",
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """Peak allocated GPU memory of each adapter kind at `resolution`, bf16, rank 16, gradient checkpointing and
    cached latents: the training steps' peak, and the run's with its start."""
    rows = []
    startup = measure_startup(resolution)["startup_peak"]
    for batch in [int(b) for b in batch_sizes.split(",")]:
        for kind, options in ADAPTER_RUNS.items():
            peak = measure_training(sdxl_unet(), None, resolution, batch, 16, True, new_fake_mode(), adapter=options)["tracked_peak"]
            rows.append({"job": f"train_lora.py {kind}", "resolution": resolution, "batch": batch, "step_peak_gib": peak / GIB,
                         "peak_allocated_gib": max(peak, startup) / GIB})
    report(rows, out)


@app.command()
def validate(
    resolution: Annotated[int, typer.Option(*flags("resolution"))] = 128,
    batch: Annotated[int, typer.Option(*flags("batch"))] = 1,
    rank: Annotated[int, typer.Option(*flags("rank"))] = 16,
    model: Annotated[str, typer.Option(*flags("model", "-m"))] = "full-sdxl",
    out: Annotated[Path | None, typer.Option(*flags("out"))] = None,
) -> None:
    """One training step's memory three ways at a CPU-sized resolution: the allocator's own running total
    (profiler), LiveStorages on the real tensors, LiveStorages on fake tensors."""
    from diffusers import UNet2DConditionModel

    from common.models import resolve_model

    rows = []
    for checkpointing in (False, True):
        unet = frozen(UNet2DConditionModel.from_pretrained(Path(resolve_model(model)) / "unet", dtype=torch.bfloat16), torch.bfloat16)
        real = measure_training(unet, None, resolution, batch, rank, checkpointing)
        del unet
        fake = measure_training(sdxl_unet(), None, resolution, batch, rank, checkpointing, new_fake_mode())
        rows.append({"resolution": resolution, "batch": batch, "rank": rank, "grad_checkpointing": checkpointing,
                     "allocator_rise_gib": real["allocator_rise"] / GIB,
                     "tracked_real_rise_gib": (real["tracked_peak"] - real["tracked_start"]) / GIB,
                     "tracked_real_peak_gib": real["tracked_peak"] / GIB, "tracked_fake_peak_gib": fake["tracked_peak"] / GIB})
    report(rows, out)


if __name__ == "__main__":
    run_app(app)
