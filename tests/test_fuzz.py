"""Schemathesis against a real server: no 5xx, and every response as /openapi.json says.

The server is a real ``runcache serve`` process on loopback, with a token (so
the auth paths are exercised too) and an allowlist of two harmless commands,
so whatever command text the fuzzer invents, at most ``echo`` or ``true`` runs.
Examples are bounded and derandomized: the run is reproducible and quick.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import LiveServer

TOKEN = "fuzz-token-0123456789abcdef"

#: Every operation fuzzed, as "METHOD path": all that /openapi.json describes
#: except itself, which schemathesis leaves out as the document it loaded.
OPERATIONS = {
    "POST /api/command",
    "GET /api/cache/stats",
    "POST /api/cache/clear",
    "GET /api/telemetry",
    "GET /health",
    "GET /livez",
}

CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]

EXAMPLES_PER_OPERATION = 25


def test_fuzzed_requests_get_no_5xx_and_match_the_schema(
    live_server_factory: Callable[..., LiveServer],
) -> None:
    server = live_server_factory(
        "--allow", "echo,true", "--max-timeout", "5", "--default-timeout", "5",
        env={"RUNCACHE_TOKEN": TOKEN},
    )
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} == OPERATIONS
    for operation in operations:
        _fuzz(operation.as_strategy(), server.url, CHECKS)
        if operation.body:
            _fuzz(operation.as_strategy(), server.url, CHECKS, runs=True)
            _fuzz(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), server.url,
                  [*CHECKS, negative_data_rejection])
    ran = [line for line in server.output if " ran " in line]
    assert ran, "no fuzzed command ran: the fuzzing only reached the refusals"
    assert not any("Traceback" in line for line in server.output), "".join(server.output)


def _fuzz(
    cases: st.SearchStrategy[schemathesis.Case],
    base_url: str,
    checks: list[schemathesis.CheckFunction],
    runs: bool = False,
) -> None:
    """Send bounded, reproducible examples; with ``runs``, commands start with an allowed name.

    Text the fuzzer invents rarely starts with ``echo`` or ``true``, so on its own it
    would reach only the refusals; ``runs`` puts an allowed executable in front of the
    fuzzed text (quoted or not), so results of real runs are checked as well.
    """
    if runs:
        cases = st.builds(_runnable, cases, st.sampled_from(["echo", "true"]), st.booleans())

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(
            base_url=base_url, headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks
        )

    fuzz()


def _runnable(case: schemathesis.Case, executable: str, quote: bool) -> schemathesis.Case:
    if isinstance(case.body, dict) and isinstance(case.body.get("command"), str):
        text = case.body["command"]
        case.body["command"] = f"{executable} {shlex.quote(text) if quote else text}"
    return case
