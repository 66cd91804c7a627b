"""The worst case for the output cap: NUL bytes, six bytes of JSON each (``\\u0000``).

Run:  python3 benchmarks/output_cap.py [--runs 10] [--megabytes 8]

Starts ``runcache serve`` with the default cap (8 MiB per stream) and runs, all
at once, ``--runs`` uncached commands that each print ``--megabytes`` MiB of
NULs on stdout and on stderr. It prints the size of one answer against the
cap, and the server's peak RSS (VmHWM from /proc) before and after. Goals: an
answer is at most twice the cap plus 1 KiB (the cap counts the JSON sent, not
the bytes printed); the peak grows by less than 48 MiB per run.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import Server

#: The default --max-output-bytes.
CAP = 8 << 20


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc: this benchmark needs Linux")


def answer_size(server: Server, megabytes: int, index: int) -> int:
    size = megabytes << 20
    command = f"head -c {size} /dev/zero; head -c {size} /dev/zero >&2; : {index}"
    connection = server.connection(timeout=300)
    connection.request(
        "POST",
        "/api/command",
        body=json.dumps({"command": command, "use_cache": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    response = connection.getresponse()
    data = response.read()
    connection.close()
    answer = json.loads(data)
    assert answer["stdout_truncated"] and answer["stderr_truncated"], "not cut"
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=8)
    args = parser.parse_args()
    with Server(["--max-concurrent", str(args.runs)]) as server:
        baseline = peak_rss(server.process.pid)
        with ThreadPoolExecutor(args.runs) as pool:
            sizes = list(
                pool.map(lambda index: answer_size(server, args.megabytes, index), range(args.runs))
            )
        peak = peak_rss(server.process.pid)
    largest = max(sizes)
    print(
        f"{args.runs} runs at once, each printing {args.megabytes} MiB of NULs on stdout "
        f"and on stderr; cap {CAP >> 20} MiB per stream"
    )
    print(
        f"largest answer {largest:,} bytes = {largest / CAP:.3f}x the cap "
        f"({'meets' if largest <= 2 * CAP + 1024 else 'MISSES'} the goal of <= 2x + 1 KiB)"
    )
    grown = (peak - baseline) / args.runs
    print(
        f"server peak RSS {baseline >> 20} -> {peak >> 20} MiB: {grown / (1 << 20):.0f} MiB "
        f"per run ({'meets' if grown < 48 << 20 else 'MISSES'} the goal of < 48 MiB)"
    )


if __name__ == "__main__":
    main()
