"""The ``runcache`` command's entry point, and ``python -m runcache``.

A cached ``runcache run`` is answered before the CLI is imported
(:mod:`runcache.client.cached`: a few milliseconds, where click, the engine and
the stores take hundreds); anything else goes to :func:`runcache.cli.main`.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Answer from the cache if the light path can, else run the full CLI."""
    from runcache.client.cached import answer

    answer(sys.argv[1:])  # ends the process if it answered
    from runcache.cli import main as full

    full()


if __name__ == "__main__":
    main()
