"""Clients of a runcache server: over HTTP, or an engine in the same process."""
