"""Errors as the APIs return them: OpenAI's `{"error": {message, type, param, code}}`, and TGI's
`{"error", "error_type"}` on the native route. Every error names the field at fault."""
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import ContextLengthError, LlamaRefError


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def error_body(native: bool, status: int, message: str, param, code, kind="invalid_request_error") -> dict:
    """OpenAI's error shape, or TGI's for the native route."""
    if native:
        return {"error": message, "error_type": "validation" if status < 500 else
                "overloaded" if status == 503 else "internal"}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def is_native(path: str) -> bool:
    """The provider's native route answers in TGI's shapes; every other route in OpenAI's."""
    return path.startswith("/v1/inference")


def error_response(request: Request, status: int, message: str, param, code, kind="invalid_request_error",
                   headers=None) -> JSONResponse:
    body = error_body(is_native(request.url.path), status, message, param, code, kind)
    return JSONResponse(body, status_code=status, headers=headers)


def internal_error_body(err: Exception, native: bool) -> dict:
    """A bug of ours, as a 500's body or as the last event of a stream that broke off."""
    return error_body(native, 500, f"internal error: {type(err).__name__}: {err}", None, "internal_error",
                      "server_error")


async def ending_with_error(chunks, native: bool):
    """The chunks of a stream; a failure after the 200 went out ends the stream with an error
    event, then the exception goes on (to be logged and counted by middleware.ServerErrors)."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as err:
        yield json.dumps(internal_error_body(err, native))
        raise


async def api_error(request: Request, err: APIError):
    return error_response(request, err.status, err.message, err.param, err.code, err.kind, err.headers)


async def validation_error(request: Request, err: RequestValidationError):
    """pydantic's first complaint, as "field.path: what is wrong"."""
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    return error_response(request, 400, f"{where}: {first['msg']}", where, "invalid_value")


async def http_error(request: Request, err: HTTPException):
    """What the framework refuses itself (a body that is not UTF-8 or nests too deep, an unknown
    route or method), in the API's error shape rather than FastAPI's {"detail"}."""
    where = "body" if err.status_code == 400 else None
    message = f"body: {err.detail}" if where else str(err.detail)
    return error_response(request, err.status_code, message, where, None, headers=err.headers)


async def engine_error(request: Request, err: LlamaRefError):
    """A rule the engine checks (SamplingParams, the chat format, the context): a 400."""
    code = "context_length_exceeded" if isinstance(err, ContextLengthError) else "invalid_value"
    return error_response(request, 400, str(err), err.param, code)


async def internal_error(request: Request, err: Exception):
    """A bug of ours: the API's error shape rather than a bare "Internal Server Error"."""
    return JSONResponse(internal_error_body(err, is_native(request.url.path)), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Exception, internal_error)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(LlamaRefError, engine_error)
