"""The one map from a NagayaError to an HTTP status: the JSON API, the token service and the portal's error
pages answer the same error with the same code."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from nagaya.errors import AuthError, Conflict, NagayaError, NotFound, PermissionDenied, TooManyAttempts, UsageError
from nagaya.server.jobs import JobsBusy, JobsUnavailable

# Most specific first: TooManyAttempts is an AuthError.
STATUS: tuple[tuple[type[NagayaError], int], ...] = (
    (TooManyAttempts, 429), (JobsBusy, 429), (AuthError, 401), (PermissionDenied, 403), (NotFound, 404),
    (Conflict, 409), (UsageError, 400), (JobsUnavailable, 503))


def http_status(exc: NagayaError) -> int:
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def retry_after(exc: NagayaError) -> dict[str, str]:
    """Headers that tell a client when to come back: one user's job operations in flight free up quickly."""
    return {"Retry-After": "5"} if isinstance(exc, JobsBusy) else {}


async def json_error(request: Request, exc: NagayaError) -> JSONResponse:
    """The API's and the token service's answer to a NagayaError (pages answer with HTML: portal/base.py)."""
    status = http_status(exc)
    headers = {"WWW-Authenticate": 'Basic realm="nagaya"'} if status == 401 else retry_after(exc) or None
    body: dict[str, Any] = {"detail": exc.message}
    if request.url.path == "/token":
        # registry clients (skopeo, docker) print the distribution error format, not `detail`
        code = {403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "UNAUTHORIZED")
        body["errors"] = [{"code": code, "message": exc.message}]
    return JSONResponse(body, status_code=status, headers=headers)
