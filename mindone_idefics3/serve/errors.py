"""One error type for the HTTP layer and the one helper that turns it into OpenAI's error body.

Every failure a client can cause ends here as `{"error": {"message", "type", "param", "code"}}` with its status;
anything else is logged on the server and answered with a 500 that carries no traceback.
"""
from __future__ import annotations

from typing import Dict, Optional

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}


class APIError(Exception):
    """A request the server refuses: HTTP status, a message that says what is wrong and how to fix it, the request
    field at fault (`param`) and a short machine-readable `code`."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status,
                        headers=error.headers)
