"""What the server runs on: its configuration (:class:`ServerConfig`, the ``serve.py`` flags) and
its state (:class:`ServerState`: the generator, the avatars, the sessions), which the
routes get through the :func:`get_state` dependency; :class:`ApiError`, an HTTP error response.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from starlette.requests import HTTPConnection

from lipsync.render.avatar import Avatar
from lipsync.render.generator import Generator
from lipsync.render.settings import DEFAULTS
from lipsync.serve.avatar_store import AvatarStore
from lipsync.serve.live import LiveOptions, LiveSession
from lipsync.serve.sessions import CLOSE_GOING_AWAY, StreamSession
from lipsync.serve.stream_output import FrameSink, IdleFrames, StreamOptions

SHUTDOWN_MESSAGE = "the server shut down before this request was finished; nothing was kept"


@dataclass
class ServerConfig:
    """What the server was started with (``serve.py`` flags of the same names)."""

    avatars_dir: str = "avatars"
    token: Optional[str] = None
    max_sessions: int = 8
    max_upload_mb: float = 200.0
    face_detector: str = DEFAULTS["face_detector"]
    s3fd_path: Optional[str] = None
    max_batch: int = 64
    batch_wait_ms: float = 10.0
    hold_mb: float = 1024.0
    max_frame_pixels: int = 3840 * 2160
    max_avatar_seconds: float = 300.0
    max_audio_seconds: float = 600.0
    upload_timeout: float = 600.0
    stream: StreamOptions = field(default_factory=StreamOptions)
    live: LiveOptions = field(default_factory=LiveOptions)


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
        self.sessions: Dict[str, Optional[Union[StreamSession, LiveSession]]] = {}  # None: a /v1/lipsync job
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
        close code 1001) and live sessions (their viewers disconnected), waiting up to ``grace``
        seconds for them to go."""
        with self.lock:
            self.closing = True
            running = [s for s in self.sessions.values() if s is not None]
        for s in running:
            if s.loop is not None:   # a stream's outbox is set with its loop, before either runs
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
            streams = sum(1 for s in self.sessions.values() if isinstance(s, StreamSession))
            live = [s for s in self.sessions.values() if isinstance(s, LiveSession)]
            jobs = len(self.sessions) - streams - len(live)
            viewers = sum(len(s.viewers) for s in live)
        return {"status": "shutting down" if self.closing else "ok", "model": g.describe(), "img_size": g.img_size,
                "device": str(g.device), "precision": g.precision,
                "sessions": {"streams": streams, "live": len(live), "viewers": viewers, "lipsync_jobs": jobs,
                             "max": self.config.max_sessions},
                "avatars": len(self.store.ids()), "batches": self.generator.queue.stats.as_dict(),
                "auth": self.config.token is not None}


def get_state(conn: HTTPConnection) -> ServerState:
    """Dependency: the :class:`ServerState` the app serves (``app.state.server``, set by ``create_app``)."""
    return conn.app.state.server
