"""One error hierarchy for the platform, mapped in one table to HTTP and NATS.

Every failure that crosses a process boundary is a :class:`PlatformError` with a
stable ``code``; the gateway turns it into an HTTP status and a JSON body, NATS
services into error headers on the reply.
"""

from __future__ import annotations

from typing import ClassVar, Final


class PlatformError(Exception):
    """Base of every error the platform reports to a caller."""

    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, field: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        # When a retry may succeed (a full queue, a tenant's rate): HTTP ``Retry-After``.
        self.retry_after_s = retry_after_s

    def to_dict(self) -> dict[str, str]:
        """The JSON body of an error reply."""
        body = {"code": self.code, "error": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidArgument(PlatformError):
    """A request field is missing, of the wrong type or out of range."""

    code = "invalid_argument"


class NotFound(PlatformError):
    """The named function, model, tube or node does not exist (for this tenant)."""

    code = "not_found"


class AlreadyExists(PlatformError):
    """A resource with that name exists already."""

    code = "already_exists"


class Unauthenticated(PlatformError):
    """No API key, or one that is unknown, wrong, revoked or expired."""

    code = "unauthenticated"


class PermissionDenied(PlatformError):
    """The caller's key may not do this (an admin-only route, field or tenant)."""

    code = "permission_denied"


class QuotaExceeded(PlatformError):
    """The tenant is at one of its quotas (functions, GPU memory): the error names the
    setting. Not retried by waiting: delete something, or have the quota raised."""

    code = "quota_exceeded"


class PayloadTooLarge(PlatformError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"


class UnsupportedMediaType(PlatformError):
    """The request body is not in a format the endpoint accepts."""

    code = "unsupported_media_type"


class ModelInvalid(PlatformError):
    """A model's files or tensors cannot be used (corrupt, missing, wrong dtype)."""

    code = "model_invalid"


class ResourceExhausted(PlatformError):
    """No device has room for the request."""

    code = "resource_exhausted"


class Overloaded(PlatformError):
    """Too many requests: a function's queue or a tenant's limit is full; retry after
    ``retry_after_s`` (HTTP 429 with ``Retry-After``)."""

    code = "overloaded"


class Unavailable(PlatformError):
    """A dependency (NATS, a service, a node) cannot be reached right now; retry later."""

    code = "unavailable"


class NoResponders(Unavailable):
    """Nothing subscribes to a request's subject now (its service is not running, or is
    restarting): the request reached nobody, so sending it again is always safe."""


class DeadlineExceeded(PlatformError):
    """The request did not finish within its deadline."""

    code = "deadline_exceeded"


class Internal(PlatformError):
    """A bug: logged with its traceback on the server, reported without one."""

    code = "internal"


# code -> (HTTP status, error class). The only place statuses are decided.
ERROR_TABLE: Final[dict[str, tuple[int, type[PlatformError]]]] = {
    InvalidArgument.code: (400, InvalidArgument),
    Unauthenticated.code: (401, Unauthenticated),
    PermissionDenied.code: (403, PermissionDenied),
    QuotaExceeded.code: (403, QuotaExceeded),
    NotFound.code: (404, NotFound),
    AlreadyExists.code: (409, AlreadyExists),
    PayloadTooLarge.code: (413, PayloadTooLarge),
    UnsupportedMediaType.code: (415, UnsupportedMediaType),
    ModelInvalid.code: (422, ModelInvalid),
    Overloaded.code: (429, Overloaded),
    ResourceExhausted.code: (507, ResourceExhausted),
    Unavailable.code: (503, Unavailable),
    DeadlineExceeded.code: (504, DeadlineExceeded),
    Internal.code: (500, Internal),
}


def http_status(error: PlatformError) -> int:
    """The HTTP status for an error."""
    return ERROR_TABLE.get(error.code, (500, Internal))[0]


def from_code(
    code: str, message: str, field: str | None = None, retry_after_s: float | None = None
) -> PlatformError:
    """Rebuild a typed error from its wire form (an unknown code becomes ``Internal``)."""
    cls = ERROR_TABLE.get(code, (500, Internal))[1]
    return cls(message, field=field, retry_after_s=retry_after_s)
