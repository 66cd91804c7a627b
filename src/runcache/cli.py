"""The ``runcache`` command: ``serve`` (the default) and the client commands.

The CLI only turns options into a :class:`Config` and the core objects, and
turns any runcache error into one line on stderr and an exit code.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from runcache import __version__
from runcache.config import Config, settings
from runcache.errors import RuncacheError

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code for a usage or start-up error, as click uses for usage errors.
EXIT_ERROR = 2


class DefaultGroup(click.Group):
    """A group that runs ``serve`` when no command is named, as ``runcache`` alone should."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("--help", "--version")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


def setting_options(command: F) -> F:
    """Add a flag for every setting in the table; unset flags fall back to env, then default."""
    for setting in reversed(list(settings())):
        command = click.option(
            setting.flag,
            setting.name,
            type=setting.kind,
            default=None,
            help=f"{setting.help} [env {setting.env_var}; default {setting.default}]",
        )(command)
    return command


@click.group(cls=DefaultGroup)
@click.version_option(__version__, prog_name="runcache")
def cli() -> None:
    """runcache: run commands for AI agents and scripts, and cache their results."""


@cli.command()
@setting_options
def serve(**options: Any) -> None:
    """Start the HTTP API (the default command)."""
    from runcache.app import configure_logging
    from runcache.server import serve as serve_forever
    from runcache.service import Engine

    config = Config.load(options)
    configure_logging(config.log_level)
    serve_forever(Engine.from_config(config))


def main() -> None:
    """Entry point: run the CLI, turning runcache errors into one line and exit code 2."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.Abort:
        sys.exit(130)
    except RuncacheError as error:
        click.echo(f"runcache: {error.message}", err=True)
        sys.exit(EXIT_ERROR)
    except OSError as error:
        click.echo(f"runcache: {error}", err=True)
        sys.exit(EXIT_ERROR)
