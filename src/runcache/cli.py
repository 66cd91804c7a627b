"""The ``runcache`` command: ``serve`` (the default) and the client commands.

The CLI only turns options into a :class:`Config` and the core objects, and
turns any runcache error into one line on stderr and an exit code.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

import click
import msgspec

from runcache import __version__
from runcache.client import STORE_ENV, connect, local_store
from runcache.client.base import BaseClient
from runcache.client.follow import copy_output
from runcache.client.http import ADMIN_TOKEN_ENV, TOKEN_ENV, URL_ENV, Client
from runcache.config import GROUPS, Config, parse_duration, settings
from runcache.errors import RuncacheError
from runcache.keys import command_text
from runcache.wire import POOL_PATTERN, CommandResult, RunRequest, to_builtins

F = TypeVar("F", bound=Callable[..., Any])

#: Exit code for a usage or start-up error, as click uses for usage errors.
EXIT_ERROR = 2


class DefaultGroup(click.Group):
    """A group that runs ``serve`` when no command is named, as ``runcache`` alone should."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help", "--version")):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


#: One placeholder style for every flag's value: what it is, not the Python type behind it
#: (every float setting is a duration: 90s, 5m, 1h, 1d or seconds, by the table's rule).
_PLACEHOLDERS: dict[type, str] = {int: "N", float: "DURATION", bool: "BOOL"}


def _shown(default: object) -> str:
    """A default as help prints it: an empty one says so rather than printing nothing."""
    return "none" if default in ("", None) else str(default)


def setting_options(command: F) -> F:
    """Add a flag for every setting in the table; unset flags fall back to env, then default.

    Secrets (tokens) get no flag: a flag's value is visible to every user in ``ps``;
    they come from the environment or from a ``--*-file``. A flag's text is parsed and
    checked by the table, as the environment's is, so a bad number is one line.
    """
    for setting in reversed([setting for setting in settings() if not setting.secret]):
        command = click.option(
            setting.flag,
            setting.name,
            type=str,
            metavar=_PLACEHOLDERS.get(setting.kind, "TEXT"),
            default=None,
            help=f"{setting.help} [env {setting.env_var}; default {_shown(setting.default)}]",
        )(command)
    return command


#: ``-h`` is help everywhere, as in gh, docker and httpie (subcommands inherit it);
#: after a command given to ``run`` it is that command's.
_HELP = {"help_option_names": ["-h", "--help"]}


@click.group(cls=DefaultGroup, context_settings=_HELP)
@click.version_option(__version__, prog_name="runcache")
def cli() -> None:
    """runcache: run commands for AI agents and scripts, and cache their results."""


class _GroupedHelp(click.Command):
    """``serve --help`` with its setting flags in the sections of the settings table
    (``config.GROUPS``), then the rest; click has no option groups of its own, and a
    help formatter of a few lines costs no start-up time, as rich-click's import would."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        records = {
            param.name: record
            for param in self.get_params(ctx)
            if param.name and (record := param.get_help_record(ctx)) is not None
        }
        grouped = {name for names in GROUPS.values() for name in names}
        sections = [
            (title, [records[name] for name in names if name in records])
            for title, names in GROUPS.items()
        ]
        other = [record for name, record in records.items() if name not in grouped]
        for title, rows in [*sections, ("Other options", other)]:
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


@cli.command(cls=_GroupedHelp)
@setting_options
def serve(**options: Any) -> None:
    """Start the HTTP API (the default command)."""
    from runcache.web.app import configure_logging
    from runcache.web.server import serve as serve_forever

    config = Config.load(options, flags=True)
    configure_logging(config.log_level, config.log_format)
    serve_forever(config)


@cli.command(cls=_GroupedHelp)
@click.option(
    "--pool",
    "pool",
    required=True,
    metavar="NAME",
    help='The pool whose commands this worker runs (requests\' "pool", --default-pool).',
)
@click.option(
    "--concurrency",
    "concurrency",
    type=click.IntRange(1, 1024),
    default=None,
    metavar="N",
    help="Most commands this worker runs at once [default: --max-concurrent].",
)
@setting_options
def worker(pool: str, concurrency: int | None, **options: Any) -> None:
    """Run the commands queued for a pool, here, where its tools are (needs a redis:// store)."""
    import re

    from runcache.engine.worker import serve_worker
    from runcache.web.app import configure_logging

    if not re.fullmatch(POOL_PATTERN, pool):
        raise click.BadParameter(
            "must be 1 to 64 letters, digits, '_', '.' or '-'", param_hint="--pool"
        )
    config = Config.load(options, flags=True)
    configure_logging(config.log_level, config.log_format)
    serve_worker(config, pool, concurrency or config.max_concurrent)


# -- client commands: through a server when given one, else an engine in this process --

#: Exit status of a command that ran out of time, as coreutils ``timeout`` uses.
EXIT_TIMED_OUT = 124


def client_options(command: F) -> F:
    """``--server``, falling back to RUNCACHE_URL.

    Tokens come only from RUNCACHE_TOKEN and RUNCACHE_ADMIN_TOKEN, as for the
    server: a flag's value is visible to every user of the machine in ``ps``.
    """
    return click.option(
        "--server",
        envvar=URL_ENV,
        default=None,
        metavar="URL",
        help="A running runcache server, e.g. http://127.0.0.1:8888; without one the engine "
        f"runs in this process with the store of RUNCACHE_STORE. [env {URL_ENV}]",
    )(command)


def _connect(server: str | None, store: str | None = None) -> BaseClient:
    return connect(server, os.environ.get(TOKEN_ENV), os.environ.get(ADMIN_TOKEN_ENV), store)


class _Duration(click.ParamType[float, Any]):
    """A duration flag: ``90s``, ``5m``, ``1h``, ``1d`` or seconds, read as the settings'."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value), "duration")
        except RuncacheError:
            self.fail(f"{value!r} is not a duration such as 90s, 5m, 1h or 1d (or seconds)")


DURATION = _Duration()


def store_option(command: F) -> F:
    """``--store``, the store of an engine in this process (no server given)."""
    return click.option(
        "--store",
        default=None,
        metavar="URL",
        help="Without a server: where results are cached (sqlite:///path.db, redis://...)."
        f" [env {STORE_ENV}; default sqlite:///$XDG_CACHE_HOME/runcache/cache.db]",
    )(command)


def scope_option(help_text: str) -> Callable[[F], F]:
    """``--scope``: a namespace of its own in the cache, as the request field is."""

    def add(command: F) -> F:
        return click.option("--scope", default=None, metavar="NAME", help=help_text)(command)

    return add


# Options end at the command: `runcache run ls -la` gives -la to ls. An unknown option
# before the command is refused (click names the closest), never run as the command.
@cli.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--no-cache",
    is_flag=True,
    help="Run the command even if a result is cached, and store nothing.",
)
@click.option(
    "--refresh",
    is_flag=True,
    help="Run the command even if a result is cached, and store the new result.",
)
@click.option(
    "--warm",
    is_flag=True,
    help="Answer from the cache at once (run it if nothing is cached) and refresh the"
    " result in the background, for the next call.",
)
@click.option(
    "--ttl",
    type=DURATION,
    default=None,
    metavar="DURATION",
    help="How long to keep this result cached: 90s, 5m, 1h, 1d or seconds.",
)
@click.option(
    "--stale",
    type=DURATION,
    default=None,
    metavar="DURATION",
    help="Accept a cached result this long past its expiry, answered at once while "
    "it is refreshed in the background.",
)
@click.option(
    "--timeout",
    type=DURATION,
    default=None,
    metavar="DURATION",
    help="Longest the command may run.",
)
@click.option(
    "--input",
    "inputs",
    multiple=True,
    metavar="PATTERN",
    help="A file or glob (relative to the directory it runs in) the command reads: a"
    " change to it is a new result; repeat for more; git: for the repository's state.",
)
@click.option(
    "--cache-exit-codes",
    default=None,
    metavar="CODES",
    help="Exit codes whose results are cached (default 0): 0,1 caches grep finding nothing.",
)
@scope_option(
    "A namespace of its own in the cache (a team, a project): results of one scope never"
    " answer another's; listed and invalidated as one (--scope of entries and invalidate)."
)
@click.option(
    "--cwd",
    default=None,
    metavar="DIR",
    help="Directory to run in (made absolute here; the server's own by default).",
)
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A variable to set for the command; repeat for more.",
)
@click.option(
    "--stdin",
    "feed_stdin",
    is_flag=True,
    help="Feed this command's standard input to the run (read to its end first).",
)
@click.option(
    "--pool",
    default=None,
    metavar="NAME",
    help="The pool of workers that runs it (runcache worker --pool), through --server.",
)
@click.option(
    "--retries",
    type=click.IntRange(0, 10),
    default=0,
    metavar="N",
    help="With --pool: runs again when its worker stops answering (default 0).",
)
@client_options
@store_option
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED, metavar="COMMAND...")
def run(
    argv: tuple[str, ...],
    no_cache: bool,
    refresh: bool,
    warm: bool,
    ttl: float | None,
    stale: float | None,
    timeout: float | None,
    inputs: tuple[str, ...],
    cache_exit_codes: str | None,
    scope: str | None,
    cwd: str | None,
    env_pairs: tuple[str, ...],
    feed_stdin: bool,
    pool: str | None,
    retries: int,
    server: str | None,
    store: str | None,
) -> None:
    """Run a command through the cache, as if run directly: same output, same exit code.

    COMMAND is a program and its arguments (`runcache run ls -la`: options after
    the program are its own), or one argument with spaces, run as shell text
    (`runcache run 'ls | wc -l'`). Without a server the results are cached on
    this machine, in one store every `runcache run` of the user shares. The
    output is printed as the command prints it, each stream to its own. Ctrl-C
    (or SIGTERM) gives the run up: it is killed unless another client waits on it.
    """
    if warm and (refresh or no_cache):
        raise click.UsageError("--warm answers from the cache: it takes no --refresh or --no-cache")
    signal.signal(signal.SIGTERM, _interrupt)
    stdin = sys.stdin.buffer.read() if feed_stdin else None
    request = RunRequest(
        command_text(argv),
        use_cache=not no_cache,
        timeout=timeout,
        ttl=ttl,
        refresh=refresh,
        stale=stale,
        inputs=list(inputs) or None,
        cache_exit_codes=_exit_codes(cache_exit_codes),
        scope=scope,
        pool=pool,
        retries=retries,
        **_run_context(cwd, env_pairs, stdin),
    )
    with _connect(server, store) as backend:
        result = _follow(backend, request)
        if result.cached and (warm or result.stale is True):
            _refresh_later(backend, request, server, store, stdin)
    for stream, truncated in (
        ("stdout", result.stdout_truncated),
        ("stderr", result.stderr_truncated),
    ):
        if truncated:
            click.echo(f"runcache: {stream} was cut at the output cap", err=True)
    sys.exit(_exit_status(result))


def _same_command(text: str) -> list[str]:
    """The COMMAND arguments whose :func:`~runcache.keys.command_text` is ``text``: itself
    when it has spaces (shell text), else the one argument it quotes."""
    return [text] if any(space in text for space in " \t\n") else shlex.split(text)


def _exit_codes(text: str | None) -> list[float] | None:
    """``--cache-exit-codes 0,1`` as the request's list."""
    if text is None:
        return None
    try:
        return [int(code) for code in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not exit codes such as 0,1", param_hint="--cache-exit-codes"
        ) from None


def _follow(backend: BaseClient, request: RunRequest) -> CommandResult:
    """Start the run, copy its output to this process's own as it comes, and return its
    result; Ctrl-C or SIGTERM gives the run up and exits 128 + the signal."""
    with _signals_held() as held:
        job = backend.start(request)
    try:
        if held:
            raise _Interrupted(held[0])
        copy_output(backend, job.job_id, {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer})
        detail = backend.job(job.job_id)
    except KeyboardInterrupt as interrupt:
        left = backend.leave(job.job_id)
        click.echo(
            "runcache: cancelled"
            if left.status == "cancelled"
            else "runcache: left the run to the other clients waiting on it",
            err=True,
        )
        sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))
    if isinstance(detail.result, msgspec.UnsetType):
        raise RuncacheError(detail.error or f"job {job.job_id} ended without a result")
    return detail.result


def _refresh_later(
    backend: BaseClient,
    request: RunRequest,
    server: str | None,
    store: str | None,
    stdin: bytes | None,
) -> None:
    """Refresh a result answered from the cache (``--warm``, or a stale answer) after
    this process has gone: a server runs it as a background job of its own; without
    one, a detached ``runcache run --refresh`` of the same request does, in a session
    of its own, with no terminal (identical refreshes join one run through the store's
    lock)."""
    fresh = msgspec.structs.replace(request, refresh=True, stale=None)
    if server:
        backend.start(fresh)  # a background job: the server keeps it when this client goes
        return
    options = ["--refresh", "--store", store or local_store()]
    for flag, value in (("--ttl", fresh.ttl), ("--timeout", fresh.timeout)):
        if value is not None:
            options += [flag, repr(value)]
    for pattern in fresh.inputs or ():
        options += ["--input", pattern]
    if fresh.cache_exit_codes is not None:
        options += [
            "--cache-exit-codes",
            ",".join(str(int(code)) for code in fresh.cache_exit_codes),
        ]
    if fresh.scope is not None:
        options += ["--scope", fresh.scope]
    if fresh.cwd is not None:
        options += ["--cwd", fresh.cwd]
    for name, text in (fresh.env or {}).items():
        options += ["--env", f"{name}={text}"]
    if stdin is not None:
        options.append("--stdin")
    child = subprocess.Popen(
        [sys.executable, "-m", "runcache", "run", *options, "--", *_same_command(fresh.command)],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if child.stdin is not None:
        with child.stdin:
            child.stdin.write(stdin or b"")


def _run_context(
    cwd: str | None, env_pairs: tuple[str, ...], stdin: bytes | None
) -> dict[str, Any]:
    """The run context fields of ``runcache run``'s flags (None where a flag is not given)."""
    env: dict[str, str] = {}
    for pair in env_pairs:
        name, equals, value = pair.partition("=")
        if not equals:
            raise click.BadParameter(f"{pair!r} is not NAME=VALUE", param_hint="--env")
        env[name] = value
    return {
        "cwd": None if cwd is None else os.path.abspath(cwd),
        "env": env or None,
        "stdin": None if stdin is None else stdin.decode("utf-8", "replace"),
    }


class _Interrupted(KeyboardInterrupt):
    """SIGTERM (or a Ctrl-C held while the run started), taken as Ctrl-C is: the run is
    given up, not left running."""

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Note Ctrl-C and SIGTERM while a run starts, rather than act on them.

    A background run is given up by its job id; a signal taking effect while the
    start is on its way would leave the run started with nobody to give it up.
    The caller gives the run up at once if a signal came; a second one stops
    the wait at once, for a server that does not answer. (Handlers, not a signal
    mask: Python runs handlers in the main thread, whichever thread the signal hit.)
    """
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if held:
            raise _Interrupted(signum)
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _exit_status(result: CommandResult) -> int:
    """The command's exit code, as a shell would report it."""
    if result.timed_out:
        click.echo("runcache: the command timed out and was killed", err=True)
        return EXIT_TIMED_OUT
    if result.cancelled:  # this client did not give it up: another one cancelled it
        click.echo("runcache: the run was cancelled by another client", err=True)
    code = result.return_code
    return 128 - code if code < 0 else code


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON object.")
@client_options
@store_option
def stats(as_json: bool, server: str | None, store: str | None) -> None:
    """Print the cache statistics."""
    with _connect(server, store) as backend:
        found = to_builtins(backend.cache_stats())
    if as_json:
        click.echo(_indented(found))
        return
    width = max(map(len, found), default=0)
    for name, value in found.items():
        click.echo(f"{name:<{width}}  {value}")


@cli.command()
@client_options
@store_option
def clear(server: str | None, store: str | None) -> None:
    """Empty the cache and reset its statistics."""
    with _connect(server, store) as backend:
        answer = backend.clear()
    click.echo(answer.message)


@cli.group(invoke_without_command=True)
@click.option("--prefix", default="", metavar="TEXT", help="Only commands that start with this.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    metavar="N",
    help="The most entries to list.",
)
@scope_option("Only the entries of this scope.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON object.")
@client_options
@store_option
@click.pass_context
def entries(
    ctx: click.Context,
    prefix: str,
    limit: int,
    scope: str | None,
    as_json: bool,
    server: str | None,
    store: str | None,
) -> None:
    """List cached results, newest first (and `entries show`, `entries delete`)."""
    if ctx.invoked_subcommand is not None:
        return
    with _connect(server, store) as backend:
        listing = backend.entries(prefix, limit=limit, scope=scope)
    if as_json:
        _print_json(listing)
        return
    now = time.time()
    # Whole keys: a key is shown to be used (entries show, GET/DELETE /api/cache/entries/{key}).
    _table(
        ("KEY", "BYTES", "HITS", "EXPIRES IN", "SCOPE", "COMMAND"),
        [
            (
                entry.cache_key,
                str(entry.bytes),
                str(entry.hits),
                f"{max(0.0, entry.expires_at - now):.0f}s",
                entry.scope or "-",
                entry.command,
            )
            for entry in listing.entries
        ],
        right={1, 2, 3},
    )


@entries.command("show")
@click.argument("key", metavar="KEY")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON object.")
@client_options
@store_option
def show_entry(key: str, as_json: bool, server: str | None, store: str | None) -> None:
    """Show one cached result: its command, exit code, times and output (KEY: 6 or more
    characters of its key, if no other key starts with them)."""
    with _connect(server, store) as backend:
        found = backend.entry(backend.entry_key(key))
    if as_json:
        _print_json(found)
        return
    now = time.time()
    _fields(
        ("key", found.cache_key),
        ("command", found.command),
        ("exit code", str(found.result.return_code)),
        ("bytes", str(found.bytes)),
        ("hits", str(found.hits)),
        ("stored", f"{max(0.0, now - found.created_at):.0f}s ago"),
        ("expires in", f"{max(0.0, found.expires_at - now):.0f}s"),
        *((("scope", found.scope),) if found.scope else ()),
    )
    for stream, text in (("stdout", found.result.stdout), ("stderr", found.result.stderr)):
        if text:
            click.echo(f"--- {stream} ---")
            click.echo(text, nl=not text.endswith("\n"))


@entries.command("delete")
@click.argument("key", metavar="KEY")
@client_options
@store_option
def delete_entry(key: str, server: str | None, store: str | None) -> None:
    """Delete one cached result (admin token; KEY: 6 or more characters of its key)."""
    with _connect(server, store) as backend:
        whole = backend.entry_key(key)
        backend.delete_entry(whole)
    click.echo(f"deleted {whole}")


@cli.command()
@click.option(
    "--prefix",
    default=None,
    metavar="TEXT",
    help="Delete the entries whose command starts with this.",
)
@click.option(
    "--glob",
    default=None,
    metavar="PATTERN",
    help="Delete the entries whose command matches this pattern (*, ?, [abc]).",
)
@scope_option("Delete the entries of this scope (with --prefix or --glob: those that match).")
@client_options
@store_option
def invalidate(
    prefix: str | None, glob: str | None, scope: str | None, server: str | None, store: str | None
) -> None:
    """Delete cached results by how their command starts, by a pattern, or by scope
    (admin token)."""
    with _connect(server, store) as backend:
        done = backend.invalidate(prefix, glob, scope)
    click.echo(f"deleted {done.deleted} {'entry' if done.deleted == 1 else 'entries'}")


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON object.")
@client_options
@click.pass_context
def jobs(ctx: click.Context, as_json: bool, server: str | None) -> None:
    """List a server's jobs, newest first (and `jobs logs`, `jobs cancel`)."""
    if ctx.invoked_subcommand is not None:
        return
    with _server_client(server) as client:
        listing = client.jobs()
    if as_json:
        _print_json(listing)
        return
    _table(
        ("JOB", "STATUS", "PID", "RUNTIME", "OUTPUT", "COMMAND"),
        [
            (
                job.job_id,
                job.status,
                str(job.pid or "-"),
                f"{job.runtime:.1f}s",
                f"{job.stdout_bytes + job.stderr_bytes}B",
                job.command,
            )
            for job in listing.jobs
        ],
        right={2, 3, 4},
    )


def _print_json(found: Any) -> None:
    click.echo(_indented(to_builtins(found)))


def _indented(found: Any) -> str:
    """``found`` as JSON indented by two spaces, for a person to read (``--json``)."""
    return msgspec.json.format(msgspec.json.encode(found), indent=2).decode()


#: The widest a table's last column gets when output is not a terminal of known width.
_LAST_COLUMN = 60


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: set[int]) -> None:
    """Columns as wide as their widest value (numbers, ``right``, aligned right), two
    spaces apart; the last one (a command) on one line, cut with an ellipsis to fit the
    terminal, or at 60 characters when the output is not one."""
    widths = [max(len(row[index]) for row in (header, *rows)) for index in range(len(header) - 1)]
    columns = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
    room = max(20, columns - sum(widths) - 2 * len(widths)) if columns else _LAST_COLUMN
    for row in (header, *rows):
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        click.echo("  ".join([*cells, _cut(row[-1], room)]))


def _fields(*pairs: tuple[str, str]) -> None:
    """Name: value lines, the values aligned."""
    width = max(len(name) for name, _ in pairs) + 1
    for name, value in pairs:
        click.echo(f"{name + ':':<{width}} {_cut(value, 1 << 20)}")


def _cut(text: str, most: int) -> str:
    """A cell: one line, at most ``most`` characters, an ellipsis where cut."""
    line = " ".join(text.split())
    return line if len(line) <= most else line[: most - 1] + "…"


@jobs.command()
@click.argument("job_id", metavar="JOB")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option(
    "--stream",
    type=click.Choice(["stdout", "stderr"]),
    default=None,
    help="Only this stream (both by default, each to its own).",
)
@client_options
def logs(job_id: str, follow: bool, stream: str | None, server: str | None) -> None:
    """Print a job's output so far, exactly as printed; --follow prints it as it comes.

    JOB is the job's id, or 6 or more of its first characters if no other job's start so.
    """
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    chosen = {stream: sinks[stream]} if stream else sinks
    with _server_client(server) as client:
        try:
            copy_output(client, client.job_id(job_id), chosen, until_end=follow)
        except KeyboardInterrupt:  # stop following; the job goes on
            sys.exit(130)


@jobs.command()
@click.argument("job_id", metavar="JOB")
@client_options
def cancel(job_id: str, server: str | None) -> None:
    """Kill a running job's whole process group (not cached; its waiters get the result).

    JOB is the job's id, or 6 or more of its first characters if no other job's start so.
    """
    with _server_client(server) as client:
        done = client.cancel(client.job_id(job_id))
    click.echo(f"job {done.job_id} {done.status}")


#: The one setting ``runcache mcp`` takes even when it forwards to a server.
_MCP_TOOLS = next(setting for setting in settings() if setting.name == "mcp_tools")


def _server_client(server: str | None) -> Client:
    """Jobs live in the server process that runs them: these commands need one."""
    if not server:
        raise RuncacheError(
            f"jobs live in the server that runs them: give --server URL or set {URL_ENV}"
        )
    return Client(server, os.environ.get(TOKEN_ENV), os.environ.get(ADMIN_TOKEN_ENV))


@cli.command("mcp")
@client_options
@click.option(
    "--mcp-tools",
    envvar=_MCP_TOOLS.env_var,
    default=_MCP_TOOLS.default,
    metavar="TEXT",
    help=f"{_MCP_TOOLS.help} [env {_MCP_TOOLS.env_var}; default {_MCP_TOOLS.default}]",
)
def mcp_command(server: str | None, mcp_tools: str) -> None:
    """Serve MCP over stdio for AI agents (tools: execute_command and the rest)."""
    # Imported here: the SDK takes a while to import, and only this command needs it.
    from runcache.mcp.backends import EngineBackend, ServerBackend, ToolBackend
    from runcache.mcp.shapes import selected_tools
    from runcache.mcp.tools import serve_stdio

    tools = selected_tools(mcp_tools)

    backend: ToolBackend
    log_level, log_format = "INFO", "text"
    if server:
        client = Client(server, os.environ.get(TOKEN_ENV), os.environ.get(ADMIN_TOKEN_ENV))
        backend = ServerBackend.connect(client)
    else:  # settings apply to an engine in this process; a forwarding adapter needs none
        from runcache.engine.engine import Engine

        config = Config.load()
        log_level, log_format = config.log_level, config.log_format
        backend = EngineBackend(Engine.from_config(config), owned=True)
    serve_stdio(backend, log_level, log_format, tools)


@cli.command("mcp-config")
@click.argument("client", type=click.Choice(["claude-desktop", "claude-code", "vscode", "cursor"]))
@click.option(
    "--url",
    default=None,
    metavar="URL",
    help="A runcache server the agent reaches over HTTP at URL/mcp, e.g. http://127.0.0.1:8888"
    " (Claude Desktop: through `runcache mcp --server URL`).",
)
@click.option(
    "--token-env",
    default=TOKEN_ENV,
    show_default=True,
    metavar="NAME",
    help="The environment variable the agent takes the server's token from; the token itself "
    "is never printed.",
)
@click.option("--no-token", is_flag=True, help="Send no Authorization header (a server without).")
@click.option(
    "--name", default="runcache", show_default=True, metavar="NAME", help="The server's name."
)
@client_options
def mcp_config(
    client: str, url: str | None, token_env: str, no_token: bool, name: str, server: str | None
) -> None:
    """Print an agent's configuration for runcache's MCP server, with this install's paths.

    Without --url or --server the agent starts `runcache mcp` with an engine of its own;
    with --server it starts it forwarding to that server; with --url it talks to the
    server's /mcp itself. The JSON goes to stdout, where to put it to stderr.
    """
    from runcache.mcp.client_config import CLIENTS, snippet

    found = snippet(client, server, url, None if no_token else token_env, name)
    click.echo(_indented(found))
    click.echo(f"runcache: put this in {CLIENTS[client].where}", err=True)
    if (url or server) and not no_token and CLIENTS[client].variable is None:
        click.echo(
            f"runcache: the agent must start runcache with {TOKEN_ENV} in its environment "
            "when the server has a token (this file expands no variables)",
            err=True,
        )


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
