"""The MCP tools' own shapes: the arguments and answers the HTTP API has no body for.

Like :mod:`runcache.wire`, whose building blocks they reuse, each is declared
once: it is the tool's input or output schema, and the checking of its
arguments with the same one-line messages the API gives.
"""

from __future__ import annotations

import difflib
from typing import Annotated

from msgspec import Meta

from runcache import wire
from runcache.errors import ConfigError

#: Characters of each stream an ``execute_command`` answer holds unless told otherwise.
DEFAULT_OUTPUT_CHARS = 20_000

#: Bytes a ``read_output`` page holds unless told otherwise: well inside what agents read.
DEFAULT_READ_BYTES = 20_000

#: The most characters a tool's result may hold, as a tool declares it to clients
#: (``_meta["anthropic/maxResultSizeChars"]``): an ``execute_command`` answer with both
#: streams at the default cut, its JSON escapes, the cut notes and the other fields.
MAX_RESULT_CHARS = 2 * DEFAULT_OUTPUT_CHARS + 10_000

#: Every tool, in the order ``tools/list`` gives them.
TOOL_NAMES = (
    "execute_command",
    "start_command",
    "read_output",
    "job_status",
    "cancel_job",
    "get_cache_stats",
    "clear_cache",
    "server_health",
    "get_telemetry",
    "list_active_processes",
    "get_process_status",
    "terminate_process",
    "pause_process",
    "resume_process",
    "get_process_dashboard",
)

#: The tools offered unless ``--mcp-tools`` says otherwise: what agents do (run and wait,
#: start, read output, status, cancel, cache stats; clear for a caller with the admin
#: right), in a ``tools/list`` small enough to sit in every conversation.
DEFAULT_TOOLS = TOOL_NAMES[:7]


def selected_tools(setting: str) -> tuple[str, ...]:
    """The tools ``--mcp-tools`` names: ``default``, ``all``, or names separated by commas
    (``default`` may be one of them). An unknown name stops the start, naming the closest.

    Kept here, beside the shapes, rather than with the tools: ``runcache serve`` checks
    the setting at start without importing the MCP SDK.
    """
    chosen: set[str] = set()
    for name in (part.strip() for part in setting.split(",")):
        if name == "all":
            chosen.update(TOOL_NAMES)
        elif name == "default":
            chosen.update(DEFAULT_TOOLS)
        elif name in TOOL_NAMES:
            chosen.add(name)
        else:
            close = difflib.get_close_matches(name, (*TOOL_NAMES, "all", "default"), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--mcp-tools: no tool {name!r}{hint}")
    return tuple(name for name in TOOL_NAMES if name in chosen)


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
        description="The pid of the run's leader, as list_active_processes shows it.",
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
