"""`ServeError`: a request the server refuses or cannot finish, with the HTTP status and the
OpenAI error type it is reported under. Raised by the engine, the registry and the request
checks alike; the HTTP layer turns it into `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from ..errors import LoraError

# OpenAI's error types by status
ERROR_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
               408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ServeError(LoraError):
    """A request error with its HTTP status, the parameter at fault (if one) and a short code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}
