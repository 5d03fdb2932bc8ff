#!/usr/bin/env python
"""Export a trained SDXL LoRA and its pivotal-tuning embedding for Stable Diffusion WebUI and ComfyUI.

    python convert_for_webui.py out/my_dog --name my_dog --webui_dir ~/stable-diffusion-webui
    python convert_for_webui.py out/my_dog --name my_dog --comfyui_dir ~/ComfyUI
    python convert_for_webui.py out/my_dog/pytorch_lora_weights.safetensors --name my_dog --out exported/

The LoRA becomes one kohya-format file (`lora_unet_*`, `lora_te1_*`, `lora_te2_*` with the trained
alpha per layer, so alpha / rank reproduces the trained strength) with kohya and modelspec metadata;
the embedding becomes NAME.safetensors with `clip_l` and `clip_g`. The prompts to use in each UI are
printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from common.cli import UserError, flags, run_app

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

WEBUI_FOLDERS = ("models/Lora", "embeddings")
COMFYUI_FOLDERS = ("models/loras", "models/embeddings")


@app.command()
def main(
    lora: Annotated[Path, typer.Argument(help="a training output folder or a diffusers LoRA file")],
    name: Annotated[Optional[str], typer.Option(*flags("name"), help="the name in the UI (default: the folder's name)")] = None,
    webui_dir: Annotated[Optional[Path], typer.Option(*flags("webui_dir"), help="a stable-diffusion-webui installation")] = None,
    comfyui_dir: Annotated[Optional[Path], typer.Option(*flags("comfyui_dir"), help="a ComfyUI installation")] = None,
    out: Annotated[Optional[Path], typer.Option(*flags("out", "-o"), help="a plain output folder")] = None,
    force: Annotated[bool, typer.Option(*flags("force"), help="replace files that already exist")] = False,
    model: Annotated[Optional[str], typer.Option(*flags("pretrained_model_name_or_path", "--model", "-m"), help="the base model: needed to bake a DoRA into a plain LoRA")] = None,
    rank: Annotated[Optional[int], typer.Option(*flags("rank"), help="rank of a baked DoRA (default: full, exact)")] = None,
    to: Annotated[str, typer.Option(*flags("to"), help="kohya (for the UIs) or diffusers (a kohya file back, for merge_lora/train)")] = "kohya",
    check: Annotated[bool, typer.Option(*flags("check"), help="only report what a UI would not load from a kohya file")] = False,
    dora_native: Annotated[Optional[str], typer.Option(*flags("dora_native"), help="comfyui: write a DoRA's dora_scale as ComfyUI reads it instead of baking it")] = None,
) -> None:
    """Write the LoRA (kohya format) and the embedding where WebUI or ComfyUI look for them."""
    from common.lora_formats import lora_file

    if check:
        raise typer.Exit(check_file(lora))
    if to not in ("kohya", "diffusers"):
        raise UserError(f"--to {to!r}; use kohya or diffusers")
    if dora_native not in (None, "comfyui"):
        raise UserError(f"--dora_native {dora_native!r}: only comfyui; WebUI's dora_scale normalises input columns, "
                        "which no peft DoRA (output rows) maps onto exactly, so for WebUI the DoRA is baked (give --model)")
    if to == "diffusers":
        if out is None:
            raise UserError("--to diffusers writes into --out DIR")
        to_diffusers(lora, out, force)
        return
    if sum(x is not None for x in (webui_dir, comfyui_dir, out)) != 1:
        raise UserError("give exactly one of --webui_dir DIR, --comfyui_dir DIR or --out DIR")
    if not lora.exists():
        raise UserError(f"LoRA {str(lora)!r} not found; give a training output folder or its pytorch_lora_weights.safetensors")
    source = lora_file(lora)
    name = name or (lora if lora.is_dir() else lora.parent).resolve().name
    lora_target, embedding_target = destinations(name, webui_dir, comfyui_dir, out)
    embedding = next(iter(sorted(source.parent.glob("*_emb.safetensors"))), None)
    for target in [lora_target] + ([embedding_target] if embedding else []):
        if target.exists() and not force:
            raise UserError(f"{str(target)!r} exists; pass --force to replace it")
    training_args = read_training_args(source.parent)
    export_lora(source, lora_target, name=name, training_args=training_args, model=model, rank=rank, dora_native=dora_native)
    typer.echo(f"LoRA: {lora_target}")
    if embedding:
        export_embedding(embedding, embedding_target)
        typer.echo(f"embedding: {embedding_target}")
    for line in usage_lines(name, training_args, has_embedding=embedding is not None):
        typer.echo(line)


def destinations(name: str, webui_dir: Path | None, comfyui_dir: Path | None, out: Path | None) -> tuple[Path, Path]:
    """(LoRA path, embedding path) in the chosen installation's folders, or both in --out."""
    if out is not None:
        return out / f"{name}.safetensors", out / "embeddings" / f"{name}.safetensors"
    root, folders, program, marker = (
        (webui_dir, WEBUI_FOLDERS, "stable-diffusion-webui", "models/Stable-diffusion")
        if webui_dir is not None
        else (comfyui_dir, COMFYUI_FOLDERS, "ComfyUI", "models/checkpoints")
    )
    if not (root / marker).is_dir():
        raise UserError(f"{str(root)!r} does not look like a {program} installation (no {marker}/ folder)")
    return root / folders[0] / f"{name}.safetensors", root / folders[1] / f"{name}.safetensors"


def read_training_args(folder: Path) -> dict:
    path = folder / "training_args.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_lora(source: Path, target: Path, *, name: str, training_args: dict, model: str | None, rank: int | None,
                dora_native: str | None = None) -> None:
    """The kohya-format file with kohya's `ss_*` and Stability's `modelspec.*` metadata, written atomically.
    A DoRA is baked into a plain LoRA first (every UI loads that; their DoRA conventions differ)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from common.files import atomic_path
    from common.lora_formats import diffusers_lora_to_kohya, is_dora, kohya_metadata

    with safe_open(str(source), "pt") as handle:
        dora = is_dora(handle.keys())
    if dora and not dora_native:
        if not model:
            raise UserError(f"{str(source)!r} is a DoRA: baking it into a plain LoRA needs the base model, --model MODEL")
        kohya, summary = bake_dora(source, model, rank)
    else:
        kohya, summary = diffusers_lora_to_kohya(source, dora_native=dora_native)
    rank, alpha = summary.get("unet", next(iter(summary.values())))
    fields = {"network_args": json.dumps({"parts": sorted(summary)}), "output_name": name,
              "sd_model_name": str(training_args.get("pretrained_model_name_or_path", ""))}
    if training_args:
        fields["training_comment"] = json.dumps({k: training_args.get(k) for k in ("rank", "learning_rate", "max_train_steps", "edm")})
    metadata = kohya_metadata(rank=rank, alpha=alpha, **fields) | {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.trigger_phrase": trigger_prompt(training_args, name, "webui") or "",
    }
    with atomic_path(target) as partial:
        save_file(kohya, str(partial), metadata=metadata)


def bake_dora(source: Path, model: str, rank: int | None):
    """Each DoRA layer's adapted weight W' = m * (W + dW) / ||W + dW|| (Liu et al. 2024, Eq. 5, computed by
    peft's own merge) minus W, factorised by SVD at `rank` (full by default) into a plain LoRA of scale 1."""
    import torch

    from common.lora_formats import COMPONENT_PREFIXES, LoraSpec, adapter_layers, load_loras, lora_ranks, peft_lora_to_kohya, svd_factors
    from common.models import load_sdxl_pipeline

    pipe = load_sdxl_pipeline(model, torch.float32)
    [adapter] = load_loras(pipe, [LoraSpec(source)])
    states, summary, worst = {}, {}, 0.0
    for component in COMPONENT_PREFIXES:
        state = {}
        for module_name, module in adapter_layers(getattr(pipe, component), adapter).items():
            before = module.get_base_layer().weight.detach().clone()
            module.merge(adapter_names=[adapter])
            delta = module.get_base_layer().weight.detach().double() - before.double()
            module.unmerge()
            up, down, error = svd_factors(delta, rank)
            worst = max(worst, error)
            state[f"{module_name}.lora_A.weight"], state[f"{module_name}.lora_B.weight"] = down, up
        if state:
            states[component] = state
            some_rank = next(iter(lora_ranks(state).values()))
            summary[component] = (some_rank, some_rank)  # scale 1: alpha = rank, layer by layer
    kohya = peft_lora_to_kohya(states, layers_per_block=pipe.unet.config.layers_per_block)
    typer.echo(f"DoRA baked into a plain LoRA (rank {rank or 'full'}): largest relative truncation error {worst:.2e}")
    return kohya, summary


def check_file(path: Path) -> int:
    """Report rank, alpha, DoRA, parts, and every key a UI would not map; 1 when there is any."""
    from safetensors.torch import load_file

    from common.lora_formats import check_kohya_keys, kohya_part

    if not path.is_file():
        raise UserError(f"--check takes a kohya .safetensors file; {str(path)!r} is not a file")
    state = load_file(str(path))
    problems = check_kohya_keys(state)
    parts = sorted({kohya_part(key) for key in state} - {None})
    ranks = sorted({v.shape[0] for k, v in state.items() if k.endswith("lora_down.weight")})
    alphas = sorted({float(v) for k, v in state.items() if k.endswith(".alpha")})
    typer.echo(f"parts: {', '.join(parts) or 'none'}; ranks: {ranks}; alphas: {alphas}; DoRA: {any(k.endswith('dora_scale') for k in state)}")
    for problem in problems:
        typer.echo(f"unmapped: {problem}")
    typer.echo(f"{len(problems)} key(s) a UI would skip" if problems else "every key maps onto SDXL")
    return 1 if problems else 0


def to_diffusers(source: Path, out: Path, force: bool) -> None:
    """A kohya-format LoRA as a diffusers/peft file: factors unchanged, each layer's alpha in the metadata."""
    from collections import Counter

    from peft import LoraConfig

    from common.lora_formats import DIFFUSERS_LORA_FILE, is_dora, kohya_to_peft, lora_ranks, save_diffusers_lora

    if not source.is_file():
        raise UserError(f"--to diffusers takes a kohya .safetensors file; {str(source)!r} is not a file")
    target = out / DIFFUSERS_LORA_FILE
    if target.exists() and not force:
        raise UserError(f"{str(target)!r} exists; pass --force to replace it")
    states, alphas = kohya_to_peft(source)
    configs = {}
    for component, state in states.items():
        ranks = lora_ranks(state)
        configs[component] = LoraConfig(
            r=Counter(ranks.values()).most_common(1)[0][0], lora_alpha=Counter(alphas[component].values()).most_common(1)[0][0],
            target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=alphas[component], use_dora=is_dora(state),
        ).to_dict()
    save_diffusers_lora(out, states, configs)
    typer.echo(f"diffusers LoRA: {target}")


def export_embedding(source: Path, target: Path) -> None:
    """`clip_l`/`clip_g` rows as WebUI and ComfyUI read SDXL embeddings (checked on the way)."""
    from safetensors.torch import save_file

    from common.files import atomic_path
    from common.tokens import CLIP_G_KEY, CLIP_L_KEY, read_embedding

    clip_l, clip_g = read_embedding(source)
    with atomic_path(target) as partial:
        save_file({CLIP_L_KEY: clip_l.contiguous(), CLIP_G_KEY: clip_g.contiguous()}, str(partial))


def trigger_prompt(training_args: dict, name: str, ui: str) -> str | None:
    """The instance prompt with each abstraction replaced by what the UI expects in its place."""
    from common.tokens import expand_abstractions

    prompt = training_args.get("instance_prompt")
    if not prompt:
        return None
    word = name if ui == "webui" else f"embedding:{name}"
    return expand_abstractions(prompt, {a: [word] for a in training_args.get("token_map") or {}})


def usage_lines(name: str, training_args: dict, has_embedding: bool) -> list[str]:
    webui = trigger_prompt(training_args, name, "webui") or "your prompt"
    comfyui = trigger_prompt(training_args, name, "comfyui") or "your prompt"
    lines = [f"WebUI prompt: {webui} <lora:{name}:1>", f"ComfyUI: LoraLoader with {name}.safetensors; prompt: {comfyui}"]
    if has_embedding and not training_args.get("token_map"):
        lines.append(f"the embedding's tokens are written as {name} (WebUI) or embedding:{name} (ComfyUI)")
    return lines


if __name__ == "__main__":
    run_app(app)
