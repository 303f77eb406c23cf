"""``/v1/avatars``: list, get, delete, and create (POST a face video or photo; prepared with the
settings ``inference.py`` would use for the form's ``box`` and ``fps``)."""
from __future__ import annotations

import asyncio
import shutil
import threading

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from lipsync.render.avatar_settings import settings_from_flags
from lipsync.serve.auth import require_token
from lipsync.serve.state import SHUTDOWN_MESSAGE, ApiError, ServerState, get_state
from lipsync.serve.uploads import Uploads

router = APIRouter(prefix="/v1/avatars", dependencies=[Depends(require_token)])


@router.get("")
async def list_avatars(state: ServerState = Depends(get_state)):
    """``{"avatars": [...]}``: every avatar's description."""
    return {"avatars": await asyncio.to_thread(state.store.list)}


@router.get("/{avatar_id}")
async def get_avatar(avatar_id: str, state: ServerState = Depends(get_state)):
    """One avatar's description; 404 for an id the server did not make."""
    return await asyncio.to_thread(state.store.info, avatar_id)


@router.delete("/{avatar_id}", status_code=204)
async def delete_avatar(avatar_id: str, state: ServerState = Depends(get_state)):
    """204; 404 for an unknown id, 409 while a session uses it."""
    await asyncio.to_thread(state.store.delete, avatar_id)
    return Response(status_code=204)


@router.post("", status_code=201)
async def create_avatar(request: Request, state: ServerState = Depends(get_state),
                        uploads: Uploads = Depends(Uploads)):
    """201 and the new avatar's description; prepared one at a time (503 when too many wait)."""
    abandoned = threading.Event()
    try:
        form = await uploads.form(request)
        staging = state.store.staging_dir()
        try:
            settings = settings_from_flags(uploads.flags(form))
            path, kind = await uploads.staged_face(form, staging)

            def prepare():
                if abandoned.is_set():
                    return None
                return state.store.create(path, settings, state.generator.device, kind=kind,
                                          wanted=lambda: not abandoned.is_set())

            return JSONResponse(await state.prepare(prepare), status_code=201)
        finally:
            await form.close()
            shutil.rmtree(staging, ignore_errors=True)
    except asyncio.CancelledError:
        # uvicorn cancels requests still running when --shutdown_timeout runs out: the
        # preparation thread, when it finishes, saves nothing, and the client is told
        abandoned.set()
        raise ApiError(503, SHUTDOWN_MESSAGE) from None
