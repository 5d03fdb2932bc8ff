"""What a train_lora.py run writes beside its checkpoints: the adapter files (diffusers and kohya/LyCORIS, with kohya's
metadata) at the end and on kohya's save schedule, their EMA twins, the pivotal-tuning embeddings, training_args.json,
config.toml and a model card.

`config` is train_lora.py's TrainConfig (common/ never imports a script).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from common.files import atomic_path

if TYPE_CHECKING:
    from common.training_data import TrainingData

logger = logging.getLogger(__name__)


def recorded(config) -> dict:
    """The config as training_args.json and the trackers record it."""
    fields = {f.name for f in dataclasses.fields(config) if f.metadata.get("recorded", True)}
    return {k: v for k, v in asdict(config).items() if k in fields}


def output_name(config) -> str:
    """The run's name: --output_name, or the output folder's own name (also for a nested path)."""
    return config.output_name or Path(config.output_dir).resolve().name


def save_schedule(config):
    """kohya's saving options as one checked schedule (common.save_schedule)."""
    from common.save_schedule import SaveSchedule

    return SaveSchedule(name=output_name(config), every_n_epochs=config.save_every_n_epochs, every_n_steps=config.save_every_n_steps,
                        last_n_epochs=config.save_last_n_epochs, last_n_steps=config.save_last_n_steps,
                        precision=config.save_precision).check()


def save_outputs(unet, pipe, caption_encoder, config, facts, ema=None) -> None:
    """The diffusers LoRA file (LoRA and LoCon: what diffusers loads), the kohya/LyCORIS file WebUI and ComfyUI
    read (every type but DoRA), the same two for the EMA weights (`NAME_ema.safetensors`, `ema/`) with --use_ema,
    pivotal-tuning embeddings, training_args.json and a model card, each written atomically."""
    from common.tokens import save_embedding

    output, name = Path(config.output_dir), output_name(config)
    models = trained_models(unet, pipe, config)
    save_adapter_files(models, output, name, config, pipe.unet.config.layers_per_block, facts=facts)
    if ema is not None:
        with ema_weights(ema, unet):
            save_adapter_files(models, output / "ema", f"{name}_ema", config, pipe.unet.config.layers_per_block,
                               facts=dataclasses.replace(facts, output_name=f"{name}_ema"))
        (output / "ema" / f"{name}_ema.safetensors").replace(output / f"{name}_ema.safetensors")  # beside the raw one
        if not any((output / "ema").iterdir()):  # LoHa and LoKr have no diffusers file
            (output / "ema").rmdir()

    if caption_encoder.rows:
        save_embedding(
            output / f"{name}_emb.safetensors",
            *[r.new_rows for r in caption_encoder.rows],
            [t for group in config.token_map.values() for t in group],
        )
    with atomic_path(output / "training_args.json") as partial:
        partial.write_text(json.dumps(recorded(config), indent=2, default=str))
    if config.configuration:
        with atomic_path(output / "config.toml") as partial:
            partial.write_text(config.configuration)
    with atomic_path(output / "README.md") as partial:
        partial.write_text(model_card(config, name))


def save_adapter_files(models: dict, output: Path, name: str, config, layers_per_block: int,
                       snapshot: bool = False, facts=None) -> None:
    """The adapter of `models` in --save_precision: the diffusers file (LoRA and LoCon) in `output` and the
    kohya/LyCORIS file NAME.safetensors, each with kohya's metadata of `facts` (common.lora_metadata; the minimum
    with --no_metadata) and its hashes. A `snapshot` (a --save_every_n_* file) is only the file the UIs read, under
    `name`: the kohya/LyCORIS file, or for DoRA, which has none, the diffusers one."""
    from peft.utils import get_peft_model_state_dict

    from common.lora_formats import save_diffusers_lora, trained_adapter_file
    from common.lora_metadata import add_file_metadata, lora_metadata, save_lora_file
    from common.save_schedule import cast_for_saving

    output.mkdir(parents=True, exist_ok=True)
    metadata = lora_metadata(facts, minimal=config.no_metadata)
    if config.adapter == "lora" and (config.use_dora or not snapshot):
        states = {
            component: cast_for_saving({k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()},
                                       config.save_precision)
            for component, model in models.items()
        }
        written = save_diffusers_lora(output, states, {c: model.peft_config["default"].to_dict() for c, model in models.items()},
                                      file_name=f"{name}.safetensors" if snapshot else None)
        add_file_metadata(written, metadata)
    if config.use_dora:
        if not snapshot:
            logger.warning("DoRA: no kohya copy written (WebUI and ComfyUI read DoRA differently); use the diffusers file")
        return
    state = cast_for_saving(trained_adapter_file(models, layers_per_block=layers_per_block), config.save_precision)
    save_lora_file(output / f"{name}.safetensors", state, metadata)


def lora_facts(config, data: TrainingData, formulation, started_at: float):
    """What an adapter file's metadata records of this run (common.lora_metadata): the network, the dataset's
    folders with their tags, repeats and image counts, the buckets, the training size, the rates and the start; made
    once a run, each file's own step, epoch and time added by `facts_at`."""
    from collections import Counter, defaultdict

    from common.adapters import ADAPTERS
    from common.lora_metadata import LoraFacts, dataset_folder
    from common.tokens import expand_abstractions

    groups: dict = defaultdict(list)
    for plan in data.plans:
        for example in plan.examples:
            subset = plan.subsets[example.subset]
            folder = example.name.split("/")[0] if "/" in example.name else subset.name
            groups[(folder, subset.is_reg)].append((example, subset))
    folders = [dataset_folder(folder, [e.caption for e, _ in members],
                              members[0][1].num_repeats if is_reg else members[0][0].repeats, is_reg=is_reg)
               for (folder, is_reg), members in groups.items()]
    if data.classes is not None:
        folders.append(dataset_folder(Path(config.class_data_dir).name, data.class_captions, 1, is_reg=True))
    buckets = Counter(data.instances.bucket(position) for position in range(len(data.instances)))
    width, height = config.training_size or (config.resolution, config.resolution)
    network_args = {"algo": "locon" if config.adapter == "lora" and config.conv_rank else config.adapter,
                    "lora_layers": config.lora_layers}
    if config.conv_rank:
        network_args |= {"conv_dim": config.conv_rank, "conv_alpha": config.conv_alpha or config.conv_rank}
    prediction = getattr(formulation, "prediction_type", None)
    return LoraFacts(
        network_module=ADAPTERS[config.adapter].network_module, dim=config.rank, alpha=config.lora_alpha or config.rank,
        output_name=output_name(config), network_args=network_args, base_model=config.pretrained_model_name_or_path,
        folders=tuple(folders), buckets={(w, h): n for (h, w), n in buckets.items()}, resolution=(width, height),
        clip_skip=config.clip_skip, started_at=started_at, seed=config.seed,
        learning_rate=config.learning_rate, unet_lr=config.learning_rate,
        text_encoder_lr=config.text_encoder_lr if config.train_text_encoder or config.token_map else None,
        prediction_type=prediction if prediction in ("epsilon", "v_prediction") else None,
        trigger_phrase=expand_abstractions(config.instance_prompt, config.token_map) if config.instance_prompt else None,
    )


def facts_at(facts, step: int, epoch: int):
    """The run's `lora_facts` for a file written now, after `step` steps in `epoch` epochs."""
    return dataclasses.replace(facts, steps=step, epoch=epoch, finished_at=time.time())


def trained_models(unet, pipe, config) -> dict:
    """The models whose adapters a run trains, by the component names of the adapter files."""
    if config.train_text_encoder:
        return {"unet": unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    return {"unet": unet}


def save_snapshot(unet, pipe, config, schedule, file_name: str, facts) -> None:
    """A --save_every_n_epochs/--save_every_n_steps file of the adapter as it is now, then the file kohya's
    --save_last_n_* retire (common.save_schedule); the main process's work."""
    output = Path(config.output_dir)
    save_adapter_files(trained_models(unet, pipe, config), output, file_name.removesuffix(".safetensors"), config,
                       pipe.unet.config.layers_per_block, snapshot=True, facts=facts)
    for removed in schedule.remove_expired(output, file_name):
        logger.info(f"removed {removed.name} (--save_last_n_*)")


def make_ema(config, unet, accelerator):
    """diffusers' EMAModel of the UNet adapter's trained weights (--use_ema), on the device and in every checkpoint;
    its decay warms up as min(--ema_decay, (1 + t) / (10 + t)) (EMAModel.get_decay without use_ema_warmup)."""
    from diffusers.training_utils import EMAModel

    if not config.use_ema:
        return None
    ema = EMAModel([p for p in unet.parameters() if p.requires_grad], decay=config.ema_decay)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


@contextlib.contextmanager
def ema_weights(ema, unet):
    """The UNet adapter with its EMA weights inside the block, its raw weights after it."""
    trained = [p for p in unet.parameters() if p.requires_grad]
    ema.store(trained)
    ema.copy_to(trained)
    try:
        yield
    finally:
        ema.restore(trained)


def model_card(config, name: str) -> str:
    """How to use the result: trigger prompt, tokens, diffusers and infer.py code, WebUI and ComfyUI."""
    from common.tokens import expand_abstractions

    model = config.pretrained_model_name_or_path
    prompt = expand_abstractions(config.instance_prompt or "(your caption)", config.token_map)
    tokens = [t for group in config.token_map.values() for t in group]
    embedding_code = embedding_cli = embedding_ui = tokens_line = ""
    if tokens:
        tokens_line = "Tokens: " + ", ".join(f"`{a}` -> `{''.join(t)}`" for a, t in config.token_map.items()) + "\n"
        embedding_code = f"""from safetensors.torch import load_file
pipe.text_encoder_2.text_model.eos_token_id = 49407  # pool at the end of text, as in training (SDXL's config says 2)
state = load_file("{config.output_dir}/{name}_emb.safetensors")
pipe.load_textual_inversion(state["clip_l"], token={tokens!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
pipe.load_textual_inversion(state["clip_g"], token={tokens!r}, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
"""
        embedding_cli = f" --embedding {config.output_dir}/{name}_emb.safetensors"
        ui_prompt = expand_abstractions(config.instance_prompt or "", {a: [name] for a in config.token_map})
        embedding_ui = f"""
Embedding: copy `{name}_emb.safetensors` as `{name}.safetensors` into WebUI's `embeddings/` or ComfyUI's
`models/embeddings/` and write its name where the tokens were: WebUI `{ui_prompt} <lora:{name}:1>`,
ComfyUI `{expand_abstractions(config.instance_prompt or "", {a: [f"embedding:{name}"] for a in config.token_map})}`.
"""
    kind = {"lora": "LoCon" if config.conv_rank else "LoRA", "loha": "LoHa", "lokr": "LoKr"}[config.adapter]
    convolutions = f", convolutions at rank {config.conv_rank}" if config.conv_rank else ""
    load = "from_single_file" if Path(model).is_file() else "from_pretrained"  # a single file needs its configs: see the README
    if config.adapter == "lora":
        diffusers = f"""```python
from diffusers import StableDiffusionXLPipeline
pipe = StableDiffusionXLPipeline.{load}("{model}")
pipe.load_lora_weights("{config.output_dir}")
{embedding_code}image = pipe("{prompt}").images[0]
```

or: """
    else:  # diffusers' SDXL loader reads no hada_/lokr_ tensors
        diffusers = f"diffusers' SDXL LoRA loader cannot read a {kind}; use "
    return f"""# {name}

{kind} (rank {config.rank}{convolutions}{", DoRA" if config.use_dora else ""}{", with text-encoder adapters" if config.train_text_encoder else ""}) for `{model}`,
trained with train_lora.py{" (EDM formulation)" if config.edm else ""}{", pivotal tuning" if tokens else ""}.

Trigger prompt: `{prompt}`
{tokens_line}
## diffusers

{diffusers}`python infer.py --model {model} --lora {config.output_dir}{embedding_cli} --prompt "{prompt}"`

## WebUI / ComfyUI

Copy `{name}.safetensors` into `models/Lora` (WebUI: prompt `<lora:{name}:1>`) or `models/loras` (ComfyUI: LoraLoader).
{embedding_ui}"""
