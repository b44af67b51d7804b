"""Errors as the APIs return them: OpenAI's `{"error": {message, type, param, code}}`, and TGI's
`{"error", "error_type"}` on the native route. Every error names the field at fault."""
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import ContextLengthError, LlamaRefError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_response(request: Request, status: int, message: str, param, code, kind="invalid_request_error",
                   headers=None) -> JSONResponse:
    """OpenAI's error shape, and TGI's for the native route."""
    if request.url.path.startswith("/v1/inference"):
        body = {"error": message, "error_type": "validation" if status < 500 else "overloaded"}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(request: Request, err: APIError):
    return error_response(request, err.status, err.message, err.param, err.code, err.kind, err.headers)


async def validation_error(request: Request, err: RequestValidationError):
    """pydantic's first complaint, as "field.path: what is wrong"."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return error_response(request, 400, f"{where}: {first['msg']}", where, "invalid_value")


async def engine_error(request: Request, err: LlamaRefError):
    """A rule the engine checks (SamplingParams, the chat format, the context): a 400."""
    code = "context_length_exceeded" if isinstance(err, ContextLengthError) else "invalid_value"
    return error_response(request, 400, str(err), err.param, code)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(LlamaRefError, engine_error)
