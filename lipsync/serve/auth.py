"""The token: with one (``serve.py --token``), every HTTP request and WebSocket handshake must carry
it (``Authorization: Bearer TOKEN`` or ``?token=TOKEN``), else 401 ``{"detail": ...}``.

:func:`require_token` is the one check. Every router declares it as a dependency; what no router
covers (the web page's files under ``/web``, paths no route has, a method a path does not take) is
checked before anything else by the same function (:func:`guarded`, :func:`method_not_allowed`).
"""
from __future__ import annotations

import json
import secrets
from typing import Optional

from fastapi import WebSocket
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection, Request

from lipsync.serve.state import get_state

NEEDS_TOKEN = "this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN"


class TokenRequired(Exception):
    """A request or WebSocket handshake without the server's token; the message says what was wrong."""


def token_of(scope) -> Optional[str]:
    """The token a request carries: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``."""
    from urllib.parse import parse_qs

    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text = value.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return values[0] if values else None


def require_token(conn: HTTPConnection) -> None:
    """Dependency: raises TokenRequired unless ``conn`` (a request or WebSocket handshake) carries the
    server's token, or the server has none."""
    token = get_state(conn).config.token
    if token is None:
        return
    given = token_of(conn.scope)
    if given is None:
        raise TokenRequired(NEEDS_TOKEN)
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise TokenRequired("wrong token")


async def refuse(conn: HTTPConnection, exc: TokenRequired) -> Optional[JSONResponse]:
    """Exception handler of TokenRequired: the 401 response, or a WebSocket handshake refused with it."""
    if isinstance(conn, WebSocket):
        await deny(conn, 401, str(exc))
        return None
    return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def guarded(app):
    """The ASGI ``app`` behind :func:`require_token`, for what no router covers (static files, the
    router's answer to a path no route has)."""

    async def guard(scope, receive, send):
        try:
            require_token(HTTPConnection(scope))
        except TokenRequired as exc:
            conn = WebSocket(scope, receive, send) if scope["type"] == "websocket" else Request(scope, receive)
            response = await refuse(conn, exc)
            if response is not None:
                await response(scope, receive, send)
            return
        await app(scope, receive, send)

    return guard


async def method_not_allowed(request: Request, exc):
    """Handler of 405 (a method the path does not take), which routing answers before the route's
    dependencies run: without the token, 401 as everywhere."""
    try:
        require_token(request)
    except TokenRequired as refused:
        return await refuse(request, refused)
    return await http_exception_handler(request, exc)


async def deny(ws: WebSocket, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP ``status`` and ``{"detail": message}`` (or, on a server
    without the denial-response extension, accept it, send ``{"type": "error"}`` and close)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    try:
        await ws.send_denial_response(JSONResponse({"detail": message}, status_code=status, headers=headers))
    except RuntimeError:
        await ws.accept()
        await ws.send_text(json.dumps({"type": "error", "message": message, "status": status}))
        await ws.close(1008)
