"""The MCP tools' own shapes: the arguments and answers the HTTP API has no body for.

Like :mod:`runcache.wire`, whose building blocks they reuse, each is declared
once: it is the tool's input or output schema, and the checking of its
arguments with the same one-line messages the API gives.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from runcache import wire

#: Characters of each stream an ``execute_command`` answer holds unless told otherwise.
DEFAULT_OUTPUT_CHARS = 20_000

#: Bytes a ``read_output`` page holds unless told otherwise: well inside what agents read.
DEFAULT_READ_BYTES = 20_000

MaxOutputChars = Annotated[
    int,
    Meta(
        ge=0,
        description="The most characters of stdout (and of stderr) to return: a longer "
        "stream comes back as its head and its tail, with a line between them "
        "saying how much was left out and how to read it (read_output). "
        "0 returns the output whole.",
        extra={
            "type": "max_output_chars must be a whole number",
            "constraint": "max_output_chars must be 0 or more",
        },
    ),
]
JobId = Annotated[
    wire.JobId, Meta(description="The job's id, as start_command or execute_command returned it.")
]
Pid = Annotated[
    int,
    Meta(
        ge=1,
        description="The pid of the run's process-group leader.",
        extra={
            "missing": "pid is required",
            "type": "pid must be a whole number",
            "constraint": "pid must be a positive whole number",
        },
    ),
]


class ExecuteRequest(wire.RunRequest, frozen=True):
    """The arguments of ``execute_command``: a run, and how much of its output to return."""

    max_output_chars: MaxOutputChars = DEFAULT_OUTPUT_CHARS


class ExecuteResult(wire.CommandResult, frozen=True, kw_only=True):
    """``execute_command``'s answer: the result of ``POST /api/command`` (its output cut
    to ``max_output_chars`` when longer), and the job that ran or answered it."""

    job_id: str


class JobRef(wire.Request, frozen=True):
    """The arguments of the tools that act on one job."""

    job_id: JobId


class OutputRequest(wire.PageQuery, frozen=True, kw_only=True):
    """The arguments of ``read_output``: the page query of ``GET /api/jobs/{job_id}/output``,
    with a smaller page unless told otherwise, and the job."""

    limit: wire.PageLimit = DEFAULT_READ_BYTES
    job_id: JobId


class ProcessRef(wire.Request, frozen=True):
    """The arguments of the reference's process tools."""

    pid: Pid
