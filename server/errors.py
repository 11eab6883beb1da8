"""Server errors and their HTTP statuses (the core raises, only the HTTP layer maps)."""

from __future__ import annotations

from fwbuild.errors import FwbuildError, KeyFileError, UsageError

from .artifacts import ArtifactMissing


class NotFound(FwbuildError):
    """Unknown node or resource (HTTP 404)."""


class Forbidden(FwbuildError):
    """Known but not allowed: revoked node, secret asked from outside the subnets (HTTP 403)."""


class Unbound(Forbidden):
    """A request from the enrollment subnets whose address is bound to no node (HTTP 403;
    WalT's property routes answer 400 `Invalid request.`)."""


class Conflict(FwbuildError):
    """The request contradicts the state (reused or revoked key) (HTTP 409)."""


class HttpError(FwbuildError):
    """A protocol-level error with an explicit status (bad method, body too large ...)."""

    def __init__(self, status: int, what: str, hint: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False) -> None:
        super().__init__(what, None, hint)
        self.status = status
        self.headers = headers or {}
        self.close = close  # answer with Connection: close (the request may be unread)


def http_status(exc: FwbuildError) -> int:
    if isinstance(exc, HttpError):
        return exc.status
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, Forbidden):
        return 403
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, (ArtifactMissing, KeyFileError)):
        return 503
    return 500
