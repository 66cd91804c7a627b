"""The wire: checking a command request without HTTP, and its schema saying exactly that."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import hypothesis.strategies as st
import msgspec
import pytest
from hypothesis import given, settings
from jsonschema import Draft202012Validator

from runcache import wire
from runcache.engine.callers import Caller
from runcache.engine.engine import Engine
from runcache.errors import BadRequest
from runcache.wire import COMMAND_PATTERN, COMMAND_REQUIRED, CommandRequest, decode_command_request
from test_api import BAD_COMMAND_BODIES

#: The bounds the property's schema is written with (the default settings).
MAX_TIMEOUT, MAX_TTL = 3600.0, 2592000.0

NUL_MESSAGE = "command must not contain NUL characters"

#: Who the engine logs and audits as asking, in these tests.
CALLER = Caller("test")


def refusal(body: bytes) -> str:
    """The message decoding refuses ``body`` with; fails the test if it is accepted."""
    with pytest.raises(BadRequest) as refused:
        decode_command_request(body)
    assert refused.value.status == 400
    return refused.value.message


@pytest.mark.parametrize(("body", "message"), BAD_COMMAND_BODIES)
def test_every_bad_body_gets_the_api_message_without_http(
    engine: Engine, body: bytes, message: str
) -> None:
    if "must be at most" in message:
        # Decoding knows no server's bounds: the engine refuses these, before running anything.
        request = decode_command_request(body)
        with pytest.raises(BadRequest, match=message):
            asyncio.run(engine.run(request, CALLER))
        assert engine.telemetry.snapshot().commands_executed == 0
    else:
        assert message in refusal(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"ttl": 0, "timeout": "x", "use_cache": 1, "command": 5}', "command must be a string"),
        (
            b'{"ttl": 0, "timeout": "x", "use_cache": 1, "command": "echo"}',
            "use_cache must be true or false",
        ),
        (b'{"ttl": 0, "timeout": -1, "command": "echo"}', "timeout must be greater than 0 seconds"),
        (b'{"ttl": {}, "timeout": null, "command": "echo"}', "ttl must be a number of seconds"),
        (b'{"use_cache": "no", "command": "   "}', COMMAND_REQUIRED),
        (b'{"timeout": 0, "command": "echo \\u0000"}', NUL_MESSAGE),
        (b'{"ttl": -5, "use_cache": null, "command": "echo"}', "use_cache must be true or false"),
        # A number past any float's range is refused in another way, but in the same order.
        (b'{"ttl": 1e400, "command": 5}', "command must be a string"),
        (
            b'{"ttl": "x", "timeout": 1e400, "command": "echo"}',
            "timeout must be a number of seconds",
        ),
        (b'{"ttl": 1e400, "timeout": 5.5, "command": "echo"}', "ttl must be a number of seconds"),
    ],
)
def test_the_first_wrong_field_in_declaration_order_is_reported(body: bytes, message: str) -> None:
    assert refusal(body) == message


def test_the_declaration_order_of_a_command_request() -> None:
    info = msgspec.inspect.type_info(CommandRequest)
    assert isinstance(info, msgspec.inspect.StructType)
    names = [field.encode_name for field in info.fields]
    assert names == [
        "command",
        "use_cache",
        "timeout",
        "ttl",
        "refresh",
        "stale",
        "cwd",
        "env",
        "stdin",
        "cache_exit_codes",
        "inputs",
        "pass_env",
        "scope",
        "pool",
        "retries",
        "background",
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"command": "echo hi", "timeot": 5}', "unknown field 'timeot'; did you mean 'timeout'?"),
        (
            b'{"command": "echo hi", "TIMEOUT": 5}',
            "unknown field 'TIMEOUT'; did you mean 'timeout'?",
        ),
        (
            b'{"Command": "echo hi", "command": "x"}',
            "unknown field 'Command'; did you mean 'command'?",
        ),
        (
            b'{"command": "echo hi", "extra": [1]}',
            "unknown field 'extra'; known fields: command, use_cache, timeout, ttl, refresh, "
            "stale, cwd, env, stdin, cache_exit_codes, inputs, pass_env, scope, pool, retries, "
            "background",
        ),
        # A known field's own problem is named first.
        (b'{"timeot": 5, "command": "echo hi", "ttl": -1}', "ttl must be greater than 0 seconds"),
    ],
)
def test_an_unknown_field_is_refused_naming_the_closest_known_one(
    body: bytes, message: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        decode_command_request(body)
    assert refused.value.message == message


def test_a_full_request_decodes_to_its_fields() -> None:
    body = b'{"command": "ls", "use_cache": false, "timeout": 2, "ttl": 0.5}'
    assert decode_command_request(body) == CommandRequest("ls", False, 2.0, 0.5)


@pytest.mark.parametrize("field", ["timeout", "ttl"])
@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"9" * 400])
def test_a_number_out_of_float_range_is_not_a_number_of_seconds(field: str, number: bytes) -> None:
    body = b'{"command": "echo", "%s": %s}' % (field.encode(), number)
    assert refusal(body) == f"{field} must be a number of seconds"


# What a command may be: the schema's pattern, the decoder and JSON Schema validation
# must agree on each of these, and on what is expected of it.
TRICKY_COMMANDS = [
    ("", False),
    (" ", False),
    ("\t\n\r\x0b\x0c", False),
    ("\u3000", False),  # ideographic space
    ("\xa0\u2028\u2029\u3000 ", False),
    ("\x00", False),
    ("echo\x00", False),
    ("\x00echo", False),
    (" \x00 ", False),
    ("echo hi\x00\n", False),
    ("\nls", True),
    ("ls\n", True),
    ("\nls\n", True),
    ("ls\n\n", True),
    ("\u3000ls", True),
    (" x ", True),
    ("echo 'ünï ✓'", True),
]


@pytest.mark.parametrize(("command", "accepted"), TRICKY_COMMANDS)
def test_the_command_pattern_accepts_exactly_what_decoding_accepts(
    command: str, accepted: bool
) -> None:
    body = json.dumps({"command": command}).encode()
    try:
        decoded = decode_command_request(body)
    except BadRequest as error:
        assert error.message == (NUL_MESSAGE if "\x00" in command else COMMAND_REQUIRED)
        decodes = False
    else:
        assert decoded.command == command
        decodes = True
    matches = re.search(COMMAND_PATTERN, command) is not None
    schema = wire.schema_components()["CommandRequest"]
    valid = Draft202012Validator(schema).is_valid({"command": command})
    assert (decodes, matches, valid) == (accepted, accepted, accepted)


# -- the property: the request schema says exactly what the server accepts -----------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
_seconds = st.one_of(
    st.floats(min_value=0, max_value=MAX_TIMEOUT, exclude_min=True),
    st.floats(min_value=-10, max_value=MAX_TTL * 2),
    st.integers(min_value=-10, max_value=int(MAX_TTL * 2)),
    st.sampled_from(
        [
            0,
            0.0,
            -0.0,
            5e-324,
            MAX_TIMEOUT,
            MAX_TIMEOUT + 1e-9,
            3601,
            MAX_TTL,
            MAX_TTL + 1,
            1e308,
            10**400,
            None,
            True,
            "5",
        ]
    ),
    _json_values,
)
_commands = st.one_of(
    st.from_regex(r"[a-z]{1,8}( [a-z0-9-]{1,8}){0,3}", fullmatch=True),
    st.text(),
    st.text(
        alphabet=st.sampled_from(
            [" ", "\t", "\n", "\r", "\x0b", "\x00", "\u3000", "\xa0", "a", "é"]
        )
    ),
)
_KNOWN = {"command", "use_cache", "timeout", "ttl"}
_requests = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries(
        {"command": _commands},
        optional={"use_cache": st.booleans() | _json_values, "timeout": _seconds, "ttl": _seconds},
    ),
    st.dictionaries(
        st.text(max_size=6).filter(lambda name: name not in _KNOWN), _json_values, max_size=2
    ),
)

_REQUEST_SCHEMA = Draft202012Validator(
    wire.command_request_schema({"timeout": (MAX_TIMEOUT, 300), "ttl": (MAX_TTL, 3600)})
)


def _accepted(body: bytes) -> bool:
    """Whether the server takes ``body``: it decodes, and its bounds are the server's."""
    try:
        request = decode_command_request(body)
    except BadRequest:
        return False
    return (request.timeout is None or request.timeout <= MAX_TIMEOUT) and (
        request.ttl is None or request.ttl <= MAX_TTL
    )


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(payload=_requests)
def test_the_request_schema_allows_exactly_what_the_server_accepts(
    payload: dict[str, Any],
) -> None:
    body = json.dumps(payload).encode()
    assert _accepted(body) == _REQUEST_SCHEMA.is_valid(payload), body
