"""The GPU fast paths, checked where a CPU can check them: the UNet's attention is PyTorch's scaled-dot-product
attention in training, AdamW is fused where the parameters are on a GPU and unchanged on the CPU, batches are pinned
for a GPU, and torch.compile gets infer.py's recipe."""

from __future__ import annotations

import types

import pytest
import torch

from training_helpers import train_cli, write_images


def test_every_attention_of_the_trained_unet_runs_through_sdpa(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    import torch.nn.functional as F
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    import train_lora

    calls, seen, inside = [], {}, []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(bool(inside)) or sdpa(*a, **k))
    add_lora = train_lora.add_lora

    def keep_unet(unet, config):  # SDPA calls inside the UNet's forward are the UNet's (the text encoders use it too)
        seen["unet"] = add_lora(unet, config)
        seen["unet"].register_forward_pre_hook(lambda *_: inside.append(1))
        seen["unet"].register_forward_hook(lambda *_: inside.clear())
        return seen["unet"]

    monkeypatch.setattr(train_lora, "add_lora", keep_unet)
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 1),
                             "--instance_prompt", "a sks dog", "--resolution", 64, "--max_train_steps", 1, "--cache_latents",
                             "--output_dir", tmp_path / "out")
    assert code == 0, err
    attentions = [m for m in seen["unet"].modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(m.processor, AttnProcessor2_0) for m in attentions)
    assert calls.count(True) == len(attentions)  # one training forward: each attention once, through SDPA


def fake_accelerator(device: str):
    return types.SimpleNamespace(device=torch.device(device), num_processes=1)


@pytest.mark.parametrize("device, fused", [("cuda", True), ("cpu", None)])
def test_adamw_is_fused_for_parameters_on_a_gpu_and_left_as_it_is_on_the_cpu(device, fused):
    import train_lora

    unet = torch.nn.Linear(4, 4)
    unet.config = types.SimpleNamespace(layers_per_block=2)
    pipe = types.SimpleNamespace(text_encoder=torch.nn.Linear(1, 1).requires_grad_(False),
                                 text_encoder_2=torch.nn.Linear(1, 1).requires_grad_(False))
    config = train_lora.TrainConfig(pretrained_model_name_or_path="x", instance_data_dir="x", instance_prompt="x")
    optimizer, _, _ = train_lora.make_optimizer(config, unet, pipe, fake_accelerator(device), 1, 4)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is fused


class _Sized(torch.utils.data.Dataset):
    epoch = 0

    def __len__(self):
        return 2

    def bucket(self, position):
        return (64, 64)


def test_batches_are_pinned_only_for_a_gpu():
    import train_lora
    from common.training_data import make_loader

    config = train_lora.TrainConfig(pretrained_model_name_or_path="x", instance_data_dir="x", instance_prompt="x")
    for pin in (False, True):
        loader, _ = make_loader(config, _Sized(), 2, pin_memory=pin)
        assert loader.pin_memory is pin


def test_compiled_training_takes_infers_recipe_and_states_its_graph_breaks(tiny_sdxl_path, tmp_path, capsys, monkeypatch):
    compiled = []

    def record(module, *args, **kwargs):  # inductor takes minutes on a CPU; the wiring is what is checked here
        compiled.append(kwargs)
        return module

    monkeypatch.setattr(torch, "compile", record)
    code, out, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 1),
                               "--instance_prompt", "a sks dog", "--resolution", 64, "--max_train_steps", 1,
                               "--torch_compile", "--output_dir", tmp_path / "out")
    assert code == 0, err
    assert compiled == [{"mode": "max-autotune-no-cudagraphs"}]
    assert "torch.compile:" in out, out


def test_graph_break_summary_names_the_commonest_break():
    from torch._dynamo.utils import counters

    from common.models import graph_break_summary

    counters["graph_break"].clear()
    assert graph_break_summary() == "torch.compile: the UNet compiled without graph breaks"

    def breaks(x):
        print("a print breaks the graph")
        return x + 1

    torch._dynamo.reset()
    torch.compile(breaks, backend="eager")(torch.ones(2))
    summary = graph_break_summary()
    assert summary.startswith("torch.compile: 1 graph break(s), most often (1x): "), summary
    counters["graph_break"].clear()


@pytest.mark.heavy
def test_the_gpu_bench_runs_dry_on_the_cpu_with_its_table(tmp_path):
    """bench/gpu.sh --dry-run: the tiny model through the same training and sampling code, and the table the GPU run
    prints for bench/RESULTS.md: the card line, four training rows and four sampling rows with the README's estimates."""
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    table = tmp_path / "table.md"
    done = subprocess.run(["bash", str(repo / "bench" / "gpu.sh"), "--dry-run", "--out", str(table)], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = table.read_text().splitlines()
    assert lines[0].startswith("Card: cpu x") and "torch 2.14.1" in lines[0] and "(--dry-run: not a measurement)" in lines[0]
    rows = [line.split(" | ") for line in lines if line.startswith("| train_lora.py") or line.startswith("| infer.py")]
    assert len(rows) == 8
    train = [row for row in rows if row[0] == "| train_lora.py rank 16"]
    assert [(row[1], row[2]) for row in train] == [("1", "cached latents"), ("1", "checkpointing, cached latents"),
                                                    ("4", "cached latents"), ("4", "checkpointing, cached latents")]
    assert all(float(row[3]) > 0 for row in train) and [row[5] for row in train] == ["11.2", "6.6", "29.5", "7.1"]
    sampled = [row for row in rows if row[0] == "| infer.py" and "skipped" not in row[3]]
    assert len(sampled) == 2 and [row[5] for row in sampled] == ["8.0", "12.5"]
