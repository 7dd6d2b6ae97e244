"""FastAPI's OpenAPI document, made to say what the handlers really answer: validation errors
are 400 with the ``Error`` body (not 422), and every /v1 operation documents the errors its
auth, its lookups, the region (421) and the store can give."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong, for a person."},
        "region": {"type": "string", "description": "421 only: the customer's region."},
        "api_url": {
            "type": ["string", "null"],
            "description": "421 only: that region's API, when declared.",
        },
        "problems": {
            "type": "array",
            "description": "Validation errors only: each bad parameter and the rule it broke"
            " (the value is never echoed).",
            "items": {
                "type": "object",
                "required": ["param", "problem"],
                "properties": {"param": {"type": "string"}, "problem": {"type": "string"}},
            },
        },
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
_ERRORS = {
    "400": "Invalid parameters or body (problems name each), or a request that cannot be"
    " answered as asked (e.g. an operator token without 'customer').",
    "401": "Missing, malformed, unknown or revoked API token.",
    "403": "The token lacks the scope, or may not see that customer.",
    "404": "Unknown customer, or no such item.",
    "409": "API tokens are off on this deployment.",
    "421": "The customer is served by another region's API (its own store and tokens):"
    " 'region' names it and 'api_url' is its address when declared. Not a redirect: a token"
    " of this region is not valid there.",
    "429": "Rate limit: this token's, or this client address's failed authentications.",
    "500": "The customer's HMAC keys cannot be read; nothing was changed.",
    "503": "Storage unavailable.",
}
_CUSTOMER_DOC = (
    "The customer asked about. A customer token may omit it (its own customer) or name its own"
    " (another: 403). An operator token must name one: 400 without it, 404 if unknown. A"
    " customer served by another region: 421, naming that region."
)


def _names_customer(path: str, op: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether the operation is about one customer (a parameter or a body field names it, or
    /v1/me of a customer's token): then another region's customer gets 421."""
    if path == "/v1/me" or any(p["name"] == "customer" for p in op.get("parameters", [])):
        return True
    for media in op.get("requestBody", {}).get("content", {}).values():
        ref = media.get("schema", {}).get("$ref", "")
        if "customer" in schemas.get(ref.rpartition("/")[2], {}).get("properties", {}):
            return True
    return False


def _error_codes(
    method: str, path: str, op: dict[str, Any], had_422: bool, schemas: dict[str, Any]
) -> set[str]:
    """The error statuses an operation can answer, from its path and its inputs."""
    takes_input = bool(op.get("parameters")) or "requestBody" in op
    codes: set[str] = set()
    if had_422 or takes_input:
        codes.add("400")
    if path.startswith("/v1/"):
        codes |= {"401", "403", "429", "503"}
        if takes_input:
            codes.add("404")
        if _names_customer(path, op, schemas):
            codes.add("421")
        if path.startswith("/v1/tokens"):
            codes.add("409")
        if (method, path) == ("post", "/v1/erase"):
            codes.add("500")
    elif path == "/healthz":
        codes.add("503")
    return codes


def _error_response(code: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERRORS[code],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }
    if code == "429":
        response["headers"] = _RETRY_AFTER
    return response


def _document_operation(
    method: str, path: str, op: dict[str, Any], schemas: dict[str, Any]
) -> None:
    responses = op["responses"]
    for param in op.get("parameters", []):
        if param["name"] == "customer" and param["in"] == "query":
            param["description"] = _CUSTOMER_DOC
    had_422 = responses.pop("422", None) is not None
    for code in sorted(_error_codes(method, path, op, had_422, schemas)):
        responses.setdefault(code, _error_response(code))


def openapi_of(app: FastAPI) -> dict[str, Any]:
    """The app's document, built once."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = _ERROR_SCHEMA
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            _document_operation(method, path, op, schemas)
    app.openapi_schema = doc
    return doc
