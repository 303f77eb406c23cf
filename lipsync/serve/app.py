"""The real-time lip-sync server: HTTP API + WebSocket streaming over one loaded generator.

``create_app(state)`` builds the FastAPI app from the routers of :mod:`lipsync.serve.routes`;
``serve.py`` loads the generator, builds a :class:`lipsync.serve.state.ServerState` and runs it
under uvicorn. The contract (docs/serving.md):

- ``GET /healthz`` -> 200 JSON.
- ``POST /v1/avatars`` (multipart ``file``, optional ``box`` "top bottom left right", ``fps``) ->
  201 ``{"avatar_id", "frames", "fps", "width", "height", ...}``; ``GET /v1/avatars``,
  ``GET /v1/avatars/{id}``, ``DELETE /v1/avatars/{id}`` (204; 409 while a session uses it).
- ``POST /v1/lipsync`` (multipart ``avatar_id`` or ``face`` file, and ``audio`` file) -> video/mp4,
  what ``inference.py`` writes for that face and audio.
- WebSocket ``/v1/stream?avatar_id=ID``: see :mod:`lipsync.serve.sessions`.
- ``/v1/sessions``: live sessions watched over WebRTC, speech from the server side: see
  :mod:`lipsync.serve.routes.live`.
- ``/``: the web page (``lipsync/serve/web/index.html``), ``/web/...``: its other files.

Errors are JSON ``{"detail": message}``: 401 without the token (when the server has one), 404 for
an unknown avatar id, 409 deleting an avatar in use, 413 for an upload over ``max_upload_mb``
(nothing is kept), 415 for a file that is not the media asked for (judged by its content, not its
name), 422 for a missing or malformed field or a face/audio the engine cannot use, 503 beyond
``max_sessions``. A WebSocket refused before it opens gets the same status codes as an HTTP
response to its handshake.
"""
from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.routing import Router

from lipsync.core.errors import Wav2LipError
from lipsync.render.streaming import warm_up_mel
from lipsync.serve.auth import TokenRequired, guarded, method_not_allowed, refuse
from lipsync.serve.avatar_store import AvatarInUse, AvatarNotFound
from lipsync.serve.routes import avatars, jobs, live, page, stream
from lipsync.serve.state import ApiError, ServerState, get_state
from lipsync.serve.webrtc import WebRTCUnavailable, restore_consent, set_consent_timeout


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Before serving: remove unfinished uploads, warm the mel up, set the WebRTC consent timeout;
    after: close the state (see :meth:`ServerState.close`), put the consent timeout back."""
    state = app.state.server
    state.store.cleanup()
    await asyncio.to_thread(warm_up_mel)
    try:
        consent = set_consent_timeout(state.config.live.consent_timeout)
    except WebRTCUnavailable:
        consent = None
    try:
        yield
    finally:
        await state.close()
        if consent is not None:
            restore_consent(consent)


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state`` (closed with the app's lifespan)."""
    app = FastAPI(title="wav2lip server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    _error_responses(app)
    for area in (page, avatars, jobs, stream, live):
        app.include_router(area.router)
    page.mount_web(app)
    # what no route takes (a path with or without a trailing slash too many: redirected; else 404)
    # is answered by a second pass over the routes, behind the token check
    app.router.redirect_slashes = False
    app.router.default = guarded(Router(app.routes, redirect_slashes=True))
    return app


def _error_responses(app: FastAPI) -> None:
    """Project errors as JSON responses: ApiError its status, a missing avatar 404, one in use 409,
    any other input error 422 (its message without the server's paths); no token 401."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(AvatarNotFound)
    async def not_found(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AvatarInUse)
    async def avatar_in_use(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(Wav2LipError)
    async def unusable(request, exc):
        return JSONResponse({"detail": get_state(request).public(str(exc))}, status_code=422)

    app.add_exception_handler(TokenRequired, refuse)
    app.add_exception_handler(405, method_not_allowed)
