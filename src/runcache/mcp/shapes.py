"""The MCP tools' own shapes: the arguments and answers the HTTP API has no body for.

Like :mod:`runcache.wire`, whose building blocks they reuse, each is declared
once: it is the tool's input or output schema, and the checking of its
arguments with the same one-line messages the API gives.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from runcache import wire
from runcache.engine.job_answers import MAX_PAGE_BYTES

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
    str,
    Meta(
        pattern="^[A-Za-z0-9_-]+$",
        description="The job's id, as start_command or execute_command returned it.",
        extra={
            "missing": "job_id is required",
            "type": "job_id must be a string",
            "constraint": "job_id must be a job id (letters, digits, _ and -)",
        },
    ),
]
Stream = Annotated[
    Literal["stdout", "stderr"],
    Meta(description="Which stream to read.", extra={"type": "stream must be stdout or stderr"}),
]
Offset = Annotated[
    int,
    Meta(
        ge=0,
        description="The byte of the stream to start at.",
        extra={"type": "offset must be a whole number", "constraint": "offset must be 0 or more"},
    ),
]
Limit = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_PAGE_BYTES,
        description="The most bytes to return.",
        extra={
            "type": "limit must be a whole number",
            "constraint": f"limit must be from 1 to {MAX_PAGE_BYTES}",
        },
    ),
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


class OutputRequest(wire.Request, frozen=True):
    """The arguments of ``read_output``: a page of one stream of a job, by byte offsets."""

    job_id: JobId
    stream: Stream = "stdout"
    offset: Offset = 0
    limit: Limit = DEFAULT_READ_BYTES


class ProcessRef(wire.Request, frozen=True):
    """The arguments of the reference's process tools."""

    pid: Pid
