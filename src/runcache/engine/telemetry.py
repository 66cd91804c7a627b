"""Counts of what the engine ran, and a cheap look at the machine it runs on."""

from __future__ import annotations

import shutil
import threading
import time

import psutil

from runcache.run.runner import RunResult
from runcache.wire import SystemMetrics
from runcache.wire import Telemetry as TelemetryAnswer


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

    def snapshot(self) -> TelemetryAnswer:
        """The answer of ``GET /api/telemetry``."""
        with self._lock:
            executed, succeeded, seconds = self._executed, self._succeeded, self._execution_seconds
            failed, timed_out, hits = self._failed, self._timed_out, self._cache_hits
        return TelemetryAnswer(
            uptime_seconds=round(self.uptime, 3),
            commands_executed=executed,
            commands_succeeded=succeeded,
            commands_failed=failed,
            commands_timed_out=timed_out,
            cache_hits_served=hits,
            total_execution_time=round(seconds, 6),
            success_rate=f"{succeeded / executed * 100 if executed else 0.0:.1f}%",
            average_execution_time=f"{seconds / executed if executed else 0.0:.2f}s",
            system_metrics=self._system_metrics(),
        )

    def _system_metrics(self) -> SystemMetrics:
        disk = shutil.disk_usage(self._disk_path)
        return SystemMetrics(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_percent=psutil.virtual_memory().percent,
            disk_usage=round(disk.used / disk.total * 100, 1) if disk.total else 0.0,
        )
