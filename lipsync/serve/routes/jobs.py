"""``POST /v1/lipsync``: a face (``avatar_id`` or a ``face`` file) and an ``audio`` file in, the mp4
``inference.py`` writes for them out."""
from __future__ import annotations

import asyncio
import os
import shutil

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from lipsync.render.settings import NO_BOX
from lipsync.serve.auth import require_token
from lipsync.serve.state import SHUTDOWN_MESSAGE, ApiError, ServerState, get_state
from lipsync.serve.uploads import FORM_FIELDS, Uploads, text_field

router = APIRouter(dependencies=[Depends(require_token)])


@router.post("/v1/lipsync")
async def lipsync(request: Request, state: ServerState = Depends(get_state), uploads: Uploads = Depends(Uploads)):
    """video/mp4; the job holds a session slot (503 when all are taken), an avatar in use can not be
    deleted (409) until it ends."""
    from lipsync.render.inference import InferenceConfig, run_inference

    form = await uploads.form(request)  # read before taking a session slot: a slow upload holds none
    staging = state.store.staging_dir()
    sid = pinned = None
    try:
        try:
            avatar_id = text_field(form, "avatar_id")
            has_face = "face" in form or "file" in form
            if (avatar_id is None) == (not has_face):
                raise ApiError(422, "give the face as 'avatar_id' (a prepared avatar) or a 'face' file, one of them")
            given = [name for name in FORM_FIELDS if name in form]
            if avatar_id is not None and given:  # an avatar has its own
                raise ApiError(422, f"{', '.join(repr(n) for n in given)}: {', '.join(FORM_FIELDS)} describe a "
                                    "face file; a prepared avatar keeps the ones it was made with (leave them out, "
                                    "or prepare another avatar)")
            face = None if avatar_id is not None else (await uploads.staged_face(form, staging))[0]
            flags = uploads.flags(form)
            audio_path = await uploads.staged_audio(form, staging)
        finally:
            await form.close()
        sid = state.reserve("lipsync")
        folder = None
        if avatar_id is not None:
            folder = state.store.pin(avatar_id)  # in use: DELETE gets 409 until the job ends
            pinned = avatar_id
            flags["box"] = NO_BOX  # the avatar's own boxes
        outfile = os.path.join(staging, "lipsync.mp4")
        cfg = InferenceConfig(checkpoint_path=state.generator.checkpoint_path, face=face, avatar=folder,
                              audio=audio_path, outfile=outfile, det_cache_dir="", progress=False, **flags)
        sink = None
        if state.frame_sink is not None:
            sink = lambda i, frame: state.frame_sink(sid, i, frame)  # noqa: E731
        await asyncio.get_running_loop().run_in_executor(state.job_pool, run_inference, cfg, sink, state.generator)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, asyncio.CancelledError):  # see create_avatar in routes/avatars.py
            raise ApiError(503, SHUTDOWN_MESSAGE) from None
        raise
    finally:
        if pinned is not None:
            state.store.release(pinned)
        if sid is not None:
            state.release(sid)
    return FileResponse(outfile, media_type="video/mp4", filename="lipsync.mp4",
                        background=BackgroundTask(shutil.rmtree, staging, True))
