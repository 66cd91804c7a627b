"""Strict about what it is told, on the command line: a misspelt option is refused with
the closest one, and nothing runs (the API and MCP cases are in test_api and test_mcp)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_a_misspelt_run_option_is_refused_naming_the_closest_and_runs_nothing(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    done = subprocess.run(
        [sys.executable, "-m", "runcache", "run", "--timeot", "5", "--", "touch", str(marker)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "--timeot" in done.stderr and "--timeout" in done.stderr
    assert not marker.exists()
