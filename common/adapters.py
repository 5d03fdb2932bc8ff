"""LoRA-family adapters as one table: LoRA (LoCon where it adapts convolutions), LoHa and LoKr.

Each type is one small description, `AdapterType`: the peft config that trains it, the tensors one layer of it
holds in a kohya/LyCORIS file (the names WebUI and ComfyUI read), how peft's parameters become those tensors,
and its ΔW, a pure function of them. Training, loading users' files, merging, export and --check look the type
up in ADAPTERS; none of them asks which type it has.

The ΔW functions are the loaders' arithmetic, which ComfyUI (comfy/weight_adapter/{lora,loha,lokr}.py) and
WebUI (extensions-builtin/Lora/network_{lora,hada,lokr}.py) share: a layer's ΔW is scaled by alpha / rank,
the rank being the rows of a particular factor (named in each function), and by 1 where the file has no alpha
or, for LoKr, no low-rank factor at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from common.cli import UserError

if TYPE_CHECKING:  # imported where used: the scripts parse options and answer --help without torch
    import torch

Tensors = dict[str, "torch.Tensor"]  # one layer's tensors, by their name in the file (`alpha` a 0-dim tensor)


# ---------------------------------------------------------------- ΔW of one layer, from its file tensors


def _compute_dtype(tensors: Tensors):
    import torch

    return torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32


def alpha_scale(tensors: Tensors, rank: int | None) -> float:
    """alpha / rank (Hu et al. 2022, Sec. 4.1), 1 where the file gives no alpha or the layer has no rank."""
    alpha = tensors.get("alpha")
    return float(alpha) / rank if alpha is not None and rank else 1.0


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Tucker-2 reconstruction sum_{p,q} core[p, q, h, w] a[p, o] b[q, i] (Kolda & Bader 2009, "Tensor
    Decompositions and Applications", Sec. 4): a (r, out) and b (r, in) factors around an (r, r, kh, kw) core,
    LyCORIS's `use_tucker` form of a convolution's factor."""
    import torch

    return torch.einsum("pqhw,po,qi->oihw", core, a.flatten(1), b.flatten(1))


def lora_delta(tensors: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    """LoRA, ΔW = (alpha / r) U D (Hu et al. 2022, "LoRA", Eq. 3 and Sec. 4.1) with U = lora_up (out, r) and
    D = lora_down (r, in), r the rows of D. On a convolution (LoCon) D is (r, in, kh, kw) and U (out, r, 1, 1):
    ΔW = reshape(U D). With a Tucker core lora_mid (r, r, kh, kw) and D (r, in, 1, 1):
    ΔW[o, i, h, w] = (alpha / r) sum_{a,b} U[o, a] mid[a, b, h, w] D[b, i]."""
    dtype = _compute_dtype(tensors)
    up, down = tensors["lora_up.weight"].to(dtype), tensors["lora_down.weight"].to(dtype)
    if "lora_mid.weight" in tensors:
        product = tucker(tensors["lora_mid.weight"].to(dtype), up.flatten(1).T, down)
    else:
        product = up.flatten(1) @ down.flatten(1)
    return alpha_scale(tensors, down.shape[0]) * product.reshape(shape)


def loha_delta(tensors: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    """LoHa, ΔW = (alpha / r) (W1a W1b) ⊙ (W2a W2b), the Hadamard product of two rank-r products (Hyeon-Woo,
    Ye-Bin & Oh 2022, "FedPara", Sec. 3), r the rows of hada_w1_b: hada_w*_a (out, r), hada_w*_b (r, in, or
    in kh kw on a convolution). In the Tucker form each product is `tucker(hada_t*, hada_w*_a, hada_w*_b)`,
    with hada_w*_a then (r, out)."""
    dtype = _compute_dtype(tensors)
    w = {k: v.to(dtype) for k, v in tensors.items() if k.startswith("hada_")}
    if "hada_t1" in w:
        products = [tucker(w[f"hada_t{k}"], w[f"hada_w{k}_a"], w[f"hada_w{k}_b"]) for k in (1, 2)]
    else:
        products = [w[f"hada_w{k}_a"] @ w[f"hada_w{k}_b"] for k in (1, 2)]
    return alpha_scale(tensors, w["hada_w1_b"].shape[0]) * (products[0] * products[1]).reshape(shape)


def lokr_delta(tensors: Tensors, shape: tuple[int, ...]) -> torch.Tensor:
    """LoKr, ΔW = s (W1 ⊗ W2), a Kronecker product (Yeh et al. 2024, "Navigating Text-To-Image Customization:
    From LyCORIS Fine-Tuning to Model Evaluation", Sec. 3): W1 = lokr_w1 or lokr_w1_a lokr_w1_b (out_l, in_m);
    W2 = lokr_w2, lokr_w2_a lokr_w2_b, or `tucker(lokr_t2, lokr_w2_a, lokr_w2_b)` (out_k, in_n[, kh, kw]).
    s = alpha / r with r the rows of lokr_w2_b, else of lokr_w1_b, and s = 1 when both factors are full
    matrices, whatever the alpha (LyCORIS writes alpha = r there; ComfyUI and WebUI ignore it)."""
    import torch

    dtype = _compute_dtype(tensors)
    w = {k: v.to(dtype) for k, v in tensors.items() if k.startswith("lokr_")}
    w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
    if "lokr_w2" in w:
        w2 = w["lokr_w2"]
    elif "lokr_t2" in w:
        w2 = tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    rank = w["lokr_w2_b"].shape[0] if "lokr_w2" not in w else w["lokr_w1_b"].shape[0] if "lokr_w1" not in w else None
    return alpha_scale(tensors, rank) * torch.kron(w1, w2.contiguous()).reshape(shape)


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class AdapterType:
    """One adapter type: how it trains (peft), what a layer holds in a file, and its ΔW."""

    name: str  # --adapter
    title: str  # for people
    network_module: str  # kohya's ss_network_module for a file of this type
    required: tuple[tuple[str, ...], ...]  # a file layer is of this type when it holds one of these sets of tensors
    optional: tuple[str, ...]  # further tensors such a layer may hold
    peft_prefixes: tuple[str, ...]  # the names of its parameters in a peft layer
    delta: Callable[[Tensors, tuple[int, ...]], "torch.Tensor"]
    factor_pairs: tuple[tuple[str, str], ...] = ()  # (left, right) tensors whose product is one low-rank factor of ΔW
    trains_dora: bool = False
    trains_tucker: bool = False  # peft trains its effective-conv (Tucker) form correctly

    @property
    def file_suffixes(self) -> frozenset[str]:
        return frozenset(name for group in self.required for name in group) | frozenset(self.optional) | {"alpha"}


ADAPTERS: dict[str, AdapterType] = {
    "lora": AdapterType(
        "lora", "LoRA (LoCon on convolutions)", "networks.lora",
        required=(("lora_up.weight", "lora_down.weight"),), optional=("lora_mid.weight", "dora_scale"),
        peft_prefixes=("lora_A", "lora_B", "lora_magnitude_vector"), delta=lora_delta, trains_dora=True,
        factor_pairs=(("lora_up.weight", "lora_down.weight"),),
    ),
    "loha": AdapterType(
        "loha", "LoHa", "lycoris.kohya",
        required=(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),), optional=("hada_t1", "hada_t2", "dora_scale"),
        # peft 0.21.2's LoHa effective-conv backward swaps the two Tucker chains (HadaWeightCP.backward): its
        # gradients of hada_w1_a and hada_w2_a are wrong (tests/test_adapters.py shows it), so that form is refused
        peft_prefixes=("hada_",), delta=loha_delta, factor_pairs=(("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b")),
    ),
    "lokr": AdapterType(
        "lokr", "LoKr", "lycoris.kohya",
        required=tuple((w1, w2) for w1 in ("lokr_w1", "lokr_w1_a") for w2 in ("lokr_w2", "lokr_w2_a")),
        optional=("lokr_w1_b", "lokr_w2_b", "lokr_t2", "dora_scale"),
        peft_prefixes=("lokr_",), delta=lokr_delta, trains_tucker=True,
        factor_pairs=(("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")),
    ),
}

TRAINED_PARAMETER_MARKERS = tuple(prefix for adapter in ADAPTERS.values() for prefix in adapter.peft_prefixes)


def peft_config(adapter: AdapterType, *, rank: int, alpha: float, target_modules: list[str], rank_pattern: dict | None = None,
                alpha_pattern: dict | None = None, dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                use_dora: bool = False, use_tucker: bool = False, decompose_both: bool = False, factor: int = -1):
    """The peft config that trains `adapter` on `target_modules` (full module paths, each matched exactly), at `rank`
    and `alpha` except where the patterns (full module paths) say otherwise. LoRA starts from Gaussian A and zero B
    (the diffusers scripts' init), LoHa and LoKr from peft's defaults (one factor zero), so ΔW starts at 0."""
    import re

    from peft import LoHaConfig, LoKrConfig, LoraConfig

    exact = lambda pattern: {re.escape(name): value for name, value in (pattern or {}).items()}  # noqa: E731
    shared = {"target_modules": target_modules, "rank_pattern": exact(rank_pattern), "alpha_pattern": exact(alpha_pattern)}
    if adapter.name == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora, init_lora_weights="gaussian", **shared)
    lycoris = {"r": rank, "alpha": alpha, "rank_dropout": rank_dropout, "module_dropout": module_dropout, "use_effective_conv2d": use_tucker}
    if adapter.name == "loha":
        return LoHaConfig(**lycoris, **shared)
    return LoKrConfig(**lycoris, decompose_both=decompose_both, decompose_factor=factor, **shared)


# Other LyCORIS and kohya algorithms, by a tensor that only they write: refused by name rather than misread.
OTHER_ALGORITHMS = {
    "on_input": "IA3", "a1.weight": "GLoRA", "b1.weight": "GLoRA", "oft_blocks": "OFT/BOFT", "oft_diag": "OFT",
    "diff": "full weight differences (diff)", "diff_b": "full weight differences (diff)", "w_norm": "norm-layer training",
    "b_norm": "norm-layer training", "set_weight": "weight replacement",
}


def adapter_of_layer(tensor_names, where: str) -> AdapterType:
    """The adapter type of one file layer from its tensors' names; an algorithm this toolkit does not read, or a
    layer with a factor missing, refused in one line naming `where`."""
    names = set(tensor_names)
    for name in sorted(names):
        if name in OTHER_ALGORITHMS:
            raise UserError(f"{where} is {OTHER_ALGORITHMS[name]} (its {name!r} tensor), which this toolkit does not read; "
                            f"LoRA, LoCon, LoHa, LoKr and DoRA files are read")
    for adapter in ADAPTERS.values():
        if any(set(group) <= names for group in adapter.required):
            unknown = names - adapter.file_suffixes
            if unknown:
                raise UserError(f"{where} is a {adapter.title} layer with tensors it does not define: {', '.join(sorted(unknown))}")
            return adapter
    raise UserError(f"{where} holds {', '.join(sorted(names))}: no complete LoRA, LoHa or LoKr layer (a factor is missing)")


# ---------------------------------------------------------------- peft parameters <-> file tensors


def file_tensors(adapter: AdapterType, parameters: Tensors, *, rank: int, alpha: float) -> Tensors:
    """One trained peft layer (`parameters` by peft's names, `module.lora_A.weight` style suffixes stripped to
    `lora_A.weight`, `hada_w1_a`, `lokr_w1`...) as the tensors of its kohya/LyCORIS file layer, with its alpha.

    Two LoKr forms are written otherwise than peft holds them, with the same ΔW (`lokr_delta`):
    - peft scales a LoKr with two full factors by alpha / r, the loaders do not: the scale goes into lokr_w1 and
      alpha is written as r, as LyCORIS writes it;
    - the Tucker form (lokr_t2) is written as its full lokr_w2: ComfyUI's `torch.kron` of the non-contiguous
      tensor its einsum makes fails on current torch (seen with 2.14), and leaves the layer out."""
    import torch

    renamed = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    tensors = {renamed.get(name, name): value.detach().float().cpu().contiguous() for name, value in parameters.items()}
    if adapter.name == "lokr" and "lokr_t2" in tensors:
        tensors["lokr_w2"] = tucker(tensors.pop("lokr_t2"), tensors.pop("lokr_w2_a"), tensors.pop("lokr_w2_b")).contiguous()
    if adapter.name == "lokr" and "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors["lokr_w1"] = tensors["lokr_w1"] * (alpha / rank)
        alpha = rank
    tensors["alpha"] = torch.tensor(float(alpha))
    return tensors


def cast_layer(adapter: AdapterType, tensors: Tensors, dtype, where: str) -> Tensors:
    """One file layer's tensors in `dtype` with the same ΔW up to rounding: in fp16, each low-rank pair's rank-one
    terms first get factors of equal norm (`balanced_factors`), so weak terms stay above fp16's normal range; alpha
    and dora_scale stay float32. Refused in one line where a value does not fit `dtype`. (The Tucker forms, whose
    pairs meet through a core, are cast as they are.)"""
    import torch


    cast = dict(tensors)
    tucker_form = any(name in tensors for name in ("lora_mid.weight", "hada_t1", "lokr_t2"))
    for left, right in adapter.factor_pairs:
        if left in tensors and right in tensors and dtype == torch.float16 and not tucker_form:
            a, b = balanced_factors(tensors[left].flatten(1), tensors[right].flatten(1))
            cast[left], cast[right] = a.reshape(tensors[left].shape), b.reshape(tensors[right].shape)
    for name, value in cast.items():
        if name not in ("alpha", "dora_scale"):
            cast[name] = value.to(dtype).contiguous()
            if not torch.isfinite(cast[name]).all():
                raise UserError(f"{where}.{name} does not fit {str(dtype).removeprefix('torch.')}; use --save_precision fp32")
    return cast


def adapter_of_peft_layer(layer) -> AdapterType:
    """The type of a peft tuner layer (a LoRA, LoHa or LoKr layer), from the parameter names it declares."""
    for adapter in ADAPTERS.values():
        if any(name.startswith(adapter.peft_prefixes) for name in layer.adapter_layer_names):
            return adapter
    raise ValueError(f"{type(layer).__name__} is no LoRA, LoHa or LoKr layer")


def peft_layer_file_tensors(layer, adapter_name: str = "default") -> Tensors:
    """One peft layer's trained adapter `adapter_name` as the tensors of its kohya/LyCORIS file layer (`file_tensors`)."""
    adapter = adapter_of_peft_layer(layer)
    parameters = {name.replace(f".{adapter_name}", ""): value for name, value in layer.named_parameters()
                  if f".{adapter_name}" in name and name.startswith(adapter.peft_prefixes) and "magnitude" not in name}
    alpha = (layer.lora_alpha if adapter.name == "lora" else layer.alpha)[adapter_name]
    return file_tensors(adapter, parameters, rank=layer.r[adapter_name], alpha=alpha)


def peft_parameters(adapter: AdapterType, tensors: Tensors, *, rank: int, alpha: float) -> Tensors:
    """The inverse of `file_tensors`: a file layer's tensors as the parameters of a peft layer trained at
    (rank, alpha), so that the peft layer's ΔW is the file's (for --init_lora)."""
    renamed = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    parameters = {renamed.get(name, name): value for name, value in tensors.items() if name not in ("alpha", "dora_scale")}
    if adapter.name == "lokr" and "lokr_w1" in parameters and "lokr_w2" in parameters:
        parameters["lokr_w1"] = parameters["lokr_w1"] * (rank / alpha)  # the file's scale is 1
    return parameters


# ---------------------------------------------------------------- users' files applied as weight patches


def dora_change(weight: torch.Tensor, scaled_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """W' - W of a DoRA layer as ComfyUI computes W' (comfy/weight_adapter/base.py `weight_decompose`; DoRA: Liu et al.
    2024, Eq. 5): W' = (W + ΔW) d / (||.|| + eps), the norm taken over each output row of the base W when d's first
    axis is the output size (ComfyUI's own convention), else over each input column of W + ΔW (kohya's, WebUI's),
    eps = float32 eps. A strength moves from W towards W' linearly: W + strength (W' - W)."""
    import torch

    weight_calc = weight + scaled_delta
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    else:
        norm = weight_calc.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
        norm = norm.reshape(weight.shape[1], *[1] * (weight.ndim - 1)).transpose(0, 1)
    return weight_calc * (dora_scale.to(weight.dtype) / (norm + torch.finfo(torch.float32).eps)) - weight


# ---------------------------------------------------------------- whether an adapted weight fits the model's dtype


def fits_dtype(weight: torch.Tensor, dtype) -> bool:
    """Whether every value of `weight` is finite once stored in `dtype` (a value beyond its range becomes inf)."""
    import torch

    return bool(torch.isfinite(weight.to(dtype)).all())


def largest_fitting_weight(base: torch.Tensor, change: torch.Tensor, dtype) -> float:
    """The largest |w| for which W + w·C surely stays within `dtype`'s range: (max - max|W|) / max|C| by the triangle
    inequality, and at most float32's largest number, in which the patch is computed (0 where C is not finite or W
    alone does not fit)."""
    import math

    import torch

    largest_change = float(change.abs().max()) if change.numel() else 0.0
    room = float(torch.finfo(dtype).max) - (float(base.abs().max()) if base.numel() else 0.0)
    if not math.isfinite(largest_change) or room <= 0:
        return 0.0
    return min(room / largest_change if largest_change else math.inf, float(torch.finfo(torch.float32).max))


def lora_change_bound(up: torch.Tensor, down: torch.Tensor) -> float:
    """An upper bound of max |(U D)_ij| that does not form U D: max_i ||U_i,:|| · max_j ||D_:,j|| (Cauchy-Schwarz),
    U (out, r[, 1, 1]) and D (r, in[, kh, kw])."""
    return float(up.flatten(1).float().norm(dim=1).max()) * float(down.flatten(1).float().norm(dim=0).max())


def adapted_weight_overflow(base: torch.Tensor, change: torch.Tensor, weight: float, dtype) -> float | None:
    """None where W + weight·C fits `dtype` (`fits_dtype`, evaluated in float32); otherwise the largest |weight| that
    surely fits (`largest_fitting_weight`), which is below |weight|."""
    adapted = base.float() + weight * change.float()
    return None if fits_dtype(adapted, dtype) else largest_fitting_weight(base, change, dtype)


def file_layers(state: Tensors) -> dict[str, Tensors]:
    """A kohya/LyCORIS file's tensors by layer, {layer name: {tensor name: tensor}}: the key split before the longest
    tensor name an adapter type defines, so that dotted layer names (ComfyUI's LoRA saver writes
    `diffusion_model.input_blocks.4.1....lora_up.weight`) stay whole, and otherwise at its first '.', as both UIs
    split kohya names (`lora_unet_x.lora_up.weight` -> layer lora_unet_x, tensor lora_up.weight)."""
    known = sorted(set().union(*(a.file_suffixes for a in ADAPTERS.values())) | set(OTHER_ALGORITHMS), key=len, reverse=True)
    layers: dict[str, Tensors] = {}
    for key, value in state.items():
        tensor = next((name for name in known if key.endswith("." + name)), None)
        name = key[: -len(tensor) - 1] if tensor else key.partition(".")[0]
        layers.setdefault(name, {})[tensor or key.partition(".")[2]] = value
    return layers


PATCHES_ATTRIBUTE = "_adapter_patch_originals"  # on a pipeline: {(component, module): its weight before any patch}


def patch_weights(pipe, layers: dict[str, Tensors], targets: dict[str, tuple[str, str]], *, strength: float,
                  keep: Callable[[str, str], bool], source: str) -> int:
    """Add each file layer's ΔW (its type's formula, float32, times `strength`; a DoRA layer's W' - W, `dora_change`) to
    the weight it names, as the UIs patch weights; `targets` resolves layer names to (component, module path) and
    `keep` chooses which (blocks). A layer naming no module of the model, or of another shape, is refused before any
    weight changes; a patched weight beyond the range of the model's dtype (a huge `strength`) is refused with every
    patch of this call undone. The weights as they were are kept (on the CPU) for `unpatch_weights`. Returns the
    layers applied."""
    import torch

    planned = []
    for name, tensors in layers.items():
        if name not in targets:
            raise UserError(f"LoRA {source!r} does not match this model: its layer {name!r} names no layer of it "
                            "(trained for another base?)")
        component, module_path = targets[name]
        if not keep(component, module_path):
            continue
        adapter = adapter_of_layer(tensors, f"layer {name} of {source!r}")
        module = getattr(pipe, component).get_submodule(module_path)
        module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        factors = {k: v for k, v in tensors.items() if k != "dora_scale"}
        try:  # shapes only, on the meta device: nothing changes before every layer is known to fit
            adapter.delta({k: v if k == "alpha" else v.to("meta") for k, v in factors.items()}, tuple(module.weight.shape))
        except RuntimeError as error:
            raise UserError(f"LoRA {source!r} does not match this model: layer {name} does not fit its "
                            f"{tuple(module.weight.shape)} weight ({str(error).splitlines()[0]})") from None
        planned.append((component, module_path, module, adapter, factors, tensors.get("dora_scale")))
    originals = pipe.__dict__.setdefault(PATCHES_ATTRIBUTE, {})
    undo = []  # (module, its weight before this call; None where `originals` holds it) of each layer patched so far
    with torch.no_grad():
        for component, module_path, module, adapter, factors, dora_scale in planned:
            weight = module.weight
            key = (component, module_path)
            before = weight.detach().to("cpu", copy=True)
            undo.append((module, before if key in originals else None, key))
            originals.setdefault(key, before)
            current = weight.detach().float()
            patched = current + strength * _patch_change(adapter, factors, dora_scale, current)
            if not fits_dtype(patched, weight.dtype):
                _undo_patches(undo, originals)
                raise UserError(f"LoRA {source!r} at weight {strength:g} takes {component}.{module_path}'s weight beyond "
                                f"{describe_dtype_range(weight.dtype)}: {describe_fitting_weights(_largest_strength(planned))}")
            weight.copy_(patched.to(weight.dtype))
    return len(planned)


def _patch_change(adapter: AdapterType, factors: Tensors, dora_scale, current: torch.Tensor) -> torch.Tensor:
    """What one file layer adds to the (float32) weight `current` at strength 1: its ΔW, or W' - W for a DoRA layer."""
    delta = adapter.delta({k: v.to(current.device) for k, v in factors.items()}, tuple(current.shape))
    return delta if dora_scale is None else dora_change(current, delta, dora_scale.float().to(current.device))


def _largest_strength(planned: list) -> float:
    """The largest strength at which every planned layer's patched weight surely fits its dtype (convexity: a layer
    that fits at a strength fits at every smaller one)."""
    limits = []
    for *_, module, adapter, factors, dora_scale in planned:
        current = module.weight.detach().float()
        limits.append(largest_fitting_weight(current, _patch_change(adapter, factors, dora_scale, current), module.weight.dtype))
    return min(limits)


def _undo_patches(undo: list, originals: dict) -> None:
    """The weights patched by one `patch_weights` call back as they were before it, bit for bit."""
    for module, before, key in reversed(undo):
        module.weight.copy_(before if before is not None else originals.pop(key))


def describe_dtype_range(dtype) -> str:
    """`the range of float16 (±65504)`."""
    import torch

    return f"the range of {str(dtype).removeprefix('torch.')} (±{float(torch.finfo(dtype).max):.6g})"


def describe_fitting_weights(limit: float) -> str:
    """What a refusal says of the weights that fit (`largest_fitting_weight`): the limit rounded down to 3 significant
    digits, below it by a margin for the rounding of the patch itself, so that the weight named does fit."""
    import math

    if not limit > 0:
        return "no weight makes it fit"
    step = 10.0 ** (math.floor(math.log10(limit)) - 2)
    return f"weights up to {math.floor(limit * (1 - 1e-6) / step) * step:.3g} fit"


def unpatch_weights(pipe) -> None:
    """Every patched weight back to its value before the first patch, bit for bit."""
    import torch

    with torch.no_grad():
        for (component, module_path), original in pipe.__dict__.pop(PATCHES_ATTRIBUTE, {}).items():
            module = getattr(pipe, component).get_submodule(module_path)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            module.weight.copy_(original)


def balanced_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product in float64 with each rank-one term's factors of equal norm: up_k / c_k and c_k down_k,
    c_k = sqrt(||up_k|| / ||down_k||). SVD factors carry all of s_k in up (U S, V^T), and fp16's normal range
    ends at 6e-5, where the weak terms' up columns would become subnormals and lose their digits."""
    import torch

    up, down = up.double(), down.double()
    up_norms, down_norms = up.norm(dim=0), down.norm(dim=1)
    c = torch.where((up_norms > 0) & (down_norms > 0), (up_norms / down_norms.clamp_min(1e-300)).sqrt(), 1.0)
    return up / c, down * c[:, None]
