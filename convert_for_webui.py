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
) -> None:
    """Write the LoRA (kohya format) and the embedding where WebUI or ComfyUI look for them."""
    from common.lora_formats import lora_file

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
    export_lora(source, lora_target, name, training_args)
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
    root, folders, what, marker = (
        (webui_dir, WEBUI_FOLDERS, "stable-diffusion-webui", "models/Stable-diffusion")
        if webui_dir is not None
        else (comfyui_dir, COMFYUI_FOLDERS, "ComfyUI", "models/checkpoints")
    )
    if not (root / marker).is_dir():
        raise UserError(f"{str(root)!r} does not look like a {what} installation (no {marker}/ folder)")
    return root / folders[0] / f"{name}.safetensors", root / folders[1] / f"{name}.safetensors"


def read_training_args(folder: Path) -> dict:
    path = folder / "training_args.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def export_lora(source: Path, target: Path, name: str, training_args: dict) -> None:
    """The kohya-format file with kohya's `ss_*` and Stability's `modelspec.*` metadata, written atomically."""
    from safetensors.torch import save_file

    from common.files import atomic_path
    from common.lora_formats import diffusers_lora_to_kohya

    kohya, summary = diffusers_lora_to_kohya(source)
    rank, alpha = summary.get("unet", next(iter(summary.values())))
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_network_args": json.dumps({"parts": sorted(summary)}),
        "ss_sd_model_name": str(training_args.get("pretrained_model_name_or_path", "")),
        "ss_output_name": name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": name,
        "modelspec.trigger_phrase": trigger_prompt(training_args, name, "webui") or "",
    }
    if training_args:
        metadata["ss_training_comment"] = json.dumps({k: training_args.get(k) for k in ("rank", "learning_rate", "max_train_steps", "edm")})
    with atomic_path(target) as partial:
        save_file(kohya, str(partial), metadata=metadata)


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
