"""The real-time lip-sync server: HTTP API + WebSocket streaming over one loaded generator.

``create_app(state)`` builds the FastAPI app; ``serve.py`` loads the generator, builds a
:class:`ServerState` and runs it under uvicorn. The contract (README "Server"):

- ``GET /healthz`` -> 200 JSON.
- ``POST /v1/avatars`` (multipart ``file``, optional ``box`` "top bottom left right", ``fps``) ->
  201 ``{"avatar_id", "frames", "fps", "width", "height", ...}``; ``GET /v1/avatars``,
  ``GET /v1/avatars/{id}``, ``DELETE /v1/avatars/{id}`` (204; 409 while a session uses it).
- ``POST /v1/lipsync`` (multipart ``avatar_id`` or ``face`` file, and ``audio`` file) -> video/mp4,
  what ``inference.py`` writes for that face and audio.
- WebSocket ``/v1/stream?avatar_id=ID``: see :mod:`lipsync.serve.sessions`.
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
import logging
import os
import secrets
import shutil
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.staticfiles import StaticFiles

from lipsync.render.avatar import NO_BOX, Avatar, AvatarSettings
from lipsync.serve.avatar_store import AvatarInUse, AvatarNotFound, AvatarStore
from lipsync.core.errors import Wav2LipError
from lipsync.render.generator import Generator
from lipsync.render.streaming import warm_up_mel
from lipsync.serve.sessions import CLOSE_GOING_AWAY, StreamSession
from lipsync.serve.stream_output import FrameSink, IdleFrames, StreamOptions

log = logging.getLogger(__name__)

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
UPLOAD_CHUNK = 1 << 20
SHUTDOWN_MESSAGE = "the server shut down before this request was finished; nothing was kept"


@dataclass
class ServerConfig:
    """What the server was started with (``serve.py`` flags of the same names)."""

    avatars_dir: str = "avatars"
    token: Optional[str] = None
    max_sessions: int = 8
    max_upload_mb: float = 200.0
    face_detector: str = "sfd"
    s3fd_path: Optional[str] = None
    max_batch: int = 64
    batch_wait_ms: float = 10.0
    hold_mb: float = 1024.0
    max_frame_pixels: int = 3840 * 2160
    max_avatar_seconds: float = 300.0
    max_audio_seconds: float = 600.0
    upload_timeout: float = 600.0
    stream: StreamOptions = field(default_factory=StreamOptions)


class ApiError(Exception):
    """An HTTP error response: ``status`` and the message for ``{"detail": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ServerState:
    """Everything the app serves from: the generator, the avatars, the sessions.

    ``frame_sink(session_id, index, frame)``: receives every streamed and /v1/lipsync frame before
    encoding (a test hook; /v1/lipsync frames come with the id ``"lipsync-<n>"``).
    """

    def __init__(self, generator: Generator, config: ServerConfig, frame_sink: Optional[FrameSink] = None):
        self.generator = generator
        self.config = config
        self.frame_sink = frame_sink
        self.store = AvatarStore(config.avatars_dir, generator.img_size, hold_mb=config.hold_mb,
                                 on_unload=self._forget_faces)
        self.sessions: Dict[str, Optional[StreamSession]] = {}  # None: a /v1/lipsync job
        self.lock = threading.Lock()
        self.idle = IdleFrames(config.stream.jpeg_quality)
        generator.queue.configure(max_batch=config.max_batch, max_wait=config.batch_wait_ms / 1000.0,
                                  busy=self._busy)
        # long work runs on its own threads, never on the event loop's default executor (which the
        # short calls of every request and stream need): avatars are prepared one at a time (face
        # detection competes with generation), /v1/lipsync jobs one thread per session slot
        self.prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="prepare")
        self.job_pool = ThreadPoolExecutor(config.max_sessions, thread_name_prefix="lipsync")
        self._root_pattern = re.compile(re.escape(os.path.abspath(self.store.root)) + r"[^'\"\s]*")
        self.prepares_waiting = 0
        self.closing = False

    # ---- sessions ---------------------------------------------------------------------------------
    def _busy(self) -> set:
        with self.lock:
            return {sid for sid, s in self.sessions.items() if s is not None and s.in_flight()}

    def reserve(self, kind: str) -> str:
        """A session slot (a stream or a /v1/lipsync job); ApiError 503 when all are taken."""
        with self.lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down")
            if len(self.sessions) >= self.config.max_sessions:
                raise ApiError(503, f"all {self.config.max_sessions} sessions are in use; try again later")
            sid = f"{kind}-{uuid.uuid4().hex[:12]}"
            self.sessions[sid] = None
            return sid

    def release(self, sid: str) -> None:
        with self.lock:
            self.sessions.pop(sid, None)

    async def prepare(self, fn):
        """Run ``fn`` (an avatar preparation) on the preparation thread, after those queued before it;
        ApiError 503 when ``max_sessions`` preparations already wait."""
        with self.lock:
            if self.closing:
                raise ApiError(503, "the server is shutting down")
            if self.prepares_waiting >= self.config.max_sessions:
                raise ApiError(503, f"{self.prepares_waiting} avatars are being prepared; try again later")
            self.prepares_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.prepare_pool, fn)
        finally:
            with self.lock:
                self.prepares_waiting -= 1

    def public(self, message: str) -> str:
        """``message`` without the server's own paths: a file under ``avatars_dir`` is named by what it
        is (the uploaded face or audio, an avatar's file)."""
        names = {"face": "the uploaded face", "audio": "the uploaded audio"}

        def name(m):
            return names.get(os.path.basename(m.group(0)), "an avatar's file")

        return self._root_pattern.sub(name, message)

    def _forget_faces(self, avatar: Avatar) -> None:
        bank = self.generator.bank
        if bank is not None:
            bank.forget(avatar.key)

    async def end_streams(self, grace: float = 5.0) -> None:
        """Refuse new sessions and end running streams with an error message (``{"type": "error"}``,
        close code 1001), waiting up to ``grace`` seconds for them to go."""
        with self.lock:
            self.closing = True
            running = [s for s in self.sessions.values() if s is not None]
        for s in running:
            if s.loop is not None and s.outbox is not None:
                with contextlib.suppress(RuntimeError):  # that session's loop is already closed
                    s.loop.call_soon_threadsafe(s.fail, "the server is shutting down", CLOSE_GOING_AWAY)
        waited = 0.0
        while waited < grace and any(s is not None for s in self.sessions.values()):
            await asyncio.sleep(0.05)
            waited += 0.05

    async def close(self, grace: float = 5.0, prepare_grace: float = 60.0) -> None:
        """Shutdown, after the HTTP server stopped: end streams, let an avatar being prepared finish
        (up to ``prepare_grace`` seconds), remove unfinished uploads and saves (the generator, and its
        forward queue, belong to whoever loaded it)."""
        await self.end_streams(grace)
        # queued preparations are cancelled; the one running may finish (saved whole) within the grace
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.to_thread(self.prepare_pool.shutdown, True, cancel_futures=True),
                                   prepare_grace)
        self.job_pool.shutdown(wait=False, cancel_futures=True)
        self.store.cleanup()

    def health(self) -> dict:
        g = self.generator
        with self.lock:
            streams = sum(1 for s in self.sessions.values() if s is not None)
            jobs = len(self.sessions) - streams
        return {"status": "shutting down" if self.closing else "ok", "model": g.describe(), "img_size": g.img_size,
                "device": str(g.device), "precision": g.precision,
                "sessions": {"streams": streams, "lipsync_jobs": jobs, "max": self.config.max_sessions},
                "avatars": len(self.store.ids()), "batches": self.generator.queue.stats.as_dict(),
                "auth": self.config.token is not None}


# ------------------------------------------------------------------------------------------------
# Token
# ------------------------------------------------------------------------------------------------
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


class TokenAuth:
    """ASGI middleware: with a token, every HTTP request and WebSocket handshake must carry it, else 401."""

    def __init__(self, app, token: Optional[str]):
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send):
        if self.token is None or scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = token_of(scope)
        if given is not None and secrets.compare_digest(given.encode(), self.token.encode()):
            return await self.app(scope, receive, send)
        message = ("this server needs a token: send 'Authorization: Bearer TOKEN' or add ?token=TOKEN"
                   if given is None else "wrong token")
        if scope["type"] == "websocket":
            return await deny(WebSocket(scope, receive, send), 401, message)
        response = JSONResponse({"detail": message}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


async def deny(ws, status: int, message: str) -> None:
    """Refuse a WebSocket handshake with an HTTP ``status`` and ``{"detail": message}`` (or, on a server
    without the denial-response extension, accept it, send ``{"type": "error"}`` and close)."""
    import json

    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    try:
        await ws.send_denial_response(JSONResponse({"detail": message}, status_code=status, headers=headers))
    except RuntimeError:
        await ws.accept()
        await ws.send_text(json.dumps({"type": "error", "message": message, "status": status}))
        await ws.close(1008)


# ------------------------------------------------------------------------------------------------
# Uploads
# ------------------------------------------------------------------------------------------------
class _TooLarge(Exception):
    pass


async def read_form(request, limit_bytes: int):
    """The multipart form of ``request``, refusing (ApiError 413) a body over ``limit_bytes``: by its
    Content-Length before reading anything, else as soon as the bytes received pass the limit.
    Uploaded files stay in Starlette's anonymous temporary files, so a refusal keeps nothing."""
    mb = limit_bytes / 2 ** 20
    too_large = ApiError(413, f"the upload is larger than this server's limit of {mb:g} MB (--max_upload_mb)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit_bytes:
        raise too_large
    received = 0

    async def receive():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit_bytes:
                raise _TooLarge()
        return message

    try:
        return await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except _TooLarge:
        raise too_large from None


# Containers an upload may be (ffmpeg demuxer names): self-contained media files. Playlists and
# manifests (hls, dash, concat) and the like name other files, which ffmpeg would then read from
# this server's disk, so they are refused whatever their name.
UPLOAD_FORMATS = frozenset({
    "mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "asf", "mpegts", "mpeg", "mpegvideo",
    "m4v", "h264", "hevc", "mjpeg", "gif", "nut", "mxf", "dv", "ogg", "wav", "w64", "mp3", "aac", "flac", "aiff",
    "caf", "amr", "ac3", "eac3", "wv", "au", "image2", "apng",
})


def upload_format_ok(format_name: str) -> bool:
    """Whether ffmpeg's demuxer names for a file (``MediaInfo.format``) are all in
    :data:`UPLOAD_FORMATS` or image pipes (``png_pipe``, ``jpeg_pipe``, ...)."""
    names = [n for n in format_name.split(",") if n]
    return bool(names) and all(n in UPLOAD_FORMATS or n.endswith("_pipe") for n in names)


def media_kinds(path: str) -> set:
    """What a file holds, judged by its content (not its name): {"image"} for a still photo, else
    the streams ffmpeg finds, a subset of {"video", "audio"} (empty: not media ffmpeg reads, or a
    container that is not a self-contained file: see :data:`UPLOAD_FORMATS`)."""
    from lipsync.media.ffmpeg import MediaError, image_signature
    from lipsync.media.probe import probe_media

    with open(path, "rb") as fh:
        if image_signature(fh.read(32)):
            return {"image"}
    try:
        info = probe_media(path)
    except (MediaError, OSError):
        return set()
    if not upload_format_ok(info.format):
        log.warning("refused an upload in the %r format (not a self-contained media file)", info.format)
        return set()
    return {kind for kind, stream in (("video", info.video), ("audio", info.audio)) if stream is not None}


def media_limits(path: str, config: ServerConfig, what: str) -> None:
    """Refuse (ApiError 422) an uploaded face whose frames have more than ``max_frame_pixels`` pixels
    or that lasts more than ``max_avatar_seconds`` (``what`` "face"), or audio longer than
    ``max_audio_seconds`` (``what`` "audio"): a small file can otherwise decode to gigabytes."""
    from lipsync.media.ffmpeg import MediaError
    from lipsync.media.probe import probe_media

    try:
        info = probe_media(path)
    except (MediaError, OSError):
        return  # not probed here: the engine reports what is wrong with it
    if what == "audio":
        stream = info.audio
        seconds = max(info.duration, stream.end or 0.0 if stream else 0.0)
        if seconds > config.max_audio_seconds:
            raise ApiError(422, f"the audio lasts {seconds:.1f} s; this server takes at most "
                                f"{config.max_audio_seconds:g} s (--max_audio_seconds)")
        return
    video = info.video
    if video is None:
        return
    if video.width * video.height > config.max_frame_pixels:
        raise ApiError(422, f"the face's frames are {video.width}x{video.height} pixels; this server takes at most "
                            f"{config.max_frame_pixels} pixels per frame (--max_frame_pixels): scale it down")
    seconds = max(info.duration, video.end or 0.0)
    if seconds > config.max_avatar_seconds:
        raise ApiError(422, f"the face video lasts {seconds:.1f} s on its timeline; this server takes at most "
                            f"{config.max_avatar_seconds:g} s (--max_avatar_seconds)")


async def save_upload(upload, folder: str, name: str) -> str:
    """Copy an uploaded file into ``folder/name`` (a name the server chose); returns the path."""
    path = os.path.join(folder, name)

    def copy():
        upload.file.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(upload.file, out, UPLOAD_CHUNK)

    await asyncio.to_thread(copy)
    return path


def parse_box(text: Optional[str]) -> Tuple[int, int, int, int]:
    """The ``box`` form field, "top bottom left right" pixels -> a tuple; ApiError 422 when malformed."""
    if text is None or not str(text).strip():
        return NO_BOX
    parts = str(text).replace(",", " ").split()
    try:
        box = tuple(int(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ApiError(422, f"box must be four integers 'top bottom left right' (pixels), got {str(text)[:60]!r}")
    return box  # type: ignore[return-value]


def parse_fps(text: Optional[str]) -> float:
    """The ``fps`` form field (frames/s of a photo avatar, default 25); ApiError 422 when not a
    positive number."""
    if text is None or not str(text).strip():
        return 25.0
    try:
        fps = float(text)
    except ValueError:
        fps = float("nan")
    if not 0 < fps <= 240:
        raise ApiError(422, f"fps must be a number of frames per second in (0, 240], got {str(text)[:60]!r}")
    return fps


def _field(form, name: str) -> Optional[str]:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(422, f"form field {name!r} must be text, not a file")
    return value


def _file(form, name: str):
    value = form.get(name)
    if value is None:
        return None
    if isinstance(value, str):
        raise ApiError(422, f"form field {name!r} must be a file upload")
    return value


# ------------------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------------------
def create_app(state: ServerState):
    """The FastAPI app serving ``state`` (closed with the app's lifespan)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.store.cleanup()
        await asyncio.to_thread(warm_up_mel)
        yield
        await state.close()

    app = FastAPI(title="wav2lip server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(TokenAuth, token=state.config.token)
    _error_responses(app, state)
    uploads = _Uploads(state)
    _page_routes(app, state)
    _avatar_routes(app, state, uploads)
    _lipsync_route(app, state, uploads)
    _stream_route(app, state)
    return app


def _error_responses(app, state: ServerState) -> None:
    """Project errors as JSON responses: ApiError its status, a missing avatar 404, one in use 409,
    any other input error 422."""

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(AvatarNotFound)
    async def not_found(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AvatarInUse)
    async def in_use(request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(Wav2LipError)
    async def unusable(request, exc):
        return JSONResponse({"detail": state.public(str(exc))}, status_code=422)


class _Uploads:
    """What the upload routes share: the size limit, staging a face upload (judged by content), and
    the avatar settings inference.py would use."""

    def __init__(self, state: ServerState):
        self.state = state
        self.config = state.config

    def settings_for(self, face: str, box: Tuple[int, ...], fps: float) -> AvatarSettings:
        """The avatar settings inference.py uses for these flags (same defaults)."""
        from lipsync.render.inference import InferenceConfig

        return InferenceConfig(checkpoint_path=self.state.generator.checkpoint_path, face=face, audio="", box=box,
                               fps=fps, face_detector=self.config.face_detector,
                               s3fd_path=self.config.s3fd_path).avatar_settings()

    def limit_bytes(self) -> int:
        return int(self.config.max_upload_mb * 2 ** 20)

    async def staged_face(self, form, staging: str) -> Tuple[str, str]:
        upload = _file(form, "face") if "face" in form else _file(form, "file")
        if upload is None:
            raise ApiError(422, "missing the face: a multipart file field 'file' (a video or photo)")
        path = await save_upload(upload, staging, "face")
        kinds = await asyncio.to_thread(media_kinds, path)
        if not kinds & {"image", "video"}:
            raise ApiError(415, f"the uploaded face {upload.filename!r} is not a video or photo this server can read "
                                f"(judged by its content{'; it is audio' if kinds else ''})")
        await asyncio.to_thread(media_limits, path, self.config, "face")
        return path, "image" if "image" in kinds else "video"

    async def staged_audio(self, form, staging: str) -> str:
        upload = _file(form, "audio")
        if upload is None:
            raise ApiError(422, "missing the speech: a multipart file field 'audio'")
        path = await save_upload(upload, staging, "audio")
        if "audio" not in await asyncio.to_thread(media_kinds, path):
            raise ApiError(415, f"the uploaded audio {upload.filename!r} is not audio this server can "
                                "read (judged by its content: no audio stream)")
        await asyncio.to_thread(media_limits, path, self.config, "audio")
        return path

    async def form(self, request):
        """The request's multipart form (see :func:`read_form`); ApiError 408 when the body has not
        arrived within ``upload_timeout`` seconds."""
        try:
            return await asyncio.wait_for(read_form(request, self.limit_bytes()), self.config.upload_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the upload did not arrive within {self.config.upload_timeout:g} s "
                                "(--upload_timeout)") from None


def _page_routes(app, state: ServerState) -> None:
    """/healthz, the web page at / and its files under /web."""

    @app.get("/healthz")
    async def healthz():
        return state.health()

    @app.get("/")
    async def page():
        index = os.path.join(WEB_DIR, "index.html")
        if not os.path.isfile(index):
            raise ApiError(404, "the web page is not installed (lipsync/serve/web/index.html)")
        return FileResponse(index, media_type="text/html")

    if os.path.isdir(WEB_DIR):
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


def _avatar_routes(app, state: ServerState, uploads: _Uploads) -> None:
    """GET, POST and DELETE of /v1/avatars."""

    @app.get("/v1/avatars")
    async def list_avatars():
        return {"avatars": await asyncio.to_thread(state.store.list)}

    @app.get("/v1/avatars/{avatar_id}")
    async def get_avatar(avatar_id: str):
        return await asyncio.to_thread(state.store.info, avatar_id)

    @app.delete("/v1/avatars/{avatar_id}", status_code=204)
    async def delete_avatar(avatar_id: str):
        await asyncio.to_thread(state.store.delete, avatar_id)
        return Response(status_code=204)

    @app.post("/v1/avatars", status_code=201)
    async def create_avatar(request: Request):
        abandoned = threading.Event()
        try:
            form = await uploads.form(request)
            staging = state.store.staging_dir()
            try:
                box, fps = parse_box(_field(form, "box")), parse_fps(_field(form, "fps"))
                path, kind = await uploads.staged_face(form, staging)
                settings = uploads.settings_for(path, box, fps)

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


def _lipsync_route(app, state: ServerState, uploads: _Uploads) -> None:
    """POST /v1/lipsync: a face (avatar id or file) and an audio file in, the mp4 inference.py writes out."""

    @app.post("/v1/lipsync")
    async def lipsync(request: Request):
        from lipsync.render.inference import InferenceConfig, run_inference

        config = state.config
        form = await uploads.form(request)  # read before taking a session slot: a slow upload holds none
        staging = state.store.staging_dir()
        sid = pinned = None
        try:
            try:
                avatar_id = _field(form, "avatar_id")
                has_face = "face" in form or "file" in form
                if (avatar_id is None) == (not has_face):
                    raise ApiError(422, "give the face as 'avatar_id' (a prepared avatar) or a 'face' file, one of them")
                face = None if avatar_id is not None else (await uploads.staged_face(form, staging))[0]
                box, fps = parse_box(_field(form, "box")), parse_fps(_field(form, "fps"))
                audio_path = await uploads.staged_audio(form, staging)
            finally:
                await form.close()
            sid = state.reserve("lipsync")
            folder = None
            if avatar_id is not None:
                folder = state.store.pin(avatar_id)  # in use: DELETE gets 409 until the job ends
                pinned = avatar_id
            outfile = os.path.join(staging, "lipsync.mp4")
            cfg = InferenceConfig(checkpoint_path=state.generator.checkpoint_path, face=face, avatar=folder,
                                  audio=audio_path, outfile=outfile, box=box if face else NO_BOX, fps=fps,
                                  face_detector=config.face_detector, s3fd_path=config.s3fd_path, det_cache_dir="",
                                  progress=False)
            sink = None
            if state.frame_sink is not None:
                sink = lambda i, frame: state.frame_sink(sid, i, frame)  # noqa: E731
            await asyncio.get_running_loop().run_in_executor(state.job_pool, run_inference, cfg, sink, state.generator)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, asyncio.CancelledError):  # see create_avatar
                raise ApiError(503, SHUTDOWN_MESSAGE) from None
            raise
        finally:
            if pinned is not None:
                state.store.release(pinned)
            if sid is not None:
                state.release(sid)
        return FileResponse(outfile, media_type="video/mp4", filename="lipsync.mp4",
                            background=BackgroundTask(shutil.rmtree, staging, True))


def _stream_route(app, state: ServerState) -> None:
    """The WebSocket /v1/stream?avatar_id=ID (the protocol is in the module docstring)."""

    @app.websocket("/v1/stream")
    async def stream(ws: WebSocket):
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


__all__ = ["ApiError", "ServerConfig", "ServerState", "TokenAuth", "create_app", "media_kinds", "parse_box",
           "parse_fps", "read_form", "token_of"]
