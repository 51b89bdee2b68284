"""The one place NVML errors become domain errors, shared by the NVML backend's parts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from shapeshifter.common.errors import (
    DeviceTimeout,
    DomainError,
    GpuLost,
    InsufficientResources,
    Internal,
    InUse,
    InvalidArgument,
    NotFound,
    NotSupported,
    PermissionDenied,
    ResetRequired,
)

T = TypeVar("T")
MIB = 1024 * 1024

# NVML error constant name -> domain error; anything else is Internal. Names, not values, so the
# table reads against whichever module (real or fake) is injected.
ERROR_TABLE: tuple[tuple[str, type[DomainError]], ...] = (
    ("NVML_ERROR_NOT_SUPPORTED", NotSupported),
    ("NVML_ERROR_NO_PERMISSION", PermissionDenied),
    ("NVML_ERROR_INVALID_ARGUMENT", InvalidArgument),
    ("NVML_ERROR_GPU_IS_LOST", GpuLost),
    ("NVML_ERROR_IN_USE", InUse),
    ("NVML_ERROR_RESET_REQUIRED", ResetRequired),
    ("NVML_ERROR_INSUFFICIENT_RESOURCES", InsufficientResources),
    ("NVML_ERROR_NOT_FOUND", NotFound),
    ("NVML_ERROR_TIMEOUT", DeviceTimeout),
)
# What each typed error means for the operator, appended to the NVML text.
_HINTS: dict[type[DomainError], str] = {
    GpuLost: "the GPU fell off the bus; reset it (nvidia-smi -r) or reboot",
    ResetRequired: "takes effect only after a GPU reset (nvidia-smi -r) or a reboot",
    InsufficientResources: "the GPU has no free slices or instances for this",
    DeviceTimeout: "the device did not answer in time; retry",
}


def domain_error(nvml: Any, err: Any, action: str) -> DomainError:
    cls = next((c for name, c in ERROR_TABLE if err.value == getattr(nvml, name)), Internal)
    hint = _HINTS.get(cls)
    return cls(f"{action}: NVML error {err.value}: {err}" + (f" ({hint})" if hint else ""))


@contextmanager
def nvml_errors(nvml: Any, action: str) -> Iterator[None]:
    """Re-raise NVML errors inside the block as domain errors naming the action."""
    try:
        yield
    except nvml.NVMLError as e:
        raise domain_error(nvml, e, action) from e


def optional_read(nvml: Any, action: str, read: Callable[[], T]) -> T | None:
    """A read the device may not support: None when NVML says NOT_SUPPORTED."""
    try:
        with nvml_errors(nvml, action):
            return read()
    except NotSupported:
        return None


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
