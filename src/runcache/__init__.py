"""runcache: run command-line commands for AI agents and scripts, and cache their results."""

__version__ = "0.1.0"
