"""Encoding a run's result as JSON once, in the form the cache stores and the API serves.

Output can be tens of megabytes. Decoding it to one ``str`` and handing that to
a JSON encoder holds the raw bytes, the text and the encoder's growing buffer
at once, more than three times the output. Here the output is decoded and
escaped a slice at a time, and the raw buffer is released before the pieces
are joined, so at most about twice the output is held.
"""

from __future__ import annotations

import codecs

import orjson

from runcache.runner import RunResult
from runcache.wire import RunSummary, encode

#: Bytes of output decoded and escaped per step.
SLICE_BYTES = 1 << 20


def encode_result(result: RunResult, key: str) -> bytes:
    """The result as a :class:`~runcache.wire.StoredResult`, consuming its output buffers.

    The summary is encoded by its declaration; the output strings, which may be
    megabytes, are spliced in after it as pieces escaped a slice at a time.
    """
    summary = encode(RunSummary(
        return_code=result.return_code,
        success=result.success,
        timed_out=result.timed_out,
        partial_results=result.partial_results,
        stdout_truncated=result.stdout_truncated,
        stderr_truncated=result.stderr_truncated,
        execution_time=round(result.execution_time, 6),
        timestamp=result.timestamp,
        cache_key=key,
        cancelled=result.cancelled,
    ))
    stdout = json_string_pieces(result.stdout)
    stderr = json_string_pieces(result.stderr)
    return b"".join([summary[:-1], b',"stdout":', *stdout, b',"stderr":', *stderr, b"}"])


def json_string_pieces(data: bytearray) -> list[bytes]:
    """``data`` as a JSON string in pieces (invalid UTF-8 becomes U+FFFD); empties ``data``."""
    if len(data) <= SLICE_BYTES:
        pieces = [orjson.dumps(data.decode("utf-8", errors="replace"))]
    else:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        view = memoryview(data)
        pieces = [b'"']
        for start in range(0, len(data), SLICE_BYTES):
            end = start + SLICE_BYTES
            text = decoder.decode(view[start:end], final=end >= len(data))
            pieces.append(orjson.dumps(text)[1:-1])
        pieces.append(b'"')
        view.release()
    data.clear()
    return pieces
