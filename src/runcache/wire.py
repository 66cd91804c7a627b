"""The wire: every request and response of the HTTP API, declared once.

Each shape is a msgspec ``Struct``. From these declarations come the checking of
requests (decoded and checked in one pass, with the messages clients already
read), the encoding of answers, the OpenAPI components (``openapi.py``), the
MCP tools' input and output schemas (``mcp.py``) and the typed results of the
engine and the clients. A field is named in one place, so the five layers
that speak it cannot drift apart.

The JSON Schema of a request says exactly what the checking accepts: a command
must hold something besides white space and no NUL character, which is what
the server can run. Bounds that depend on the server's settings (the longest
timeout, ttl and stale) are checked by the engine and written into the OpenAPI
document by :func:`command_request_schema`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from runcache import keys
from runcache.errors import BadRequest

S = TypeVar("S", bound=Struct)

#: What a missing or empty command answers, as the contract fixes it.
COMMAND_REQUIRED = "Command parameter is required"

#: White space as Python's ``str.isspace`` has it, spelled out: ``\s`` means
#: other characters in the ECMA-262 regular expressions of JSON Schema
#: validators, so the schema would allow what the server refuses.
_WHITE_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

#: A command that is more than white space, without NUL (a C string cannot carry it).
#: Linear to match: a NUL stops ``[^\x00]*`` and nothing can backtrack into it.
COMMAND_PATTERN = rf"^[{_WHITE_SPACE}]*[^{_WHITE_SPACE}\x00][^\x00]*$"

_Count = Annotated[int, Meta(ge=0)]
_Seconds = Annotated[float, Meta(ge=0)]
_Percent = Annotated[str, Meta(pattern=r"^\d+\.\d%$", examples=["87.5%"])]

Command = Annotated[
    str,
    Meta(
        pattern=COMMAND_PATTERN,
        description="The command line, run with /bin/sh -c (or split, in allowlist mode).",
        extra={
            "missing": COMMAND_REQUIRED,
            "type": "command must be a string",
            "constraint": COMMAND_REQUIRED,
            "nul": "command must not contain NUL characters",
        },
    ),
]
UseCache = Annotated[
    bool,
    Meta(
        description="false runs the command even when a result is cached, and stores nothing.",
        extra={"type": "use_cache must be true or false"},
    ),
]


def _seconds(name: str, description: str) -> Meta:
    """More than 0 seconds, with the messages for ``name``."""
    return Meta(
        gt=0,
        description=description,
        extra={
            "type": f"{name} must be a number of seconds",
            "constraint": f"{name} must be greater than 0 seconds",
        },
    )


Timeout = Annotated[float, _seconds("timeout", "Most seconds the command may run.")]
Background = Annotated[
    bool,
    Meta(
        description="true answers 202 at once with the job that runs the command; "
        "follow it under /api/jobs/{job_id}.",
        extra={"type": "background must be true or false"},
    ),
]
Ttl = Annotated[float, _seconds("ttl", "Seconds this result is kept in the cache.")]
Refresh = Annotated[
    bool,
    Meta(
        description="true runs the command even when a result is cached, and stores the "
        "new result in its place (identical requests still share the run).",
        extra={"type": "refresh must be true or false"},
    ),
]


Stale = Annotated[
    float,
    Meta(
        ge=0,
        description="Seconds past its expiry a cached result may still answer at once, "
        'marked "stale": true, while one run refreshes it '
        "(default --default-stale, at most --max-stale).",
        extra={
            "type": "stale must be a number of seconds",
            "constraint": "stale must be 0 or more seconds",
        },
    ),
]

#: The longest ``cwd`` a request may name (Linux's PATH_MAX).
MAX_PATH = 4096
#: The most variables a request's ``env`` may set.
MAX_ENV_VARIABLES = 256

Cwd = Annotated[
    str,
    Meta(
        pattern=r"^/[^\x00]*$",
        max_length=MAX_PATH,
        description="The directory the command runs in: an absolute path to an existing "
        "directory (within the server's --allow-cwd roots when it names any). "
        "Part of the cache key.",
        extra={
            "type": "cwd must be a string",
            "constraint": f"cwd must be an absolute path (starting with /) of at most "
            f"{MAX_PATH} characters",
            "nul": "cwd must not contain NUL characters",
        },
    ),
]
_EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]
_EnvValue = Annotated[str, Meta(pattern=r"^[^\x00]*$")]
Env = Annotated[
    dict[_EnvName, _EnvValue],
    Meta(
        max_length=MAX_ENV_VARIABLES,
        description="Environment variables to set for the command, over the server's own "
        "(only those --env-allow names, when it names any). Part of the cache key.",
        extra={
            "type": "env must be an object of variable names to string values",
            "constraint": f"env must map at most {MAX_ENV_VARIABLES} variable names (letters, "
            "digits and _, not starting with a digit) to values without NUL",
        },
    ),
]
PassEnv = Annotated[
    dict[_EnvName, _EnvValue],
    Meta(
        max_length=MAX_ENV_VARIABLES,
        description="Environment variables passed to the command but left out of the cache "
        "key (a scanner's token, say): results are shared whatever their values. The same "
        "rules as env (--env-allow); never logged, audited or stored.",
        extra={
            "type": "pass_env must be an object of variable names to string values",
            "constraint": f"pass_env must map at most {MAX_ENV_VARIABLES} variable names "
            "(letters, digits and _, not starting with a digit) to values without NUL",
        },
    ),
]
Stdin = Annotated[
    str,
    Meta(
        description="Text fed to the command's standard input (UTF-8); without it the "
        "command reads end of file at once. Part of the cache key.",
        extra={"type": "stdin must be a string"},
    ),
]


#: What a pool's name may be: it is part of Redis keys and of Prometheus labels.
POOL_PATTERN = "^[A-Za-z0-9_.-]{1,64}$"

Pool = Annotated[
    str,
    Meta(
        pattern=POOL_PATTERN,
        description="The pool of workers that runs the command (runcache worker --pool): "
        "where its tools are. Default --default-pool; none: the server runs it. Part of "
        "the cache key, in place of the server's own environment.",
        extra={
            "type": "pool must be a string",
            "constraint": "pool must be 1 to 64 letters, digits, '_', '.' or '-'",
        },
    ),
]
# A JSON number, as cache_exit_codes below says why: the schema's integer accepts 10.0.
Retries = Annotated[
    float,
    Meta(
        multiple_of=1,
        ge=0,
        le=10,
        description="With a pool: how many times a command whose worker stopped answering "
        "is run again (default 0: its side effects are not runcache's to repeat).",
        extra={
            "type": "retries must be a whole number",
            "constraint": "retries must be a whole number from 0 to 10",
        },
    ),
]


#: The exit codes whose results are cached unless a request says otherwise (the key's).
DEFAULT_CACHE_EXIT_CODES = keys.DEFAULT_CACHE_EXIT_CODES

# A JSON number, not an int: JSON has one kind of number, and its Schema calls 1.0 an
# integer; msgspec's int would refuse it where the schema (and a client) accepts it.
CacheExitCodes = Annotated[
    list[Annotated[float, Meta(ge=0, le=255, multiple_of=1)]],
    Meta(
        min_length=1,
        max_length=256,
        description="The exit codes whose results are answers to cache (default [0]): "
        "[0, 1] caches grep finding nothing, diff finding a difference, a linter's "
        "findings. A run that timed out or was cancelled is never cached. Part of the "
        "cache key when it is not [0].",
        extra={
            "type": "cache_exit_codes must be a list of exit codes (whole numbers)",
            "constraint": "cache_exit_codes must hold 1 to 256 whole numbers from 0 to 255",
        },
    ),
]


#: The most patterns a request's ``inputs`` may hold.
MAX_INPUT_PATTERNS = 256

Inputs = Annotated[
    list[Annotated[str, Meta(min_length=1, max_length=4096, pattern="^[^\x00]*$")]],
    Meta(
        max_length=MAX_INPUT_PATTERNS,
        description="Files the command reads, whose contents join the cache key: paths and "
        'globs (**, *, ?, [abc]) relative to the run\'s directory, and "git:" for the git '
        "repository there (HEAD, status and diff). A result whose inputs changed while it "
        "ran is not stored.",
        extra={
            "type": "inputs must be a list of paths and globs (strings)",
            "constraint": f"inputs must hold at most {MAX_INPUT_PATTERNS} paths or globs, "
            "each 1 to 4096 characters without NUL",
        },
    ),
]


#: The longest scope name.
MAX_SCOPE = 64

#: A scope's name: what a key, a Redis key and a log line can hold as it is.
SCOPE_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_SCOPE - 1}}}$"

#: What a scope may be, in the words of every message that refuses one.
SCOPE_RULE = (
    f"scope must be 1 to {MAX_SCOPE} letters, digits, '.', '_' or '-', "
    "starting with a letter or digit"
)


def _scope(description: str) -> Meta:
    """A scope's name, with the messages that refuse another."""
    return Meta(
        pattern=SCOPE_PATTERN,
        max_length=MAX_SCOPE,
        description=description,
        extra={"type": "scope must be a string", "constraint": SCOPE_RULE},
    )


Scope = Annotated[
    str,
    _scope(
        "A namespace of its own in the cache (a team, a project): results of one scope "
        "never answer another's or an unscoped request, and a scope's entries are listed "
        "and invalidated as one. Part of the cache key. "
        + SCOPE_RULE.removeprefix("scope must be ").capitalize()
        + "."
    ),
]


class Request(Struct, frozen=True, forbid_unknown_fields=True):
    """A request's shape. A field it does not know is refused, naming the closest one it
    knows: ``{"timeot": 5}`` must not run with the default timeout, unnoticed."""


class RunRequest(Request, frozen=True):
    """What to run and how: the fields every way of asking for a run shares."""

    command: Command
    use_cache: UseCache = True
    timeout: Timeout | None = None
    ttl: Ttl | None = None
    refresh: Refresh = False
    stale: Stale | None = None
    cwd: Cwd | None = None
    env: Env | None = None
    stdin: Stdin | None = None
    cache_exit_codes: CacheExitCodes | None = None
    inputs: Inputs | None = None
    pass_env: PassEnv | None = None
    scope: Scope | None = None
    pool: Pool | None = None
    retries: Retries = 0


class CommandRequest(RunRequest, frozen=True):
    """The body of ``POST /api/command``."""

    background: Background = False


# Answers accept fields they do not declare when decoded, so a client keeps
# working against a newer server; their schemas are closed all the same
# (see ``schema_components``), since they say exactly what this server sends.


class RunSummary(Struct, frozen=True, kw_only=True):
    """What a run produced, apart from its output."""

    return_code: int
    success: bool
    timed_out: bool
    partial_results: bool
    stdout_truncated: bool
    stderr_truncated: bool
    execution_time: _Seconds
    timestamp: Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
    cache_key: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
    #: Killed on request (a cancel or a terminate) before it ended; never cached.
    cancelled: bool = False
    #: The inputs the request named (their contents are in the key), when it named any.
    inputs: list[str] | UnsetType = UNSET


class StoredResult(RunSummary, frozen=True):
    """A run's result as the cache holds it: the summary, then the output."""

    stdout: str
    stderr: str


class CommandResult(StoredResult, frozen=True):
    """The answer of ``POST /api/command``: the stored result and where it came from."""

    cached: bool
    coalesced: bool
    #: Only in a stale answer: a cached result past its expiry, being refreshed.
    stale: bool | UnsetType = UNSET


class CacheStats(Struct, frozen=True):
    """The answer of ``GET /api/cache/stats``; ``hit_rate`` is the contract's string."""

    hits: _Count
    misses: _Count
    evictions: _Count
    expirations: _Count
    coalesced: _Count
    size: _Count
    max_size: _Count
    bytes: _Count
    max_bytes: _Count
    hit_rate: _Percent
    hit_ratio: Annotated[float, Meta(ge=0, le=1)]
    #: Hits answered past expiry (``"stale": S``), counted in ``hits`` too.
    stale_hits: _Count = 0
    store_error: str | UnsetType = UNSET


class SystemMetrics(Struct, frozen=True):
    cpu_percent: _Seconds
    memory_percent: _Seconds
    disk_usage: _Seconds


class Telemetry(Struct, frozen=True):
    """The answer of ``GET /api/telemetry``: counts since start, and the machine."""

    uptime_seconds: _Seconds
    commands_executed: _Count
    commands_succeeded: _Count
    commands_failed: _Count
    commands_timed_out: _Count
    cache_hits_served: _Count
    total_execution_time: _Seconds
    success_rate: _Percent
    average_execution_time: Annotated[str, Meta(pattern=r"^\d+\.\d\ds$", examples=["1.25s"])]
    system_metrics: SystemMetrics


class SlotUse(Struct, frozen=True, kw_only=True):
    """How busy the answering process's command slots are: ``size`` runs at once
    (``--max-concurrent``), ``in_use`` of them taken now, and ``queued`` runs waiting
    for one (each at most ``--queue-timeout``). Per process, with ``--workers``."""

    size: _Count
    in_use: _Count
    queued: _Count


class Health(Struct, frozen=True):
    """The answer of ``GET /health``; ``reason`` only while degraded."""

    status: Literal["healthy", "degraded"]
    version: str
    store: str
    cache_stats: CacheStats
    telemetry: Telemetry
    uptime: _Seconds
    running_commands: _Count
    slots: SlotUse
    reason: str | UnsetType = UNSET
    #: Seconds an ended job is kept (--job-retention): what ``runcache mcp --server``
    #: offers its MCP tasks' time to live from (absent from servers before it).
    job_retention: _Seconds | UnsetType = UNSET


class HitSample(Struct, frozen=True):
    """The cache's counts at one moment (``at``, seconds since the epoch): hits and
    misses since the last clear, as ``GET /api/cache/stats`` answered then."""

    at: Annotated[float, Meta(ge=0, description="Seconds since the epoch.")]
    hits: _Count
    misses: _Count


class PolicyRule(Request, frozen=True, kw_only=True):
    """A rule of ``--policy``: what it matches (exactly one of ``match``, a shell-style
    pattern on the whole command, and ``program``, its first word's base name) and what
    it sets where a request leaves it out (``cache`` false: nothing cached)."""

    match: Annotated[str, Meta(min_length=1, extra={"type": "match must be a string"})] | None = (
        None
    )
    program: (
        Annotated[str, Meta(min_length=1, extra={"type": "program must be a string"})] | None
    ) = None
    ttl: Ttl | None = None
    stale: Stale | None = None
    timeout: Timeout | None = None
    inputs: Inputs | None = None
    cache_exit_codes: CacheExitCodes | None = None
    scope: Scope | None = None
    cache: Annotated[bool, Meta(extra={"type": "cache must be true or false"})] = True


class PolicyAnswer(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/policy``: the file the rules came from (empty without
    ``--policy``) and the rules, in the order they are matched."""

    source: str
    rules: list[PolicyRule]


class CacheHistory(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/cache/history``: a sample every ``interval`` seconds
    since the server started, oldest first, the last hour of them at most."""

    interval: _Seconds
    samples: list[HitSample]


class Cleared(Struct, frozen=True):
    """The answer of ``POST /api/cache/clear``, fixed to the letter by the user's spec."""

    success: Literal[True] = True
    message: Literal["Cache cleared"] = "Cache cleared"


class Live(Struct, frozen=True):
    """The answer of ``GET /livez``."""

    status: Literal["ok"] = "ok"


class Error(Struct, frozen=True):
    """Every error answer: what is wrong, in one sentence."""

    error: str


#: Every shape the API sends or takes, named as the OpenAPI components name them.
SHAPES: tuple[type[Struct], ...] = (
    CommandRequest,
    CommandResult,
    CacheStats,
    Telemetry,
    Health,
    CacheHistory,
    PolicyAnswer,
    Cleared,
    Live,
    Error,
)

encode = msgspec.json.Encoder().encode

_decoders: dict[type[Struct], msgspec.json.Decoder[Any]] = {}


def _loose_number(text: str) -> float | str:
    """A JSON number with a fraction or exponent; past any float's range, its text,
    which no number field accepts, so it is reported as its field's type problem."""
    value = float(text)
    return value if math.isfinite(value) else text


_any_decoder = msgspec.json.Decoder(float_hook=_loose_number)


def decode_command_request(body: bytes) -> CommandRequest:
    """Decode and check a ``POST /api/command`` body; BadRequest says what is wrong."""
    if not body.strip():
        raise BadRequest(COMMAND_REQUIRED)
    return decode_request(CommandRequest, body)


def decode_request(shape: type[S], body: bytes) -> S:
    """Decode and check a request of ``shape``; BadRequest says what is wrong.

    The checked decode is one pass. Only a body it refuses is decoded again,
    loosely, to find the first field (in declaration order) that is wrong and
    answer with that field's message.
    """
    decoder = _decoders.get(shape)
    if decoder is None:
        decoder = _decoders[shape] = msgspec.json.Decoder(shape)
    try:
        decoded: S = decoder.decode(body)
        return decoded
    except msgspec.ValidationError:
        pass
    except _MALFORMED as error:
        raise _malformed(error, body) from None
    try:
        payload = _any_decoder.decode(body)
    except _MALFORMED as error:  # past the wrong value the checked decode stopped at
        raise _malformed(error, body) from None
    raise BadRequest(_first_problem(shape, payload))


#: A body that is not JSON (msgspec 0.19 to 0.22 report invalid UTF-8 in a string as a
#: UnicodeDecodeError, 0.23 as a DecodeError), or one whose arrays or objects nest deeper
#: than Python's recursion limit (about 1,000 deep, even in a field no shape declares: it
#: is skipped by recursion too), a RecursionError.
_MALFORMED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _malformed(error: Exception, body: bytes) -> BadRequest:
    """The 400 for a body that is not JSON. Invalid UTF-8 is told in runcache's own words,
    found by decoding the body (only on this error path), since msgspec's wording for it
    changed between releases and counts bytes of the string alone."""
    if isinstance(error, RecursionError):
        return BadRequest(NESTED_TOO_DEEP)
    try:
        body.decode()
    except UnicodeDecodeError as bad:
        return BadRequest(
            f"request body must be valid JSON: it is not UTF-8 ({bad.reason} at byte {bad.start})"
        )
    return BadRequest(f"request body must be valid JSON: {error}")


#: What a body nested past the decoder's recursion limit answers.
NESTED_TOO_DEEP = (
    "request body is nested too deeply: its arrays and objects may nest a few hundred deep"
)

#: The most digits a whole number in a query string or header may have: enough for any
#: offset (2**63 has 19), far below the 4,300 past which ``int()`` refuses a string.
MAX_DIGITS = 20


def whole_number(text: str) -> int | None:
    """``text`` as a whole number, or None unless it is 1 to ``MAX_DIGITS`` ASCII digits.

    Every integer the HTTP layer reads from a query string or a header goes through
    here, so none reaches ``int()`` unbounded (whose ValueError past 4,300 digits
    would be an unexpected error, a 500) or as a digit ``int()`` refuses (``"²"``
    passes ``str.isdigit``).
    """
    if not (0 < len(text) <= MAX_DIGITS and text.isascii() and text.isdigit()):
        return None
    return int(text)


def _first_problem(shape: type[Struct], payload: object) -> str:
    """The message of the first field of ``shape`` that ``payload`` gets wrong."""
    if not isinstance(payload, dict):
        return "request body must be a JSON object"
    info = msgspec.inspect.type_info(shape)
    assert isinstance(info, msgspec.inspect.StructType)
    hints = typing.get_type_hints(shape, include_extras=True)
    for field in info.fields:
        value = payload.get(field.encode_name, UNSET)
        messages = _messages(field.type)
        if value is UNSET or (value is None and field.required):
            if field.required:
                return messages["missing"]
            continue
        try:
            msgspec.convert(value, hints[field.name], strict=True)
        except msgspec.ValidationError as error:
            return _message_for(messages, value, str(error), field.name)
    known = [field.encode_name for field in info.fields]
    unknown = next((name for name in payload if name not in known), None)
    if unknown is not None:
        return unknown_field(unknown, known)
    return "request body is not valid"


def unknown_field(name: str, known: list[str]) -> str:
    """The message for a field no shape declares, with the closest known one, if any."""
    by_lower = {field.lower(): field for field in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    hint = (
        f"; did you mean {by_lower[close[0]]!r}?"
        if close
        else f"; known fields: {', '.join(known)}"
    )
    return f"unknown field {name!r}{hint}"


def _messages(field_type: msgspec.inspect.Type) -> dict[str, str]:
    """The messages a field declares in its ``Meta(extra=...)``."""
    if isinstance(field_type, msgspec.inspect.UnionType):
        for member in field_type.types:
            if not isinstance(member, msgspec.inspect.NoneType):
                return _messages(member)
    if isinstance(field_type, msgspec.inspect.Metadata):
        return dict(field_type.extra or {})
    return {}


_TYPE_ERROR = re.compile(r"^Expected `[^`]+`, got `")


def _message_for(messages: dict[str, str], value: object, error: str, name: str) -> str:
    if isinstance(value, str) and "\x00" in value and "nul" in messages:
        return messages["nul"]
    kind = "type" if _TYPE_ERROR.match(error) or "out of range" in error else "constraint"
    if kind == "constraint" and "length <=" in error and "too_long" in messages:
        kind = "too_long"
    return messages.get(kind) or messages.get("type") or f"{name} is not valid: {error}"


def command_request_schema(
    bounds: dict[str, tuple[float, float]], pools: bool = True
) -> dict[str, Any]:
    """The request's JSON Schema with this server's bounds and defaults written in:
    ``bounds`` maps each bounded field (timeout, ttl, stale) to its (most, default).
    Without ``pools`` (a store that holds none), ``pool`` may only be null: a pool's
    name would be refused, and the schema says what this server accepts."""
    schema: dict[str, Any] = schema_components()["CommandRequest"]
    properties = schema["properties"]
    if not pools:
        properties["pool"] = {
            "type": "null",
            "default": None,
            "description": "This server's store is not a redis:// one, so it has no worker "
            "pools: it runs every command itself.",
        }
    for name, (limit, default) in bounds.items():
        number = next(
            option for option in properties[name]["anyOf"] if option.get("type") == "number"
        )
        number["maximum"] = limit
        properties[name]["default"] = default
    return schema


def schema_components(ref_template: str = "#/components/schemas/{name}") -> dict[str, Any]:
    """The JSON Schemas of every shape, keyed by name, referring to each other by
    ``ref_template``; a fresh copy each call, free to edit."""
    _, components = msgspec.json.schema_components(SHAPES, ref_template=ref_template)
    return _closed(components, SHAPES)


def shape_schema(shape: type[Struct]) -> dict[str, Any]:
    """One shape's JSON Schema on its own, as an MCP tool's input or output schema:
    its fields at the root, and the shapes it holds (only those) under ``$defs``."""
    _, components = msgspec.json.schema_components((shape,), ref_template="#/$defs/{name}")
    schema: dict[str, Any] = _closed(components, (shape,)).pop(shape.__name__)
    return {**schema, "$defs": components} if components else schema


def _closed(components: dict[str, Any], shapes: tuple[type[Struct], ...]) -> dict[str, Any]:
    """Answers allow no field they do not list; requests ignore those they do not know.
    A shape's schema also states what ``_SCHEMA_EXTRAS`` holds for it."""
    requests = {shape.__name__ for shape in shapes if issubclass(shape, Request)}
    for name, schema in components.items():
        if name not in requests:
            schema["additionalProperties"] = False
        schema.update(copy.deepcopy(_SCHEMA_EXTRAS.get(name, {})))
    return components


def to_builtins(value: Struct) -> dict[str, Any]:
    """A shape as plain JSON-ready Python objects (for MCP's structured content), the
    shapes it holds too; unset fields are left out, as when encoded."""
    built: dict[str, Any] = msgspec.to_builtins(value)
    return built


# -- jobs: background runs, following, paging and steering a run ------------------

JobStatus = Literal["running", "paused", "completed", "failed", "timed_out", "cancelled"]
#: A job's id: URL-safe characters (the engine makes hex ones). One declaration for the
#: paths that name a job, the MCP tools' arguments and every answer that carries one.
JOB_ID_PATTERN = "^[A-Za-z0-9_-]+$"
JobId = Annotated[
    str,
    Meta(
        pattern=JOB_ID_PATTERN,
        description="The job's URL-safe id.",
        extra={
            "missing": "job_id is required",
            "type": "job_id must be a string",
            "constraint": "job_id must be a job id (letters, digits, _ and -)",
        },
    ),
]
_CacheKey = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]


class JobAccepted(Struct, frozen=True):
    """The 202 answer of ``POST /api/command`` with ``"background": true``;
    ``pid`` is null for a job answered from the cache."""

    job_id: JobId
    status: JobStatus
    cache_key: _CacheKey
    pid: int | None


class JobRecord(Struct, frozen=True, kw_only=True):
    """One job as ``GET /api/jobs`` lists it. ``return_code`` once it has ended;
    ``error`` only when it ended without running (every slot stayed busy, say)."""

    job_id: JobId
    command: str
    status: JobStatus
    pid: int | None
    started_at: Annotated[float, Meta(ge=0, description="Seconds since the epoch.")]
    runtime: _Seconds
    stdout_bytes: _Count
    stderr_bytes: _Count
    last_output: str
    cache_key: _CacheKey
    background: bool
    #: Answered from the cache (a background request's hit): it never had a process.
    cached: bool = False
    return_code: int | UnsetType = UNSET
    error: str | UnsetType = UNSET
    #: With a shared store: the server running the job, ``host:pid:suffix``.
    instance: str | UnsetType = UNSET


class JobDetail(JobRecord, frozen=True, kw_only=True):
    """The answer of ``GET /api/jobs/{job_id}``: the record, and once it has ended
    the result exactly as ``POST /api/command`` answers it."""

    result: CommandResult | UnsetType = UNSET


class JobList(Struct, frozen=True):
    """The answer of ``GET /api/jobs``: running jobs and recent ones, newest first."""

    jobs: list[JobRecord]


class JobOutput(Struct, frozen=True):
    """A page of one stream of a job: ``GET /api/jobs/{job_id}/output``.

    Offsets count bytes of the captured stream; ``data`` never splits a UTF-8
    character, so ``next_offset`` may stop short of ``offset + limit``.
    """

    data: str
    offset: _Count
    next_offset: _Count
    total_bytes: _Count
    eof: bool


class JobAction(Struct, frozen=True, kw_only=True):
    """The answer of ``POST /api/jobs/{job_id}/cancel``, ``/pause`` and ``/resume``;
    one that cannot be done now answers 409 instead."""

    success: Literal[True] = True
    job_id: JobId
    status: JobStatus


SHAPES = (*SHAPES, JobAccepted, JobRecord, JobDetail, JobList, JobOutput, JobAction)


# -- the process routes kept from the reference API (spec/processes.md) -------------
# Their names and shapes are the reference's, so its clients work unchanged:
# answers carry "success", and a pid that names no run answers 404 with
# ``ProcessFailure`` rather than the one error shape.

ProcessStatus = Literal["running", "paused", "terminated", "completed"]
TaskStatus = Literal["running", "completed", "failed"]
_Pid = Annotated[int, Meta(ge=1, description="The pid of the run's process-group leader.")]
_Timestamp = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
_Duration = Annotated[str, Meta(pattern=r"^\d+\.\ds$", examples=["12.3s"])]


class Process(Struct, frozen=True, kw_only=True):
    """One run as the process routes show it. ``progress`` is 0.0 and the eta
    ``"Unknown"``: a shell command says nothing of how far along it is."""

    pid: _Pid
    command: str
    status: ProcessStatus
    start_time: Annotated[float, Meta(ge=0, description="Seconds since the epoch.")]
    progress: Annotated[float, Meta(ge=0, le=1)]
    last_output: Annotated[str, Meta(max_length=200)]
    bytes_processed: _Count
    runtime_formatted: _Duration
    eta_formatted: str
    #: With a shared store: the server running the run, ``host:pid:suffix``.
    instance: str | UnsetType = UNSET


class ProcessList(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/processes/list``: running and paused runs by pid."""

    success: Literal[True] = True
    active_processes: dict[Annotated[str, Meta(pattern=r"^\d+$")], Process]
    total_count: _Count


class ProcessDetail(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/processes/status/{pid}``."""

    success: Literal[True] = True
    process: Process


class ProcessDone(Struct, frozen=True, kw_only=True):
    """The answer of ``POST /api/processes/terminate|pause|resume/{pid}``."""

    success: Literal[True] = True
    message: str


class ProcessFailure(Struct, frozen=True, kw_only=True):
    """The 404 of a process route: no run has this pid, or it cannot do this now."""

    success: Literal[False] = False
    error: str


class DashboardEntry(Struct, frozen=True, kw_only=True):
    """One run on the dashboard: ``command`` cut to 60 characters (then "...")."""

    pid: _Pid
    command: Annotated[str, Meta(max_length=63)]
    status: ProcessStatus
    runtime: _Duration
    progress_percent: Annotated[str, Meta(pattern=r"^\d+\.\d%$", examples=["0.0%"])]
    progress_bar: str
    eta: str
    bytes_processed: _Count
    last_output: Annotated[str, Meta(max_length=100)]


class SystemLoad(Struct, frozen=True):
    cpu_percent: Annotated[float, Meta(ge=0)]
    memory_percent: Annotated[float, Meta(ge=0)]
    active_connections: _Count


class Dashboard(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/processes/dashboard``."""

    timestamp: _Timestamp
    total_processes: _Count
    processes: list[DashboardEntry]
    system_load: SystemLoad


class TaskSubmitted(Struct, frozen=True, kw_only=True):
    """The answer of ``POST /api/process/execute-async``; ``task_id`` is the job's id."""

    success: Literal[True] = True
    task_id: JobId
    command: str
    status: Literal["submitted"] = "submitted"
    timestamp: _Timestamp


class TaskState(Struct, frozen=True, kw_only=True):
    """Where a task stands: its result once it has ended (null if it never ran)."""

    status: TaskStatus
    result: CommandResult | None
    execution_time: _Seconds


class TaskResult(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/process/get-task-result/{task_id}``."""

    success: Literal[True] = True
    task_id: JobId
    result: TaskState
    timestamp: _Timestamp


SHAPES = (
    *SHAPES,
    ProcessList,
    ProcessDetail,
    ProcessDone,
    ProcessFailure,
    Dashboard,
    TaskSubmitted,
    TaskResult,
)


# -- cache entries: listing, reading, deleting and invalidating what the cache holds --

_EpochSeconds = Annotated[float, Meta(ge=0, description="Seconds since the epoch.")]


class CacheEntry(Struct, frozen=True, kw_only=True):
    """One cached result as ``GET /api/cache/entries`` lists it. ``hits`` are this
    entry's since it was stored. An entry stored by a runcache older than these
    fields has an empty ``command`` and a ``created_at`` of 0."""

    cache_key: str
    command: str
    bytes: _Count
    created_at: _EpochSeconds
    expires_at: _EpochSeconds
    hits: _Count
    return_code: int
    #: The scope of the request that stored it; null for none.
    scope: Scope | None = None


class CacheEntryList(Struct, frozen=True, kw_only=True):
    """The answer of ``GET /api/cache/entries``: live entries, newest first;
    ``next_offset`` asks for the next page, null after the last."""

    entries: list[CacheEntry]
    next_offset: _Count | None


class CacheEntryDetail(CacheEntry, frozen=True, kw_only=True):
    """The answer of ``GET /api/cache/entries/{cache_key}``: the entry, and the
    result it holds as ``POST /api/command`` answers it, without the flags."""

    result: StoredResult


def _not_empty(name: str, description: str) -> Meta:
    """A string of at least one character, with the messages for ``name``."""
    return Meta(
        min_length=1,
        description=description,
        extra={
            "type": f"{name} must be a string",
            "constraint": f"{name} must not be empty",
        },
    )


#: The longest ``glob`` an invalidation takes. Each of its characters is a step of the
#: regular expression matched against every command in the cache: a megabyte of ``*a``
#: held the event loop for seconds; real patterns are a command line long.
MAX_GLOB = 1024


class InvalidateRequest(Request, frozen=True):
    """The body of ``POST /api/cache/invalidate``: at most one of ``prefix`` and ``glob``,
    and ``scope``, or both (a conjunction: the scope's entries whose command matches)."""

    prefix: (
        Annotated[str, _not_empty("prefix", "Delete the entries whose command starts with this.")]
        | UnsetType
    ) = UNSET
    glob: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=MAX_GLOB,
                description="Delete the entries whose whole command matches this shell-style "
                f"pattern (*, ?, [abc], [!abc]), at most {MAX_GLOB} characters.",
                extra={
                    "type": "glob must be a string",
                    "constraint": "glob must not be empty",
                    "too_long": f"glob must be at most {MAX_GLOB} characters",
                },
            ),
        ]
        | UnsetType
    ) = UNSET
    scope: (
        Annotated[
            str,
            _scope(
                "Delete the entries of this scope (with prefix or glob: those of "
                "them whose command matches)."
            ),
        ]
        | UnsetType
    ) = UNSET


#: What the JSON Schema of a shape states beyond its fields.
_SCHEMA_EXTRAS: dict[str, dict[str, Any]] = {
    "InvalidateRequest": {
        "anyOf": [{"required": ["prefix"]}, {"required": ["glob"]}, {"required": ["scope"]}],
        "not": {"required": ["prefix", "glob"]},
    },
    **dict.fromkeys(
        ("RunRequest", "CommandRequest", "ExecuteRequest"),
        {
            # refresh stores the new result, use_cache false stores nothing: not both.
            "not": {
                "required": ["refresh", "use_cache"],
                "properties": {"refresh": {"const": True}, "use_cache": {"const": False}},
            },
        },
    ),
}

INVALIDATE_ONE = 'give one of "prefix" and "glob", a "scope", or a scope and one of them'


def decode_invalidate_request(body: bytes) -> InvalidateRequest:
    """Decode and check a ``POST /api/cache/invalidate`` body; BadRequest says what is wrong."""
    if not body.strip():
        raise BadRequest(f"the body must be a JSON object: {INVALIDATE_ONE}")
    request = decode_request(InvalidateRequest, body)
    commands = (request.prefix is not UNSET) + (request.glob is not UNSET)
    if commands > 1 or (commands == 0 and request.scope is UNSET):
        raise BadRequest(INVALIDATE_ONE)
    return request


class Deleted(Struct, frozen=True, kw_only=True):
    """The answer of ``DELETE /api/cache/entries/{cache_key}`` and of
    ``POST /api/cache/invalidate``: how many entries went."""

    success: Literal[True] = True
    deleted: _Count


SHAPES = (*SHAPES, CacheEntryList, CacheEntryDetail, InvalidateRequest, Deleted)


# -- worker pools: what each pool has now ---------------------------------------------


class PoolCounts(Struct, frozen=True):
    """One worker pool now: its live workers (their heartbeat has not lapsed), the
    commands queued for them, and those they run. Read from Redis, so every server
    sharing the store answers the same figures."""

    pool: Annotated[str, Meta(pattern=POOL_PATTERN)]
    workers: _Count
    queued: _Count
    running: _Count


class PoolList(Struct, frozen=True):
    """The answer of ``GET /api/pools``: every pool a worker ever joined on this store,
    by name (none without a redis:// store)."""

    pools: list[PoolCounts]


SHAPES = (*SHAPES, PoolList)


# -- query strings: a page of output, a page of entries ------------------------------
# Declared once, for the routes that read them from a query string (decode_query), the
# OpenAPI document's parameters and the MCP tool that reads a page (mcp/shapes.py).

#: Bytes a page of output holds unless the request asks for fewer (or more, up to
#: MAX_PAGE_BYTES).
DEFAULT_PAGE_BYTES = 65536
MAX_PAGE_BYTES = 1 << 20

#: The largest offset a page may start at.
MAX_OFFSET = 1 << 62

#: Entries a page lists unless the request asks for fewer (or more, up to MAX_LIST).
DEFAULT_LIST = 100
MAX_LIST = 1000


def _whole(name: str, low: int, high: int, description: str) -> Meta:
    """A whole number from ``low`` to ``high``: one message whatever is wrong with it,
    the one the API has always given."""
    message = f"{name} must be a whole number from {low} to {high}"
    return Meta(
        ge=low, le=high, description=description, extra={"type": message, "constraint": message}
    )


PageStream = Annotated[
    Literal["stdout", "stderr"],
    Meta(
        description="The stream to read.",
        extra_json_schema={"type": "string"},  # msgspec leaves it to the enum
        extra={"type": "stream must be stdout or stderr"},
    ),
]
PageOffset = Annotated[int, _whole("offset", 0, MAX_OFFSET, "The first byte to read.")]
PageLimit = Annotated[int, _whole("limit", 1, MAX_PAGE_BYTES, "Most bytes to read.")]


class PageQuery(Request, frozen=True):
    """A page of one stream of output, by byte offsets: the query of
    ``GET /api/jobs/{job_id}/output`` and ``GET /api/cache/entries/{cache_key}/output``."""

    stream: PageStream = "stdout"
    offset: PageOffset = 0
    limit: PageLimit = DEFAULT_PAGE_BYTES


class EntryListQuery(Request, frozen=True):
    """A page of the cache's entries: the query of ``GET /api/cache/entries``."""

    prefix: Annotated[str, Meta(description="Only entries whose command starts with this.")] = ""
    scope: Annotated[str, _scope("Only entries of this scope.")] | None = None
    offset: Annotated[int, _whole("offset", 0, MAX_OFFSET, "Entries to skip.")] = 0
    limit: Annotated[int, _whole("limit", 1, MAX_LIST, "Most entries to list.")] = DEFAULT_LIST


def decode_query(shape: type[S], query: Mapping[str, str]) -> S:
    """A query string checked against ``shape``; BadRequest says what is wrong.

    Whole numbers are read by :func:`whole_number`, as every number the HTTP layer
    reads (``+5``, ``1e3`` or a 5,000-digit offset is refused, not converted). A
    parameter the shape does not declare is ignored (unlike a body's unknown field): a
    query string carries what caches and browsers add (``_=1733…``), not a request's
    intent.
    """
    known = _field_names(shape)
    payload: dict[str, object] = {name: value for name, value in query.items() if name in known}
    for name in _number_fields(shape):
        text = payload.get(name)
        if isinstance(text, str):
            number = whole_number(text)
            payload[name] = text if number is None else number
    try:
        return msgspec.convert(payload, shape)
    except msgspec.ValidationError:
        raise BadRequest(_first_problem(shape, payload)) from None


@functools.cache
def _field_names(shape: type[Struct]) -> frozenset[str]:
    """The names (as sent) of ``shape``'s fields."""
    info = msgspec.inspect.type_info(shape)
    assert isinstance(info, msgspec.inspect.StructType)
    return frozenset(field.encode_name for field in info.fields)


@functools.cache
def _number_fields(shape: type[Struct]) -> tuple[str, ...]:
    """The names (as sent) of ``shape``'s whole-number fields; the same for every request."""
    info = msgspec.inspect.type_info(shape)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple(
        field.encode_name
        for field in info.fields
        if isinstance(
            field.type.type if isinstance(field.type, msgspec.inspect.Metadata) else field.type,
            msgspec.inspect.IntType,
        )
    )
