"""The WebSocket ``/v1/stream?avatar_id=ID`` (the protocol: :mod:`lipsync.serve.sessions`). A
handshake refused before it opens gets the status an HTTP request would (401, 404, 422, 503)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, WebSocket

from lipsync.core.errors import Wav2LipError
from lipsync.serve.auth import deny, require_token
from lipsync.serve.avatar_store import AvatarNotFound
from lipsync.serve.sessions import StreamSession
from lipsync.serve.state import ApiError, ServerState, get_state

router = APIRouter(dependencies=[Depends(require_token)])


@router.websocket("/v1/stream")
async def stream(ws: WebSocket, state: ServerState = Depends(get_state)):
    """One streaming session for the avatar ``avatar_id``, holding a session slot while it runs."""
    avatar_id = ws.query_params.get("avatar_id")
    if not avatar_id:
        return await deny(ws, 422, "give the avatar: /v1/stream?avatar_id=ID")
    try:
        sid = state.reserve("stream")
    except ApiError as exc:
        return await deny(ws, exc.status, str(exc))
    acquired = False
    try:
        try:
            avatar = await asyncio.to_thread(state.store.acquire, avatar_id)
            acquired = True
        except AvatarNotFound as exc:
            return await deny(ws, 404, str(exc))
        except Wav2LipError as exc:
            return await deny(ws, 422, f"avatar {avatar_id} cannot be used: {state.public(str(exc))}")
        session = StreamSession(sid, avatar, state.generator.queue.generate_for(sid), state.config.stream, state.idle,
                                state.frame_sink, device=state.generator.device)
        await ws.accept()
        with state.lock:
            state.sessions[sid] = session
        await session.run(ws)
    finally:
        if acquired:
            state.store.release(avatar_id)
        state.release(sid)
