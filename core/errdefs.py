"""The error classes every service raises, and their one mapping to and from gRPC/ttrpc status codes.

A service raises `NotFound("image foo")`; the servers turn it into status NOT_FOUND with the message
"image foo: not found", as containerd does, and clients turn such a status back into the class.
Nothing else in the project maps errors to codes.
"""
from __future__ import annotations

from grpclib.const import Status


class ContainerdError(Exception):
    """Base of the errdefs classes. `str(err)` is "<message>: <suffix>" like containerd's wrapping."""

    code: Status = Status.UNKNOWN
    suffix = "unknown"

    def __init__(self, message: str = ""):
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        if not self.message:
            return self.suffix
        if self.message.endswith(self.suffix):
            return self.message
        return f"{self.message}: {self.suffix}"


class Unknown(ContainerdError):
    code, suffix = Status.UNKNOWN, "unknown"


class InvalidArgument(ContainerdError):
    code, suffix = Status.INVALID_ARGUMENT, "invalid argument"


class NotFound(ContainerdError):
    code, suffix = Status.NOT_FOUND, "not found"


class AlreadyExists(ContainerdError):
    code, suffix = Status.ALREADY_EXISTS, "already exists"


class FailedPrecondition(ContainerdError):
    code, suffix = Status.FAILED_PRECONDITION, "failed precondition"


class Unavailable(ContainerdError):
    code, suffix = Status.UNAVAILABLE, "unavailable"


class Unimplemented(ContainerdError):
    """containerd's ErrNotImplemented (named so as not to shadow Python's NotImplemented)."""

    code, suffix = Status.UNIMPLEMENTED, "not implemented"


class Aborted(ContainerdError):
    code, suffix = Status.ABORTED, "aborted"


class Canceled(ContainerdError):
    code, suffix = Status.CANCELLED, "context canceled"


class DeadlineExceeded(ContainerdError):
    code, suffix = Status.DEADLINE_EXCEEDED, "context deadline exceeded"


_BY_CODE: dict[int, type[ContainerdError]] = {
    cls.code.value: cls
    for cls in (Unknown, InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unavailable,
                Unimplemented, Aborted, Canceled, DeadlineExceeded)
}


def to_status(err: BaseException) -> tuple[Status, str]:
    """The status code and message a server sends for `err` (anything else is UNKNOWN)."""
    if isinstance(err, ContainerdError):
        return err.code, str(err)
    return Status.UNKNOWN, str(err) or type(err).__name__


def from_status(code: int | Status, message: str) -> ContainerdError:
    """The errdefs error a client raises for a non-OK status."""
    value = code.value if isinstance(code, Status) else int(code)
    return _BY_CODE.get(value, Unknown)(message or "")
