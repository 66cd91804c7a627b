"""Allow ``python -m runcache``."""

from runcache.cli import main

main()
