"""LoRA files in diffusers/peft and kohya/WebUI formats, loaded into an SDXL pipeline through diffusers.

diffusers reads both formats; this module adds what users need around it: `PATH[:WEIGHT]`
specs, loading only some blocks (B-LoRA), and a check that every layer of the file really
landed in the model with the file's weights.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

from common.checkpoints import unet_module_to_sgm
from common.cli import UserError

# B-LoRA (Frenkel et al. 2024, "Implicit Style-Content Separation using B-LoRA"), Sec. 4: in SDXL
# the first two transformer blocks of the first up block carry content and style respectively.
BLORA_CONTENT_BLOCK = "unet.up_blocks.0.attentions.0"
BLORA_STYLE_BLOCK = "unet.up_blocks.0.attentions.1"
BLORA_BLOCKS = (BLORA_CONTENT_BLOCK, BLORA_STYLE_BLOCK)

COMPONENT_PREFIXES = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
# kohya's names for the parts of SDXL, as WebUI and ComfyUI read them (kohya-ss/sd-scripts, networks/lora.py)
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
DORA_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to load: its file, its weight (scales its delta W linearly), and optional block prefixes."""

    path: Path
    weight: float = 1.0
    blocks: tuple[str, ...] | None = None


def parse_weighted_path(spec: str, what: str = "LoRA") -> tuple[Path, float]:
    """`PATH[:WEIGHT]` -> (path, weight); a path may itself contain ':' (a tail after the last ':' is a
    weight when the whole spec is not an existing path). The weight must be a finite number."""
    import math

    path_text, weight_text = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and not Path(spec).expanduser().exists():
        path_text, weight_text = head, tail
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"{what} file {path_text!r} not found; expected PATH or PATH:WEIGHT, e.g. my_lora.safetensors:0.8")
    if weight_text is None:
        return path, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        raise UserError(f"{what} weight {weight_text!r} in {spec!r} is not a number; expected PATH:WEIGHT, e.g. {path_text}:0.8") from None
    if not math.isfinite(weight):
        raise UserError(f"{what} weight {weight_text!r} in {spec!r} is not a finite number; expected e.g. {path_text}:0.8")
    return path, weight


def safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names of a safetensors file, read without its tensors; a file that is not one (truncated,
    random bytes, another format) is refused in one line naming it."""
    from safetensors import safe_open

    with _readable_safetensors(path, what):
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())


def read_safetensors(path: Path, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, refused in one line as `safetensors_keys` refuses it (`hint`: what to
    do instead)."""
    from safetensors.torch import load_file

    with _readable_safetensors(path, what, hint):
        return load_file(str(path))


def read_finite_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter or embedding file (`read_safetensors`), refused in one line where one holds a NaN or an
    infinity (`refuse_non_finite`)."""
    tensors = read_safetensors(path, what)
    refuse_non_finite(tensors, what, path)
    return tensors


def non_finite_values(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: what it holds, `nan`, `inf` or `nan, inf`} for each floating tensor holding a NaN or an infinity."""
    import torch

    found = {}
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            kinds = [kind for kind, test in (("nan", torch.isnan), ("inf", torch.isinf)) if bool(test(value).any())]
            found[name] = ", ".join(kinds)
    return found


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str, source: Path) -> None:
    """One line naming the first tensor holding a NaN or an infinity: added to any weight, it makes every output it
    touches NaN, and the images black, without an error anywhere (what a diverged training run saves)."""
    found = non_finite_values(tensors)
    if found:
        name, kinds = next(iter(found.items()))
        more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
        raise UserError(f"{what} {str(source)!r} holds non-finite values ({kinds}) in {name}{more}: it cannot be applied "
                        "(a training run that diverged?)")


@contextlib.contextmanager
def _readable_safetensors(path: Path, what: str, hint: str = ""):
    from safetensors import SafetensorError

    try:
        yield
    except (SafetensorError, OSError) as error:
        raise UserError(f"could not read {what} {str(path)!r} as a safetensors file: {_first_line(error)}{hint}") from None


def lora_file(path: Path) -> Path:
    """The weights file of a LoRA given as a file or as a training output folder."""
    if path.is_file():
        return path
    if (path / DIFFUSERS_LORA_FILE).is_file():
        return path / DIFFUSERS_LORA_FILE
    candidates = sorted(p for p in path.glob("*.safetensors") if not p.name.endswith("_emb.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise UserError(
            f"LoRA folder {str(path)!r} must hold {DIFFUSERS_LORA_FILE} or exactly one .safetensors file; found {found}"
        )
    return candidates[0]


def normalize_block_prefix(block: str) -> str:
    """`up_blocks.0.attentions.1` -> `unet.up_blocks.0.attentions.1`; component-qualified names stay."""
    block = block.strip().strip(".")
    if block.split(".")[0] in COMPONENT_PREFIXES:
        return block
    return f"unet.{block}"


def parse_blocks(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of blocks as component-qualified prefixes (empty for None or blanks)."""
    return tuple(normalize_block_prefix(b) for b in (text or "").split(",") if b.strip())


def is_dora(keys) -> bool:
    """Whether peft state-dict keys hold DoRA magnitudes."""
    return any(key.endswith(DORA_MAGNITUDE_SUFFIX) for key in keys)


def lora_ranks(state: dict) -> dict[str, int]:
    """{module: rank} of a peft state dict: the rows of each module's lora_A."""
    return {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items() if k.endswith(".lora_A.weight")}


def adapter_layers(model, adapter_name: str) -> dict:
    """{module name: peft layer} of the modules of `model` that carry the adapter `adapter_name` (a LoRA, LoHa or
    LoKr layer: each keeps its rank per adapter in `r`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "r", {})}


def save_diffusers_lora(folder: Path, states: dict[str, dict], adapter_metadata: dict[str, dict] | None = None,
                        file_name: str | None = None) -> Path:
    """folder/pytorch_lora_weights.safetensors (or `file_name`) from peft state dicts per component and, optionally,
    each component's LoraConfig as a dict (ranks and alphas; without it every layer loads at scale 1, and it is
    written without where the base model lay, `shareable_config`), written atomically; its path."""
    from diffusers import StableDiffusionXLPipeline

    from common.files import atomic_path

    layers = {f"{component}_lora_layers": state for component, state in states.items()}
    layers |= {f"{component}_lora_adapter_metadata": shareable_config(config) for component, config in (adapter_metadata or {}).items()}
    target = Path(folder) / (file_name or DIFFUSERS_LORA_FILE)
    with atomic_path(target) as partial:
        StableDiffusionXLPipeline.save_lora_weights(partial.parent, weight_name=partial.name, **layers)
    return target


# LoraConfig fields that say where the base model lay on the machine that trained: peft's `to_dict` holds the path it
# was given (/home/<user>/models/...), and diffusers writes the dict into the file's `lora_adapter_metadata`
LOCAL_CONFIG_FIELDS = ("base_model_name_or_path",)


def shareable_config(config: dict) -> dict:
    """An adapter config dict for a file that others will read: without `LOCAL_CONFIG_FIELDS` (loading never reads
    them; the base model is named where the user names it)."""
    return {key: value for key, value in config.items() if key not in LOCAL_CONFIG_FIELDS}


def public_model_name(model: str) -> str:
    """A base model as a shared file's metadata may name it: a hub id or a built-in name as given, a local path (absolute,
    ~ or ./-relative, or an existing file or folder) by its last part only, which names no user's folders."""
    path = Path(model)
    if model and (path.is_absolute() or model.startswith(("~", ".")) or path.exists()):
        return path.expanduser().resolve().name
    return model


def read_lora(pipe, path: Path):
    """(state_dict, network_alphas, metadata) in diffusers naming, whatever the file's format."""
    file = lora_file(path)
    try:
        state_dict, network_alphas, metadata = pipe.lora_state_dict(
            str(file.parent), weight_name=file.name, unet_config=pipe.unet.config, return_lora_metadata=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"could not read LoRA {str(file)!r}: {_first_line(error)}") from None
    if not state_dict or not all("lora" in key for key in state_dict):
        raise UserError(f"{str(file)!r} is not a LoRA file: its keys have no 'lora' layers")
    refuse_non_finite(state_dict, "LoRA", file)
    return state_dict, network_alphas, metadata


def keep_blocks(state_dict: dict, network_alphas: dict | None, blocks: tuple[str, ...], source: Path):
    """The part of a LoRA under the given module prefixes; an error when a prefix matches nothing."""
    prefixes = [normalize_block_prefix(b) for b in blocks]
    kept = {k: v for k, v in state_dict.items() if any(k.startswith(p + ".") for p in prefixes)}
    for prefix in prefixes:
        if not any(k.startswith(prefix + ".") for k in kept):
            present = sorted({".".join(k.split(".")[:4]) for k in state_dict})
            raise UserError(
                f"LoRA {str(source)!r} has no layers under {prefix!r}; its blocks include {', '.join(present[:8])}"
            )
    if network_alphas:
        network_alphas = {k: v for k, v in network_alphas.items() if any(k.startswith(p + ".") for p in prefixes)}
    return kept, network_alphas


def check_lora_files(specs: list[LoraSpec]) -> None:
    """Before any model loads: each --lora file is readable, and one to be applied holds only finite values (a
    diverged run's file would make every image black), refused in one line naming the file and its first bad tensor."""
    for spec in specs:
        file = lora_file(spec.path)
        if spec.weight == 0:
            safetensors_keys(file, "LoRA")  # not applied (`load_loras`): readable is enough
        else:
            read_finite_safetensors(file, "LoRA")


def load_loras(pipe, specs: list[LoraSpec]) -> list[str]:
    """Load each LoRA with its weight, which scales its ΔW linearly (not each factor, which would square it);
    the names of the peft adapters made.

    A diffusers/peft file becomes a peft adapter through diffusers (all of them activated together with their
    weights). A kohya/LyCORIS file (LoRA, LoCon, LoHa, LoKr, with or without dora_scale) is applied as the UIs
    apply it, by adding each layer's ΔW to the weight it names (`common.adapters.patch_weights`; undone exactly
    by `unpatch_weights`). A LoRA of weight 0 is not loaded (its file is only checked to be readable), so the
    model stays the base model exactly: loaded, it would add exactly zero, but the adapted module tree can take
    other kernel paths whose rounding differs in the last bits on some CPUs.
    """
    from common.models import quiet_libraries

    names, weights = [], []
    for index, spec in enumerate(specs):
        file = lora_file(spec.path)
        keys = safetensors_keys(file, "LoRA")
        if spec.weight == 0:
            continue
        if is_kohya_format(keys):
            patch_kohya_file(pipe, file, spec)
            continue
        name = f"lora_{index}"
        state_dict, network_alphas, metadata = read_lora(pipe, spec.path)
        if spec.blocks:
            state_dict, network_alphas = keep_blocks(state_dict, network_alphas, spec.blocks, spec.path)
        with quiet_libraries():
            _load_adapter(pipe, state_dict, network_alphas, metadata, name, spec.path)
        refuse_overflowing_adapter(pipe, name, spec)
        names.append(name)
        weights.append(spec.weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return names


def refuse_overflowing_adapter(pipe, adapter_name: str, spec: LoraSpec) -> None:
    """Refuse, and remove, a peft adapter whose weight takes some layer's adapted weight W + weight·s·ΔW beyond the
    range of the model's dtype (fp16: ±65504): peft's DoRA forms that sum, fusing (--into_checkpoint, the DoRA bake)
    stores it, and an unfused LoRA's output overflows alike, so the images come out black. The message gives the
    largest weight that surely fits (`adapter_overflow_limit`)."""
    from common.adapters import describe_dtype_range, describe_fitting_weights

    limits = {}
    for component in COMPONENT_PREFIXES:
        model = getattr(pipe, component, None)
        for module, layer in (adapter_layers(model, adapter_name) if model is not None else {}).items():
            limit = adapter_overflow_limit(layer, adapter_name, spec.weight)
            if limit is not None:
                limits[f"{component}.{module}"] = (limit, layer.get_base_layer().weight.dtype)
    if limits:
        pipe.delete_adapters([adapter_name])
        layer, (_, dtype) = next(iter(limits.items()))
        more = f" and {len(limits) - 1} more layer(s)" if len(limits) > 1 else ""
        raise UserError(f"LoRA {str(spec.path)!r} at weight {spec.weight:g} takes the weight of {layer}{more} beyond "
                        f"{describe_dtype_range(dtype)}: {describe_fitting_weights(min(v for v, _ in limits.values()))}")


def adapter_overflow_limit(layer, adapter_name: str, weight: float) -> float | None:
    """None where a peft layer's adapted weight W + weight·s·ΔW fits its dtype; otherwise the largest |weight| that
    surely fits (`common.adapters.adapted_weight_overflow`). Cheap where it fits by far: a LoRA layer's ΔW is bounded
    from its factors (`lora_change_bound`) and formed only where the bound does not rule overflow out. peft multiplies
    the adapter's output by the number weight·s, itself at most float32's largest."""
    import math

    import torch

    from common.adapters import adapted_weight_overflow, lora_change_bound

    base = layer.get_base_layer().weight.detach()
    scale = layer.scaling[adapter_name]
    scalar_limit = float(torch.finfo(torch.float32).max) / abs(scale) if scale else math.inf
    if adapter_name in getattr(layer, "lora_A", {}):
        up, down = layer.lora_B[adapter_name].weight.detach(), layer.lora_A[adapter_name].weight.detach()
        room = float(torch.finfo(base.dtype).max) - float(base.abs().max())
        if abs(weight) <= scalar_limit and abs(weight * scale) * lora_change_bound(up, down) <= room:
            return None
        change = scale * (up.flatten(1).float() @ down.flatten(1).float()).reshape(base.shape)
    else:  # LoHa, LoKr: peft's own ΔW, which carries the layer's scale
        change = layer.get_delta_weight(adapter_name).detach().float()
    limit = adapted_weight_overflow(base, change, weight, base.dtype)
    if limit is None and abs(weight) <= scalar_limit:
        return None
    return min(limit if limit is not None else math.inf, scalar_limit)


KOHYA_FILE_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_", "diffusion_model.", "text_encoders.")


def is_kohya_format(keys) -> bool:
    """Whether a file's keys are the UIs' layer names: kohya's and LyCORIS's (lora_unet_..., lora_te1_...,
    lycoris_...) or ComfyUI's own (diffusion_model.<SGM path>, text_encoders.clip_l.<path>: its LoRA saver's)."""
    return any(key.startswith(KOHYA_FILE_PREFIXES) for key in keys)


def patch_kohya_file(pipe, file: Path, spec: LoraSpec) -> int:
    """A kohya/LyCORIS file's layers added to the weights they name, at the spec's weight and in its blocks only
    (every block named must hold some layer); the number of layers applied."""
    from common.adapters import file_layers, patch_weights

    layers = file_layers(read_finite_safetensors(file, "LoRA"))
    prefixes = [normalize_block_prefix(b) for b in spec.blocks or ()]
    targets = file_layer_names(pipe)
    if prefixes:
        present = {f"{targets[name][0]}.{targets[name][1]}" for name in layers if name in targets}
        for prefix in prefixes:
            if not any(path.startswith(prefix + ".") for path in present):
                blocks = sorted({".".join(path.split(".")[:4]) for path in present})
                raise UserError(f"LoRA {str(spec.path)!r} has no layers under {prefix!r}; its blocks include {', '.join(blocks[:8])}")
    keep = lambda component, module: not prefixes or any(f"{component}.{module}".startswith(p + ".") for p in prefixes)  # noqa: E731
    return patch_weights(pipe, layers, targets, strength=spec.weight, keep=keep, source=str(spec.path))


def file_layer_names(pipe) -> dict[str, tuple[str, str]]:
    """Every name a kohya/LyCORIS file may give a Linear or Conv2d layer of the pipeline, -> (component, module path):
    the UNet's under lora_unet_ in SGM naming (kohya's SDXL files) and in diffusers naming, under lycoris_
    (LyCORIS's own wrapper: SimpleTuner's files) and as diffusion_model.<SGM path> (ComfyUI's LoRA saver), as
    ComfyUI maps them; the text encoders' under lora_te1_ (or SD1's lora_te_) and lora_te2_ with CLIP's text_model
    level, as the UIs read them, and without it (what naming code run over transformers 5's CLIPTextModel writes),
    and as ComfyUI's text_encoders.clip_l/clip_g names."""
    import torch

    config = pipe.unet.config
    up_levels_with_attention = tuple(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
    names: dict[str, tuple[str, str]] = {}
    for component in COMPONENT_PREFIXES:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            path = path.replace(".base_layer", "")  # under a peft adapter already loaded: the layer it wraps
            flat = path.replace(".", "_")
            if component == "unet":
                sgm = unet_module_to_sgm(path, config.layers_per_block, up_levels_with_attention)
                spellings = [f"lora_unet_{sgm.replace('.', '_')}", f"lora_unet_{flat}", f"lycoris_{flat}", f"diffusion_model.{sgm}"]
            else:
                inner = path.removeprefix("text_model.")
                prefixes = ("lora_te1_", "lora_te_") if component == "text_encoder" else ("lora_te2_",)
                spellings = [f"{prefix}{level}{inner.replace('.', '_')}" for prefix in prefixes for level in ("text_model_", "")]
                clip = "clip_l" if component == "text_encoder" else "clip_g"
                spellings.append(f"text_encoders.{clip}.transformer.text_model.{inner}")
            for spelling in spellings:
                names[spelling] = (component, path)
    return names


def _load_adapter(pipe, state_dict, network_alphas, metadata, adapter_name: str, source: Path) -> None:
    """diffusers' load_lora_weights, split so that our normalised state dict goes in unchanged."""
    if network_alphas and metadata:
        network_alphas = None  # the file's own metadata (rank, alpha per layer) is the more precise record
    try:
        pipe.load_lora_into_unet(
            state_dict, network_alphas, pipe.unet, adapter_name=adapter_name, metadata=metadata, _pipeline=pipe
        )
        for prefix, encoder in (("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
            pipe.load_lora_into_text_encoder(
                state_dict,
                network_alphas,
                encoder,
                prefix=prefix,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=pipe,
            )
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(
            f"LoRA {str(source)!r} does not match this model (trained for another base?): {_mismatch_reason(error)}"
        ) from None
    _restore_dora_magnitudes(pipe, state_dict, adapter_name)
    _check_every_layer_loaded(pipe, state_dict, adapter_name, source)


def component_part(model, component: str, state_dict: dict) -> dict:
    """The layers of a LoRA state dict (diffusers naming, `component.` prefixes) for one component, named as diffusers
    names them when it injects them into `model`: peft naming (`<module>.lora_A.weight`), the module paths `model` has
    (transformers 5's CLIPTextModel has no `text_model` level, which older files carry). The same conversions as
    diffusers 0.42's `load_lora_adapter` (UNet) and `_load_lora_into_text_encoder`."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    part = {k.removeprefix(component + "."): v for k, v in state_dict.items() if k.startswith(component + ".")}
    if not part:
        return {}
    if component == "unet":
        return part if "lora_A" in next(iter(part)) else convert_unet_state_dict_to_peft(part)
    part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    return part if hasattr(model, "text_model") else {k.removeprefix("text_model."): v for k, v in part.items()}


ADAPTER_KEY = re.compile(r"(.+?)\.((?:lora_|hada_|lokr_)[^.]*(?:\.[^.]+)?)$")


def split_adapter_key(key: str) -> tuple[str, str]:
    """`<module>.lora_A.weight` -> (module, `lora_A.weight`); also `lora_magnitude_vector`, `hada_w1_a`, `lokr_w1`."""
    match = ADAPTER_KEY.match(key)
    if match is None:
        raise UserError(f"LoRA key {key!r} names no adapter tensor (lora_*, hada_*, lokr_*)")
    return match.group(1), match.group(2)


def landed_tensor(layer, tensor: str, adapter_name: str) -> torch.Tensor:
    """What a peft layer holds for a file tensor of adapter `adapter_name`: `lora_A.weight` -> lora_A[name].weight,
    `lora_magnitude_vector` -> lora_magnitude_vector[name].weight, `lokr_w1` -> lokr_w1[name]."""
    import torch

    container, _, attribute = tensor.partition(".")
    held = getattr(layer, container)[adapter_name]
    return held if isinstance(held, torch.Tensor) else getattr(held, attribute or "weight")


def _restore_dora_magnitudes(pipe, state_dict: dict, adapter_name: str) -> None:
    """Each DoRA layer's magnitude set from the file.

    With diffusers 0.42.1, transformers 5.23.0 and peft 0.21.2, a text encoder's magnitudes never arrive: peft's
    state dicts name them `<module>.lora_magnitude_vector` (without the `.weight` of the parameter), and the key
    renaming that transformers' `load_adapter` takes from peft (`build_peft_weight_mapping`: `lora_*` ->
    `lora_*.<adapter>`) makes `lora_magnitude_vector.<adapter>`, which names no parameter. transformers' load report
    lists them as unexpected and `lora_magnitude_vector.<adapter>.weight` as missing, and the layers keep peft's
    initial magnitude, ||W|| (the UNet goes through peft's own set_peft_model_state_dict, which adds the `.weight`)."""
    import torch

    for component in COMPONENT_PREFIXES:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        magnitudes = {k: v for k, v in component_part(model, component, state_dict).items() if k.endswith(DORA_MAGNITUDE_SUFFIX)}
        layers = adapter_layers(model, adapter_name) if magnitudes else {}
        with torch.no_grad():
            for key, value in magnitudes.items():
                layer = layers.get(key.removesuffix(DORA_MAGNITUDE_SUFFIX))
                if layer is not None:  # a layer the model lacks is refused by _check_every_layer_loaded
                    landed_tensor(layer, DORA_MAGNITUDE_SUFFIX.lstrip("."), adapter_name).copy_(value)


def _check_every_layer_loaded(pipe, state_dict: dict, adapter_name: str, source: Path) -> None:
    """Each component received as many adapter layers as the file has, and every tensor of the file (factors,
    DoRA magnitudes) is in its layer as the file holds it, rounded to the model's dtype.

    diffusers and peft skip unmatched layers with at most a warning, a layer whose name matched only by suffix can
    be injected but left at its initial weights, and a tensor renamed on the way is dropped with only a load report
    (`_restore_dora_magnitudes`); each leaves a LoRA that "works", wrongly.
    """
    for component in COMPONENT_PREFIXES:
        model = getattr(pipe, component, None)
        part = component_part(model, component, state_dict)
        if not part:
            continue
        layers = adapter_layers(model, adapter_name) if model is not None else {}
        modules = {split_adapter_key(key)[0] for key in part}
        if len(layers) != len(modules) or not modules <= set(layers):
            raise UserError(
                f"LoRA {str(source)!r} does not match this model: {len(modules)} {component} layers in the file, "
                f"{len(modules & set(layers))} applied (names or shapes differ from the model's)"
            )
        for key, value in part.items():
            module, tensor = split_adapter_key(key)
            difference = _load_difference(landed_tensor(layers[module], tensor, adapter_name).detach(), value)
            if difference:
                raise UserError(f"LoRA {str(source)!r} did not load as the file holds it: {component}.{module}.{tensor} "
                                f"{difference} (a library dropped or changed it on the way)")


def _load_difference(landed: torch.Tensor, value: torch.Tensor) -> str | None:
    """How a tensor in the model differs from the file's, cast to the model's dtype as loading casts it; None if equal."""
    import torch

    if landed.shape != value.shape:
        return f"has shape {tuple(landed.shape)} in the model, {tuple(value.shape)} in the file"
    expected = value.to(landed.device, landed.dtype)
    if torch.equal(landed, expected):
        return None
    return f"is up to {float((landed.float() - expected.float()).abs().max()):.3g} off the file's values in the model"


def _mismatch_reason(error: Exception) -> str:
    for line in str(error).splitlines():
        if "size mismatch" in line or "not found" in line:
            return line.strip()
    return _first_line(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__



def peft_to_kohya(state: dict, alpha, kohya_name) -> dict:
    """A peft LoRA state dict (`<module>.lora_A.weight`, `.lora_B.weight`) in kohya/WebUI format:
    `<kohya_name(module)>.lora_down.weight`, `.lora_up.weight` and `.alpha`, with alpha the trained
    lora_alpha (a number, or a function of the module) so that alpha / rank reproduces the trained
    scale (diffusers' converter writes the rank)."""
    import torch

    alpha_for = alpha if callable(alpha) else (lambda module: alpha)
    kohya = {}
    for key, value in state.items():
        module, factor = key.rsplit(".lora_", 1)
        kind = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}.get(factor)
        if kind is None:
            raise ValueError(f"cannot write {key!r} in kohya format (only plain LoRA A/B factors)")
        name = kohya_name(module)
        kohya[f"{name}.{kind}"] = value.detach().contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(alpha_for(module)))
    return kohya


def trained_adapter_file(models: dict, *, layers_per_block: int = 2, adapter_name: str = "default") -> dict:
    """The kohya/LyCORIS file of a trained adapter (LoRA, LoCon, LoHa, LoKr) on the pipeline's `models`
    ({component: model}): every peft layer's tensors (`peft_layer_file_tensors`) under its kohya name, which
    WebUI, ComfyUI and our loader read."""
    from common.adapters import peft_layer_file_tensors

    state = {}
    for component, model in models.items():
        for path, layer in adapter_layers(model, adapter_name).items():
            name = kohya_module_name(component, path, layers_per_block)
            state |= {f"{name}.{tensor}": value for tensor, value in peft_layer_file_tensors(layer, adapter_name).items()}
    return state


def peft_lora_to_kohya(states: dict[str, dict], *, alphas: dict | None = None, layers_per_block: int = 2) -> dict:
    """peft state dicts per component in kohya naming (`kohya_module_name`), each component's alpha a number
    or a function of the module; a component without one gets alpha = rank per layer (scale 1)."""
    kohya = {}
    for component, state in states.items():
        alpha = (alphas or {}).get(component, lora_ranks(state).__getitem__)
        kohya |= peft_to_kohya(state, alpha, functools.partial(kohya_module_name, component, layers_per_block=layers_per_block))
    return kohya


def kohya_module_name(component: str, module: str, layers_per_block: int = 2) -> str:
    """The kohya name this toolkit writes for a diffusers module path: `lora_unet_<SGM path>` for the UNet,
    `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` for the text encoders (WebUI names CLIP's
    `text_model` level, which transformers 5 keeps only in CLIPTextModelWithProjection)."""
    if component == "unet":
        return KOHYA_PREFIXES["unet"] + unet_module_to_sgm(module, layers_per_block).replace(".", "_")
    return KOHYA_PREFIXES[component] + "text_model_" + module.removeprefix("text_model.").replace(".", "_")


def kohya_part(key: str) -> str | None:
    """The part of SDXL a kohya key belongs to, as kohya abbreviates it: unet, te1 or te2 (None for no part)."""
    for prefix in KOHYA_PREFIXES.values():
        if key.startswith(prefix):
            return prefix.removeprefix("lora_").removesuffix("_")
    return None


BaseWeight = Callable[[str, str], "torch.Tensor"]  # (component, peft module path) -> the base model's weight


def base_weight_reader(pipe) -> BaseWeight:
    """Reads a base weight of a loaded pipeline by component and peft module path (transformers 5's
    CLIPTextModel has no `text_model` level, which peft paths of older files carry)."""

    def read(component: str, module: str) -> torch.Tensor:
        model = getattr(pipe, component, None)
        if model is None:
            raise UserError(f"no {component} is loaded to read the base weight of {module} from")
        for path in (module, module.removeprefix("text_model.")):
            try:
                return model.get_submodule(path).weight.detach()
            except AttributeError:
                continue
        raise UserError(f"the base model has no layer {component}.{module}; is this LoRA for another model?")

    return read


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.double().reshape(weight.shape[0], -1).norm(dim=1)


def comfyui_dora_scale(magnitude: torch.Tensor, base: torch.Tensor, scaled_delta: torch.Tensor) -> torch.Tensor:
    """The output-axis `dora_scale` d with which ComfyUI computes peft's DoRA weight.

    peft (Liu et al. 2024, "DoRA", Eq. 5): W' = m (W + s dW) / ||W + s dW||, norms over output rows.
    ComfyUI (comfy/weight_adapter/base.py, `weight_decompose`), for a dora_scale whose first axis has the
    weight's output size: W' = (W + s dW) d / (||W|| + eps), the row norms of the *base* weight W and
    eps = finfo(float32).eps (ComfyUI patches in float32). Equal when d = m (||W|| + eps) / ||W + s dW||.
    Shape (out, 1, ...): it broadcasts over W's rows as ComfyUI's norm does."""
    import torch

    eps = torch.finfo(torch.float32).eps
    adapted_norms = _row_norms(base.double() + scaled_delta.double())
    scale = magnitude.double().reshape(-1) * (_row_norms(base) + eps) / adapted_norms
    return scale.reshape(base.shape[0], *[1] * (base.ndim - 1)).float().contiguous()


def magnitude_from_comfyui_dora_scale(dora_scale: torch.Tensor, base: torch.Tensor, scaled_delta: torch.Tensor) -> torch.Tensor:
    """peft's DoRA magnitude m of a layer that ComfyUI adapts with an output-axis `dora_scale` d: the
    inverse of `comfyui_dora_scale`, m = d ||W + s dW|| / (||W|| + eps)."""
    import torch

    eps = torch.finfo(torch.float32).eps
    adapted_norms = _row_norms(base.double() + scaled_delta.double())
    return (dora_scale.double().reshape(-1) * adapted_norms / (_row_norms(base) + eps)).float()


def _scaled_delta(state: dict, module: str, alpha: float) -> torch.Tensor:
    down, up = state[f"{module}.lora_A.weight"].double(), state[f"{module}.lora_B.weight"].double()
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


def diffusers_lora_to_kohya(file: Path, layers_per_block: int = 2, base_weight: BaseWeight | None = None) -> tuple[dict, dict]:
    """A diffusers/peft SDXL LoRA file (UNet and text encoders) in kohya format, each layer's alpha taken
    from the file's adapter metadata (lora_alpha, alpha_pattern; alpha = rank when there is none), and
    a summary {component: (rank, alpha)} for the file's metadata.

    A DoRA's magnitudes are written for ComfyUI, as the `dora_scale` (out, 1) of `comfyui_dora_scale`,
    which needs the base weights (`base_weight`). WebUI normalises input columns instead, which no
    peft DoRA (output rows) maps onto exactly; for WebUI a DoRA is baked into a plain LoRA."""
    states, alphas = read_peft_lora(file)
    magnitudes = {(component, key): state.pop(key) for component, state in states.items()
                  for key in [k for k in state if k.endswith(DORA_MAGNITUDE_SUFFIX)]}
    if magnitudes and base_weight is None:
        raise UserError(f"{str(file)!r} is a DoRA: bake it (give --model) or write it natively for ComfyUI "
                        "(--dora_native comfyui, with --model)")
    kohya = peft_lora_to_kohya(states, alphas={c: alphas[c].__getitem__ for c in states}, layers_per_block=layers_per_block)
    summary = {}
    for component, part in states.items():
        some_module = next(iter(alphas[component]))
        summary[component] = (part[f"{some_module}.lora_A.weight"].shape[0], alphas[component][some_module])
    for (component, key), magnitude in magnitudes.items():
        module = key.removesuffix(DORA_MAGNITUDE_SUFFIX)
        base = base_weight(component, module)
        delta = _scaled_delta(states[component], module, alphas[component][module]).reshape(base.shape)
        kohya[kohya_module_name(component, module, layers_per_block) + ".dora_scale"] = comfyui_dora_scale(magnitude, base, delta)
    return kohya, summary


def svd_factors(delta: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """dW ~= up @ down at a fixed `rank` (None: every singular vector, exact up to rounding), with the relative
    Frobenius error ||dW - up down|| / ||dW||: `low_rank_factors` with a fixed rank."""
    factors = low_rank_factors(delta, RankRule(rank=rank))
    return factors.up, factors.down, factors.error


@dataclass(frozen=True)
class RankRule:
    """How a re-factorised layer's rank is chosen: a fixed `rank` (None: full), or the smallest rank whose relative
    Frobenius error is at most `error`, never above `cap`."""

    rank: int | None = None
    error: float | None = None
    cap: int | None = None


@dataclass(frozen=True)
class LowRank:
    up: torch.Tensor  # (out, r), float32
    down: torch.Tensor  # (r, in)
    error: float  # ||dW - up down|| / ||dW||, measured
    capped: bool = False  # the error target needed more than the cap allows


def parse_rank_rule(text: str, option: str, *, named: tuple[str, ...] = (), cap: int | None = None):
    """--rank as a `RankRule` target from `P%` (e.g. 1%: the smallest rank with at most 1% relative error), a positive
    number, or one of `named` (returned as it is); one line naming the option for anything else."""
    if text in named:
        return text
    if text.endswith("%"):
        try:
            percent = float(text[:-1])
        except ValueError:
            percent = -1.0
        if not 0 < percent < 100:
            raise UserError(f"{option} {text!r}: an error target is a percentage between 0 and 100, e.g. 1%")
        return RankRule(error=percent / 100, cap=cap)
    if not text.isdigit() or int(text) < 1:
        choices = ", ".join(("N", "P% (an error target, e.g. 1%)", *named))
        raise UserError(f"{option} {text!r}: give one of {choices}")
    return RankRule(rank=int(text))


def low_rank_factors(delta: torch.Tensor, rule: RankRule) -> LowRank:
    """dW ~= up @ down by the truncated SVD, the best rank-r approximation (Eckart & Young 1936): down = V_r^T, the top
    right singular vectors, up = dW V_r (= U_r S_r), its relative error sqrt(sum_{i>r} s_i^2 / sum s_i^2). The rank is
    the rule's, or the smallest meeting its error target (the measured error, raised one rank at a time where the
    estimate falls short), stopping at its cap.

    Where the ranks wanted are far below a large layer's size, the singular vectors come from randomized subspace
    iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4, as torch.svd_lowrank: 8 extra columns, 4 power iterations)
    instead of a full SVD: one float64 SVD of an SDXL 1280x2048 projection takes seconds on a CPU, the 736 layers of
    a LoRA most of an hour. Its random start comes from a fixed seed, apart from the global RNG."""
    import torch

    delta = delta.double()
    size = min(delta.shape)
    limit = min(rule.rank or rule.cap or size, size) if rule.error is None or rule.cap else size
    if size >= 256 and 4 * (limit + 8) <= size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _, singular_values, basis = torch.svd_lowrank(delta, q=limit + 8, niter=4)
    else:
        _, singular_values, right = torch.linalg.svd(delta, full_matrices=False)
        basis = right.T
    singular_values, basis = singular_values[:limit], basis[:, :limit]
    norm = torch.linalg.norm(delta).clamp_min(1e-30)

    def measured(rank: int) -> float:
        kept = basis[:, :rank]
        return float(torch.linalg.norm(delta - (delta @ kept) @ kept.T) / norm)

    if rule.error is None:
        rank = limit
    else:
        tail = (norm**2 - torch.cumsum(singular_values**2, 0)).clamp_min(0).sqrt() / norm
        meets = (tail <= rule.error).nonzero()
        rank = int(meets[0]) + 1 if len(meets) else limit
        while rank < limit and measured(rank) > rule.error:
            rank += 1
    error = measured(rank)
    up = delta @ basis[:, :rank]
    capped = rule.error is not None and error > rule.error
    return LowRank(up.float().contiguous(), basis[:, :rank].T.float().contiguous(), error, capped)


def kohya_to_peft(file: Path, base_weight: BaseWeight | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """A kohya/WebUI SDXL LoRA as peft state dicts per component and each module's alpha, through
    diffusers' own kohya conversion (SGM or diffusers block names), one layer at a time so that every
    alpha stays with its module. ComfyUI `dora_scale`s become peft magnitudes with the base weights
    (`attach_dora_scales`)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.configuration_utils import FrozenDict
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    from common.architectures import SDXL_UNET_CONFIG
    from common.models import quiet_libraries

    read_finite_safetensors(file, "LoRA")  # diffusers' reading renames the tensors: refused by the file's own names
    with quiet_libraries():
        state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(file.parent), weight_name=file.name,
                                                                  unet_config=FrozenDict(SDXL_UNET_CONFIG))
    if alphas is None:
        raise UserError(f"{str(file)!r} is not a kohya-format LoRA (no lora_unet_/lora_te keys)")
    states: dict[str, dict] = {}
    module_alphas: dict[str, dict] = {}
    for key in sorted(k for k in state if k.endswith("down.weight")):
        component, rest = key.split(".", 1)
        up_key = rest[: -len("down.weight")] + "up.weight"
        pair = {rest: state[key], up_key: state[f"{component}.{up_key}"]}
        if component == "unet":
            converted = convert_unet_state_dict_to_peft(pair)
        else:  # one layer alone does not tell diffusers' format guess that these are its old names
            converted = convert_state_dict_to_peft(convert_state_dict_to_diffusers(pair, original_type=StateDictType.DIFFUSERS_OLD))
        if component == "text_encoder":  # transformers 5's CLIPTextModel has no text_model level
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        states.setdefault(component, {}).update(converted)
        module = next(k for k in converted if k.endswith("lora_A.weight")).removesuffix(".lora_A.weight")
        module_alphas.setdefault(component, {})[module] = float(alphas.get(f"{key}.alpha", state[key].shape[0]))
    attach_dora_scales(file, states, module_alphas, base_weight)
    return states, module_alphas


def attach_dora_scales(file: Path, states: dict[str, dict], alphas: dict[str, dict], base_weight: BaseWeight | None) -> None:
    """diffusers drops `dora_scale` from kohya files; put output-axis (out, 1) scales back as the peft magnitudes
    that give the weights ComfyUI computes (`magnitude_from_comfyui_dora_scale`), or refuse when one cannot
    be placed (never drop a magnitude silently)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        scales = {k.removesuffix(".dora_scale"): handle.get_tensor(k) for k in handle.keys() if k.endswith(".dora_scale")}
    if not scales:
        return
    if base_weight is None:
        raise UserError(f"{str(file)!r} is a DoRA with ComfyUI dora_scale tensors: reading them needs the base model (--model)")
    for component, state in states.items():
        for key in [k for k in state if k.endswith(".lora_A.weight")]:
            module = key.removesuffix(".lora_A.weight")
            name = kohya_module_name(component, module)
            if name in scales:
                scale = scales.pop(name)
                out_features = state[f"{module}.lora_B.weight"].shape[0]
                if scale.shape[0] != out_features or scale[0].numel() != 1:
                    raise UserError(f"{name}.dora_scale has shape {tuple(scale.shape)}; only the output-axis form "
                                    f"({out_features}, 1) is read (an input-axis WebUI/kohya scale has no peft equivalent)")
                base = base_weight(component, module)
                delta = _scaled_delta(state, module, alphas[component][module]).reshape(base.shape)
                state[module + DORA_MAGNITUDE_SUFFIX] = magnitude_from_comfyui_dora_scale(scale, base, delta)
    if scales:
        raise UserError(f"{len(scales)} dora_scale tensor(s) match no layer, e.g. {next(iter(scales))}; refusing to drop them")


def kohya_names_for_sdxl() -> set[str]:
    """Every kohya LoRA name a UI maps onto SDXL: UNet modules in SGM and in diffusers naming, and the
    text encoders' modules under lora_te1_/lora_te2_ with CLIP's text_model level."""
    from common.models import sdxl_module_names

    names = set()
    for full in sdxl_module_names():
        component, _, path = full.partition(".")
        if not path:
            continue
        names.add(kohya_module_name(component, path))
        if component == "unet":  # the UIs also read UNet modules under their diffusers path
            names.add(KOHYA_PREFIXES["unet"] + path.replace(".", "_"))
    return names


def comfyui_layer_names() -> set[str]:
    """The layer names ComfyUI alone reads for SDXL: diffusion_model.<SGM path> (what its LoRA saver writes) and
    text_encoders.clip_l/clip_g.transformer.text_model.<path>."""
    from common.models import sdxl_module_names

    names = set()
    for full in sdxl_module_names():
        component, _, path = full.partition(".")
        if component == "unet" and path:
            names.add(f"diffusion_model.{unet_module_to_sgm(path)}")
        elif path:
            clip = "clip_l" if component == "text_encoder" else "clip_g"
            names.add(f"text_encoders.{clip}.transformer.text_model.{path.removeprefix('text_model.')}")
    return names


@dataclass(frozen=True)
class UiFinding:
    """What one UI does with a part of a kohya file: `refuses` the whole file, `skips` a layer or key,
    `misapplies` it (loads it without an error into weights the file does not mean), or `breaks` the model with it
    (loads it without an error, and every image it touches comes out NaN: black)."""

    effect: str
    what: str


def dora_scale_effects(shape: tuple, out_features: int, in_features: int) -> tuple[str | None, str | None]:
    """What WebUI and ComfyUI do with a `dora_scale` of this shape on a Linear layer (None: what it means).
    WebUI (`apply_weight_decompose`) divides it by the (1, in) column norms and broadcasts: (in,) and (1, in)
    are right, (out, 1) broadcasts to (out, in) without an error, anything else fails. ComfyUI
    (`weight_decompose`) takes a first axis of the output size as output rows ((out, 1) right; a 1-D (out,)
    fails, or on a square layer broadcasts wrongly) and anything else as input columns ((in,), (1, in))."""
    along_inputs = shape in ((in_features,), (1, in_features))
    webui = None if along_inputs else "misapplies" if shape == (out_features, 1) and out_features > 1 else "skips"
    if shape[0] == out_features:
        comfyui = None if shape == (out_features, 1) else "misapplies" if shape == (in_features,) else "skips"
    else:
        comfyui = None if along_inputs else "skips"
    return webui, comfyui


# What each UI's loader needs of a layer of each type (comfy/weight_adapter/{lora,loha,lokr}.py; WebUI's
# network_{lora,hada,lokr}.py `create_module`), as tensor names
WEBUI_COMPLETE = {"lora": [{"lora_up.weight", "lora_down.weight"}], "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}],
                  "lokr": [{w1, w2} for w1 in ("lokr_w1", "lokr_w1_a") for w2 in ("lokr_w2", "lokr_w2_a")]}
WEBUI_UNREAD_DIFFUSERS_NAMES = ("lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_add_embedding_", "lora_unet_conv_norm_out")


def _layer_kind(tensors: set) -> str | None:
    """The adapter type a layer's tensor names point to (the first factor a loader looks for), None for none."""
    if tensors & {"lora_up.weight", "lora_down.weight", "lora_mid.weight"}:
        return "lora"
    if any(name.startswith("hada_") for name in tensors):
        return "loha"
    if any(name.startswith("lokr_") for name in tensors):
        return "lokr"
    return None


def _complete(kind: str, tensors: set) -> bool:
    pairs = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b"}
    return any(group <= tensors and all(pairs[a] in tensors for a in group if a in pairs) for group in WEBUI_COMPLETE[kind])


def ui_findings(state: dict) -> dict[str, list[UiFinding]]:
    """Per UI, what its loader does with a kohya/LyCORIS SDXL file of LoRA, LoCon, LoHa or LoKr layers, reproduced from
    the loaders' source (WebUI 1.10's extensions-builtin/Lora, ComfyUI's comfy/lora.py and comfy/weight_adapter):

    - a key naming no SDXL module, or with a tensor name no LoRA-family type reads: both skip it (WebUI's "failed to
      match keys", ComfyUI's "lora key not loaded"); LyCORIS's own `lycoris_` names and WebUI's misreading of three
      diffusers-style UNet names (up_blocks.0's upsampler, add_embedding, conv_norm_out) are read by ComfyUI only;
      IA3 (`on_input`) ComfyUI has no adapter for, and skips;
    - a layer without its factors: WebUI's `load_network` finds no module type for it and refuses the whole file;
      ComfyUI raises on lora_up without lora_down and on an incomplete LoHa (the node fails), skips lora_down alone,
      and logs an error and leaves the layer out for an incomplete LoKr;
    - a LoKr in the Tucker form (lokr_t2): ComfyUI's torch.kron of its einsum's non-contiguous result fails with
      current torch (2.14), so the layer is left out (WebUI makes it contiguous first);
    - a second-encoder (lora_te2_) attention layer without all of q/k/v/out_proj: WebUI patches OpenCLIP's fused
      MultiheadAttention only with all four and otherwise skips the layer whole; the first encoder (HF CLIP,
      separate Linear layers) and ComfyUI (separate layers for both) patch each projection;
    - `dora_scale`: WebUI always normalises input columns (shape (1, in)) and broadcasts any other shape, so an
      output-axis (out, 1) scale is applied wrongly without an error; ComfyUI (`weight_decompose`) reads (out, 1) on
      the output axis and (1, in) on the input axis; other shapes fail in both;
    - a tensor holding a NaN or an infinity: neither UI checks, so both add it to the weights and break the model.
    """
    from common.adapters import ADAPTERS, OTHER_ALGORITHMS, file_layers

    known = kohya_names_for_sdxl()
    comfyui_only = {"lycoris_" + name.removeprefix("lora_unet_") for name in known if name.startswith("lora_unet_")}
    comfyui_only |= comfyui_layer_names()
    # IA3's scale vector is `weight`; the other algorithms' tensors are named in OTHER_ALGORITHMS
    suffixes = set().union(*(adapter.file_suffixes for adapter in ADAPTERS.values())) | set(OTHER_ALGORITHMS) | {"weight"}
    webui: list[UiFinding] = []
    comfyui: list[UiFinding] = []
    for key, kinds in non_finite_values(state).items():
        for findings in (webui, comfyui):
            findings.append(UiFinding("breaks", f"{key} holds non-finite values ({kinds}): every image it touches comes out "
                                                "black (a training run that diverged?)"))
    layers: dict[str, dict[str, object]] = {}
    for name, tensors in file_layers(state).items():
        for suffix, value in tensors.items():
            key = f"{name}.{suffix}"
            if suffix not in suffixes:
                for findings in (webui, comfyui):
                    findings.append(UiFinding("skips", f"{key}: unknown suffix {suffix!r}"))
            elif name in comfyui_only or name.startswith(WEBUI_UNREAD_DIFFUSERS_NAMES) and name in known:
                webui.append(UiFinding("skips", f"{key}: WebUI maps no SDXL module to {name!r} (ComfyUI does)"))
                layers.setdefault(name, {})[suffix] = value
            elif name not in known:
                for findings in (webui, comfyui):
                    findings.append(UiFinding("skips", f"{key}: no SDXL module is named {name!r}"))
            else:
                layers.setdefault(name, {})[suffix] = value
    for name, parts in layers.items():
        tensors = set(parts)
        kind = _layer_kind(tensors)
        present = ", ".join(sorted(tensors))
        if kind is None:
            if "on_input" in tensors:
                comfyui.append(UiFinding("skips", f"{name}: IA3, which ComfyUI has no adapter for"))
            elif not tensors & set(OTHER_ALGORITHMS):  # both UIs load GLoRA, OFT and weight differences
                for findings in (webui, comfyui):
                    findings.append(UiFinding("skips", f"{name}: has {present}, which no adapter type reads"))
            continue
        if not _complete(kind, tensors):
            webui.append(UiFinding("refuses", f"{name}: has {present}, not a complete {kind} layer"))
            if kind == "lora":
                comfyui.append(UiFinding("refuses", f"{name}: lora_up without lora_down") if "lora_up.weight" in tensors
                               else UiFinding("skips", f"{name}: has {present} but no lora_up"))
            elif kind == "loha":
                comfyui.append(UiFinding("refuses", f"{name}: an incomplete LoHa ({present})") if "hada_w1_a" in tensors
                               else UiFinding("skips", f"{name}: has {present} but no hada_w1_a"))
            else:
                comfyui.append(UiFinding("skips", f"{name}: an incomplete LoKr ({present}) fails and is left out"))
            continue
        if "lokr_t2" in tensors:
            comfyui.append(UiFinding("skips", f"{name}: lokr_t2 (Tucker LoKr): torch.kron of its non-contiguous factor fails "
                                              "in ComfyUI with current torch, which leaves the layer out"))
        scale = parts.get("dora_scale")
        if scale is not None and kind == "lora":
            up, down = parts["lora_up.weight"], parts["lora_down.weight"]
            out_features, in_features = up.shape[0], down[0].numel() // (down.shape[2] * down.shape[3] if down.ndim == 4 else 1)
            webui_effect, comfyui_effect = dora_scale_effects(tuple(scale.shape[:2]), out_features, in_features)
            described = f"{name}.dora_scale {tuple(scale.shape)} on a ({out_features}, {in_features}) layer"
            if webui_effect:
                webui.append(UiFinding(webui_effect, f"{described}: WebUI normalises input columns, (1, {in_features})"))
            if comfyui_effect == "skips":
                comfyui.append(UiFinding(comfyui_effect, f"{described} fits neither axis of the layer"))
            elif comfyui_effect:
                comfyui.append(UiFinding(comfyui_effect, f"{described}: ComfyUI reads a first axis of the output size "
                                                         "as output rows and broadcasts it wrongly"))
    attention: dict[str, set[str]] = {}
    for name in layers:
        if kohya_part(name) == "te2":
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                if name.endswith("self_attn_" + projection):
                    attention.setdefault(name.removesuffix(projection), set()).add(projection)
    for layer, present in attention.items():
        if len(present) < 4:
            webui.append(UiFinding("skips", f"{layer}*: only {', '.join(sorted(present))} of q/k/v/out_proj "
                                            "(OpenCLIP's fused attention is patched with all four or not at all)"))
    return {"WebUI": webui, "ComfyUI": comfyui}


def read_peft_lora(file: Path, base_weight: BaseWeight | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """Any SDXL LoRA file (kohya or diffusers/peft) as peft state dicts per component and each module's alpha
    (a kohya DoRA's magnitudes need the base weights, `base_weight`)."""
    import json

    from safetensors import safe_open

    keys = safetensors_keys(file, "LoRA")
    if any(k.startswith("lora_") for k in keys):
        return kohya_to_peft(file, base_weight)
    with safe_open(str(file), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in keys}
        metadata = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    refuse_non_finite(state, "LoRA", file)
    states: dict[str, dict] = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if component not in COMPONENT_PREFIXES or ".lora_" not in rest:
            raise UserError(f"{str(file)!r} is not a diffusers SDXL LoRA: unexpected key {key!r}")
        states.setdefault(component, {})[rest] = value
    alphas = {}
    for component, part in states.items():
        pattern = metadata.get(f"{component}.alpha_pattern") or {}

        def alpha_for(module: str, rank: int, component=component, pattern=pattern) -> float:
            for key, value in pattern.items():
                if module == key.lstrip("^") or module.endswith("." + key.lstrip("^")):
                    return value
            return metadata.get(f"{component}.lora_alpha", rank)

        alphas[component] = {
            k.removesuffix(".lora_A.weight"): alpha_for(k.removesuffix(".lora_A.weight"), v.shape[0])
            for k, v in part.items() if k.endswith("lora_A.weight")
        }
    return states, alphas
