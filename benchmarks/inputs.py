"""Inputs in the key: what naming a command's input files costs a hit, and the stat pass.

Run:  python3 benchmarks/inputs.py [--seconds 3] [--rounds 3] [--connections 8]
          [--files 10000]

Two parts, each a ratio of two things measured in this run:

1. Over HTTP, one ``runcache serve`` (memory store): cached hits of a command
   keyed on 10 input files of 4 KiB, named as 10 paths (an ``lstat`` each on the
   event loop: no file is read, their stats unchanged) and as one glob
   (``src/*.txt``: listed and stat'ed in a worker thread), against hits of the same
   command without inputs, rounds rotating which goes first. Goal for the paths:
   >= 0.8.
2. In this process, on ``--files`` unchanged files of 4 KiB in a tree: the stat pass
   a hit makes (``Inputs.snapshot`` with the memo warm) against hashing them all
   (the memo cold, as the first request), in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _harness import Server
from _loadgen import Load, load, median_load, ratio_line
from runcache.run.inputs import Inputs

COMMAND = "echo inputs-benchmark"


def http_part(args: argparse.Namespace, work: Path) -> None:
    src = work / "src"
    src.mkdir()
    for number in range(10):
        (src / f"{number}.txt").write_bytes(bytes([65 + number]) * 4096)
    paths = [f"src/{number}.txt" for number in range(10)]
    bodies = {
        "plain": {"command": COMMAND, "cwd": str(work)},
        "paths": {"command": COMMAND, "cwd": str(work), "inputs": paths},
        "glob": {"command": COMMAND, "cwd": str(work), "inputs": ["src/*.txt"]},
    }
    encoded = {name: json.dumps(body).encode() for name, body in bodies.items()}
    runs: dict[str, list[Load]] = {name: [] for name in bodies}
    with Server(["--store", "memory://"]) as server:
        for name, body in bodies.items():
            server.request("POST", "/api/command", body)  # cached from now on
            load(server, "POST", "/api/command", encoded[name], args.connections, 1.0)
        for round_number in range(args.rounds):
            order = list(encoded.items())
            order = order[round_number % 3 :] + order[: round_number % 3]  # rotated
            for name, data in order:
                runs[name].append(
                    load(server, "POST", "/api/command", data, args.connections, args.seconds)
                )
    print(
        f"HTTP hits, memory store, {args.connections} connections, {args.rounds} rounds of "
        f"{args.seconds}s, order alternating"
    )
    medians = {name: median_load(found) for name, found in runs.items()}
    for name, found in medians.items():
        print(f"hits {name:7} {found.describe()}")
    print(
        ratio_line(
            "hits keyed on 10 input paths / plain hits", medians["paths"], medians["plain"], 0.8
        )
    )
    print(
        ratio_line(
            "hits keyed on a glob of 10 files / plain hits", medians["glob"], medians["plain"]
        )
    )


def stat_part(args: argparse.Namespace, work: Path) -> None:
    tree = work / "tree"
    for number in range(args.files):
        folder = tree / f"d{number // 500}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{number}.txt").write_bytes(number.to_bytes(4, "big") * 1024)
    cold, warm = [], []
    for _ in range(3):
        inputs = Inputs(args.files, 1 << 40)
        started = time.perf_counter()
        first = inputs.snapshot(str(tree), ["**/*.txt"])
        cold.append(time.perf_counter() - started)
        started = time.perf_counter()
        again = inputs.snapshot(str(tree), ["**/*.txt"])
        warm.append(time.perf_counter() - started)
        assert first.digest == again.digest
    stat_ms, hash_ms = statistics.median(warm) * 1e3, statistics.median(cold) * 1e3
    print(
        f"{args.files} unchanged files of 4 KiB: the stat pass (memo warm) {stat_ms:.0f} ms, "
        f"hashing them all (memo cold) {hash_ms:.0f} ms: the stat pass takes "
        f"{stat_ms / hash_ms:.2f} of hashing"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--files", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        http_part(args, Path(scratch))
        stat_part(args, Path(scratch))


if __name__ == "__main__":
    main()
