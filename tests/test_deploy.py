"""deploy/: the systemd unit passes systemd's own check, and its example settings exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runcache.config import settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "runcache.service"
ENV_FILE = ROOT / "deploy" / "runcache.env"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """Checked as shipped but for its two paths, which point at this install instead."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package")
    runcache = Path(sys.executable).with_name("runcache")
    assert runcache.exists(), f"{runcache} is missing: install runcache into this environment"
    text = UNIT.read_text()
    assert "ExecStart=/opt/runcache/.venv/bin/runcache serve" in text
    unit = tmp_path / "runcache.service"
    unit.write_text(
        text.replace("/opt/runcache/.venv/bin/runcache", str(runcache)).replace(
            "/etc/runcache/runcache.env", str(ENV_FILE)
        )
    )
    checked = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown or misspelt keys are only warnings: any line at all fails the test.
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")


def test_the_unit_leaves_namespaces_to_containment() -> None:
    """Runs are contained in user, PID and mount namespaces: hardening that refuses them
    would quietly turn containment down to the process group."""
    keys = {
        line.split("=", 1)[0]
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    }
    assert not keys & {"RestrictNamespaces", "PrivateUsers", "SystemCallFilter"}
    assert {"User", "NoNewPrivileges", "ProtectSystem", "StateDirectory"} <= keys


def test_every_setting_the_example_names_exists() -> None:
    known = {setting.env_var for setting in settings()}
    named = set(re.findall(r"^#?\s*(RUNCACHE_[A-Z_]+)=", ENV_FILE.read_text(), re.MULTILINE))
    assert named and named <= known, named - known
