"""Request bodies a route reads itself (capped, never echoed back) instead of through FastAPI's
model parameters: those answer a body of bytes that are not UTF-8 with a 500, trying to echo it
in the 422. Shared by the routers that take JSON bodies (``/datasets``, ``/pairs``)."""
from __future__ import annotations

from typing import Any, TypeVar

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

__all__ = ["inline_schema", "json_body_openapi", "read_capped", "parse_json_body", "read_json_body"]

M = TypeVar("M", bound=BaseModel)


def inline_schema(schema: dict) -> dict:
    """A model's JSON schema with its ``$defs`` references resolved in place, for a request
    body documented by hand (the body is read by the route itself, capped, not by FastAPI)."""
    defs = schema.pop("$defs", {})

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "$ref" in x and x["$ref"].startswith("#/$defs/"):
                return walk(defs[x["$ref"].rsplit("/", 1)[1]])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(schema)


def json_body_openapi(model: type[BaseModel]) -> dict:
    """``openapi_extra`` documenting a required JSON body of ``model``."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(model.model_json_schema())}}}}


async def read_capped(request: Request, cap: int, hint: str = "") -> bytes:
    """The whole body, or a 413 once it passes ``cap`` bytes (``hint`` is added to the message)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > cap:
        raise HTTPException(413, f"the request body is larger than {cap} bytes{hint}")
    body = bytearray()
    try:
        async for piece in request.stream():
            body += piece
            if len(body) > cap:
                raise HTTPException(413, f"the request body is larger than {cap} bytes")
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before the body was sent") from None
    return bytes(body)


def parse_json_body(model: type[M], raw: bytes) -> M:
    """``raw`` validated as ``model``; errors as FastAPI's 422 list, naming the fields."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        # Without the input: it may be bytes that are not UTF-8, which no JSON answer can echo.
        errors = e.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in errors]) from None


async def read_json_body(request: Request, model: type[M], cap: int, example: str, hint: str = "") -> M:
    """A JSON body of ``model``: 415 unless it is sent as JSON (``example`` shows how), 413 above
    ``cap`` bytes, 422 naming what is wrong."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        raise HTTPException(415, f"send JSON: {example}")
    return parse_json_body(model, await read_capped(request, cap, hint))
