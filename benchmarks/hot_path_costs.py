"""What a cache hit must not spend: encoding JSON with the json module, and an INFO log line.

Run:  python3 benchmarks/hot_path_costs.py

Times, in the same run, ``json.dumps`` and ``orjson.dumps`` of a small result,
and a formatted INFO log line against a DEBUG call that is filtered out (what a
hit costs at the default level). Prints µs per call (best of 5 repeats) and the
ratios. This is why results are encoded once with orjson and hits log at DEBUG.
"""

from __future__ import annotations

import io
import json
import logging
import timeit
from collections.abc import Callable

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
    fast = microseconds(lambda: orjson.dumps(RESULT))
    info = microseconds(lambda: logger.info("%s hit %r", "127.0.0.1", "echo hi"), 20_000)
    debug = microseconds(lambda: logger.debug("%s hit %r", "127.0.0.1", "echo hi"))
    print(f"json.dumps {stdlib:.2f} µs, orjson.dumps {fast:.2f} µs: orjson {stdlib / fast:.1f}x")
    print(f"INFO log line {info:.2f} µs, filtered DEBUG call {debug:.3f} µs: {info / debug:.0f}x")


if __name__ == "__main__":
    main()
