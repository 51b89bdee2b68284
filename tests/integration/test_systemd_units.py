"""`systemd-analyze verify` on every unit in systemd/, with ExecStart pointed at the real
console script of this checkout (the unit's own path exists only on an installed host)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import console_script

SYSTEMD_DIR = Path(__file__).parents[2] / "systemd"
UNITS = sorted(SYSTEMD_DIR.glob("*.service"))


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
    text = text.replace(match.group(0), f"ExecStart={script[0]}{match.group(2)}")
    # Helpers the unit runs from /opt/shapeshifter/libexec ship in systemd/ (README install).
    text = re.sub(r"/opt/shapeshifter/libexec/(\S+)", lambda m: str(SYSTEMD_DIR / m.group(1)), text)
    copy = tmp_path / unit.name
    copy.write_text(text)
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
        "DeviceAllow=char-nvidia* rwm",
        "After=network-online.target nvidia-persistenced.service nvidia-fabricmanager.service",
        "Wants=network-online.target nvidia-persistenced.service nvidia-fabricmanager.service",
        "ExecStartPre=+/opt/shapeshifter/libexec/nvidia-caps-nodes",
        "CacheDirectory=shapeshifter-nodeagent",
    ):
        assert line in text, line


def _unit_settings(name: str) -> dict[str, list[str]]:
    """KEY -> every value it is given in the unit (comments skipped)."""
    settings: dict[str, list[str]] = {}
    for line in (SYSTEMD_DIR / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, f"unexpected time span {value!r}"
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_engine_caches_are_writable_under_the_sandbox() -> None:
    """ProtectSystem=strict + ProtectHome: every cache an engine writes must point into the
    unit's CacheDirectory (%C = /var/cache), the only writable place besides the state dir."""
    settings = _unit_settings("nodeagent.service")
    assert "strict" in settings["ProtectSystem"] and "yes" in settings["ProtectHome"]
    cache_dir = f"%C/{settings['CacheDirectory'][0]}"
    env = dict(item.split("=", 1) for item in settings["Environment"])
    for var in (
        "HOME", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR",
        "VLLM_CACHE_ROOT", "FLASHINFER_WORKSPACE_BASE", "CUDA_CACHE_PATH", "HF_HOME",
    ):  # fmt: skip
        assert var in env, f"{var} is not set: it defaults to a read-only place"
        assert env[var] == cache_dir or env[var].startswith(cache_dir + "/"), (var, env[var])


def test_mig_device_nodes_need_no_mknod_at_runtime() -> None:
    settings = _unit_settings("nodeagent.service")
    assert "CAP_MKNOD" not in " ".join(settings["CapabilityBoundingSet"])  # engines inherit it
    assert settings["DeviceAllow"] == ["char-nvidia* rwm"]
    pre = settings["ExecStartPre"]
    assert pre == ["+/opt/shapeshifter/libexec/nvidia-caps-nodes"]  # privileged, before start
    assert (SYSTEMD_DIR / "nvidia-caps-nodes").stat().st_mode & 0o111  # shipped executable


def test_stop_timeout_covers_the_worst_engine_stop() -> None:
    """With engines.stop_on_exit each engine is drained, SIGTERMed (vLLM --shutdown-timeout),
    then SIGKILLed after the grace and waited for once more; systemd must not cut that short."""
    from nodeagent.config import EnginesConfig
    from nodeagent.engines.spec import InstanceSpec

    engines = EnginesConfig()
    drain_s = InstanceSpec.__dataclass_fields__["drain_timeout_s"].default
    agent_s = 5.0  # gRPC grace 2 s, link and sampler stop
    worst_s = drain_s + engines.shutdown_timeout_s + 2 * engines.kill_grace_s + agent_s
    stop_s = _seconds(_unit_settings("nodeagent.service")["TimeoutStopSec"][0])
    assert stop_s >= worst_s, (stop_s, worst_s)


def _caps_env(tmp_path: Path, minors: str | None, devices: str) -> dict[str, str]:
    recorder = tmp_path / "mknod"
    recorder.write_text(
        '#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n'
        'while [ "$#" -gt 4 ]; do shift; done\ntouch "$1"\n'  # the node path: 4th from the end
    )
    recorder.chmod(0o755)
    (tmp_path / "devices").write_text(devices)
    env = {
        "PATH": "/usr/bin:/bin", "MKNOD": str(recorder),
        "NVIDIA_CAPS_MINORS": str(tmp_path / "mig-minors"),
        "NVIDIA_PROC_DEVICES": str(tmp_path / "devices"), "NVIDIA_CAPS_DIR": str(tmp_path / "caps"),
    }  # fmt: skip
    if minors is not None:
        (tmp_path / "mig-minors").write_text(minors)
    return env


def _run_caps(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = str(SYSTEMD_DIR / "nvidia-caps-nodes")
    return subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)


def test_caps_nodes_created_for_every_minor_once(tmp_path: Path) -> None:
    minors = "config 1\nmonitor 2\ngpu0/gi1/access 12\ngpu0/gi1/ci0/access 13\n"
    env = _caps_env(tmp_path, minors, "Character devices:\n195 nvidia\n508 nvidia-caps\n")
    first = _run_caps(env)
    assert first.returncode == 0, first.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    caps = tmp_path / "caps"
    assert calls == [
        f"-m 0400 {caps}/nvidia-cap1 c 508 1",
        f"-m 0400 {caps}/nvidia-cap2 c 508 2",
        f"-m 0444 {caps}/nvidia-cap12 c 508 12",
        f"-m 0444 {caps}/nvidia-cap13 c 508 13",
    ]
    again = _run_caps(env)  # idempotent: existing nodes are kept
    assert again.returncode == 0 and "created 0 node(s)" in again.stdout
    assert len((tmp_path / "calls").read_text().splitlines()) == 4


def test_caps_nodes_without_mig_driver_is_a_no_op(tmp_path: Path) -> None:
    result = _run_caps(_caps_env(tmp_path, None, "195 nvidia\n"))
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert not (tmp_path / "calls").exists() and not (tmp_path / "caps").exists()


def test_caps_nodes_fail_loudly_without_the_caps_major(tmp_path: Path) -> None:
    result = _run_caps(_caps_env(tmp_path, "config 1\n", "195 nvidia\n"))
    assert result.returncode == 1 and "no nvidia-caps device" in result.stderr
    assert not (tmp_path / "calls").exists()
