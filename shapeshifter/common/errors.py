"""Domain errors and the one table that maps them to gRPC status codes.

Every layer raises these; only the gRPC servicers translate them (``grpc_code``). A refused
request must change nothing, so validation raises before any actuator is touched.
"""

from __future__ import annotations

import grpc


class DomainError(Exception):
    """Base of every error the agent and coordinator report to a caller."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(DomainError):
    """A value outside what the device or schema allows. The message names field and range."""


class NotFound(DomainError):
    """Unknown GPU, node, instance, profile name the caller referenced."""


class FailedPrecondition(DomainError):
    """The request is valid but the state forbids it (stale epoch, GPU busy, MIG off)."""


class PermissionDenied(DomainError):
    """The driver or the authorization layer refused the change."""


class Unauthenticated(DomainError):
    """No or invalid credentials."""


class Unavailable(DomainError):
    """A dependency is not reachable now (GPU lost, node disconnected); retry may help."""


class NotSupported(DomainError):
    """The device does not support this operation (e.g. MIG on a consumer GPU)."""


class InUse(FailedPrecondition):
    """The device is busy (processes running, instances managed)."""


class ResetRequired(FailedPrecondition):
    """The change is accepted but takes effect only after a GPU reset or a reboot (MIG mode on
    A100), or the GPU reported an error only a reset clears (Xid 79, 48, ...)."""


class InsufficientResources(FailedPrecondition):
    """The device has no room for the request now (MIG slices or instances taken)."""


class GpuLost(Unavailable):
    """The GPU stopped answering (NVML GPU_IS_LOST, Xid 79): a reset or reboot is needed."""


class DeviceTimeout(Unavailable):
    """The device did not answer in time; retry may help."""


class Internal(DomainError):
    """An unexpected failure; never used for bad input."""


_CODES: tuple[tuple[type[DomainError], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (InUse, grpc.StatusCode.FAILED_PRECONDITION),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (NotSupported, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Internal, grpc.StatusCode.INTERNAL),
)


def grpc_code(err: BaseException) -> grpc.StatusCode:
    """The status code for an error; anything not a DomainError is INTERNAL."""
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return grpc.StatusCode.INTERNAL


def out_of_range(
    field: str, value: float, low: float, high: float, unit: str = ""
) -> InvalidArgument:
    """The standard message for a number outside its allowed range."""
    u = f" {unit}" if unit else ""
    return InvalidArgument(
        f"{field}={value:g}{u} is outside the allowed range [{low:g}, {high:g}]{u}", field=field
    )
