"""`systemd-analyze verify` on every unit in systemd/, with ExecStart pointed at the real
console script of this checkout (the unit's own path exists only on an installed host)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script

UNITS = sorted((Path(__file__).parents[2] / "systemd").glob("*.service"))


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _analyzer_usable(tmp_path: Path) -> str:
    """Empty when systemd-analyze can verify here, else the reason it cannot."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    result = _verify(probe)
    return "" if result.returncode == 0 else f"systemd-analyze cannot run here: {result.stderr}"


def _local_copy(unit: Path, tmp_path: Path) -> Path:
    text = unit.read_text()
    match = re.search(r"^ExecStart=(\S+)(.*)$", text, re.M)
    assert match, f"{unit.name} has no ExecStart"
    script = console_script(Path(match.group(1)).name)
    assert len(script) == 1, f"console script {script} is not installed in this venv"
    copy = tmp_path / unit.name
    copy.write_text(text.replace(match.group(0), f"ExecStart={script[0]}{match.group(2)}"))
    return copy


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit: Path, tmp_path: Path) -> None:
    reason = _analyzer_usable(tmp_path)
    if reason:
        print(reason)
        pytest.skip(reason)
    copy = _local_copy(unit, tmp_path)
    result = _verify(copy)
    complaints = [line for line in result.stderr.splitlines() if copy.name in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if a bad unit fails it."""
    reason = _analyzer_usable(tmp_path)
    if reason:
        pytest.skip(reason)
    unit = tmp_path / "broken.service"
    unit.write_text("[Service]\nType=bogus\nExecStart=/nonexistent/bin\n")
    result = _verify(unit)
    assert result.returncode != 0 or "broken.service" in result.stderr


def test_nodeagent_unit_essentials() -> None:
    text = (Path(__file__).parents[2] / "systemd" / "nodeagent.service").read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=shapeshifter-nodeagent",
        "CapabilityBoundingSet=CAP_SYS_ADMIN",
        "DeviceAllow=char-nvidia* rw",
        "After=network-online.target nvidia-persistenced.service",
    ):
        assert line in text, line
