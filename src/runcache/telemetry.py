"""Counts of what the engine ran, and a cheap look at the machine it runs on."""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

import psutil

from runcache.runner import RunResult


class Telemetry:
    """Execution counts since start; system metrics that never block a request.

    ``psutil.cpu_percent(interval=None)`` compares against the previous call
    instead of sampling for a while, so it is primed here once and every later
    read is immediate.
    """

    def __init__(self, disk_path: str = "/") -> None:
        self.started = time.monotonic()
        self._disk_path = disk_path
        self._lock = threading.Lock()
        self._executed = 0
        self._succeeded = 0
        self._failed = 0
        self._timed_out = 0
        self._execution_seconds = 0.0
        self._cache_hits = 0
        psutil.cpu_percent(interval=None)

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    def record_run(self, result: RunResult) -> None:
        with self._lock:
            self._executed += 1
            self._execution_seconds += result.execution_time
            if result.success:
                self._succeeded += 1
            else:
                self._failed += 1
            if result.timed_out:
                self._timed_out += 1

    def record_hit(self) -> None:
        with self._lock:
            self._cache_hits += 1

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of ``GET /api/telemetry``."""
        with self._lock:
            executed = self._executed
            succeeded = self._succeeded
            counts = {
                "commands_executed": executed,
                "commands_succeeded": succeeded,
                "commands_failed": self._failed,
                "commands_timed_out": self._timed_out,
                "cache_hits_served": self._cache_hits,
                "total_execution_time": round(self._execution_seconds, 6),
            }
            average = self._execution_seconds / executed if executed else 0.0
        rate = succeeded / executed * 100 if executed else 0.0
        return {
            "uptime_seconds": round(self.uptime, 3),
            **counts,
            "success_rate": f"{rate:.1f}%",
            "average_execution_time": f"{average:.2f}s",
            "system_metrics": self._system_metrics(),
        }

    def _system_metrics(self) -> dict[str, float]:
        disk = shutil.disk_usage(self._disk_path)
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "memory_percent": psutil.virtual_memory().percent,
            "disk_usage": round(disk.used / disk.total * 100, 1) if disk.total else 0.0,
        }
