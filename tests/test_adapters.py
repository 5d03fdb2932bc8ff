"""The adapter table's ΔW formulas against independent float64 evaluations of the papers' formulas, peft's own layers,
and the loaders of ComfyUI and WebUI reproduced from their sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.adapters import ADAPTERS, adapter_of_layer, file_tensors, lokr_delta, peft_parameters
from common.cli import UserError
from ui_loaders import comfyui_patch, webui_patch

GEN = torch.Generator().manual_seed(0)


def randn(*shape) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def as_np(tensors: dict) -> dict:
    return {k: v.numpy() for k, v in tensors.items()}


# ---------------------------------------------------------------- the papers' formulas, evaluated independently in numpy

def scale(alpha: float | None, rank: int | None) -> float:
    return alpha / rank if alpha is not None and rank else 1.0


def tucker_np(core, a, b):
    """sum_{p,q} core[p,q,h,w] a[p,o] b[q,i], as nested tensordots."""
    return np.tensordot(np.tensordot(core, a, axes=([0], [0])), b, axes=([0], [0])).transpose(2, 3, 0, 1)


LORA_CASES = {  # name: (tensors, weight shape)
    "linear": ({"lora_up.weight": (24, 4), "lora_down.weight": (4, 16)}, (24, 16)),
    "conv3x3": ({"lora_up.weight": (24, 4, 1, 1), "lora_down.weight": (4, 16, 3, 3)}, (24, 16, 3, 3)),
    "conv1x1": ({"lora_up.weight": (24, 4, 1, 1), "lora_down.weight": (4, 16, 1, 1)}, (24, 16, 1, 1)),
    "tucker": ({"lora_up.weight": (24, 4, 1, 1), "lora_mid.weight": (4, 4, 3, 3), "lora_down.weight": (4, 16, 1, 1)}, (24, 16, 3, 3)),
}


@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("alpha", [None, 2.0])
def test_lora_and_locon_delta_is_hu_et_al_scaled_by_alpha_over_rank(case, alpha):
    shapes, weight_shape = LORA_CASES[case]
    tensors = {k: randn(*s) for k, s in shapes.items()} | ({"alpha": torch.tensor(alpha, dtype=torch.float64)} if alpha else {})
    t = as_np(tensors)
    up = t["lora_up.weight"].reshape(24, 4)
    if case == "tucker":
        expected = np.einsum("oa,abhw,bi->oihw", up, t["lora_mid.weight"], t["lora_down.weight"].reshape(4, 16))
    elif case == "linear":
        expected = up @ t["lora_down.weight"]
    else:
        expected = np.einsum("oa,aihw->oihw", up, t["lora_down.weight"])
    expected = scale(alpha, 4) * expected.reshape(weight_shape)
    np.testing.assert_allclose(ADAPTERS["lora"].delta(tensors, weight_shape).numpy(), expected, rtol=1e-12, atol=1e-12)


LOHA_CASES = {
    "linear": ({"hada_w1_a": (24, 4), "hada_w1_b": (4, 16), "hada_w2_a": (24, 4), "hada_w2_b": (4, 16)}, (24, 16)),
    "conv3x3": ({"hada_w1_a": (24, 4), "hada_w1_b": (4, 144), "hada_w2_a": (24, 4), "hada_w2_b": (4, 144)}, (24, 16, 3, 3)),
    "tucker": ({"hada_w1_a": (4, 24), "hada_w1_b": (4, 16), "hada_t1": (4, 4, 3, 3),
                "hada_w2_a": (4, 24), "hada_w2_b": (4, 16), "hada_t2": (4, 4, 3, 3)}, (24, 16, 3, 3)),
}


@pytest.mark.parametrize("case", LOHA_CASES)
@pytest.mark.parametrize("alpha", [None, 3.0])
def test_loha_delta_is_the_hadamard_product_of_two_low_rank_products(case, alpha):
    shapes, weight_shape = LOHA_CASES[case]
    tensors = {k: randn(*s) for k, s in shapes.items()} | ({"alpha": torch.tensor(alpha, dtype=torch.float64)} if alpha else {})
    t = as_np(tensors)
    if case == "tucker":
        first, second = (tucker_np(t[f"hada_t{k}"], t[f"hada_w{k}_a"], t[f"hada_w{k}_b"]) for k in (1, 2))
    else:
        first, second = (np.einsum("or,ri->oi", t[f"hada_w{k}_a"], t[f"hada_w{k}_b"]).reshape(weight_shape) for k in (1, 2))
    expected = scale(alpha, 4) * first * second
    np.testing.assert_allclose(ADAPTERS["loha"].delta(tensors, weight_shape).numpy(), expected, rtol=1e-12, atol=1e-12)


def kron_np(w1, w2):
    """W1 ⊗ W2 by its definition: block (i, j) is w1[i, j] w2; on a convolution each kernel position alike."""
    if w2.ndim == 4:
        return np.stack([np.stack([kron_np(w1, w2[:, :, h, w]) for w in range(w2.shape[3])], -1) for h in range(w2.shape[2])], -2)
    return np.block([[w1[i, j] * w2 for j in range(w1.shape[1])] for i in range(w1.shape[0])])


LOKR_CASES = {  # name: (tensors, weight shape, the rank the scale divides by, None for scale 1)
    "w1 full, w2 low-rank": ({"lokr_w1": (4, 2), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 8)}, (24, 16), 3),
    "both low-rank": ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 8)}, (24, 16), 3),
    "w1 low-rank, w2 full": ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 2), "lokr_w2": (6, 8)}, (24, 16), 2),
    "both full": ({"lokr_w1": (4, 2), "lokr_w2": (6, 8)}, (24, 16), None),
    "conv, w2 low-rank": ({"lokr_w1": (4, 2), "lokr_w2_a": (6, 3), "lokr_w2_b": (3, 72)}, (24, 16, 3, 3), 3),
    "conv, w2 full": ({"lokr_w1": (4, 2), "lokr_w2": (6, 8, 3, 3)}, (24, 16, 3, 3), None),
    "conv, tucker": ({"lokr_w1": (4, 2), "lokr_w2_a": (3, 6), "lokr_w2_b": (3, 8), "lokr_t2": (3, 3, 3, 3)}, (24, 16, 3, 3), 3),
}


@pytest.mark.parametrize("case", LOKR_CASES)
@pytest.mark.parametrize("alpha", [None, 5.0])
def test_lokr_delta_is_the_kronecker_product_with_the_loaders_scale(case, alpha):
    shapes, weight_shape, rank = LOKR_CASES[case]
    tensors = {k: randn(*s) for k, s in shapes.items()} | ({"alpha": torch.tensor(alpha, dtype=torch.float64)} if alpha else {})
    t = as_np(tensors)
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker_np(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(6, 8, *weight_shape[2:])
    expected = scale(alpha, rank) * kron_np(w1, w2).reshape(weight_shape)
    np.testing.assert_allclose(lokr_delta(tensors, weight_shape).numpy(), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- peft's layers, exported, give peft's ΔW

class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(40, 48)
        self.conv = torch.nn.Conv2d(20, 32, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(20, 32, 1)


PEFT_CASES = {
    "lora": lambda: __import__("peft").LoraConfig(r=4, lora_alpha=8, target_modules=["proj", "conv", "shortcut"], init_lora_weights=False),
    "loha": lambda: __import__("peft").LoHaConfig(r=4, alpha=2, target_modules=["proj", "conv", "shortcut"], init_weights=False),
    "lokr": lambda: __import__("peft").LoKrConfig(r=3, alpha=6, target_modules=["proj", "conv", "shortcut"], init_weights=False),
    "lokr both decomposed": lambda: __import__("peft").LoKrConfig(r=2, alpha=6, decompose_both=True, target_modules=["proj", "conv"], init_weights=False),
    "lokr full factors": lambda: __import__("peft").LoKrConfig(r=32, alpha=8, target_modules=["proj", "conv"], init_weights=False),
    "lokr tucker": lambda: __import__("peft").LoKrConfig(r=3, alpha=6, use_effective_conv2d=True, target_modules=["conv"], init_weights=False),
}


def peft_layer_parameters(model, name: str) -> dict:
    """A peft layer's adapter parameters by their own names (`lora_A.weight`, `hada_w1_a`, `lokr_w1`)."""
    from peft import get_peft_model_state_dict

    return {key.removeprefix(f"{name}."): value for key, value in get_peft_model_state_dict(model).items() if key.startswith(f"{name}.")}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_a_peft_layer_exported_to_file_tensors_gives_peft_own_delta(case):
    from peft import inject_adapter_in_model

    torch.manual_seed(1)
    model = inject_adapter_in_model(PEFT_CASES[case](), TwoLayers())
    adapter = ADAPTERS[case.split()[0]]
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "get_delta_weight")]
    assert layers
    for name, layer in layers:
        rank, alpha = layer.r["default"], (layer.lora_alpha if adapter.name == "lora" else layer.alpha)["default"]
        tensors = file_tensors(adapter, peft_layer_parameters(model, name), rank=rank, alpha=alpha)
        assert adapter_of_layer(tensors, name) is adapter
        ours = adapter.delta({k: v.double() for k, v in tensors.items()}, tuple(layer.get_base_layer().weight.shape))
        torch.testing.assert_close(ours.float(), layer.get_delta_weight("default").float(), rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
        original = peft_layer_parameters(model, name)
        if "lokr_t2" in original:  # written as its full lokr_w2 (`file_tensors`): ComfyUI cannot read lokr_t2 now
            assert "lokr_w2" in tensors and not {"lokr_t2", "lokr_w2_a", "lokr_w2_b"} & set(tensors)
            continue
        again = peft_parameters(adapter, tensors, rank=rank, alpha=alpha)
        assert again.keys() == original.keys()
        for key in again:
            torch.testing.assert_close(again[key].float(), original[key].float(), rtol=1e-6, atol=1e-7, msg=f"{case} {name} {key}")


@pytest.mark.parametrize("case", PEFT_CASES)
def test_exported_layers_patched_by_comfyuis_and_webuis_arithmetic_give_peft_merged_weights(case):
    """Every peft layer type and form, exported, and applied as ComfyUI's and WebUI's loaders apply it (reproduced
    from their sources), gives the weight peft's own merge gives."""
    from peft import inject_adapter_in_model

    torch.manual_seed(4)
    model = inject_adapter_in_model(PEFT_CASES[case](), TwoLayers())
    adapter = ADAPTERS[case.split()[0]]
    for name, layer in [(n, m) for n, m in model.named_modules() if hasattr(m, "get_delta_weight")]:
        rank, alpha = layer.r["default"], (layer.lora_alpha if adapter.name == "lora" else layer.alpha)["default"]
        tensors = file_tensors(adapter, peft_layer_parameters(model, name), rank=rank, alpha=alpha)
        base = layer.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=["default"])
        merged = layer.get_base_layer().weight.detach().clone()
        layer.unmerge()
        for ui, patch in (("ComfyUI", comfyui_patch), ("WebUI", webui_patch)):
            torch.testing.assert_close(patch(base, tensors), merged, rtol=1e-5, atol=1e-5, msg=f"{ui}: {case} {name}")
        torch.testing.assert_close(comfyui_patch(base, tensors, 0.5) - base, 0.5 * (merged - base), rtol=1e-5, atol=1e-6)


def test_comfyuis_lokr_arithmetic_fails_on_the_tucker_form_with_this_torch():
    """Why `file_tensors` writes a Tucker LoKr as its full lokr_w2: ComfyUI's torch.kron of its einsum's
    non-contiguous result raises (ComfyUI then logs the error and leaves the layer unpatched)."""
    shapes, weight_shape, _ = LOKR_CASES["conv, tucker"]
    tensors = {k: randn(*s).float() for k, s in shapes.items()}
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        comfyui_patch(torch.zeros(weight_shape), tensors)
    torch.testing.assert_close(webui_patch(torch.zeros(weight_shape), tensors), lokr_delta(tensors, weight_shape))


def test_lokr_with_two_full_factors_is_scaled_by_alpha_over_r_in_peft_but_not_in_the_uis():
    """Why `file_tensors` moves the scale into lokr_w1: read as it is, the file would be 4x off at r 32, alpha 8."""
    from peft import LoKrConfig, inject_adapter_in_model

    torch.manual_seed(2)
    model = inject_adapter_in_model(LoKrConfig(r=32, alpha=8, target_modules=["proj"], init_weights=False), TwoLayers())
    layer = model.proj
    raw = {k: v.double() for k, v in peft_layer_parameters(model, "proj").items()} | {"alpha": torch.tensor(8.0)}
    assert set(raw) == {"lokr_w1", "lokr_w2", "alpha"}, "both factors full at this rank"
    ratio = float(layer.get_delta_weight("default").detach().double().norm() / lokr_delta(raw, (48, 40)).norm())
    assert abs(ratio - 8 / 32) < 1e-6, ratio


def test_peft_loha_effective_conv_gradients_are_wrong_so_that_form_is_refused():
    """peft 0.21.2's LoHa Tucker (use_effective_conv2d) backward: its gradients for hada_w1_a and hada_w2_a differ
    from autograd's through the same forward formula (`loha_delta`), so --adapter loha --use_tucker is refused."""
    from peft import LoHaConfig, inject_adapter_in_model

    torch.manual_seed(3)
    model = inject_adapter_in_model(LoHaConfig(r=4, alpha=4, use_effective_conv2d=True, target_modules=["conv"], init_weights=False), TwoLayers())
    layer = model.conv
    parameters = {name: getattr(layer, name)["default"] for name in ("hada_w1_a", "hada_w1_b", "hada_t1", "hada_w2_a", "hada_w2_b", "hada_t2")}
    upstream = torch.randn(32, 20, 3, 3)
    peft_grads = torch.autograd.grad((layer.get_delta_weight("default") * upstream).sum(), list(parameters.values()))
    ours = ADAPTERS["loha"].delta(parameters | {"alpha": torch.tensor(4.0)}, (32, 20, 3, 3))
    true_grads = torch.autograd.grad((ours * upstream).sum(), list(parameters.values()))
    errors = {name: float((p - t).norm() / t.norm()) for name, p, t in zip(parameters, peft_grads, true_grads)}
    assert errors["hada_w1_a"] > 0.1 and errors["hada_w2_a"] > 0.1, errors
    assert max(errors[n] for n in ("hada_w1_b", "hada_t1", "hada_w2_b", "hada_t2")) < 1e-5, errors
    assert not ADAPTERS["loha"].trains_tucker and ADAPTERS["lokr"].trains_tucker


# ---------------------------------------------------------------- what a file layer is

@pytest.mark.parametrize("tensors, algorithm", [
    ({"weight", "on_input"}, "IA3"), ({"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}, "GLoRA"),
    ({"oft_blocks", "alpha"}, "OFT/BOFT"), ({"diff", "diff_b"}, "full weight differences"),
])
def test_other_algorithms_are_refused_by_name(tensors, algorithm):
    with pytest.raises(UserError, match=f"lora_unet_x is {algorithm}.*LoRA, LoCon, LoHa, LoKr and DoRA files are read"):
        adapter_of_layer(tensors, "lora_unet_x")


def test_a_layer_missing_a_factor_or_with_unknown_tensors_is_refused():
    with pytest.raises(UserError, match="no complete LoRA, LoHa or LoKr layer"):
        adapter_of_layer({"lora_up.weight", "alpha"}, "lora_unet_x")
    with pytest.raises(UserError, match="LoHa layer with tensors it does not define: hada_w3"):
        adapter_of_layer({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_w3"}, "lora_unet_x")
    assert adapter_of_layer({"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"}, "x") is ADAPTERS["lokr"]
