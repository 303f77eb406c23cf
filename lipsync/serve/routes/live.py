"""``/v1/sessions``: live sessions (:mod:`lipsync.serve.live`) watched over WebRTC
(:mod:`lipsync.serve.webrtc`), with speech queued from the server side.

- ``POST /v1/sessions`` (JSON ``{"avatar_id"}``) -> 201 ``{"session_id", "avatar_id", "fps",
  "ice_servers", ...}``; holds a session slot (503 beyond ``max_sessions``) until it ends.
- ``GET /v1/sessions/{id}`` -> the session's state (and ``ice_servers``); ``DELETE /v1/sessions/{id}`` -> 204, ended.
- ``POST /v1/sessions/{id}/offer`` (JSON ``{"sdp", "type": "offer"}``) -> ``{"sdp", "type":
  "answer", "viewer_id"}``; 503 beyond ``max_viewers``; ``DELETE .../viewers/{viewer_id}`` -> 204.
- ``POST /v1/sessions/{id}/speak`` (multipart ``audio``: any file the server reads) -> 202
  ``{"utterance", "frames", "seconds", "starts_after"}``; or a body of raw PCM
  (``Content-Type: audio/L16;rate=16000;channels=1;endianness=little-endian``, see
  :mod:`lipsync.serve.pcm`), spoken as it arrives, -> 202 ``{"utterances", "frames", "seconds"}``
  once the body ends; ``DELETE .../speak`` -> ``{"interrupted": n}``.
- WebSocket ``/v1/sessions/{id}/speak``: the streaming protocol's audio messages (binary 16 kHz
  mono 16-bit little-endian PCM, then ``{"type": "end"}``) spoken as they arrive; the server
  answers ``{"type": "end", "utterances", "frames", "seconds"}`` and closes (see :func:`speak_socket`).
- An offer whose audio the browser sends (a sendrecv audio transceiver with the microphone's
  track) makes that microphone the session's speech (:func:`lipsync.serve.webrtc.answer`).

A server without aiortc answers 501 naming the pip command.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

import audio
from lipsync.serve.auth import deny, require_token
from lipsync.serve.live import LiveSession, SessionFull
from lipsync.serve.speech import SessionBusy, SpeechEnded, SpeechStream
from lipsync.serve.pcm import PcmDecoder, PcmFormatError, is_l16, parse_l16
from lipsync.serve.sessions import (CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED,
                                    MAX_TEXT_BYTES)
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
    except SessionBusy as exc:
        raise ApiError(409, str(exc)) from None
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
    audio too long or too short, 503 when the session has too much speech queued. A raw PCM body
    (``audio/L16``) is spoken as it arrives: see :func:`speak_stream`."""
    _session(state, session_id)
    content_type = request.headers.get("content-type")
    if is_l16(content_type):
        return await speak_stream(_session(state, session_id), request, content_type, state)
    if (content_type or "").lower().startswith("audio/"):
        raise ApiError(415, f"a {content_type.split(';')[0]} body: send raw PCM as audio/L16 (e.g. Content-Type: "
                            "audio/L16;rate=16000;channels=1;endianness=little-endian), any other audio as the "
                            "multipart file 'audio'")
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


async def speak_stream(session: LiveSession, request: Request, content_type: str, state: ServerState):
    """Speak a raw PCM body as it arrives; 202 ``{"utterances": [ids], "frames", "seconds"}`` once it
    has ended (frames of its utterances, seconds of audio received).

    Each chunk's samples go to the session's :class:`lipsync.serve.speech.SpeechStream` at once, so the
    first frames render and play while the rest of the body is on its way. The body is read only
    while less than ``max_ahead`` frames of speech wait to be played (a client sending faster than
    real time is held back by TCP). Errors: 415 for a bad ``audio/L16`` Content-Type (nothing
    queued), 409 when the session already takes a speech stream, 408 when no byte arrived for
    ``idle_timeout`` seconds, 422 for a body that is not whole samples (what came before was spoken)
    or too short for one frame (0.1875 s), 404 when the session ended meanwhile.
    """
    try:
        decoder = PcmDecoder(parse_l16(content_type))
    except PcmFormatError as exc:
        raise ApiError(415, str(exc)) from None
    try:
        stream = session.open_stream()
    except SessionBusy as exc:
        raise ApiError(409, str(exc)) from None
    timeout = state.config.stream.idle_timeout
    chunks = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), timeout)
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(408, f"no audio arrived for {timeout:g} s (--idle_timeout): the speech stream "
                                    "ended") from None
            stream.push(decoder.decode(chunk))
            await _room(session, stream)
        tail, leftover = decoder.flush()
        stream.push(tail)
    except SpeechEnded:
        raise ApiError(404, f"live session {session.sid} ended while its speech arrived") from None
    except ClientDisconnect:      # the sender went away: what arrived plays out; nobody reads an answer
        stream.finish()
        return Response(status_code=204)
    finally:
        result = stream.finish()
    if leftover:
        raise ApiError(422, f"the body ended with {leftover} byte(s) that are not a whole sample ({decoder.fmt.frame_bytes} "
                            f"bytes: 16 bits x {decoder.fmt.channels} channel(s)); the {result['seconds']:g} s before "
                            "them were spoken")
    if not result["frames"]:
        raise ApiError(422, _too_short(result))
    return JSONResponse(result, status_code=202)


def _too_short(result: dict) -> str:
    """The refusal of a speech stream (:meth:`SpeechStream.finish`'s ``result``) that made no frame."""
    return f"the audio is too short: {result['seconds']:g} s; a frame needs at least 0.1875 s"


async def _room(session: LiveSession, stream: SpeechStream) -> None:
    """Wait while more than ``max_ahead`` frames of speech wait to be played (not reading meanwhile:
    the sender is held back by TCP)."""
    ahead = session.options.max_ahead / session.fps
    while session.queued_seconds() > ahead and not session.closed and not stream.closed:
        await asyncio.sleep(1.0 / session.fps)


@router.websocket("/{session_id}/speak")
async def speak_socket(ws: WebSocket, session_id: str, state: ServerState = Depends(get_state)):
    """The WebSocket streaming protocol's audio spoken into a live session as it arrives.

    The client sends binary messages of 16 kHz mono signed 16-bit little-endian PCM (10-500 ms each
    recommended, at most ``max_message_bytes``), then ``{"type": "end"}``; the server answers
    ``{"type": "end", "utterances": [ids], "frames", "seconds"}`` and closes with 1000. The frames
    go to the session's WebRTC viewers, not to this socket. Refused before it opens: 404 for an
    unknown session, 409 when the session already takes a speech stream. Afterwards a problem is
    ``{"type": "error", "message"}`` and a close: 1003 for an odd byte count or an unknown text
    message, 1009 for a message too large, 1008 after ``idle_timeout`` seconds without a message,
    1001 when the session ends meanwhile. A client that disconnects ends the stream; what it sent
    plays out."""
    with state.lock:
        session = state.sessions.get(session_id)
    if not isinstance(session, LiveSession) or session.closed:
        return await deny(ws, 404, f"no live session {session_id!r} (ended, or never made by this server)")
    try:
        stream = session.open_stream()
    except SessionBusy as exc:
        return await deny(ws, 409, str(exc))
    limit = state.config.stream.max_message_bytes
    timeout = state.config.stream.idle_timeout
    try:
        await ws.accept()
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), timeout)
            except asyncio.TimeoutError:
                return await _refuse(ws, f"no message for {timeout:g} s (--idle_timeout)", CLOSE_POLICY)
            if msg["type"] == "websocket.disconnect":
                return
            data, text = msg.get("bytes"), msg.get("text")
            if data is not None:
                if len(data) > limit:
                    return await _refuse(ws, f"audio message of {len(data)} bytes is too large: at most {limit} bytes",
                                         CLOSE_TOO_BIG)
                if len(data) % 2:
                    return await _refuse(ws, f"PCM audio must be whole 16-bit samples: got {len(data)} bytes (an odd "
                                             "number)", CLOSE_UNSUPPORTED)
                stream.push(np.frombuffer(data, dtype="<i2").astype(np.int16))          # (n,) 16 kHz
                await _room(session, stream)
            elif text is not None:
                try:
                    end = len(text) <= MAX_TEXT_BYTES and json.loads(text) == {"type": "end"}
                except (ValueError, RecursionError):
                    end = False
                if not end:
                    return await _refuse(ws, f'unknown message {text[:60]!r}: the only text message is '
                                             '{"type": "end"}; audio goes in binary messages', CLOSE_UNSUPPORTED)
                result = stream.finish()
                if not result["frames"]:  # as a PCM body (422) and the /v1/stream socket
                    return await _refuse(ws, _too_short(result), CLOSE_UNSUPPORTED)
                await ws.send_text(json.dumps({"type": "end", **result}))
                return await ws.close(CLOSE_NORMAL)
    except SpeechEnded:
        return await _refuse(ws, f"live session {session_id} ended", CLOSE_GOING_AWAY)
    finally:
        stream.finish()


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    await ws.send_text(json.dumps({"type": "error", "message": message}))
    await ws.close(code)


@router.delete("/{session_id}/speak")
async def interrupt(session_id: str, state: ServerState = Depends(get_state)):
    """``{"interrupted": n}``: every queued utterance dropped; the face is idle and silent from the next frame."""
    return {"interrupted": _session(state, session_id).interrupt()}
