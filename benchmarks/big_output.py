"""A command printing 50 MB: time of the miss and of the hit, and the server's peak RSS.

Run:  python3 benchmarks/big_output.py [--megabytes 50]

Starts ``runcache serve`` with the output cap raised above the output size,
runs the command once (a miss: it runs, is encoded once and stored) and then
again (a hit: the stored JSON is sent as it is), reading the whole body each
time. Peak RSS is the server's VmHWM from /proc. It prints the hit's time, the
hit/miss ratio, and peak RSS as a multiple of the output size. Goals: the hit
answers in under 0.1 s and peak RSS stays under 3x the output size.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _harness import Server


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc: this benchmark needs Linux")


def timed_request(server: Server, body: bytes) -> tuple[float, dict[str, object]]:
    connection = server.connection(timeout=300)
    began = time.perf_counter()
    connection.request(
        "POST", "/api/command", body=body, headers={"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - began
    connection.close()
    return elapsed, json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    size = args.megabytes * 1_000_000
    cap = str(size + (1 << 20))
    command = f"head -c {size} /dev/zero | tr '\\0' a"
    body = json.dumps({"command": command}).encode()
    with Server(["--max-output-bytes", cap]) as server:
        baseline = peak_rss(server.process.pid)
        miss_time, miss = timed_request(server, body)
        hit_time, hit = timed_request(server, body)
        peak = peak_rss(server.process.pid)
    assert miss["cached"] is False and hit["cached"] is True
    assert isinstance(hit["stdout"], str) and len(hit["stdout"]) == size
    print(
        f"output {size / 1e6:.0f} MB; server RSS before the first request {baseline / 1e6:.0f} MB"
    )
    print(f"miss (run, encode, store, send): {miss_time:.3f} s")
    print(
        f"hit (send the stored JSON):      {hit_time:.3f} s "
        f"({'meets' if hit_time < 0.1 else 'MISSES'} the goal of < 0.1 s)"
    )
    print(f"hit / miss time: {hit_time / miss_time:.3f}")
    ratio = peak / size
    print(
        f"peak RSS {peak / 1e6:.0f} MB = {ratio:.2f}x the output "
        f"({'meets' if ratio < 3 else 'MISSES'} the goal of < 3x)"
    )


if __name__ == "__main__":
    main()
