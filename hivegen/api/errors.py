"""Failures as OpenAI's API reports them: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
an OpenAI client expects (400 bad parameter, 401 no key, 402 credits, 404 model, 429 busy, 503 no route)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hivegen.api.schemas import ApiParameterError
from hivegen.api.service import ServerBusy, UnknownModel
from hivegen.api.streaming import StreamRetracted
from hivegen.credits.units import format_credits
from hivegen.errors import (
    GenerationCancelled,
    HivegenError,
    InsufficientCredits,
    InvalidParameterError,
    NoRouteError,
    RemoteError,
    VerificationError,
)

logger = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None, **extra: Any) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code, **extra), status_code=status)


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI-shaped body of a failure (also sent as a stream's last event)."""
    if isinstance(exc, ApiParameterError | InvalidParameterError):
        message = str(exc) if str(exc).startswith(f"{exc.param}: ") else f"{exc.param}: {exc}"
        return 400, error_body(message, "invalid_request_error", exc.param)
    if isinstance(exc, UnknownModel):
        return 404, error_body(str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, InsufficientCredits):
        return 402, error_body(
            str(exc), "insufficient_credits", None, "insufficient_credits", account=exc.account,
            balance=format_credits(exc.balance), needed=format_credits(exc.needed),
        )  # fmt: skip
    if isinstance(exc, ServerBusy):
        return 429, error_body(str(exc), "server_busy", None, "server_busy")
    if isinstance(exc, NoRouteError):
        return 503, error_body(str(exc), "no_route", None, "no_route", missing_blocks=exc.missing_blocks)
    if isinstance(exc, StreamRetracted):
        return 409, error_body(str(exc), "stream_retracted", None, "stream_retracted")
    if isinstance(exc, RemoteError | VerificationError | GenerationCancelled):
        return 502, error_body(str(exc), "swarm_error", None, "swarm_error")
    logger.exception("internal error in an API request", exc_info=exc)
    return 500, error_body("internal error in the hivegen API server; see its log", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server in OpenAI's shape, including FastAPI's own validation errors."""

    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid body"))
        return error_response(400, message, "invalid_request_error", param)

    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_)

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        status, body = describe(exc)
        return JSONResponse(body, status_code=status)

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    app.add_exception_handler(HivegenError, on_error)  # handled: the server goes on
    app.add_exception_handler(ApiParameterError, on_error)
    app.add_exception_handler(Exception, on_error)  # a bug: answered 500 and logged
