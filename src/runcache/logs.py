"""The server log's two formats: a readable line, or one JSON object a line.

``--log-format json`` is for log collectors: each line is an object with
``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, then the fields
the line was logged with (``extra=``: a run's line carries ``client``,
``command``, ``return_code`` and ``execution_time``), and ``exception`` with the
traceback when there is one. A command is request-controlled text; in the text
format it is quoted (``%r``) so it cannot forge a line, in JSON it is a JSON
string. Neither format ever holds a token or a command's output: nothing logs them.

A command is logged (here and in the audit log) cut to :data:`LOGGED_COMMAND_CHARS`
characters followed by how much was cut and the whole command's SHA-256
(:func:`loggable`), so a client cannot wash earlier lines out of a rotated log with
a few huge commands, and two long commands still differ in their logged form.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec

FORMATS = ("text", "json")

#: The most characters of a command any log line holds (then its length and digest).
LOGGED_COMMAND_CHARS = 1000

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

#: What every LogRecord has; anything else on a record came with ``extra=``.
#: (uvicorn adds ``color_message``, its message with terminal colours: left out.)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, the line's own fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[
                :-6
            ]
            + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD and name not in entry:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return msgspec.json.encode(entry, enc_hook=str).decode()


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``--log-format``."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def loggable(command: str, limit: int = LOGGED_COMMAND_CHARS) -> str:
    """``command`` as every log writes it: whole up to ``limit`` characters; past it, its
    first ``limit`` characters and ``… [+N chars, sha256 <first 16 hex digits>]``."""
    if len(command) <= limit:
        return command
    digest = hashlib.sha256(command.encode(errors="surrogatepass")).hexdigest()[:16]
    return f"{command[:limit]}… [+{len(command) - limit} chars, sha256 {digest}]"
