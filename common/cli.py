"""Command-line plumbing shared by the scripts: the one user-error type, its one-line printing, flag spelling,
and options declared once, as fields of the config dataclass that the script then receives."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from typing import TYPE_CHECKING, Annotated, Any, Callable

import typer

if TYPE_CHECKING:  # torch is imported where used: the scripts answer --help without it
    import torch

# The precisions by their command-line names, as torch's attribute names
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
DTYPE_NAMES = {name: short for short, name in DTYPES.items()}  # "bfloat16" -> "bf16"


class UserError(Exception):
    """Bad input from the user: what was wrong, the value, and what is accepted.

    Raised where input enters; `run_app` prints it as a single line and exits with status 2.
    """


class Interrupted(UserError):
    """The user stopped the run (Ctrl-C); exit status 130, as a shell reports SIGINT."""


INTERRUPTED_EXIT_STATUS = 130


def expand_many_valued(argv: list[str], many_valued: tuple[str, ...]) -> list[str]:
    """argparse's nargs="*" for `many_valued` flags, which kohya's command lines use (`--network_args conv_dim=8
    conv_alpha=4`): each value after such a flag, up to the next option, gets the flag of its own, as Typer's
    repeated options want it."""
    expanded, current = [], None
    for item in argv:
        if item.startswith("-"):
            current = item if item in many_valued else None
            expanded.append(item)
        elif current is not None and expanded[-1] != current:
            expanded += [current, item]
        else:
            expanded.append(item)
    return expanded


MANY_VALUED = "many_valued_options"  # on a Typer app: its flags that take several values after one flag, as argparse's nargs="*"


def run_app(app: typer.Typer) -> None:
    """Run a Typer app so that every input error is one line on stderr and a non-zero exit.

    Typer's standalone mode prints usage errors in a multi-line box and lets exceptions
    raised inside a command end in a traceback; scripts are chained in shell pipelines,
    where one greppable `error: ...` line is what people want to see.
    """
    if getattr(app, MANY_VALUED, ()):
        sys.argv[1:] = expand_many_valued(sys.argv[1:], getattr(app, MANY_VALUED))
    try:
        exit_code = app(standalone_mode=False)
    except Interrupted as error:
        _fail(str(error), code=INTERRUPTED_EXIT_STATUS)
    except UserError as error:
        _fail(str(error))
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", code=INTERRUPTED_EXIT_STATUS)
    except typer.TyperException as error:  # typer's vendored click: usage errors, bad parameters
        _fail(error.format_message(), code=getattr(error, "exit_code", 2))
    except OSError as error:  # the file system's refusals (no space, no permission, a file where a folder goes)
        _fail(describe_os_error(error))
    if exit_code == INTERRUPTED_EXIT_STATUS:  # typer turns KeyboardInterrupt into this status, silently
        _fail("interrupted", code=INTERRUPTED_EXIT_STATUS)
    if isinstance(exit_code, int) and exit_code != 0:
        sys.exit(exit_code)


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: what the system said and the path it said it about."""
    reason = error.strerror or str(error)
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"{reason}: {' -> '.join(repr(p) for p in paths)}" if paths else reason


def _fail(message: str, code: int = 2) -> None:
    first_line = " ".join(message.split("\n")).strip()
    print(f"error: {first_line}", file=sys.stderr)
    sys.exit(code)


def flags(name: str, *short: str) -> list[str]:
    """A diffusers-style underscore flag with its dash alias: flags("num_images") -> --num_images, --num-images."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    return names + list(short)


REQUIRED = dataclasses.MISSING  # an option without a default


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """How a config field appears on the command line."""

    help: str
    panel: str | None
    names: tuple[str, ...]  # further names beside --field_name and --field-name
    cli_type: Any  # the type the command line parses, where it differs from the field's (True/False text)
    parse: Callable[[str, Any], Any] | None  # (option name, parsed value) -> the field's value
    no_effect: str | None  # accepted so that other tools' command lines run; why it does nothing here
    refused: str | None = None  # another tool's option that means something else here: what to use instead


def option(default: Any = dataclasses.MISSING, *names: str, help: str = "", panel: str | None = None, cli_type: Any = None,
           parse: Callable[[str, Any], Any] | None = None, no_effect: str | None = None, refused: str | None = None) -> Any:
    """A config field that is also a command-line option: its one declaration (default, help, help panel)."""
    if no_effect:
        help = f"{help + '; ' if help else ''}[dim]no effect: {no_effect}[/dim]"
    if refused:
        help = f"{help + '; ' if help else ''}[dim]refused (kohya's, meaning something else here): {refused}[/dim]"
    spec = OptionSpec(help=help, panel=panel, names=names, cli_type=cli_type, parse=parse, no_effect=no_effect, refused=refused)
    return dataclasses.field(default=default, metadata={"option": spec})


def option_fields(config_type: type) -> list[tuple[dataclasses.Field, OptionSpec]]:
    return [(f, f.metadata["option"]) for f in dataclasses.fields(config_type) if "option" in f.metadata]


def command_signature(*config_types: type, defaults: dict | None = None, more_names: dict | None = None) -> inspect.Signature:
    """The Typer command signature made from the option fields of `config_types`, in their order:
    each option is declared once, on its config field. `defaults` and `more_names` adapt a shared
    config to one script (its own default, an alias that script's users know)."""
    defaults, more_names = defaults or {}, more_names or {}
    parameters = []
    for config_type in config_types:
        hints = typing.get_type_hints(config_type, include_extras=True)
        for field, spec in option_fields(config_type):
            default = defaults.get(field.name, field.default)
            names = flags(field.name, *spec.names, *more_names.get(field.name, ()))
            annotation = Annotated[spec.cli_type or hints[field.name], typer.Option(*names, help=spec.help, rich_help_panel=spec.panel)]
            parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                                default=inspect.Parameter.empty if default is dataclasses.MISSING else default))
    return inspect.Signature(parameters, return_annotation=None)


def options_command(app: typer.Typer, *config_types: type, name: str | None = None, defaults: dict | None = None,
                    more_names: dict | None = None):
    """Register `function(**options)` as `app`'s command (`name`: one of its subcommands), its options being the
    option fields of `config_types`."""

    def register(function):
        function.__signature__ = command_signature(*config_types, defaults=defaults, more_names=more_names)
        return app.command(name)(function)

    return register


def config_from_options(config_type: type, options: dict, warn: Callable[[str], None] | None = None):
    """`config_type` built by keyword from the command's options that are its fields, each parsed by its own
    `parse`; an option without effect that was set gets a warning naming it."""
    values = {}
    for field, spec in option_fields(config_type):
        if field.name not in options:
            continue
        value = options[field.name]
        if spec.parse is not None:
            value = spec.parse(field.name, value)
        if spec.no_effect and value != field.default and warn is not None:
            warn(f"--{field.name} has no effect: {spec.no_effect}")
        if spec.refused and value != field.default:
            raise UserError(f"--{field.name} is kohya's option and means something else here: {spec.refused}")
        values[field.name] = value
    return config_type(**values)


def parse_bool(name: str, value: Any) -> bool:
    """True/False as text, as the diffusers scripts' `type=bool` flags take them (but parsed right)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off", ""):
        return False
    raise UserError(f"--{name} {value!r} is not a boolean; use True or False")


def parse_dtype(name: str) -> torch.dtype:
    """torch's dtype for a precision's command-line name (fp32, fp16, bf16)."""
    import torch

    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name])
