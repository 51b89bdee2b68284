"""scripts/gpu-check against the stateful fake pynvml (injected as tests/unit/test_gpu_nvml.py
does): every check reported, nothing written to the GPUs, NVML absence a distinct exit code,
and the vLLM start/ready/stop through the fake vLLM."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pynvml
import pytest

from shapectl.commands.demo import free_port
from tests.fakes.fake_pynvml import FakeNvml

ROOT = Path(__file__).parents[2]
FAKE_VLLM = ROOT / "tests" / "fakes" / "fake_vllm.py"
WRITE_PREFIXES = ("nvmlDeviceSet", "nvmlDeviceCreate", "nvmlDeviceReset", "nvmlDeviceClear",
                  "nvmlGpuInstanceCreate", "nvmlGpuInstanceDestroy", "nvmlComputeInstanceDestroy")


def load_gpu_check() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / "scripts" / "gpu-check"))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


class Spy:
    """Records the name of every NVML function looked up on the fake."""

    def __init__(self, fake: FakeNvml) -> None:
        self.fake, self.used = fake, []

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.fake, name)
        if callable(value) and not isinstance(value, type):
            self.used.append(name)
        return value


def run(fake: Any, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return gpu_check.main(list(argv), nvml=fake, out=out), out.getvalue()


def lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status)]


def test_all_checks_pass_and_nothing_is_written() -> None:
    fake = FakeNvml("h100-80gb", 2)
    spy = Spy(fake)
    code, out = run(spy)
    assert code == 0, out
    for i in (0, 1):
        for check in ("telemetry", "power-limits", "enforced-limit", "clocks", "mig"):
            assert any(f"gpu{i} {check}" in line for line in lines(out, "PASS")), (i, check, out)
    assert any("xid-registration" in line for line in lines(out, "PASS"))
    assert "limit 700 W in [200, 700] W" in out and "profiles 1g.10gb" in out
    assert "SKIP  vllm" in out and "gpu-check: 12 passed, 0 failed, 1 skipped" in out
    assert fake.calls == []  # the fake's own record of write calls
    assert "nvmlDeviceRegisterEvents" in spy.used  # Xid registration was really exercised
    assert not [n for n in spy.used if n.startswith(WRITE_PREFIXES)], spy.used
    assert not fake.initialized  # NVML shut down again


def test_enforced_limit_below_the_limit_is_shown() -> None:
    fake = FakeNvml("a100-80gb", 1)
    fake.gpus[0].external_cap_mw = 300_000  # a BMC cap
    code, out = run(fake)
    assert code == 0
    assert "enforced 300 W, limit 400 W (below the limit: a BMC or firmware cap applies)" in out


def test_mig_gpu_reported_and_vllm_skipped_on_it() -> None:
    fake = FakeNvml("a100-80gb", 1)
    fake.gpus[0].mig_current = fake.gpus[0].mig_pending = pynvml.NVML_DEVICE_MIG_ENABLE
    code, out = run(fake, "--vllm-python", sys.executable)
    assert code == 0, out
    assert "mode enabled, 0 instances" in out
    assert "SKIP  vllm                   GPU 0 is in MIG mode" in out
    assert fake.calls == []


def test_a_failing_check_fails_the_run() -> None:
    fake = FakeNvml("h100-80gb", 2)
    fake.gpus[1].temperature_c = 60

    def no_xid(handle: Any, event_types: int, event_set: object) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    fake.nvmlDeviceRegisterEvents = no_xid  # type: ignore[method-assign]
    code, out = run(fake)
    assert code == 1
    assert "FAIL  xid-registration       Xid events cannot be watched" in out
    assert "1 failed" in out and fake.calls == []


def test_lost_gpu_is_a_failure_not_missing_nvml() -> None:
    fake = FakeNvml("h100-80gb", 2)
    fake.lose_gpu(1)
    code, out = run(fake)
    assert code == 1
    assert "FAIL  nvml" in out and "lost" in out


def test_nvml_absent_has_its_own_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml("h100-80gb", init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    code, out = run(fake)
    assert code == gpu_check.EXIT_NO_NVML == 4
    assert out == ""
    assert "NVML unavailable" in capsys.readouterr().err


def test_guard_refuses_every_writer_before_it_runs() -> None:
    fake = FakeNvml("h100-80gb", 1)
    fake.nvmlInit()
    guarded = gpu_check.ReadOnlyNvml(fake)
    handle = guarded.nvmlDeviceGetHandleByIndex(0)  # reads pass
    with pytest.raises(gpu_check.SetterRefused, match="nvmlDeviceSetPowerManagementLimit"):
        guarded.nvmlDeviceSetPowerManagementLimit(handle, 300_000)
    assert fake.calls == [] and fake.gpus[0].power_limit_mw == 700_000
    names = [n for n in dir(pynvml) if n.startswith("nvml") and callable(getattr(pynvml, n))
             and not isinstance(getattr(pynvml, n), type)]
    writer = re.compile(r"^nvml(Device|GpuInstance|ComputeInstance|System|Unit|VgpuInstance)?"
                        r"(Set|Create|Destroy|Reset|Clear|Modify|Remove)[A-Z]")
    writers = [n for n in names if writer.match(n)]
    assert len(writers) > 40
    assert not [n for n in writers if gpu_check.is_read_only(n)]
    assert all(gpu_check.is_read_only(n) for n in names if n.startswith("nvmlDeviceGet"))


def stub_vllm(root: Path) -> Path:
    """A `vllm` package whose api_server is the fake vLLM (same flags, same endpoints)."""
    server = root / "vllm" / "entrypoints" / "openai"
    server.mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text('__version__ = "0.0.0-fake"\n')
    (root / "vllm" / "entrypoints" / "__init__.py").write_text("")
    (server / "__init__.py").write_text("")
    (server / "api_server.py").write_text(
        f"import runpy, sys\nsys.argv[0] = {str(FAKE_VLLM)!r}\n"
        f"runpy.run_path({str(FAKE_VLLM)!r}, run_name='__main__')\n"
    )
    return root


def test_vllm_start_ready_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(stub_vllm(tmp_path)))
    monkeypatch.setenv("FAKE_VLLM_STARTUP_S", "0.3")
    fake = FakeNvml("h100-80gb", 1)
    port = free_port()
    code, out = run(fake, "--vllm-python", sys.executable, "--vllm-port", str(port),
                    "--vllm-model", str(tmp_path), "--vllm-timeout-s", "30")
    assert code == 0, out
    line = next(line for line in out.splitlines() if " vllm " in line)
    assert line.startswith("PASS") and "vLLM 0.0.0-fake" in line
    assert "completion ' tok tok tok tok'" in line and "stopped (exit 0)" in line
    assert fake.calls == []


def test_vllm_that_cannot_import_fails(tmp_path: Path) -> None:
    fake = FakeNvml("h100-80gb", 1)
    code, out = run(fake, "--vllm-python", sys.executable + "-missing")
    assert code == 1 and "FAIL  vllm" in out
