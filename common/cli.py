"""Command-line plumbing shared by the scripts: the one user-error type, its one-line printing, flag spelling."""

from __future__ import annotations

import sys

import typer


class UserError(Exception):
    """Bad input from the user: what was wrong, the value, and what is accepted.

    Raised where input enters; `run_app` prints it as a single line and exits with status 2.
    """


def run_app(app: typer.Typer) -> None:
    """Run a Typer app so that every input error is one line on stderr and a non-zero exit.

    Typer's standalone mode prints usage errors in a multi-line box and lets exceptions
    raised inside a command end in a traceback; scripts are chained in shell pipelines,
    where one greppable `error: ...` line is what people want to see.
    """
    try:
        exit_code = app(standalone_mode=False)
    except UserError as error:
        _fail(str(error))
    except (typer.Abort, KeyboardInterrupt):
        _fail("interrupted", code=130)
    except typer.TyperException as error:  # typer's vendored click: usage errors, bad parameters
        _fail(error.format_message(), code=getattr(error, "exit_code", 2))
    if isinstance(exit_code, int) and exit_code != 0:
        sys.exit(exit_code)


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
