"""Encoding a run's result as JSON once, in the form the cache stores and the API serves.

Output can be tens of megabytes. Decoding it to one ``str`` and handing that to
a JSON encoder holds the raw bytes, the text and the encoder's growing buffer
at once, more than three times the output. Here the output is decoded and
escaped a slice at a time, and the raw buffer is released before the pieces
are joined, so at most about twice the output is held.

The output cap counts what is sent, not what was captured: a byte the command
printed can take six in JSON (a NUL is ``\u0000``), so each stream's JSON
is cut at ``limit`` bytes (at a whole character and a whole escape) and the
stream marked truncated. An answer is then at most twice the cap plus its
summary, whatever the command printed.

The escaping is orjson's, the one JSON this package does not leave to msgspec:
it escapes output 1.5 to 5 times faster (``benchmarks/hot_path_costs.py``), and
a run's output can be megabytes.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import orjson
from msgspec import UNSET

from runcache.run.runner import RunResult
from runcache.wire import RunSummary, encode

#: Bytes of output decoded and escaped per step.
SLICE_BYTES = 1 << 20


def encode_result(
    result: RunResult,
    key: str,
    limit: int | None = None,
    inputs: Sequence[str] | None = None,
) -> bytes:
    """The result as a :class:`~runcache.wire.StoredResult`, consuming its output buffers.

    The summary is encoded by its declaration; the output strings, which may be
    megabytes, are spliced in after it as pieces escaped a slice at a time, each
    at most ``limit`` bytes of JSON.
    """
    partial_results = result.partial_results  # read before the buffers are consumed
    stdout, stdout_cut = json_string_pieces(result.stdout, limit)
    stderr, stderr_cut = json_string_pieces(result.stderr, limit)
    summary = encode(
        RunSummary(
            return_code=result.return_code,
            success=result.success,
            timed_out=result.timed_out,
            partial_results=partial_results,
            stdout_truncated=result.stdout_truncated or stdout_cut,
            stderr_truncated=result.stderr_truncated or stderr_cut,
            execution_time=round(result.execution_time, 6),
            timestamp=result.timestamp,
            cache_key=key,
            cancelled=result.cancelled,
            inputs=list(inputs) if inputs else UNSET,
        )
    )
    return b"".join([summary[:-1], b',"stdout":', *stdout, b',"stderr":', *stderr, b"}"])


def json_string_pieces(data: bytearray, limit: int | None = None) -> tuple[list[bytes], bool]:
    """``data`` as a JSON string in pieces (invalid UTF-8 becomes U+FFFD), with at most
    ``limit`` bytes between its quotes, and whether it had to be cut there; empties ``data``."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    view = memoryview(data)
    pieces = [b'"']
    used = 0
    cut = False
    for start in range(0, len(data), SLICE_BYTES):
        end = start + SLICE_BYTES
        text = decoder.decode(view[start:end], final=end >= len(data))
        piece = orjson.dumps(text)[1:-1]
        if limit is not None and used + len(piece) > limit:
            pieces.append(_escaped_prefix(text, limit - used))
            cut = True
            break
        pieces.append(piece)
        used += len(piece)
    pieces.append(b'"')
    view.release()
    data.clear()
    return pieces, cut


def _escaped_prefix(text: str, budget: int) -> bytes:
    """The longest start of ``text`` whose JSON escape fits in ``budget`` bytes, escaped."""
    low, high = 0, min(len(text), budget)  # a character takes at least one byte
    while low < high:
        middle = (low + high + 1) // 2
        if len(orjson.dumps(text[:middle])) - 2 <= budget:
            low = middle
        else:
            high = middle - 1
    return orjson.dumps(text[:low])[1:-1]
