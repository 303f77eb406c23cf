"""``GET /healthz``, the web page at ``/`` and its files under ``/web`` (``lipsync/serve/web``)."""
from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from lipsync.serve.auth import guarded, require_token
from lipsync.serve.state import ApiError, ServerState, get_state

WEB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web")

router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/healthz")
async def healthz(state: ServerState = Depends(get_state)):
    """200 and what the server runs: model, device, sessions, avatars, batches."""
    return state.health()


@router.get("/")
async def page():
    """The web page (lipsync/serve/web/index.html); 404 when it is not installed."""
    index = os.path.join(WEB_DIR, "index.html")
    if not os.path.isfile(index):
        raise ApiError(404, "the web page is not installed (lipsync/serve/web/index.html)")
    return FileResponse(index, media_type="text/html")


def mount_web(app) -> None:
    """Serve the page's other files under /web (a mount: no router dependency reaches it, so it is
    guarded by the same token check)."""
    if os.path.isdir(WEB_DIR):
        app.mount("/web", guarded(StaticFiles(directory=WEB_DIR)), name="web")
