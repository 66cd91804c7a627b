"""Settings: one table that drives the defaults, the environment, the CLI flags and the docs.

Every setting is a field of :class:`Config` with its default and a line of help.
``RUNCACHE_<NAME>`` sets it from the environment and ``--<name>`` from the command
line, so adding a setting here is all it takes to expose it everywhere; a test
checks that docs/configuration.md documents each one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from runcache.errors import ConfigError
from runcache.keys import DEFAULT_MAX_OUTPUT_BYTES
from runcache.run.run_as import OWN_PREFIX, RunAs, is_own

MiB = 1024 * 1024


#: The most seconds any duration setting may be (about 31 years): past it, nonsense.
MAX_SECONDS = 1e9

#: The fewest processes ``max_processes`` may allow: a PID namespace's pid_max is at
#: least 301 (pids 1 to 300), and the kernel's largest is 4194304.
MIN_PROCESSES = 300
MAX_PID_MAX = 4194304 - 1

#: The largest whole-number setting: what a signed 64-bit integer holds, as the JSON
#: encoder, SQLite and the kernel's limits do (a larger output cap crashed the start).
MAX_WHOLE = 2**63 - 1


class SettingError(ConfigError):
    """A setting refused, in a message that names each setting it is about the way the
    operator set it: ``--default-ttl`` on the command line, ``RUNCACHE_DEFAULT_TTL`` in
    the environment (:meth:`Config.load` knows which), ``default_ttl`` in code.

    ``template`` is a :meth:`str.format` string: ``{0}``, ``{1}``... are the settings
    named, by field; the values shown are keyword arguments, so their text is never
    read as a template.
    """

    def __init__(self, template: str, *settings: str, **values: Any) -> None:
        self.template = template
        self.settings = settings
        self.values = values
        super().__init__(self.named(str))

    def named(self, name: Callable[[str], str]) -> str:
        """The message, each setting called ``name(field)``."""
        return self.template.format(*map(name, self.settings), **self.values)


def _setting(
    default: Any,
    help: str,
    minimum: float | None = None,
    *,
    secret: bool = False,
    maximum: float | None = None,
) -> Any:
    """A row of the table.

    A ``secret`` is kept out of ``repr`` and gets no command-line flag, because a
    flag's value is visible to every user of the machine in ``ps``. Numbers are
    checked against ``minimum`` and ``maximum`` (unless given: ``MAX_SECONDS`` for a
    float, which is a duration, ``MAX_WHOLE`` for an int), and a float must be finite.
    """
    if maximum is None and isinstance(default, float):
        maximum = MAX_SECONDS
    elif maximum is None and isinstance(default, int) and not isinstance(default, bool):
        maximum = MAX_WHOLE
    metadata = {"help": help, "minimum": minimum, "maximum": maximum, "secret": secret}
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Config:
    """Everything an operator can set, with the defaults existing clients expect."""

    host: str = _setting("127.0.0.1", "Address to listen on.")
    port: int = _setting(8888, "TCP port to listen on (0 picks a free one).", 0, maximum=65535)
    store: str = _setting(
        "memory://",
        "Where cached results live: memory://, sqlite:///path.db or redis://host:port/db"
        " (also rediss://; redis+cluster://host:port for a Redis Cluster), each with an"
        " optional ?namespace=NAME.",
    )
    store_timeout: float = _setting(
        0.5,
        "Seconds a call to the store may take (a Redis round trip, a wait for SQLite's"
        " write lock) before the request goes on uncached and the store rests a second.",
        0.001,
    )
    max_entries: int = _setting(1000, "Most cached results held at once.", 1)
    max_bytes: int = _setting(256 * MiB, "Most bytes of cached results held at once.", 1)
    default_ttl: float = _setting(3600.0, "Seconds a cached result lives unless asked.", 0.001)
    max_ttl: float = _setting(30 * 86400.0, "Longest ttl a request may ask for.", 0.001)
    default_timeout: float = _setting(300.0, "Seconds a command may run unless asked.", 0.001)
    max_timeout: float = _setting(3600.0, "Longest timeout a request may ask for.", 0.001)
    default_stale: float = _setting(
        0.0,
        "Seconds past expiry a result is still answered (marked stale, refreshed meanwhile)"
        " unless a request says.",
        0,
    )
    max_stale: float = _setting(
        3600.0, "Longest stale a request may ask for; expired results are kept that long.", 0
    )
    max_output_bytes: int = _setting(
        DEFAULT_MAX_OUTPUT_BYTES,
        "Bytes of stdout and of stderr kept per run, counted as sent (JSON-escaped).",
        1,
    )
    max_body_bytes: int = _setting(1 * MiB, "Largest request body accepted (413 past it).", 1)
    containment: str = _setting(
        "auto",
        "How a run's processes are kept together so none outlives it: pidns (a PID"
        " namespace per run, with its own /proc; as root, or as any user where the kernel"
        " allows unprivileged user namespaces), group (its process group only) or auto (pidns"
        " where allowed).",
    )
    max_memory: str = _setting(
        "", "Address space each process of a run may use, e.g. 512M or 2G (empty or 0: no limit)."
    )
    max_cpu_seconds: int = _setting(
        0, "CPU seconds each process of a run may use (0: no limit).", 0, maximum=10**9
    )
    max_file_size: str = _setting(
        "", "Largest file a run may write, e.g. 100M (empty or 0: no limit)."
    )
    max_open_files: int = _setting(
        0, "Most files each process of a run may have open (0: no limit).", 0, maximum=1 << 20
    )
    max_processes: int = _setting(
        0,
        "Most processes a run may have at once, 300 or more (0: no limit); needs a PID"
        " namespace per run and Linux 6.14 or later.",
        0,
        maximum=MAX_PID_MAX,
    )
    workers: int = _setting(
        1, "Server processes sharing the port; more than 1 needs a sqlite:// or redis:// store.", 1
    )
    max_connections: int = _setting(
        10000, "Most open client connections; past it new requests get a 503.", 1
    )
    keepalive_timeout: int = _setting(
        5,
        "Seconds an idle keep-alive connection stays open between requests.",
        1,
        maximum=MAX_SECONDS,
    )
    header_timeout: float = _setting(
        10.0,
        "Seconds a client has to send a request's headers, from its first byte"
        " (or from connecting).",
        0.001,
    )
    body_timeout: float = _setting(
        30.0, "Seconds a client has to send a request's body once its headers are in.", 0.001
    )
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")
    log_format: str = _setting(
        "text",
        "Server log format: text (one readable line each) or json (one JSON object"
        " a line, with time, level, logger, message and the line's fields).",
    )
    audit_log: str = _setting(
        "",
        "File that gets one JSON line for each command request, clear, delete and"
        " invalidation: who, as which credential, what came of it (empty: none).",
    )
    audit_log_max_bytes: int = _setting(
        10 * MiB, "Size past which the audit log is rotated; five rotated files are kept.", 1024
    )
    token: str = _setting(
        "", "Bearer token every /api/* request must send (environment only).", secret=True
    )
    token_file: str = _setting(
        "",
        "File holding the token, instead of RUNCACHE_TOKEN; or several, one `name token`"
        " (or `token`) a line, each client's jobs its own.",
    )
    admin_token: str = _setting(
        "",
        "Bearer token for cache clearing (environment only); defaults to the token.",
        secret=True,
    )
    admin_token_file: str = _setting("", "File holding the admin token.")
    allow: str = _setting(
        "", "Comma-separated executables to allow; set, commands run without a shell."
    )
    allow_runners: str = _setting(
        "",
        "Programs in --allow that run other programs (env, find, git, sh, python3...) "
        "and that you mean to allow anyway.",
    )
    max_concurrent: int = _setting(32, "Most commands running at once; cache hits never wait.", 1)
    queue_timeout: float = _setting(
        30.0, "Seconds a command waits for a free slot before a 503 with Retry-After.", 0
    )
    job_retention: float = _setting(
        3600.0, "Seconds a finished job stays listed, with its output (at most 1,000 kept).", 0
    )
    instance_timeout: float = _setting(
        10.0,
        "With a shared store: seconds an instance may miss its heartbeat before its running"
        " jobs are marked failed and their cache lease released.",
        3,
    )
    default_pool: str = _setting(
        "",
        "The pool of workers (runcache worker --pool) that runs a request naming none;"
        " empty: this server runs it. Needs a redis:// store.",
    )
    max_queued: int = _setting(
        1000, "Most commands a pool's queue holds; past it a 503 with Retry-After.", 1
    )
    claim_timeout: float = _setting(
        30.0,
        "With pools: seconds a worker may miss its heartbeat before another finds its"
        " command and fails it (or runs it again when its request's retries allow).",
        3,
    )
    env_allow: str = _setting(
        "",
        "Comma-separated environment variables commands see (empty: all of runcache's),"
        " and the only ones a request's env may set.",
    )
    allow_cwd: str = _setting(
        "",
        "Comma-separated absolute directories a request's cwd must lie within"
        " (empty: any existing directory).",
    )
    allowed_hosts: str = _setting(
        "",
        "Comma-separated further names (name or name:port) the Host header of a request"
        " may carry, besides 127.0.0.1, localhost, [::1] and --host: a reverse proxy's.",
    )
    allowed_origins: str = _setting(
        "",
        "Comma-separated further browser origins (https://ui.example) whose pages may"
        " call the server; pages of other origins are refused.",
    )
    max_header_bytes: int = _setting(
        64 * 1024,
        "Most bytes of a request's line and headers; past it a 431 and the connection closed.",
        1024,
        maximum=1 << 30,
    )
    write_timeout: float = _setting(
        30.0,
        "Seconds a client may take none of an answer the server has waiting (a stream"
        " it does not read) before its connection is dropped.",
        0.001,
    )
    max_streams: int = _setting(
        0,
        "Most event streams open at once (job events, MCP's GET); past it a new one gets"
        " a 503 with Retry-After (0: half of --max-connections).",
        0,
    )
    policy: str = _setting(
        "",
        "A TOML file of rules matched on the command (its program or a pattern) that set"
        " ttl, stale, timeout, inputs, cache_exit_codes, scope or cache = false where a request"
        " leaves them out; the first matching rule applies (empty: none).",
    )
    max_input_files: int = _setting(
        10_000,
        "Most files a request's inputs may match; past it the request is refused (400).",
        1,
    )
    max_input_bytes: int = _setting(
        1024 * MiB,
        "Most bytes of input files one request may have read to hash (files whose stat is"
        " unchanged since last seen are not read again); past it the request is refused (400).",
        1,
    )
    job_output_bytes: int = _setting(
        128 * MiB,
        "Most bytes of output finished jobs keep, all together (their results and"
        " the text decoded for pages); past it the output of the jobs that ended or were read"
        " longest ago is dropped (410 Gone), their status still listed.",
        0,
    )
    run_as: str = _setting(
        "",
        "User commands run as (with its primary group, no supplementary groups), so they"
        " cannot read what only runcache's user may; needs root (empty: runcache's user).",
    )
    mcp_session_timeout: float = _setting(
        300.0,
        "Seconds an MCP session at /mcp may sit idle (no request in flight, no stream"
        " open) before it is closed; its client then opens another.",
        1,
    )
    mcp_sessions_per_client: int = _setting(
        256,
        "Most MCP sessions one client address keeps at /mcp: opening one more closes its oldest.",
        1,
    )
    mcp_stateless: bool = _setting(
        False,
        "Serve /mcp without sessions, each request on its own (as --workers N does): for"
        " servers behind a load balancer, where a session's next request may reach another"
        " server; a client's cancel of a call in flight is then lost.",
    )
    mcp_tools: str = _setting(
        "default",
        "MCP tools offered (at /mcp and by runcache mcp): default (execute_command,"
        " start_command, read_output, job_status, cancel_job, get_cache_stats, and clear_cache"
        " for a caller with the admin right), all, or tool names separated by commas.",
    )

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            _check_range(setting.name, getattr(self, setting.name), setting.metadata)
        for default, most in (
            ("default_timeout", "max_timeout"),
            ("default_ttl", "max_ttl"),
            ("default_stale", "max_stale"),
        ):
            if getattr(self, default) > getattr(self, most):
                raise SettingError(
                    "{0} must not exceed {1}: {low:g} > {high:g}",
                    default,
                    most,
                    low=getattr(self, default),
                    high=getattr(self, most),
                )
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise SettingError(
                "{0} must be DEBUG, INFO, WARNING or ERROR, got {value}",
                "log_level",
                value=self.log_level,
            )
        if self.log_format not in ("text", "json"):
            raise SettingError(
                "{0} must be text or json, got {value!r}", "log_format", value=self.log_format
            )
        if self.workers > 1 and self.store.startswith("memory:"):
            raise SettingError(
                "{0} {workers} needs a store the workers share: with memory:// each "
                "process would keep its own cache, statistics and clear; set {1} to "
                "sqlite:///path/cache.db or redis://host:port/0",
                "workers",
                "store",
                workers=self.workers,
            )
        if self.containment not in ("auto", "pidns", "group"):
            raise SettingError(
                "{0} must be auto, pidns or group, got {value!r}",
                "containment",
                value=self.containment,
            )
        if 0 < self.max_processes < MIN_PROCESSES:
            raise SettingError(
                "{0} must be 0 (no limit) or at least {least} (the least the kernel lets a"
                " PID namespace hold), got {value}",
                "max_processes",
                least=MIN_PROCESSES,
                value=self.max_processes,
            )
        for name in ("max_memory", "max_file_size"):
            try:
                parse_size(getattr(self, name))
            except ValueError:
                raise SettingError(
                    "{0} must be a size such as 512M or 2G (bytes, or a number with K, M,"
                    " G or T; 0 for no limit), got {value!r}",
                    name,
                    value=getattr(self, name),
                ) from None
        self._load_tokens()
        for name in self.allowed_commands:
            if "/" in name:
                raise SettingError(
                    "{0} takes executable names, not paths: {value!r}", "allow", value=name
                )
        for name in self.env_names:
            if not _ENV_NAME.fullmatch(name):
                raise SettingError(
                    "{0}: {value!r} is not an environment variable name", "env_allow", value=name
                )
            if is_own(name):
                raise SettingError(
                    "{0}: {value!r} is one of runcache's own variables ({own}*), which"
                    " commands never see",
                    "env_allow",
                    value=name,
                    own=OWN_PREFIX,
                )
        for root in self.cwd_roots:
            if not os.path.isabs(root) or not os.path.isdir(root):
                raise SettingError(
                    "{0}: {value!r} is not an absolute path of a directory", "allow_cwd", value=root
                )
        for origin in self.origins:
            if not _ORIGIN.fullmatch(origin):
                raise SettingError(
                    "{0}: {value!r} is not an origin such as https://ui.example or"
                    " http://127.0.0.1:3000",
                    "allowed_origins",
                    value=origin,
                )
        if self.run_as:
            try:
                RunAs.lookup(self.run_as)
            except ValueError as error:
                raise SettingError("{0}: {reason}", "run_as", reason=error) from None

    def _load_tokens(self) -> None:
        # Frozen, but a token read from a file belongs in the token field itself.
        for name in ("token", "admin_token"):
            token = _token_from_file(name, getattr(self, name), getattr(self, name + "_file"))
            if name == "token" and self.token_file:
                token = _token_lines(token)
            elif token and not _TOKEN.fullmatch(token):
                raise _bad_token(name)
            object.__setattr__(self, name, token)
        if self.admin_token and not self.token:
            raise SettingError(
                "{0} is set but {1} is not: set {1} too, or use the one token for both",
                "admin_token",
                "token",
            )
        if len(self.plain_tokens) > 1 and not self.admin_token:
            raise SettingError(
                "{0} holds several tokens, so none of them is the admin's: set {1} (or {2}) too",
                "token_file",
                "admin_token",
                "admin_token_file",
            )

    @property
    def plain_tokens(self) -> tuple[tuple[str, str], ...]:
        """Each token ``token`` (or ``token_file``) holds, with its identity: its name in
        the file, else ``token-`` and 12 hex digits of its SHA-256 (never the token)."""
        return tuple(
            (line.partition(" ")[0], line.partition(" ")[2])
            if " " in line
            else (token_identity(line), line)
            for line in self.token.splitlines()
        )

    @property
    def admin_secret(self) -> str:
        """The token administrative operations need: the admin token, else the token
        (which is then the only one)."""
        return self.admin_token or (self.plain_tokens[0][1] if self.token else "")

    @property
    def memory_limit(self) -> int:
        """``max_memory`` in bytes; 0 is no limit."""
        return parse_size(self.max_memory)

    @property
    def file_size_limit(self) -> int:
        """``max_file_size`` in bytes; 0 is no limit."""
        return parse_size(self.max_file_size)

    @property
    def allowed_commands(self) -> tuple[str, ...]:
        """The executables of ``allow``; empty means commands run through the shell."""
        return _names(self.allow)

    @property
    def runner_names(self) -> tuple[str, ...]:
        """The programs of ``allow_runners``: allowed although they run other programs."""
        return _names(self.allow_runners)

    @property
    def env_names(self) -> tuple[str, ...]:
        """The variables of ``env_allow``; empty means commands see the whole environment."""
        return _names(self.env_allow)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The values of the secret settings (the tokens), which no command may see."""
        return tuple(
            getattr(self, item.name) for item in dataclasses.fields(self) if item.metadata["secret"]
        )

    @property
    def cwd_roots(self) -> tuple[str, ...]:
        """The directories of ``allow_cwd``; empty means a request's cwd may be any."""
        return _names(self.allow_cwd)

    @property
    def host_names(self) -> tuple[str, ...]:
        """The names of ``allowed_hosts``."""
        return _names(self.allowed_hosts)

    @property
    def origins(self) -> tuple[str, ...]:
        """The origins of ``allowed_origins``."""
        return _names(self.allowed_origins)

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        *,
        flags: bool = False,
    ) -> Config:
        """Build a config from the defaults, then the environment, then explicit overrides.

        A refused setting is named as it was set: by its variable when the environment
        gave it, by its flag when ``flags`` says the overrides are the command line's
        (where the defaults are changed by flags too), else by its field.
        """
        environ = os.environ if environ is None else environ
        try:
            return cls(**cls._values(overrides or {}, environ))
        except SettingError as error:
            by_name = {setting.name: setting for setting in settings()}

            def name(field: str) -> str:
                setting = by_name[field]
                if setting.env_var in environ and (overrides or {}).get(field) is None:
                    return setting.env_var
                if setting.secret:  # no flag: only the environment sets it
                    return setting.env_var if flags else field
                return setting.flag if flags else field

            raise ConfigError(error.named(name)) from None

    @staticmethod
    def _values(overrides: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
        """The settings the environment and the overrides give, parsed."""
        values: dict[str, Any] = {}
        for setting in settings():
            if setting.env_var in environ:
                values[setting.name] = setting.parse(environ[setting.env_var], setting.env_var)
        by_name = {setting.name: setting for setting in settings()}
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in by_name:
                raise ConfigError(f"unknown setting {name!r}")
            setting = by_name[name]
            if isinstance(value, str) and setting.kind is not str:  # a flag's text
                value = setting.parse(value, setting.flag)
            values[name] = value
        return values


#: The settings by what they are about, in the order ``runcache serve --help`` shows
#: them (click has no option groups; the CLI writes a section for each). A test checks
#: that every setting is in exactly one.
GROUPS: dict[str, tuple[str, ...]] = {
    "Listening": (
        "host",
        "port",
        "workers",
        "max_connections",
        "keepalive_timeout",
        "header_timeout",
        "body_timeout",
        "write_timeout",
        "max_header_bytes",
        "max_body_bytes",
        "max_streams",
        "allowed_hosts",
        "allowed_origins",
    ),
    "Cache": (
        "store",
        "store_timeout",
        "max_entries",
        "max_bytes",
        "default_ttl",
        "max_ttl",
        "default_stale",
        "max_stale",
        "policy",
        "max_input_files",
        "max_input_bytes",
        "instance_timeout",
    ),
    "Runs": (
        "default_timeout",
        "max_timeout",
        "max_concurrent",
        "queue_timeout",
        "max_output_bytes",
        "job_retention",
        "job_output_bytes",
        "default_pool",
        "max_queued",
        "claim_timeout",
    ),
    "Access": (
        "token",
        "token_file",
        "admin_token",
        "admin_token_file",
        "allow",
        "allow_runners",
        "env_allow",
        "allow_cwd",
        "run_as",
    ),
    "Containment and limits": (
        "containment",
        "max_memory",
        "max_cpu_seconds",
        "max_file_size",
        "max_open_files",
        "max_processes",
    ),
    "Logs": ("log_level", "log_format", "audit_log", "audit_log_max_bytes"),
    "MCP": ("mcp_tools", "mcp_session_timeout", "mcp_sessions_per_client", "mcp_stateless"),
}


@dataclass(frozen=True)
class Setting:
    """One row of the settings table, as the CLI and the docs see it."""

    name: str
    default: Any
    help: str
    #: Set only from the environment (or a file), never by a flag; kept out of logs.
    secret: bool = False

    @property
    def group(self) -> str:
        """The section of :data:`GROUPS` it is in."""
        return next(title for title, names in GROUPS.items() if self.name in names)

    @property
    def env_var(self) -> str:
        return "RUNCACHE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> type:
        return type(self.default)

    def parse(self, text: str, source: str) -> Any:
        """Turn the text of an environment variable or flag into the setting's type
        (a float setting is a duration: ``90s``, ``5m``, ``1h``, ``1d`` or seconds)."""
        if self.kind is bool:  # bool("false") is True: spelled out instead
            if text.strip().lower() not in _BOOLEANS:
                raise ConfigError(f"{source} must be true or false, got {text!r}")
            return _BOOLEANS[text.strip().lower()]
        if self.kind is float:
            return parse_duration(text, source)
        try:
            return self.kind(text)
        except ValueError:
            kind = {int: "a whole number", float: "a number"}.get(self.kind, self.kind.__name__)
            raise ConfigError(f"{source} must be {kind}, got {text!r}") from None


#: How a yes-or-no setting may be written.
_BOOLEANS = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
}


def settings() -> Iterator[Setting]:
    """The settings table, in the order the fields are declared."""
    for item in dataclasses.fields(Config):
        yield Setting(item.name, item.default, item.metadata["help"], item.metadata["secret"])


def _check_range(name: str, value: Any, metadata: Mapping[str, Any]) -> None:
    """One line naming the setting, its value and what is allowed, for a number out of range.
    NaN passes every comparison, so finiteness is checked first."""
    minimum, maximum = metadata["minimum"], metadata["maximum"]
    if minimum is None and maximum is None:
        return
    low = "" if minimum is None else f"at least {minimum:g}"
    high = "" if maximum is None else f"at most {maximum:g}"
    allowed = " and ".join(part for part in (low, high) if part)
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(
            "{0} must be a finite number {allowed}, got {value}", name, allowed=allowed, value=value
        )
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingError(
            "{0} must be {allowed}, got {value:g}", name, allowed=allowed, value=value
        )


def parse_size(text: str) -> int:
    """A size setting in bytes: ``512M`` is 512 MiB (K, M, G and T are powers of 1024,
    an optional ``B`` or ``iB`` after them is allowed); empty is 0, no limit."""
    if not text.strip():
        return 0
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    size = int(number) << 10 * (" KMGT".index(unit.upper()) if unit else 0)
    if size > MAX_WHOLE:
        raise ValueError(f"too large: {text!r}")
    return size


#: Seconds in each unit a duration may be given in.
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, source: str) -> float:
    """Seconds from a duration as people write it: ``90s``, ``5m``, ``1h``, ``1d``, or a
    plain number of seconds (``0.5``), the one reading of every duration flag and
    ``RUNCACHE_*`` variable. Request fields stay numbers of seconds: JSON has numbers.
    ``source`` names the flag or variable in the one-line refusal."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"{source} must be a duration such as 90s, 5m, 1h or 1d (or seconds), got {text!r}"
        )
    number, unit = match.groups()
    return float(number) * DURATION_UNITS[unit.lower()] if unit else float(number)


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _token_from_file(name: str, token: str, path: str) -> str:
    if not path:
        return token
    try:
        with open(path, encoding="utf-8") as file:
            from_file = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SettingError(
            "{0} {path!r} cannot be read: {error}", name + "_file", path=path, error=error
        ) from None
    if not from_file:
        raise SettingError("{0} {path!r} is empty", name + "_file", path=path)
    if token and token != from_file:
        raise SettingError("both {0} and {1} are set: use one", name, name + "_file")
    return from_file


def _bad_token(name: str, line: int | None = None) -> SettingError:
    """A token refused: the setting's own, or the one on ``line`` of the token file."""
    return SettingError(
        ("{0} line {line}: the token" if line is not None else "{0}")
        + " must be at least {least} characters of letters, digits and -._~+/"
        " (e.g. the output of `openssl rand -hex 32`)",
        name,
        line=line,
        least=MIN_TOKEN_LENGTH,
    )


def _token_lines(text: str) -> str:
    """A token file's tokens, checked, one ``name token`` or ``token`` a line (a lone
    unnamed token as itself, as a one-token file always read); blank lines and
    ``#`` comments dropped."""
    lines: list[str] = []
    identities: set[str] = set()
    tokens: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise SettingError(
                "{0} line {number}: write `name token` or `token`", "token_file", number=number
            )
        name, token = (None, words[0]) if len(words) == 1 else (words[0], words[1])
        if not _TOKEN.fullmatch(token):
            raise _bad_token("token_file", number)
        if name is not None and (not _TOKEN_NAME.fullmatch(name) or name in RESERVED_NAMES):
            raise SettingError(
                "{0} line {number}: a name is 1 to {most} letters, digits and ._- (shorter"
                " than a token, so a token is never taken for a name and logged), and not"
                " {reserved}",
                "token_file",
                number=number,
                most=MIN_TOKEN_LENGTH - 1,
                reserved=" or ".join(sorted(RESERVED_NAMES)),
            )
        identity = name if name is not None else token_identity(token)
        if identity in identities or token in tokens:
            raise SettingError(
                "{0} line {number}: a name or token already given", "token_file", number=number
            )
        identities.add(identity)
        tokens.add(token)
        lines.append(token if name is None else f"{name} {token}")
    if not lines:
        raise SettingError("{0} holds no token (only blank lines and # comments)", "token_file")
    return "\n".join(lines)


def token_identity(token: str) -> str:
    """Who an unnamed token is, where a job or the audit log names it: a short digest,
    the same in every worker process, from which the token cannot be read back."""
    return "token-" + hashlib.sha256(token.encode()).hexdigest()[:12]


#: Identities that are not a token's: the admin token's and a server without tokens'.
RESERVED_NAMES = frozenset({"admin", "anonymous"})

#: Shorter tokens can be guessed; 16 characters of hex are 64 bits.
MIN_TOKEN_LENGTH = 16

#: RFC 6750's token characters, so a token always fits in an Authorization header.
_TOKEN = re.compile(rf"[A-Za-z0-9\-._~+/]{{{MIN_TOKEN_LENGTH},}}=*")
_SIZE = re.compile(r"(\d{1,20})\s*(?:([KMGTkmgt])(?:i?[Bb])?)?")
_DURATION = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([smhdSMHD])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ORIGIN = re.compile(r"https?://[^/?#\s]+/?", re.IGNORECASE)
_TOKEN_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{MIN_TOKEN_LENGTH - 1}}}")
