"""kohya's --config_file: a TOML file of a script's options beneath its command line, and the file a run writes of
its own configuration.

kohya sd-scripts (library/train_util.py `read_config_from_file`, at 48d368f) appends ".toml" to a name without it,
flattens every section (`[training_arguments]`, `[model_arguments]`, ... or none, as the kohya_ss GUI writes), takes
each key as an option name, and then parses the command line over it, so a flag given there wins. `--output_config`
writes the options that differ from their defaults to the --config_file path and stops, refusing to replace a file.

Here the keys are read through every spelling an option has (kohya's names are our aliases: `network_dim` is
--rank), each value converted as its command-line text would be; a key no option has is refused naming it and the
file (kohya's argparse namespace keeps such keys without a word). Our own run record is a `[train_lora]` table, so
that a re-run reads it with this toolkit's meanings where kohya's differ (`clip_skip`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from common.cli import UserError

logger = logging.getLogger(__name__)

CONFIG_SUFFIX = ".toml"
OWN_SECTION = "train_lora"  # the table a run's own configuration is written under
NEVER_WRITTEN = ("config_file", "output_config", "hub_token", "local_rank")  # a token is a secret; the rest are per-call


def config_path(value: str) -> Path:
    """The --config_file path as kohya reads it: ".toml" appended to a name without it."""
    return Path(value if value.endswith(CONFIG_SUFFIX) else value + CONFIG_SUFFIX).expanduser()


def read_config_file(path: Path) -> tuple[dict[str, Any], set[str]]:
    """A config file's keys with every section flattened, kohya's way; (values, the keys of our own `[train_lora]`
    table). A key set twice (in two sections), a table nested in a section, a file that is not TOML are refused."""
    from common.files import parse_toml, read_text_file

    if not path.is_file():
        raise UserError(f"--config_file {str(path)!r} not found (a TOML file of options; '.toml' is added to a name without it)")
    document = parse_toml(read_text_file(path, "--config_file"), f"--config_file {str(path)!r}")
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    own: set[str] = set()
    for key, value in document.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        section = f"[{key}]" if isinstance(value, dict) else "top level"
        for name, item in items:
            if isinstance(item, dict):
                raise UserError(f"--config_file {str(path)!r}: [{key}] holds the table {name!r}; options sit at the top level or "
                                "one section deep, as kohya reads them")
            if name in values:
                raise UserError(f"--config_file {str(path)!r}: {name!r} is set twice ({where[name]} and {section})")
            values[name], where[name] = item, section
            if key == OWN_SECTION:
                own.add(name)
    return values, own


def option_spellings(parameters) -> dict[str, str]:
    """Every name a config-file key may use for an option -> its parameter name: each of its flags without the
    dashes, with '-' read as '_' (--network_dim and --network-dim both give network_dim -> rank)."""
    spellings = {}
    for parameter in parameters:
        for flag in (*parameter.opts, *parameter.secondary_opts):
            if flag.startswith("--"):
                spellings[flag[2:].replace("-", "_")] = parameter.name
    return spellings


def layer_config_file(options: dict[str, Any], path: Path, context, winning_aliases: frozenset[str] = frozenset()
                      ) -> tuple[dict[str, Any], set[str]]:
    """The options with the config file's values beneath the command line's: a file value is taken where the
    command line left its option at its default, converted as its text there would be. `context` is the running
    click context (its parameters and where each value came from). Two keys of one option are refused unless they
    agree or one is among `winning_aliases` (kohya's unet_lr, which overrides its learning_rate). Returns (options,
    the parameter names the file set from our own table)."""
    values, own = read_config_file(path)
    parameters = {parameter.name: parameter for parameter in context.command.params}
    spellings = option_spellings(parameters.values())
    layered, taken, from_own = dict(options), {}, set()
    for key, value in values.items():
        name = spellings.get(key)
        if name is None:
            raise UserError(f"--config_file {str(path)!r}: {key!r} is no option of this script (see --help); kohya's own "
                            "names are read where they mean the same here")
        if name in taken:
            if value == values[taken[name]] or taken[name] in winning_aliases:
                continue
            if key not in winning_aliases:
                raise UserError(f"--config_file {str(path)!r}: {taken[name]!r} and {key!r} are the same option, --{name}; keep one")
        taken[name] = key
        if name in ("config_file", "output_config"):
            raise UserError(f"--config_file {str(path)!r}: {key!r} belongs on the command line, not in a config file")
        if context.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP"):
            continue  # the command line wins, as kohya's parse over the file's namespace does
        layered[name] = typed_value(parameters[name], value, key, path, context)
        if key in own:
            from_own.add(name)
    return layered, from_own


def typed_value(parameter, value: Any, key: str, path: Path, context) -> Any:
    """A file value as the option's command-line text would have been converted (a TOML list for an option taking
    several values); one line naming the key, the value and the file when it does not convert."""
    import typer

    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--config_file {str(path)!r}: {key} = {value}: not a finite number")
    if isinstance(value, list) and not parameter.multiple and parameter.nargs == 1:
        raise UserError(f"--config_file {str(path)!r}: {key} = {value!r}: --{parameter.name} takes one value, not a list")
    if parameter.multiple and not isinstance(value, list):
        value = [value]
    try:
        return parameter.process_value(context, value)
    except (typer.BadParameter, ValueError, TypeError) as error:
        reason = error.format_message() if isinstance(error, typer.BadParameter) else str(error)
        raise UserError(f"--config_file {str(path)!r}: {key} = {value!r}: {reason}") from None


def non_default_options(options: dict[str, Any], context) -> dict[str, Any]:
    """The options that differ from their defaults (each default as the command line converts it), by their
    parameter names, for writing: paths as text, tuples as lists, secrets and per-call options left out (kohya's
    --output_config leaves out the same kind). `context`: the running click context."""
    defaults = {parameter.name: parameter.default if parameter.default is None else parameter.process_value(context, parameter.default)
                for parameter in context.command.params}
    chosen = {}
    for name, value in options.items():
        if name in NEVER_WRITTEN or value is None or value == defaults.get(name):
            continue
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, tuple):
            value = list(value)
        if value == [] and defaults.get(name) in (None, ()):
            continue
        chosen[name] = value
    return dict(sorted(chosen.items()))


def toml_text(values: dict[str, Any], section: str = OWN_SECTION, header: str = "") -> str:
    """`values` as a TOML table: strings in JSON's escapes (which are TOML's basic-string escapes), numbers as Python
    writes them (repr round-trips every float exactly), booleans, and lists of those."""
    import json

    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{value} has no place in a run's configuration")
            return repr(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(literal(item) for item in value) + "]"
        return json.dumps(str(value))

    lines = [f"# {line}" for line in header.splitlines()] + [f"[{section}]"]
    lines += [f"{name} = {literal(value)}" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def with_config_file(options: dict) -> dict:
    """train_lora.py's options with --config_file's values beneath its command line (`layer_config_file`). kohya's
    clip_skip, which kohya ignores on SDXL (its text encoders' penultimate layer is always read), is ignored with a
    warning: ours skips layers beyond that one."""
    from typer.main import get_current_context  # typer's own click

    if not options["config_file"] or options["output_config"]:
        return options
    layered, own = layer_config_file(options, config_path(options["config_file"]), get_current_context(),
                                     winning_aliases=frozenset({"unet_lr"}))
    if layered["clip_skip"] != options["clip_skip"] and "clip_skip" not in own:
        logger.warning(f"--config_file: clip_skip = {layered['clip_skip']} is kohya's, which kohya ignores on SDXL (the penultimate "
                       "layer is always read, as here); ignored. --clip_skip N skips N layers beyond that one")
        layered["clip_skip"] = options["clip_skip"]
    return layered


def configuration_text(options: dict) -> str:
    """A train_lora.py run's options that differ from their defaults as a TOML table that --config_file reads back."""
    from typer.main import get_current_context

    values = non_default_options(options, get_current_context())
    return toml_text(values, header="train_lora.py's options for this run: re-run it with\n"
                                    "  python train_lora.py --config_file config.toml --output_dir ANOTHER_FOLDER")


def write_output_config(config_file: str | None, text: str) -> None:
    """kohya's --output_config: the configuration written to --config_file's path, never over an existing file."""
    import typer

    from common.files import atomic_path

    if not config_file:
        raise UserError("--output_config writes the options to --config_file FILE.toml; give that too")
    path = config_path(config_file)
    if path.exists():
        raise UserError(f"--output_config: {str(path)!r} exists; it is never replaced, give another --config_file")
    with atomic_path(path) as partial:
        partial.write_text(text)
    typer.echo(f"wrote the options to {path}")
