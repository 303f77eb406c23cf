"""``/v1/sessions``: live sessions (:mod:`lipsync.serve.live`) watched over WebRTC
(:mod:`lipsync.serve.webrtc`), with speech queued from the server side.

- ``POST /v1/sessions`` (JSON ``{"avatar_id"}``) -> 201 ``{"session_id", "avatar_id", "fps",
  "ice_servers", ...}``; holds a session slot (503 beyond ``max_sessions``) until it ends.
- ``GET /v1/sessions/{id}`` -> the session's state (and ``ice_servers``); ``DELETE /v1/sessions/{id}`` -> 204, ended.
- ``POST /v1/sessions/{id}/offer`` (JSON ``{"sdp", "type": "offer"}``) -> ``{"sdp", "type":
  "answer", "viewer_id"}``; 503 beyond ``max_viewers``; ``DELETE .../viewers/{viewer_id}`` -> 204.
- ``POST /v1/sessions/{id}/speak`` (multipart ``audio``: any file the server reads) -> 202
  ``{"utterance", "frames", "seconds", "starts_after"}``; ``DELETE .../speak`` -> ``{"interrupted": n}``.

A server without aiortc answers 501 naming the pip command.
"""
from __future__ import annotations

import asyncio
import shutil

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

import audio
from lipsync.serve.auth import require_token
from lipsync.serve.live import LiveSession, SessionFull
from lipsync.serve.state import ApiError, ServerState, get_state
from lipsync.serve.uploads import Uploads
from lipsync.serve.webrtc import WebRTCUnavailable, answer, close_viewer, ice_servers, require_aiortc

router = APIRouter(prefix="/v1/sessions", dependencies=[Depends(require_token)])


def _session(state: ServerState, session_id: str) -> LiveSession:
    with state.lock:
        session = state.sessions.get(session_id)
    if not isinstance(session, LiveSession) or session.closed:
        raise ApiError(404, f"no live session {session_id!r} (ended, or never made by this server)")
    return session


async def _json(request: Request, *fields: str) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(422, f"the body must be JSON with {', '.join(repr(f) for f in fields)}") from None
    if not isinstance(body, dict) or not all(isinstance(body.get(f), str) for f in fields):
        raise ApiError(422, f"the body must be a JSON object with the strings {', '.join(repr(f) for f in fields)}")
    return body


@router.post("", status_code=201)
async def create_session(request: Request, state: ServerState = Depends(get_state)):
    """201 and the new session; 404 for an unknown avatar, 501 without aiortc, 503 when all session slots are taken."""
    try:
        require_aiortc()
    except WebRTCUnavailable as exc:
        raise ApiError(501, str(exc)) from None
    avatar_id = (await _json(request, "avatar_id"))["avatar_id"]
    sid = state.reserve("live")
    acquired = False
    try:
        avatar = await asyncio.to_thread(state.store.acquire, avatar_id)
        acquired = True

        def ended():
            state.store.release(avatar_id)
            state.release(sid)

        session = LiveSession(sid, avatar_id, avatar, state.generator.queue.generate_for(sid), state.config.stream,
                              state.config.live, state.idle, state.frame_sink, device=state.generator.device,
                              on_close=ended)
        await session.start()
    except BaseException:
        if acquired:
            state.store.release(avatar_id)
        state.release(sid)
        raise
    with state.lock:
        state.sessions[sid] = session
    body = {**session.describe(), "ice_servers": ice_servers(state.config.live)}
    return JSONResponse(body, status_code=201)


@router.get("/{session_id}")
async def get_session(session_id: str, state: ServerState = Depends(get_state)):
    """The session's state: viewers, speech queued and played, stalls; and the ``ice_servers`` a
    viewer's RTCPeerConnection needs (the web page's other tabs join a session by its id)."""
    return {**_session(state, session_id).describe(), "ice_servers": ice_servers(state.config.live)}


@router.delete("/{session_id}", status_code=204)
async def delete_session(session_id: str, state: ServerState = Depends(get_state)):
    """204: the session ended (its viewers disconnected, its slot free)."""
    await _session(state, session_id).close()
    return Response(status_code=204)


@router.post("/{session_id}/offer")
async def offer(session_id: str, request: Request, state: ServerState = Depends(get_state)):
    """The SDP answer for a viewer's offer; 422 for a malformed offer, 503 beyond ``max_viewers``."""
    session = _session(state, session_id)
    body = await _json(request, "sdp", "type")
    try:
        return await answer(session, body["sdp"], body["type"])
    except WebRTCUnavailable as exc:
        raise ApiError(501, str(exc)) from None
    except SessionFull as exc:
        raise ApiError(503, str(exc)) from None
    except ValueError as exc:
        raise ApiError(422, f"unusable SDP offer: {exc}") from None


@router.delete("/{session_id}/viewers/{viewer_id}", status_code=204)
async def delete_viewer(session_id: str, viewer_id: str, state: ServerState = Depends(get_state)):
    """204: that viewer's connection closed; 404 for a viewer the session does not have."""
    if not await close_viewer(_session(state, session_id), viewer_id):
        raise ApiError(404, f"session {session_id} has no viewer {viewer_id!r}")
    return Response(status_code=204)


@router.post("/{session_id}/speak", status_code=202)
async def speak(session_id: str, request: Request, state: ServerState = Depends(get_state),
                uploads: Uploads = Depends(Uploads)):
    """202: the speech is queued after what is already queued; 415 for a file without audio, 422 for
    audio too long or too short, 503 when the session has too much speech queued."""
    _session(state, session_id)
    form = await uploads.form(request)
    staging = state.store.staging_dir()
    try:
        path = await uploads.staged_audio(form, staging)
        samples = await asyncio.to_thread(audio.load_wav, path, audio.SAMPLE_RATE)
    finally:
        await form.close()
        shutil.rmtree(staging, ignore_errors=True)
    session = _session(state, session_id)   # it may have ended while the upload arrived
    try:
        return JSONResponse(await session.speak(samples, state.config.max_audio_seconds), status_code=202)
    except SessionFull as exc:
        raise ApiError(503, str(exc)) from None


@router.delete("/{session_id}/speak")
async def interrupt(session_id: str, state: ServerState = Depends(get_state)):
    """``{"interrupted": n}``: every queued utterance dropped; the face is idle and silent from the next frame."""
    return {"interrupted": _session(state, session_id).interrupt()}
