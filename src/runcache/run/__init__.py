"""Running one command: the runner, its containment and limits, what it is given.

Knows nothing above it.
"""
