"""kohya's network and optimizer options read as this toolkit's: --network_module with --network_args, and
--optimizer_type with --optimizer_args, which kohya users write on every command line and the kohya_ss GUI writes
into every config file.

kohya sd-scripts at 48d368f: train_network.py imports --network_module and passes --network_args ("key=value"
strings) to its create_network (networks/lora.py: conv_dim, conv_alpha, dropout, rank_dropout, module_dropout,
loraplus_lr_ratio, down/mid/up_lr_weight, block_lr_zero_threshold; LyCORIS's lycoris.kohya: algo, conv_dim,
conv_alpha, dropout, rank_dropout, module_dropout, use_tucker, factor, decompose_both, preset); library/train_util.py
`get_optimizer` lower-cases --optimizer_type and passes --optimizer_args ("key=value", values read as Python
literals) to the optimizer. Each is read into the option that means the same here; anything else is refused naming
it and what is accepted, never dropped.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from typing import Any

from common.cli import UserError

logger = logging.getLogger(__name__)

# --optimizer_type (lower-cased, as kohya compares it) -> (--optimizer, --use_8bit_adam)
OPTIMIZER_TYPES = {"adamw": ("adamw", False), "adamw8bit": ("adamw", True), "prodigy": ("prodigy", False),
                   "adafactor": ("adafactor", False)}
# --optimizer_args keys -> our option, per optimizer; "betas" fills two or three options
OPTIMIZER_ARGS = {"weight_decay": "adam_weight_decay", "eps": "adam_epsilon"}
PRODIGY_ARGS = {"decouple": "prodigy_decouple", "use_bias_correction": "prodigy_use_bias_correction",
                "safeguard_warmup": "prodigy_safeguard_warmup", "d_coef": "prodigy_d_coef"}
# what this toolkit's Adafactor is: a fixed rate, as LoRA recipes (and kohya's docs) run it
ADAFACTOR_FIXED = {"relative_step": False, "scale_parameter": False, "warmup_init": False}

NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# LyCORIS's layer presets with a --lora_layers set of the same Linear layers in the transformer blocks (its attn-mlp
# also adapts the time embedding's two layers, which ours leaves alone)
LYCORIS_PRESETS = {"attn-only": "attn", "attn-mlp": "attn-mlp"}
LYCORIS_ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
# --network_args keys -> our option (both modules); `algo` and `preset` are read on their own
NETWORK_ARGS = {"conv_dim": "conv_rank", "conv_alpha": "conv_alpha", "dropout": "lora_dropout", "rank_dropout": "rank_dropout",
                "module_dropout": "module_dropout", "use_tucker": "use_tucker", "factor": "lokr_factor",
                "decompose_both": "decompose_both", "loraplus_lr_ratio": "loraplus_lr_ratio", "down_lr_weight": "down_lr_weight",
                "mid_lr_weight": "mid_lr_weight", "up_lr_weight": "up_lr_weight", "block_lr_zero_threshold": "block_lr_zero_threshold"}


def key_values(values: list[str] | tuple[str, ...] | None, option: str) -> dict[str, str]:
    """kohya's "key=value" list as a mapping (the value text as written); one without "=" is refused."""
    pairs = {}
    for item in values or ():
        key, equals, value = str(item).partition("=")
        if not equals or not key.strip():
            raise UserError(f"--{option} {item!r}: kohya's form is key=value (e.g. conv_dim=8)")
        pairs[key.strip()] = value.strip()
    return pairs


def literal(text: str) -> Any:
    """A value as kohya reads --optimizer_args (ast.literal_eval), with true/false in any case as booleans."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def kohya_optimizer(optimizer_type: str | None, optimizer_args, optimizer: str) -> dict[str, Any]:
    """The options --optimizer_type and --optimizer_args stand for ({} when neither is given). `optimizer` is --optimizer
    as given, which must agree when both are."""
    if optimizer_type is None:
        if optimizer_args:
            raise UserError("--optimizer_args needs kohya's --optimizer_type; here each optimizer setting is its own option "
                            "(--adam_weight_decay, --adam_beta1, ...)")
        return {}
    kind = optimizer_type.lower()
    if kind not in OPTIMIZER_TYPES:
        raise UserError(f"--optimizer_type {optimizer_type!r} is not available here; accepted: AdamW, AdamW8bit, Prodigy, "
                        "Adafactor (or --optimizer adamw|prodigy|adafactor)")
    name, eight_bit = OPTIMIZER_TYPES[kind]
    if optimizer.lower() not in ("adamw", name):
        raise UserError(f"--optimizer {optimizer} and --optimizer_type {optimizer_type} disagree; give one of them")
    options: dict[str, Any] = {"optimizer": name, "use_8bit_adam": eight_bit} if eight_bit else {"optimizer": name}
    for key, text in key_values(optimizer_args, "optimizer_args").items():
        value = literal(text)
        if key == "betas":
            betas = value if isinstance(value, (tuple, list)) else None
            if betas is None or len(betas) not in ((2, 3) if name == "prodigy" else (2,)):
                raise UserError(f"--optimizer_args betas={text}: two numbers (three for Prodigy), e.g. betas=0.9,0.99")
            options |= dict(zip(("adam_beta1", "adam_beta2", "prodigy_beta3"), map(float, betas)))
        elif key in OPTIMIZER_ARGS and name != "adafactor" or key == "weight_decay":
            options[OPTIMIZER_ARGS[key]] = float(value)
        elif key in PRODIGY_ARGS and name == "prodigy":
            options[PRODIGY_ARGS[key]] = float(value) if key == "d_coef" else str(bool(value))
        elif key in ADAFACTOR_FIXED and name == "adafactor":
            if value != ADAFACTOR_FIXED[key]:
                raise UserError(f"--optimizer_args {key}={text}: Adafactor here runs at a fixed rate ({key}=False), as "
                                "LoRA recipes run it")
        else:
            raise UserError(f"--optimizer_args {key}={text} is not read for {optimizer_type} here; accepted: "
                            + ", ".join(accepted_optimizer_args(name)))
    return options


def accepted_optimizer_args(name: str) -> list[str]:
    if name == "adafactor":
        return ["weight_decay", *(f"{key}=False" for key in ADAFACTOR_FIXED)]
    return ["weight_decay", "eps", "betas", *(PRODIGY_ARGS if name == "prodigy" else ())]


def kohya_network(network_module: str | None, network_args) -> dict[str, Any]:
    """The options --network_module and --network_args stand for ({} when neither is given): networks.lora is a LoRA
    (a LoCon with conv_dim); lycoris.kohya's algo picks LoCon, LoHa or LoKr; each further key its option, `preset`
    kohya's layer set (--lora_layers)."""
    if network_module is None:
        if network_args:
            raise UserError("--network_args needs kohya's --network_module (networks.lora or lycoris.kohya)")
        return {}
    if network_module not in NETWORK_MODULES:
        raise UserError(f"--network_module {network_module!r} is not available here; accepted: {', '.join(NETWORK_MODULES)} "
                        "(or --adapter lora|loha|lokr)")
    args = key_values(network_args, "network_args")
    options: dict[str, Any] = {"adapter": "lora"}
    if network_module == "lycoris.kohya":
        algo = args.pop("algo", "lora").lower()
        if algo not in LYCORIS_ALGOS:
            raise UserError(f"--network_args algo={algo} is not available here; accepted: {', '.join(LYCORIS_ALGOS)}")
        options["adapter"] = LYCORIS_ALGOS[algo]
    elif "algo" in args:
        raise UserError("--network_args algo=... is LyCORIS's; give --network_module lycoris.kohya with it")
    if "preset" in args:
        preset = args.pop("preset")
        if preset not in LYCORIS_PRESETS:
            raise UserError(f"--network_args preset={preset} is not available here; accepted: {', '.join(LYCORIS_PRESETS)} "
                            "(or --lora_layers attn|attn-mlp|all-linear)")
        options["lora_layers"] = LYCORIS_PRESETS[preset]
    for key, text in args.items():
        if key not in NETWORK_ARGS:
            raise UserError(f"--network_args {key}={text} is not read here; accepted: algo, preset, {', '.join(NETWORK_ARGS)}")
        value = literal(text)
        options[NETWORK_ARGS[key]] = str(value) if key.endswith("_lr_weight") else value
    return options


def with_kohya_options(options: dict, config_class) -> dict:
    """kohya's --network_module/--network_args and --optimizer_type/--optimizer_args read into the options they mean
    here (`kohya_optimizer`, `kohya_network`); one of those options also given otherwise (not at its default in
    `config_class`, the script's options dataclass), with another value, is refused."""
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    read = kohya_optimizer(options["optimizer_type"], options["optimizer_args"], options["optimizer"])
    read |= kohya_network(options["network_module"], options["network_args"])
    for name, value in read.items():
        if name not in defaults:
            raise UserError(f"kohya's setting for --{name} ({value}) has no option here")
        given = options.get(name, defaults.get(name))
        if given != defaults.get(name) and str(given).lower() != str(value).lower():
            raise UserError(f"--{name} {given} and kohya's --network_args/--optimizer_args/--optimizer_type ({value}) disagree; "
                            "give it once")
    return options | read


def choose_lora_layers(config, options: dict) -> None:
    """`config.lora_layers` (train_lora.py's TrainConfig): --lora_layers, or the default of the flags used: kohya's
    network module or --network_dim train kohya's layer set (common.lora_layers), said in one line; the diffusers flags
    the attention projections."""
    import sys

    from common.lora_layers import choose_layer_set

    kohya_flags = options.get("network_module") is not None or any(a.split("=")[0] == "--network_dim" for a in sys.argv[1:])
    config.lora_layers, message = choose_layer_set(config.lora_layers, kohya_flags=kohya_flags)
    if message:
        logger.warning(message)
