"""A kohya user's run as they have it: a --config_file TOML (the kohya_ss GUI's flat one, or sectioned) beneath the
command line, kohya's network and optimizer options read as ours, per-epoch and per-step adapter files with kohya's
names, retention and precision, and the run's own config.toml that re-runs it to the same LoRA bit for bit."""

from __future__ import annotations

import tomllib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.cli import UserError
from common.kohya_options import kohya_network, kohya_optimizer
from training_helpers import train_cli, write_images


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def stored_dtypes(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return {handle.get_slice(key).get_dtype() for key in handle.keys()}


def gui_toml(model: str, images, out, **extra) -> str:
    """A flat, key-sorted TOML as the kohya_ss GUI writes it on every run (kohya_gui/lora_gui.py), for an SDXL LoRA."""
    values = {
        "bucket_reso_steps": 64, "cache_latents": True, "caption_extension": ".txt", "clip_skip": 2, "enable_bucket": False,
        "gradient_accumulation_steps": 1, "keep_tokens": 1, "learning_rate": 0.001, "logging_dir": str(out / "log"),
        "lr_scheduler": "constant", "lr_warmup_steps": 0, "max_data_loader_n_workers": 0, "max_grad_norm": 1,
        "max_token_length": 75, "max_train_epochs": 3, "mixed_precision": "no", "network_alpha": 2,
        "network_args": ["conv_dim=2", "conv_alpha=1"], "network_dim": 4, "network_module": "networks.lora",
        "no_half_vae": True, "optimizer_args": ["weight_decay=0.05"], "optimizer_type": "AdamW", "output_dir": str(out),
        "output_name": "my_lora", "pretrained_model_name_or_path": model, "resolution": "64,64", "save_every_n_epochs": 1,
        "save_model_as": "safetensors", "save_precision": "fp16", "sdpa": True, "seed": 7, "shuffle_caption": True,
        "text_encoder_lr": 1e-5, "train_batch_size": 1, "train_data_dir": str(images), "unet_lr": 0.001,
    } | extra
    lines = []
    for key, value in sorted(values.items()):
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, list):
            text = "[" + ", ".join(f'"{item}"' for item in value) + "]"
        else:
            text = f'"{value}"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def kohya_images(root):
    folder = write_images(root / "img", count=2)
    (folder / "image_0.txt").write_text("sks dog, on grass")
    (folder / "image_1.txt").write_text("sks dog, indoors")
    return folder


def test_a_kohya_ss_gui_config_runs_unchanged_with_kohyas_files(tiny_sdxl_path, tmp_path, capsys, caplog):
    images, out = kohya_images(tmp_path), tmp_path / "out"
    (tmp_path / "config_lora-20261206-101010.toml").write_text(gui_toml(tiny_sdxl_path, images, out))
    code, stdout, err = train_cli(capsys, "--config_file", tmp_path / "config_lora-20261206-101010")  # kohya adds .toml
    assert code == 0, err
    files = sorted(p.name for p in out.glob("my_lora*.safetensors"))
    # 2 images, batch 1: 2 steps an epoch, 3 epochs; an epoch file after epochs 1 and 2, the last one is the final file
    assert files == ["my_lora-000001.safetensors", "my_lora-000002.safetensors", "my_lora.safetensors"], files
    assert all(stored_dtypes(out / name) == {"F16"} for name in files)
    final = tensors(out / "my_lora.safetensors")
    assert any("_in_layers_2.lora_down" in k for k in final), "conv_dim: a LoCon (the ResNets' conv1, SGM's in_layers.2)"
    assert any("_ff_net_2.lora_down" in k for k in final), "kohya's flags: kohya's layers, the feed-forward included"
    assert "clip_skip = 2 is kohya's, which kohya ignores on SDXL" in caplog.text and "--sdpa has no effect" in caplog.text
    record = tomllib.loads((out / "config.toml").read_text())["train_lora"]
    assert record["optimizer_type"] == "AdamW" and record["output_name"] == "my_lora" and "clip_skip" not in record


def test_the_command_line_wins_over_the_file_and_sections_are_flattened(tiny_sdxl_path, tmp_path, capsys):
    """kohya's own sectioned form (its docs and users' files): [model_arguments], [training_arguments], ..."""
    images = kohya_images(tmp_path)
    (tmp_path / "sectioned.toml").write_text(f"""
[model_arguments]
pretrained_model_name_or_path = "{tiny_sdxl_path}"
[additional_network_arguments]
network_dim = 8
network_alpha = 4
[training_arguments]
output_dir = "{tmp_path / 'ignored'}"
output_name = "sectioned"
train_batch_size = 1
max_train_steps = 1
resolution = 64
train_data_dir = "{images}"
save_precision = "bf16"
""")
    code, _, err = train_cli(capsys, "--config_file", tmp_path / "sectioned.toml", "--output_dir", tmp_path / "cli",
                             "--network_dim", 2)
    assert code == 0, err
    assert not (tmp_path / "ignored").exists()
    state = tensors(tmp_path / "cli" / "sectioned.safetensors")
    down = next(v for k, v in state.items() if k.endswith("lora_down.weight"))
    assert down.shape[0] == 2 and down.dtype == torch.bfloat16, "--network_dim 2 on the command line beats the file's 8"
    alpha = next(v for k, v in state.items() if k.endswith(".alpha"))
    assert float(alpha) == 4.0, "the file's network_alpha is taken where the command line gives none"


@pytest.mark.heavy
def test_output_config_then_config_file_and_the_runs_own_config_give_the_same_lora_bit_for_bit(tiny_sdxl_path, tmp_path, capsys):
    images = kohya_images(tmp_path)
    options = ["-m", tiny_sdxl_path, "--train_data_dir", images, "--resolution", 64, "--train_batch_size", 1, "--max_train_steps", 2,
               "--network_dim", 8, "--learning_rate", 3e-3, "--seed", 5, "--shuffle_caption", "--caption_dropout_rate", 0.3,
               "--network_module", "lycoris.kohya", "--network_args", "algo=loha", "conv_dim=2"]
    code, stdout, err = train_cli(capsys, *options, "--output_dir", tmp_path / "a", "--output_config", "--config_file", tmp_path / "saved")
    assert code == 0 and (tmp_path / "saved.toml").is_file() and not (tmp_path / "a").exists(), err
    written = tomllib.loads((tmp_path / "saved.toml").read_text())["train_lora"]
    assert written["rank"] == 8 and written["network_args"] == ["algo=loha", "conv_dim=2"] and "config_file" not in written
    code, _, err = train_cli(capsys, *options, "--output_dir", tmp_path / "a", "--output_config", "--config_file", tmp_path / "saved")
    assert code == 2 and "exists; it is never replaced" in err and err.count("\n") == 1, err

    assert train_cli(capsys, "--config_file", tmp_path / "saved.toml")[0] == 0  # into a/, as the file says
    assert train_cli(capsys, *options, "--output_dir", tmp_path / "c")[0] == 0
    assert train_cli(capsys, "--config_file", tmp_path / "a" / "config.toml", "--output_dir", tmp_path / "b")[0] == 0
    first = tensors(tmp_path / "c" / "c.safetensors")
    assert any("hada_w1_a" in key for key in first), "algo=loha trained a LoHa"
    for again in (tmp_path / "a" / "a.safetensors", tmp_path / "b" / "b.safetensors"):
        assert all(torch.equal(first[k], v) for k, v in tensors(again).items()) and len(tensors(again)) == len(first)


def test_step_files_and_epoch_files_hold_the_weights_of_their_step(tiny_sdxl_path, tmp_path, capsys):
    """kohya writes a step file at the last step too: it equals the final file. Retention keeps the files of the
    last 3 steps (a span: at step 6, steps 4 and 6 stay) and the last epoch file."""
    images = write_images(tmp_path / "img", count=2)
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", images, "--instance_prompt", "x", "--resolution", 64,
                             "--train_batch_size", 1, "--max_train_epochs", 3, "--save_every_n_steps", 2, "--save_last_n_steps", 3,
                             "--save_every_n_epochs", 1, "--save_last_n_epochs", 1, "--output_dir", tmp_path / "run",
                             "--learning_rate", 1e-2)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "run").glob("run*.safetensors"))
    assert names == ["run-000002.safetensors", "run-step00000004.safetensors", "run-step00000006.safetensors", "run.safetensors"]
    final, last_step, epoch_2 = (tensors(tmp_path / "run" / name) for name in ("run.safetensors", "run-step00000006.safetensors",
                                                                                 "run-000002.safetensors"))
    assert all(torch.equal(final[k], last_step[k]) for k in final)
    assert all(torch.equal(epoch_2[k], v) for k, v in tensors(tmp_path / "run" / "run-step00000004.safetensors").items()), \
        "epoch 2 ends at step 4"
    assert any(not torch.equal(final[k], epoch_2[k]) for k in final if "lora" in k)


# ------------------------------------------------------------------ hostile config files, each refused in one line

@pytest.mark.parametrize(("content", "message"), [
    (b"network_dim = \n", "is not TOML"),
    (b"rank = 4\nnetwork_dim = 8\n", "'rank' and 'network_dim' are the same option, --rank; keep one"),
    (b"[a]\nseed = 1\n[b]\nseed = 2\n", "'seed' is set twice ([a] and [b])"),
    (b"[a]\n[a.b]\nseed = 1\n", "[a] holds the table 'b'"),
    (b"no_such_option = 1\n", "'no_such_option' is no option of this script"),
    (b"network_dim = \"four\"\n", "network_dim = 'four':"),
    (b"learning_rate = nan\n", "learning_rate = nan: not a finite number"),
    (b"seed = [1, 2]\n", "seed = [1, 2]: --seed takes one value, not a list"),
    (b"config_file = \"x.toml\"\n", "'config_file' belongs on the command line"),
    ("network_dim = 4\n".encode("utf-16"), "no option"),  # read as its text (UTF-16 with a BOM), then refused for the key
])
def test_a_bad_config_file_is_refused_in_one_line_before_any_model_loads(content, message, tiny_sdxl_path, tmp_path, capsys,
                                                                         monkeypatch):
    import diffusers

    monkeypatch.setattr(diffusers.StableDiffusionXLPipeline, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("a model was loaded before the refusal")))
    if message == "no option":
        content = "network_dim = 4\nwrong_key = 1\n".encode("utf-16")
    (tmp_path / "bad.toml").write_bytes(content)
    code, _, err = train_cli(capsys, "-m", tiny_sdxl_path, "--instance_data_dir", write_images(tmp_path / "img", 1),
                             "--instance_prompt", "x", "--output_dir", tmp_path / "out", "--config_file", tmp_path / "bad.toml")
    expected = "'wrong_key' is no option of this script" if message == "no option" else message
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_missing_config_file_and_a_missing_model_are_named(tmp_path, capsys):
    code, _, err = train_cli(capsys, "--config_file", tmp_path / "nowhere")
    assert code == 2 and f"--config_file {str(tmp_path / 'nowhere.toml')!r} not found" in err, err
    (tmp_path / "empty.toml").write_text("")
    code, _, err = train_cli(capsys, "--config_file", tmp_path / "empty.toml")
    assert code == 2 and "give the base model: --model (kohya's --pretrained_model_name_or_path)" in err, err


# ------------------------------------------------------------------ kohya's network and optimizer options

@pytest.mark.parametrize(("module", "args", "expected"), [
    ("networks.lora", [], {"adapter": "lora"}),
    ("networks.lora", ["conv_dim=8", "conv_alpha=4"], {"adapter": "lora", "conv_rank": 8, "conv_alpha": 4}),
    ("lycoris.kohya", ["algo=locon", "conv_dim=4"], {"adapter": "lora", "conv_rank": 4}),
    ("lycoris.kohya", ["algo=LoHa", "dropout=0.1", "rank_dropout=0.2", "module_dropout=0.05"],
     {"adapter": "loha", "lora_dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.05}),
    ("lycoris.kohya", ["algo=lokr", "factor=8", "use_tucker=True", "decompose_both=false"],
     {"adapter": "lokr", "lokr_factor": 8, "use_tucker": True, "decompose_both": False}),
    ("networks.lora", ["loraplus_lr_ratio=16", "down_lr_weight=sine", "mid_lr_weight=1,1,1", "block_lr_zero_threshold=0.1"],
     {"adapter": "lora", "loraplus_lr_ratio": 16, "down_lr_weight": "sine", "mid_lr_weight": "(1, 1, 1)",
      "block_lr_zero_threshold": 0.1}),
])
def test_kohyas_network_options_read_as_ours(module, args, expected):
    read = kohya_network(module, args)
    if "mid_lr_weight" in expected:  # a list of weights is handed on as text, as --mid_lr_weight takes it
        assert read.pop("mid_lr_weight").replace(" ", "").strip("()") == "1,1,1"
        expected = {k: v for k, v in expected.items() if k != "mid_lr_weight"}
    assert read == expected


@pytest.mark.parametrize(("kind", "args", "expected"), [
    ("AdamW", ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6"],
     {"optimizer": "adamw", "adam_weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.99, "adam_epsilon": 1e-6}),
    ("adamw8bit", [], {"optimizer": "adamw", "use_8bit_adam": True}),
    ("Prodigy", ["decouple=True", "use_bias_correction=False", "d_coef=2", "betas=(0.9,0.99,0.999)"],
     {"optimizer": "prodigy", "prodigy_decouple": "True", "prodigy_use_bias_correction": "False", "prodigy_d_coef": 2.0,
      "adam_beta1": 0.9, "adam_beta2": 0.99, "prodigy_beta3": 0.999}),
    ("Adafactor", ["scale_parameter=False", "relative_step=False", "warmup_init=False"], {"optimizer": "adafactor"}),
])
def test_kohyas_optimizer_options_read_as_ours(kind, args, expected):
    assert kohya_optimizer(kind, args, "adamw") == expected


@pytest.mark.parametrize(("call", "message"), [
    (lambda: kohya_network("networks.oft", []), "--network_module 'networks.oft' is not available here"),
    (lambda: kohya_network("lycoris.kohya", ["algo=glora"]), "--network_args algo=glora is not available here"),
    (lambda: kohya_network("networks.lora", ["algo=loha"]), "algo=... is LyCORIS's"),
    (lambda: kohya_network("networks.lora", ["conv_dim"]), "--network_args 'conv_dim': kohya's form is key=value"),
    (lambda: kohya_optimizer("Adafactor", ["relative_step=True"], "adamw"), "Adafactor here runs at a fixed rate"),
    (lambda: kohya_optimizer("AdamW", ["betas=0.9"], "adamw"), "betas=0.9: two numbers"),
    (lambda: kohya_optimizer("Prodigy", [], "adafactor"), "--optimizer adafactor and --optimizer_type Prodigy disagree"),
    (lambda: kohya_optimizer("DAdaptAdam", [], "adamw"), "accepted: AdamW, AdamW8bit, Prodigy, Adafactor"),
])
def test_kohya_settings_that_mean_nothing_here_are_refused_naming_them(call, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


def test_without_tomllib_as_on_python_3_10_the_scripts_import_and_a_toml_file_names_what_it_needs():
    """Python 3.10 has no tomllib: train_lora.py must still start, and a config or dataset file asks for tomli."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['tomllib'] = sys.modules['tomli'] = None\n"
            "import train_lora\n"
            "from common.cli import UserError\n"
            "from common.files import parse_toml\n"
            "try:\n    parse_toml('a = 1', '--config_file x.toml')\nexcept UserError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "--config_file x.toml: reading TOML needs Python 3.11+ or the tomli package (pip install tomli)", done.stdout
