"""What a cache hit must not spend: encoding JSON with the json module, and an INFO log line;
and why a run's output is escaped with orjson while every other JSON goes through msgspec.

Run:  python3 benchmarks/hot_path_costs.py

Times, in the same run, ``json.dumps`` and ``msgspec.json.encode`` of a small result;
a formatted INFO log line against a DEBUG call that is filtered out (what a hit costs
at the default level); and ``orjson.dumps`` against ``msgspec.json.encode`` of a key's
context (encoded on every hit that has one) and of 1 MiB of output, ASCII and mixed
(what ``run/encode.py`` escapes for each MiB a command prints). Prints µs per call
(best of 5 repeats) and the ratios. This is why results are encoded once with a fast
encoder, hits log at DEBUG, and output is escaped with orjson.
"""

from __future__ import annotations

import io
import json
import logging
import timeit
from collections.abc import Callable
from functools import partial

import msgspec
import orjson

RESULT = {
    "stdout": "hi\n",
    "stderr": "",
    "return_code": 0,
    "success": True,
    "timed_out": False,
    "partial_results": False,
    "stdout_truncated": False,
    "stderr_truncated": False,
    "execution_time": 0.001,
    "timestamp": "2026-11-26T23:21:13.058620+00:00",
    "cache_key": "c" * 64,
}


#: A key's context, as ``run/context.py`` encodes one (keys sorted).
CONTEXT = {"cwd": "/home/user/project", "env": {"LANG": "C.UTF-8", "TERM": "xterm"}, "stdin": ""}

#: Output: a MiB of plain ASCII, and text with quotes, tabs and non-ASCII to escape.
OUTPUT_ASCII = "a" * (1 << 20)
OUTPUT_MIXED = ('build step "ok"\t→ done\n' * 50_000)[: 1 << 19]


def microseconds(call: Callable[[], object], number: int = 100_000) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def main() -> None:
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger = logging.getLogger("runcache.benchmark")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    stdlib = microseconds(lambda: json.dumps(RESULT))
    fast = microseconds(lambda: msgspec.json.encode(RESULT))
    info = microseconds(lambda: logger.info("%s hit %r", "127.0.0.1", "echo hi"), 20_000)
    debug = microseconds(lambda: logger.debug("%s hit %r", "127.0.0.1", "echo hi"))
    print(f"json.dumps {stdlib:.2f} µs, msgspec {fast:.2f} µs: msgspec {stdlib / fast:.1f}x")
    sorted_keys = msgspec.json.Encoder(order="sorted")
    _compare(
        "key context",
        lambda: orjson.dumps(CONTEXT, option=orjson.OPT_SORT_KEYS),
        lambda: sorted_keys.encode(CONTEXT),
        100_000,
    )
    outputs = (("1 MiB ASCII output", OUTPUT_ASCII), ("512 Ki characters mixed", OUTPUT_MIXED))
    for name, text in outputs:
        _compare(name, partial(orjson.dumps, text), partial(msgspec.json.encode, text), 200)
    print(f"INFO log line {info:.2f} µs, filtered DEBUG call {debug:.3f} µs: {info / debug:.0f}x")


def _compare(
    name: str, with_orjson: Callable[[], object], with_msgspec: Callable[[], object], number: int
) -> None:
    ours, theirs = microseconds(with_orjson, number), microseconds(with_msgspec, number)
    print(
        f"{name}: orjson {ours:.2f} µs, msgspec {theirs:.2f} µs: "
        f"msgspec / orjson {theirs / ours:.2f}"
    )


if __name__ == "__main__":
    main()
