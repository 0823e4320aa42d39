"""Typed errors: the API's RFC 9457 problems, transport failures, and what handlers raise."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional


class CapibaraError(Exception):
    """Base of every error this SDK raises."""


class TransportError(CapibaraError):
    """The server could not be reached, or the connection broke before an answer."""


class WaitTimeout(CapibaraError, TimeoutError):
    """`wait()` ran out of time before the job (or run) finished."""

    def __init__(self, message: str, resource: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(message)
        #: The job or run as last seen.
        self.resource = resource


class ProblemError(CapibaraError):
    """An error answer of the API (`application/problem+json`)."""

    def __init__(
        self,
        status: int,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        field: Optional[str] = None,
        errors: Optional[List[Dict[str, Any]]] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        #: The first field the server named (`input.width`, `Capibara-Lease`, …).
        self.field = field
        self.errors = errors or []
        self.headers = dict(headers or {})
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status} {self.title}".strip()
        if self.detail:
            text += f": {self.detail}"
        return text


class BadRequest(ProblemError):
    """400: malformed JSON or query string."""


class Unauthorized(ProblemError):
    """401: missing or unknown API key."""


class Forbidden(ProblemError):
    """403: the key lacks the role."""


class NotFound(ProblemError):
    """404: unknown id or route."""


class Conflict(ProblemError):
    """409: the action does not fit the resource's state."""


class LeaseLost(Conflict):
    """409 on a lease-scoped call: the lease expired or the job moved on. Stop working on it."""


class PayloadTooLarge(ProblemError):
    """413: body or input over the server's limit."""


class ValidationError(ProblemError):
    """422: a field is wrong; `.field` names it."""


class RateLimited(ProblemError):
    """429: a limit was hit; `.retry_after` is the seconds the server asked to wait."""

    @property
    def retry_after(self) -> Optional[float]:
        return retry_after_seconds(self.headers)


class Unavailable(ProblemError):
    """503: Postgres or Redis unreachable; retry shortly."""

    @property
    def retry_after(self) -> Optional[float]:
        return retry_after_seconds(self.headers)


class ServerError(ProblemError):
    """Any other 5xx."""


_BY_STATUS = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    429: RateLimited,
    503: Unavailable,
}


def retry_after_seconds(headers: Mapping[str, str]) -> Optional[float]:
    """The `Retry-After` header in seconds (its delay form), if any."""
    for k, v in headers.items():
        if k.lower() == "retry-after":
            try:
                return max(0.0, float(v))
            except ValueError:
                return None
    return None


def problem_from_response(
    status: int,
    body: Any,
    headers: Optional[Mapping[str, str]] = None,
    lease_scoped: bool = False,
) -> ProblemError:
    """The typed error for an error answer; `body` is its parsed JSON (or text, or None)."""
    doc: Dict[str, Any] = body if isinstance(body, dict) else {}
    errors = doc.get("errors") if isinstance(doc.get("errors"), list) else []
    field = doc.get("field")
    if field is None and errors and isinstance(errors[0], dict):
        field = errors[0].get("field")
    ptype = str(doc.get("type") or "about:blank")
    detail = doc.get("detail")
    if detail is None and isinstance(body, str):
        detail = body[:500]
    cls = _BY_STATUS.get(status)
    if status == 409 and (lease_scoped or ptype.endswith("lease-lost")):
        cls = LeaseLost
    if cls is None:
        cls = ServerError if status >= 500 else ProblemError
    return cls(
        status=status,
        type=ptype,
        title=str(doc.get("title") or ""),
        detail=str(detail or ""),
        field=field,
        errors=errors,
        headers=headers,
    )


# What handlers raise.


class Fatal(Exception):
    """Raise in a handler to fail the job without retrying."""

    def __init__(self, message: str = "", type: str = "fatal") -> None:
        super().__init__(message)
        self.message = message
        self.type = type


class RetryAfter(Exception):
    """Raise in a handler to fail this attempt and retry after `seconds`."""

    def __init__(self, seconds: float, message: str = "", type: str = "retry_after") -> None:
        super().__init__(message)
        self.seconds = seconds
        self.message = message
        self.type = type


class Cancelled(Exception):
    """Raised by `job.check_cancelled()` once the job's cancel was requested (or it lost its lease,
    timed out, or the worker is shutting down)."""
